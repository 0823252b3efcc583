package connlimit

import (
	"errors"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/mholt/caddy-l4/layer4"
)

// How a waiting connection sleeps. None of them adds a goroutine: the
// connection's own goroutine (the one caddy-l4 runs for it) does the
// waiting, and a zone wakes it through the Waker methods of connWait.
type waitMode uint8

const (
	// modeSocket: a stream with a socket underneath (on Linux). The
	// goroutine parks in Go's network poller watching the socket without
	// reading (watchSocket); the zone wakes it by moving the socket's read
	// deadline into the past, and a wait_timeout is the read deadline
	// itself. A client that closes or resets is noticed at once.
	modeSocket waitMode = iota
	// modePacket: a UDP flow of caddy-l4. Its packets are read into a
	// small buffer while it waits, so that caddy-l4's packet loop, shared
	// by every client of the listener, never blocks on it; they are
	// replayed to the next handler. Woken through read deadlines too.
	modePacket
	// modeChannel: anything else (no socket underneath, or a platform
	// without socket watching). It waits on a channel and a timer; a
	// client that left is noticed by the next handler.
	modeChannel
)

// Bounds of the packets kept for a waiting UDP flow; later ones are
// dropped, as a full socket buffer would.
const (
	maxHeldPackets = 32
	maxHeldBytes   = 256 << 10
	udpReadBuffer  = 9000 // caddy-l4's own datagram buffer size
)

// aLongTimeAgo is a read deadline that has passed: setting it wakes a
// goroutine blocked reading (or watching) the connection.
var aLongTimeAgo = time.Unix(1, 0)

// connWait is one connection's Waiter and the Waker that wakes it.
type connWait struct {
	Waiter
	mode           waitMode
	target         net.Conn        // deadlines are set here
	raw            syscall.RawConn // modeSocket only
	sig            Signal          // modeChannel only
	keepHalfClosed bool
	sentBefore     bool // client bytes were read from the socket before us

	held      [][]byte // modePacket: packets read while waiting
	heldBytes int
	dropped   int
}

var connWaitPool = sync.Pool{New: func() any { return new(connWait) }}

func getConnWait() *connWait { return connWaitPool.Get().(*connWait) }

func putConnWait(c *connWait) {
	if c.mode == modePacket {
		return // its handler's udpFlows may still refer to it (flows.go)
	}
	sig := c.sig
	*c = connWait{sig: sig}
	connWaitPool.Put(c)
}

// prepare picks how c waits for conn, the connection as the handler sees
// it (possibly wrapped by TLS or PROXY protocol handlers before it).
// sentBefore tells that bytes of the client were already read from the
// socket before this handler (by caddy-l4's matchers, kept for replay).
func (c *connWait) prepare(conn net.Conn, keepHalfClosed, sentBefore bool) {
	c.keepHalfClosed = keepHalfClosed
	c.sentBefore = sentBefore
	c.target = conn
	if isPacketFlow(conn) {
		c.mode = modePacket
		return
	}
	if canWatch {
		// A wrapper may hold bytes it already read from the socket (the
		// request behind a PROXY header, say): the socket then shows a
		// half-close after them as a bare FIN, which means abandonment.
		// So with keep_half_closed, a wrapped waiter waits on a channel.
		// releaseOnCloseWrite (limits before this one) holds no bytes.
		inner := conn
		for r, ok := inner.(*releaseOnCloseWrite); ok; r, ok = inner.(*releaseOnCloseWrite) {
			inner = r.Conn
		}
		_, bare := inner.(syscall.Conn)
		if sc, ok := underlyingSocket(conn); ok && (bare || !keepHalfClosed) {
			if raw, err := sc.(syscall.Conn).SyscallConn(); err == nil {
				c.mode, c.target, c.raw = modeSocket, sc, raw
				return
			}
		}
	}
	c.mode = modeChannel
	if c.sig == nil {
		c.sig = NewSignal()
	}
}

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

// underlyingSocket unwraps TLS (NetConn) and PROXY protocol (Raw) wrappers
// down to a connection with a socket. Those wrap the *layer4.Connection
// they were handed, which holds the socket in its Conn field.
func underlyingSocket(conn net.Conn) (net.Conn, bool) {
	for range 8 {
		switch c := conn.(type) {
		case syscall.Conn:
			return conn, true
		case *layer4.Connection:
			conn = c.Conn
		case interface{ NetConn() net.Conn }:
			conn = c.NetConn()
		case interface{ Raw() net.Conn }:
			conn = c.Raw()
		default:
			return nil, false
		}
	}
	return nil, false
}

// Wake implements Waker.
func (c *connWait) Wake() {
	if c.mode == modeChannel {
		c.sig.Wake()
		return
	}
	_ = c.target.SetReadDeadline(aLongTimeAgo)
}

// Arm implements Waker.
func (c *connWait) Arm(deadline time.Time) {
	switch c.mode {
	case modeChannel:
		return
	case modePacket:
		// caddy-l4's UDP flows keep read deadlines in whole seconds
		// (rounded down): round up, so that they never fire early.
		if !deadline.IsZero() {
			deadline = deadline.Truncate(time.Second).Add(time.Second)
		}
	}
	_ = c.target.SetReadDeadline(deadline)
}

// wait blocks until the queued waiter is admitted, refused (timed out) or
// abandoned by its client. On return nothing of the zone refers to c.
func (c *connWait) wait(z *Zone) (out Outcome, r Reason, abandoned bool) {
	switch c.mode {
	case modeSocket:
		out, r, abandoned = c.waitSocket(z)
	case modePacket:
		out, r, abandoned = c.waitPacket(z)
	default:
		out, r, _ = z.Wait(&c.Waiter, c.sig, nil)
	}
	if c.mode != modeChannel {
		// No Wake or Arm can follow an outcome: clear the deadline the
		// zone left, for the next handler.
		_ = c.target.SetReadDeadline(time.Time{})
	}
	return out, r, abandoned
}

func (c *connWait) waitSocket(z *Zone) (Outcome, Reason, bool) {
	for {
		gone, err := watchSocket(c.raw, c.keepHalfClosed, c.sentBefore)
		if !gone && !errors.Is(err, os.ErrDeadlineExceeded) {
			gone = true // the connection was closed under us
		}
		if !gone {
			// Woken: look once more, so that a client that left
			// just now is not handed on.
			gone = socketGone(c.raw, c.keepHalfClosed, c.sentBefore)
		}
		if gone && z.Abandon(&c.Waiter) {
			return Rejected, ReasonNone, true
		}
		if out, r, _ := z.Poll(&c.Waiter, time.Now()); out != Queued {
			return out, r, false
		}
	}
}

func (c *connWait) waitPacket(z *Zone) (Outcome, Reason, bool) {
	buf := make([]byte, udpReadBuffer)
	for {
		n, err := c.target.Read(buf)
		if n > 0 {
			c.hold(buf[:n])
		}
		switch {
		case err == nil:
			continue
		case errors.Is(err, os.ErrDeadlineExceeded):
			if out, r, _ := z.Poll(&c.Waiter, time.Now()); out != Queued {
				return out, r, false
			}
		default:
			// The flow went idle (caddy-l4's idle_timeout) or closed.
			if z.Abandon(&c.Waiter) {
				return Rejected, ReasonNone, true
			}
			out, r, _ := z.Poll(&c.Waiter, time.Now())
			return out, r, false
		}
	}
}

func (c *connWait) hold(p []byte) {
	if len(c.held) >= maxHeldPackets || c.heldBytes+len(p) > maxHeldBytes {
		c.dropped++
		return
	}
	c.held = append(c.held, append([]byte(nil), p...))
	c.heldBytes += len(p)
}

// replayHeld returns the connection to hand on after the wait: cx itself,
// or, when packets were held, a copy of cx (cx.Wrap) that reads, one
// datagram per Read, the datagrams cx had already buffered (read by
// matchers before this handler), then the held ones, then the flow.
//
// A copy, and not cx with its Conn replaced: caddy-l4 treats the
// connection of a UDP flow as one over its own packet type, and a matcher
// after this handler would panic on anything else under it. The copy is
// an ordinary connection to caddy-l4; reading cx's buffered datagrams here
// keeps their boundaries, which the copy would not know.
func (c *connWait) replayHeld(cx *layer4.Connection) *layer4.Connection {
	if len(c.held) == 0 {
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
	rc.held = append(frames, c.held...)
	c.held = nil
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
