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

// add tracks cw; false once the handler was cleaned up.
func (f *udpFlows) add(cw *connWait) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return false
	}
	if f.flows == nil {
		f.flows = make(map[*connWait]struct{})
	}
	f.flows[cw] = struct{}{}
	return true
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

// drainFlow reads and drops a refused UDP flow's packets until the flow
// ends (caddy-l4's idle_timeout). Closing it instead would leave its
// packets unread, and caddy-l4's packet loop, shared by every flow of the
// listener, blocks once one flow has five unread.
func drainFlow(conn net.Conn) {
	buf := make([]byte, udpReadBuffer)
	for {
		if _, err := conn.Read(buf); err != nil {
			if !isTimeout(err) {
				return
			}
			_ = conn.SetReadDeadline(time.Time{})
		}
	}
}
