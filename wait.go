package connlimit

import (
	"errors"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/mholt/caddy-l4/layer4"

	"github.com/l4-connlimit/connlimit/internal/engine"
	"github.com/l4-connlimit/connlimit/internal/platform"
)

// An arrival is one connection on its way through the limit. A stream
// (this file) and a UDP flow (udp.go) differ in how they wait, in what
// they hold meanwhile and hand on, and in how one that is rejected or
// abandoned ends; the handler's path (Handler.Handle) is the same for both.
type arrival interface {
	// waiter is the connection's place in the zone.
	waiter() *engine.Waiter
	// admit takes a slot, or waits for one; it returns Admitted,
	// Rejected (with the reason) or Abandoned.
	admit(z *engine.Zone) (engine.Outcome, engine.Reason)
	// handOn is the connection to hand to the next (or overflow) handler.
	handOn(cx *layer4.Connection) *layer4.Connection
	// end ends a connection that is not handed on (abandoned, or rejected
	// with no overflow handlers).
	end(cx *layer4.Connection) error
	// dropped counts the packets dropped while it waited (UDP only).
	dropped() int
	// done is called once nothing refers to the arrival any more: after
	// end, or when its slot was freed (heldSlot).
	done()
}

// aLongTimeAgo is a read deadline that has passed: setting it wakes a
// goroutine blocked reading (or watching) the connection.
var aLongTimeAgo = time.Unix(1, 0)

// streamWait is a stream's arrival. None of its ways of waiting adds a
// goroutine: the connection's own goroutine (the one caddy-l4 runs for
// it) waits, and the zone wakes it through the Waker methods.
//   - With a socket underneath (on Linux), it parks in Go's network poller
//     watching the socket without reading (watchSocket); the zone wakes it
//     by moving the socket's read deadline into the past, and a
//     wait_timeout is the read deadline itself. A client that closes or
//     resets is noticed at once.
//   - Otherwise (no socket underneath, or a platform without socket
//     watching) it waits on a channel and a timer; a client that left is
//     noticed by the next handler.
type streamWait struct {
	engine.Waiter
	raw            syscall.RawConn // nil: waits on sig
	sock           net.Conn        // the socket, whose deadlines wake it
	sig            engine.Signal
	keepHalfClosed bool
	sentBefore     bool // client bytes were read from the socket before us
}

var streamWaitPool = sync.Pool{New: func() any { return new(streamWait) }}

// newStreamWait picks how a stream waits. conn is the connection as the
// handler sees it (possibly wrapped by TLS or PROXY protocol handlers
// before it); sentBefore tells that bytes of the client were already read
// from the socket before this handler (by caddy-l4's matchers, kept for
// replay).
func newStreamWait(conn net.Conn, keepHalfClosed, sentBefore bool) *streamWait {
	s := streamWaitPool.Get().(*streamWait)
	s.keepHalfClosed, s.sentBefore = keepHalfClosed, sentBefore
	if !platform.CanWatch {
		return s.onChannel()
	}
	// A wrapper may hold bytes it already read from the socket (the
	// request behind a PROXY header, say): the socket then shows a
	// half-close after them as a bare FIN, which means abandonment. So
	// with keep_half_closed, a wrapped waiter waits on a channel. Wrappers
	// that hold no bytes (release close_write) count as bare.
	inner := conn
	for r, ok := inner.(byteless); ok; r, ok = inner.(byteless) {
		inner = r.NetConn()
	}
	_, bare := inner.(syscall.Conn)
	if sc, ok := underlyingSocket(conn); ok && (bare || !keepHalfClosed) {
		if raw, err := sc.(syscall.Conn).SyscallConn(); err == nil {
			s.sock, s.raw = sc, raw
			return s
		}
	}
	return s.onChannel()
}

func (s *streamWait) onChannel() *streamWait {
	if s.sig == nil {
		s.sig = engine.NewSignal()
	}
	return s
}

// byteless is a connection wrapper that holds no bytes of its own.
type byteless interface {
	net.Conn
	NetConn() net.Conn
	holdsNoBytes()
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

// probeConn looks once at the socket under conn, with the same test as a
// waiter without keep_half_closed: unknown where there is no socket.
func probeConn(conn net.Conn) platform.Peer {
	sc, ok := underlyingSocket(conn)
	if !ok || !platform.CanWatch {
		return platform.PeerUnknown
	}
	raw, err := sc.(syscall.Conn).SyscallConn()
	if err != nil {
		return platform.PeerGone
	}
	return platform.Probe(raw, false, false)
}

func (s *streamWait) waiter() *engine.Waiter                          { return &s.Waiter }
func (s *streamWait) handOn(cx *layer4.Connection) *layer4.Connection { return cx }
func (s *streamWait) end(cx *layer4.Connection) error                 { return cx.Close() }
func (s *streamWait) dropped() int                                    { return 0 }

func (s *streamWait) done() {
	*s = streamWait{sig: s.sig}
	streamWaitPool.Put(s)
}

// Wake implements engine.Waker.
func (s *streamWait) Wake() {
	if s.raw == nil {
		s.sig.Wake()
		return
	}
	_ = s.sock.SetReadDeadline(aLongTimeAgo)
}

// Arm implements engine.Waker.
func (s *streamWait) Arm(deadline time.Time) {
	if s.raw != nil {
		_ = s.sock.SetReadDeadline(deadline)
	}
}

func (s *streamWait) admit(z *engine.Zone) (engine.Outcome, engine.Reason) {
	out, r := z.Acquire(&s.Waiter, s, time.Now())
	if out == engine.Queued {
		out, r = s.wait(z)
	}
	return out, r
}

// wait blocks until the queued waiter is admitted, rejected (timed out) or
// abandoned by its client. On return nothing of the zone refers to s.
func (s *streamWait) wait(z *engine.Zone) (engine.Outcome, engine.Reason) {
	if s.raw == nil {
		return z.Wait(&s.Waiter, s.sig, nil)
	}
	// No Wake or Arm can follow an outcome: clear the deadline the zone
	// left, for the next handler.
	defer s.sock.SetReadDeadline(time.Time{})
	for {
		gone, err := platform.Watch(s.raw, s.keepHalfClosed, s.sentBefore)
		if !gone && !errors.Is(err, os.ErrDeadlineExceeded) {
			gone = true // the connection was closed under us
		}
		if !gone {
			// Woken: look once more, so that a client that left
			// just now is not handed on.
			gone = platform.Probe(s.raw, s.keepHalfClosed, s.sentBefore) == platform.PeerGone
		}
		if gone && z.Abandon(&s.Waiter) {
			return engine.Abandoned, engine.ReasonNone
		}
		if out, r, _ := z.Poll(&s.Waiter, time.Now()); out != engine.Queued {
			return out, r
		}
	}
}

// Interface guards
var (
	_ arrival      = (*streamWait)(nil)
	_ engine.Waker = (*streamWait)(nil)
)
