package connlimit

import (
	"errors"
	"fmt"
	"net"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"

	"github.com/l4-connlimit/connlimit/internal/engine"
	"github.com/l4-connlimit/connlimit/internal/platform"
)

// How a served connection gives its slot back. One heldSlot owns the slot
// from admission on and frees it once, whoever comes first: the next
// handler returning, its CloseWrite (release close_write), or, in front of
// Caddy's HTTP server, the connection's Close.

// releaseMode is the handler's release option.
type releaseMode uint8

const (
	releaseOnReturn releaseMode = iota
	releaseOnCloseWrite
)

// parseRelease reads the release option as a config gives it: "return" or
// "close_write" in any case; "" is the default, return.
func parseRelease(s string) (releaseMode, error) {
	switch strings.ToLower(s) {
	case "", "return":
		return releaseOnReturn, nil
	case "close_write":
		return releaseOnCloseWrite, nil
	}
	return releaseOnReturn, fmt.Errorf("must be return or close_write, got '%s'", s)
}

// heldSlot is an admitted connection's slot. free gives it back to the
// zone the first time and then lets the arrival go (back to its pool);
// later calls change nothing, and do not return before the first one is
// done.
type heldSlot struct {
	zone  *engine.Zone
	a     arrival
	mu    sync.Mutex
	freed bool
}

func (s *heldSlot) free() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.freed {
		s.freed = true
		s.zone.Free(s.a.waiter())
		s.a.done()
	}
}

// serve hands cx to next and frees the slot when next returns (by error,
// panic or not), or earlier with release close_write. In front of Caddy's
// HTTP server it is serveHTTP.
func (h *Handler) serve(cx *layer4.Connection, slot *heldSlot, next layer4.Handler) error {
	if inListenerWrapper(cx) {
		return h.serveHTTP(cx, slot, next)
	}
	defer slot.free()
	if conn, ok := cx.Conn.(closeWriter); ok && h.release == releaseOnCloseWrite {
		// Left in place after next returns: a handler such as tee may
		// still use cx from another goroutine, and CloseWrite after the
		// slot was freed changes nothing.
		cx.Conn = &closeWriteFrees{Conn: cx.Conn, cw: conn, slot: slot}
	}
	start := time.Now()
	err := next.Handle(cx)
	if err == nil && time.Since(start) < placementCheckWithin {
		h.checkPlacement(cx)
	}
	return err
}

// serveHTTP is serve in front of Caddy's HTTP server (caddy-l4 as a
// listener wrapper). There the route's handlers return at once, and the
// connection is handed to the HTTP server after they did, so the slot
// cannot be freed when next returns: the connection holds it, and frees
// it when the HTTP server closes it, or when a read finds the client gone.
// If next failed, or the client is already gone, it is freed at once.
// Should the connection be dropped without being closed through the
// wrapper (a later route takes it and fails), the slot is freed when the
// connection is garbage: it can be held too long, never forever.
func (h *Handler) serveHTTP(cx *layer4.Connection, slot *heldSlot, next layer4.Handler) error {
	rc := &closeFrees{Conn: cx.Conn, slot: slot}
	runtime.AddCleanup(rc, (*heldSlot).free, slot)
	// The HTTP server gets a copy of cx: caddy-l4 reads cx's byte counts
	// for a log line after handing the connection over, and the copy's
	// counts are the ones the HTTP server's reads and writes update.
	err := next.Handle(cx.Wrap(rc))
	if err != nil || probeConn(rc.Conn) == platform.PeerGone {
		slot.free()
	}
	return err
}

// inListenerWrapper reports whether caddy-l4 runs as a listener wrapper
// (caddy.listeners.layer4) of Caddy's HTTP server.
func inListenerWrapper(cx *layer4.Connection) bool {
	return cx.Context.Value(caddy.CtxKey("listener")) != nil
}

// closeFrees frees its slot when the connection is closed, or when a read
// finds it ended.
type closeFrees struct {
	net.Conn
	slot *heldSlot
}

// Read reads, and frees the slot once the client is gone.
func (c *closeFrees) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if err != nil && !isTimeout(err) {
		c.slot.free()
	}
	return n, err
}

// Close closes the connection and frees its slot.
func (c *closeFrees) Close() error {
	err := c.Conn.Close()
	c.slot.free()
	return err
}

// closeWriter is a connection whose sending side can be shut on its own.
type closeWriter interface {
	CloseWrite() error
}

// closeWriteFrees frees its slot when the next handler shuts the sending
// side of the connection (release close_write). It holds no bytes and
// unwraps (NetConn) to the connection it wraps, so that a later
// connection_limit still watches the socket while it waits.
type closeWriteFrees struct {
	net.Conn
	cw   closeWriter
	slot *heldSlot
}

// CloseWrite shuts the sending side, then frees the slot.
func (c *closeWriteFrees) CloseWrite() error {
	err := c.cw.CloseWrite()
	c.slot.free()
	return err
}

// NetConn returns the wrapped connection.
func (c *closeWriteFrees) NetConn() net.Conn { return c.Conn }

func (*closeWriteFrees) holdsNoBytes() {}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// Interface guards
var (
	_ byteless    = (*closeWriteFrees)(nil)
	_ closeWriter = (*closeWriteFrees)(nil)
)
