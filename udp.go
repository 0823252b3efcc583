package connlimit

import (
	"errors"
	"net"
	"os"
	"sync"
	"time"

	"github.com/mholt/caddy-l4/layer4"

	"github.com/l4-connlimit/connlimit/internal/engine"
)

// Everything UDP: a flow of caddy-l4 waits by reading its packets into a
// small buffer, so that caddy-l4's packet loop, shared by every client of
// the listener, never blocks on it; the held packets are replayed to the
// next handler, one per Read. A rejected flow is drained rather than
// closed, and the flows of a handler are tracked so that a config reload
// cannot strand their slots.

// Bounds of the packets kept for a waiting UDP flow; later ones are
// dropped, as a full socket buffer would.
const (
	maxHeldPackets = 32
	maxHeldBytes   = 256 << 10
	udpReadBuffer  = 9000 // caddy-l4's own datagram buffer size
)

// isPacketFlow tells caddy-l4's UDP flows from streams: no socket of
// their own under any wrapper, and a local address on a UDP listener. (The
// remote address does not tell: behind a PROXY v2 header naming UDP
// addresses, a TCP stream has a UDP remote address.)
func isPacketFlow(conn net.Conn) bool {
	if _, ok := underlyingSocket(conn); ok {
		return false
	}
	_, udp := conn.LocalAddr().(*net.UDPAddr)
	return udp
}

// flowWait is a UDP flow's arrival. It is never pooled: its handler's
// udpFlows may refer to it until the flow is done.
type flowWait struct {
	engine.Waiter
	conn      net.Conn // the flow; woken through its read deadline
	flows     *udpFlows
	held      [][]byte // packets read while waiting
	heldBytes int
	lost      int
	abandoned bool // it left while it waited: caddy-l4 ends it
}

func (f *flowWait) waiter() *engine.Waiter { return &f.Waiter }
func (f *flowWait) dropped() int           { return f.lost }
func (f *flowWait) done()                  { f.flows.remove(f) }

// end leaves an abandoned flow to caddy-l4, which closes it (a close here
// could end a newer flow of the same client), and drains any other.
func (f *flowWait) end(cx *layer4.Connection) error {
	if !f.abandoned {
		drainFlow(cx)
	}
	return nil
}

// Wake implements engine.Waker.
func (f *flowWait) Wake() { _ = f.conn.SetReadDeadline(aLongTimeAgo) }

// Arm implements engine.Waker. caddy-l4's UDP flows keep read deadlines in whole
// seconds (rounded down): round up, so that they never fire early.
func (f *flowWait) Arm(deadline time.Time) {
	if !deadline.IsZero() {
		deadline = deadline.Truncate(time.Second).Add(time.Second)
	}
	_ = f.conn.SetReadDeadline(deadline)
}

// admit asks for a slot, the flow tracked (udpFlows.acquire); a flow
// that arrives after its handler was cleaned up counts as abandoned.
func (f *flowWait) admit(z *engine.Zone) (engine.Outcome, engine.Reason) {
	out, r, ok := f.flows.acquire(z, f)
	switch {
	case !ok:
		return engine.Abandoned, engine.ReasonNone
	case out == engine.Queued:
		out, r = f.wait(z)
		f.abandoned = out == engine.Abandoned
		_ = f.conn.SetReadDeadline(time.Time{}) // for the next handler
	}
	return out, r
}

// wait reads and holds the flow's packets until it is admitted, rejected
// (timed out) or abandoned (the flow went idle or closed).
func (f *flowWait) wait(z *engine.Zone) (engine.Outcome, engine.Reason) {
	buf := make([]byte, udpReadBuffer)
	for {
		n, err := f.conn.Read(buf)
		if n > 0 {
			f.hold(buf[:n])
		}
		switch {
		case err == nil:
			continue
		case errors.Is(err, os.ErrDeadlineExceeded):
			if out, r, _ := z.Poll(&f.Waiter, time.Now()); out != engine.Queued {
				return out, r
			}
		default:
			// caddy-l4's idle_timeout, or closed.
			if z.Abandon(&f.Waiter) {
				return engine.Abandoned, engine.ReasonNone
			}
			out, r, _ := z.Poll(&f.Waiter, time.Now())
			return out, r
		}
	}
}

func (f *flowWait) hold(p []byte) {
	if len(f.held) >= maxHeldPackets || f.heldBytes+len(p) > maxHeldBytes {
		f.lost++
		return
	}
	f.held = append(f.held, append([]byte(nil), p...))
	f.heldBytes += len(p)
}

// handOn returns the connection to hand on after the wait: cx itself,
// or, when packets were held, a copy of cx (cx.Wrap) that reads, one
// datagram per Read, the datagrams cx had already buffered (read by
// matchers before this handler), then the held ones, then the flow.
//
// A copy, and not cx with its Conn replaced: caddy-l4 treats the
// connection of a UDP flow as one over its own packet type, and a matcher
// after this handler would panic on anything else under it. The copy is
// an ordinary connection to caddy-l4; reading cx's buffered datagrams here
// keeps their boundaries, which the copy would not know.
func (f *flowWait) handOn(cx *layer4.Connection) *layer4.Connection {
	if len(f.held) == 0 {
		return cx
	}
	var frames [][]byte
	for left := len(cx.MatchingBytes()); left > 0; {
		buf := make([]byte, udpReadBuffer)
		n, err := cx.Read(buf)
		if n <= 0 || err != nil {
			break // a datagram the matchers read only in part: below
		}
		frames = append(frames, buf[:n:n])
		left -= n
	}
	rc := &replayConn{Conn: cx.Conn}
	cp := cx.Wrap(rc)
	// Bytes cx could not hand out as whole datagrams (the copy has them
	// too, and would serve them first) go after the whole ones.
	if rest := len(cp.MatchingBytes()); rest > 0 {
		buf := make([]byte, rest)
		n, _ := cp.Read(buf) // from its buffer, all at once: never the flow
		frames = append(frames, buf[:n])
	}
	rc.held = append(frames, f.held...)
	f.held = nil
	return cp
}

// replayConn hands the packets held while waiting to the next handler,
// one per Read, before reading on from the flow.
type replayConn struct {
	net.Conn
	held [][]byte
}

func (rc *replayConn) Read(p []byte) (int, error) {
	if len(rc.held) > 0 {
		n := copy(p, rc.held[0])
		if n < len(rc.held[0]) { // the rest on the next Read, as caddy-l4's own flows do
			rc.held[0] = rc.held[0][n:]
			return n, nil
		}
		rc.held[0] = nil
		rc.held = rc.held[1:]
		return n, nil
	}
	return rc.Conn.Read(p)
}

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
	flows  map[*flowWait]struct{}
	closed bool
}

// arrive returns the arrival of a new flow of this handler.
func (u *udpFlows) arrive(conn net.Conn) *flowWait {
	return &flowWait{conn: conn, flows: u}
}

// acquire asks z for a slot for f (Zone.Acquire) and tracks f from before
// that moment, so that close never misses a flow that is being admitted.
// The lock is not held while the zone decides (a fleet zone asks its
// store): a close that comes meanwhile is seen after, and this flow gives
// back what it got. ok is false, and nothing is held, once the handler
// was cleaned up.
func (u *udpFlows) acquire(z *engine.Zone, f *flowWait) (out engine.Outcome, r engine.Reason, ok bool) {
	u.mu.Lock()
	if u.closed {
		u.mu.Unlock()
		return engine.Rejected, engine.ReasonNone, false
	}
	if u.flows == nil {
		u.flows = make(map[*flowWait]struct{})
	}
	u.flows[f] = struct{}{}
	u.mu.Unlock()
	out, r = z.Acquire(&f.Waiter, f, time.Now())
	u.mu.Lock()
	closed := u.closed
	u.mu.Unlock()
	if closed { // close may have looked at f before it held anything
		if !z.Abandon(&f.Waiter) {
			z.Free(&f.Waiter)
		}
		return engine.Rejected, engine.ReasonNone, false
	}
	return out, r, true
}

// remove stops tracking f.
func (u *udpFlows) remove(f *flowWait) {
	u.mu.Lock()
	delete(u.flows, f)
	u.mu.Unlock()
}

// close frees the slots of the flows still tracked, abandons those still
// waiting, and returns how many there were. A flow that ends later finds
// its slot freed already: Free and Abandon change nothing twice.
func (u *udpFlows) close(z *engine.Zone) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.closed = true
	n := len(u.flows)
	// Waiting flows first: a slot freed before would go to one of them,
	// which could claim it before it is abandoned.
	for f := range u.flows {
		z.Abandon(&f.Waiter)
	}
	for f := range u.flows {
		z.Free(&f.Waiter)
	}
	clear(u.flows)
	return n
}

// drainQuiet is how long a rejected UDP flow must stay silent before it is
// let go: the client's next packets then start a new flow, which may find
// room. (caddy-l4 keeps UDP deadlines in whole seconds.)
const drainQuiet = 2 * time.Second

// drainFlow reads and drops a UDP flow's packets until it has been silent
// for drainQuiet, or ends. Closing it at once would leave its packets
// unread, and caddy-l4's packet loop, shared by every flow of the
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

// Interface guards
var (
	_ arrival      = (*flowWait)(nil)
	_ engine.Waker = (*flowWait)(nil)
)
