package connlimit

import (
	"net"
	"sync"
	"time"
)

// udpFlows are the UDP flows one handler is serving or keeping waiting.
//
// On a config reload caddy-l4 stops the old server's packet loop: the
// client's next packets start a new flow under the new config, and the
// old flows only wait out their idle timeout. caddy-l4 v0.1.2 then has
// them report their end on a channel that nobody reads any more, and from
// the sixth flow or so on they block there for good: their handlers never
// return. The slots they hold (in a zone, which outlives the config) would
// be lost for every later config. So when the handler is cleaned up (after
// its config stopped), the slots of its flows are freed and its waiting
// flows are abandoned. TCP connections are not tracked: they keep being
// served by the old config, and hold their slots until they end.
type udpFlows struct {
	mu     sync.Mutex
	flows  map[*connWait]struct{}
	closed bool
}

// acquire asks z for a slot for cw (Zone.Acquire) and tracks cw from
// that moment, under the lock that close takes, so that close never misses
// a flow that is just being admitted. ok is false, and nothing is asked,
// once the handler was cleaned up.
func (f *udpFlows) acquire(z *Zone, cw *connWait) (out Outcome, r Reason, ok bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return Rejected, ReasonNone, false
	}
	if f.flows == nil {
		f.flows = make(map[*connWait]struct{})
	}
	f.flows[cw] = struct{}{}
	out, r = z.Acquire(&cw.Waiter, cw, time.Now())
	return out, r, true
}

// remove stops tracking cw. A tracked connWait is never put back in the
// pool (putConnWait skips packet flows), so Cleanup never touches a
// connWait that another connection reuses.
func (f *udpFlows) remove(cw *connWait) {
	f.mu.Lock()
	delete(f.flows, cw)
	f.mu.Unlock()
}

// close frees the slots of the flows still tracked, abandons those still
// waiting, and returns how many there were. A flow that ends later finds
// its slot freed already: Release and Abandon change nothing twice.
func (f *udpFlows) close(z *Zone) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	n := len(f.flows)
	for cw := range f.flows {
		if !z.Abandon(&cw.Waiter) {
			z.Release(&cw.Waiter)
		}
	}
	clear(f.flows)
	return n
}

// drainQuiet is how long a refused UDP flow must stay silent before it is
// let go: the client's next packets then start a new flow, which may find
// room. (caddy-l4 keeps UDP deadlines in whole seconds.)
const drainQuiet = 2 * time.Second

// drainFlow reads and drops a refused UDP flow's packets until it has
// been silent for drainQuiet, or ends. Closing it at once would leave its
// packets unread, and caddy-l4's packet loop, shared by every flow of the
// listener, blocks once one flow has five unread. (Once the flow is let
// go, packets that come before caddy-l4 has taken note can still fill it:
// caddy-l4 runs the same risk whenever a flow reaches its idle_timeout.)
func drainFlow(conn net.Conn) {
	buf := make([]byte, udpReadBuffer)
	for {
		_ = conn.SetReadDeadline(time.Now().Add(drainQuiet))
		if _, err := conn.Read(buf); err != nil {
			return
		}
	}
}
