// Package connlimit is a caddy-l4 handler that lets at most N connections
// of a route through to the next handler at once and makes the rest wait,
// unread, until a slot frees.
package connlimit

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(&Handler{})
}

// zoneRegistry holds every zone of the process, across config reloads.
var zoneRegistry = NewRegistry(newZoneMetrics)

// Handler limits how many connections are handled by the rest of its
// route at once. Connections beyond the limit wait, unread (the kernel
// keeps the bytes the client sends, and applies backpressure), until a slot
// frees; then they are handed to the next handler with every byte intact.
// Connections that cannot wait are handed to the overflow handlers, or
// closed.
//
// The limit holds while the next handler runs: put a terminal handler such
// as `proxy` after connection_limit in the same route (or subroute).
type Handler struct {
	// How many connections are let through to the next handler at once
	// (per key value, when key is set). Required; at least 1.
	MaxConnections int `json:"max_connections,omitempty"`

	// How many connections may wait for a slot (per key value, when key is
	// set). 0 (the default) sets no bound; -1 lets nobody wait.
	MaxWaiting int `json:"max_waiting,omitempty"`

	// How long a connection may wait before it is refused. 0 (the default)
	// waits until it is admitted or its client leaves.
	WaitTimeout caddy.Duration `json:"wait_timeout,omitempty"`

	// The order in which waiters of equal priority are admitted: "fifo"
	// (the default; oldest first) or "lifo" (newest first).
	Order string `json:"order,omitempty"`

	// The handlers that refused connections are handed to (waiting list
	// full, wait timed out, or no waiting allowed), for example a proxy to
	// a spill-over server. Without them a refused connection is closed.
	OverflowRaw []json.RawMessage `json:"overflow,omitempty" caddy:"namespace=layer4.handlers inline_key=handler"`

	// Handlers with the same zone share one count and one waiting list,
	// across routes, servers and config reloads. Every handler of a zone in
	// one config must have the same max_connections, max_waiting,
	// wait_timeout and order; the settings of the newest config apply to
	// everyone in the zone. Without a zone, each handler counts alone.
	Zone string `json:"zone,omitempty"`

	// A separate count and waiting list for each distinct value of this
	// placeholder expression, for example {l4.conn.remote_ip}:
	// max_connections and max_waiting then apply per key value. An empty
	// value is one key of its own.
	Key string `json:"key,omitempty"`

	// Within a zone, waiters with a higher priority are admitted before any
	// waiter with a lower one; equal priorities keep the order. Default 0.
	Priority int `json:"priority,omitempty"`

	// Keep a waiter whose client has sent bytes and then closed its
	// sending side (a half-close) in line, instead of dropping it as
	// abandoned. See the README on half-closed clients.
	KeepHalfClosed bool `json:"keep_half_closed,omitempty"`

	// When a served connection frees its slot: "return" (the default)
	// when the next handler returns, that is for `proxy` once both the
	// backend and the client have closed; "close_write" as soon as the
	// next handler shuts its sending side to the client (`proxy` does so
	// once every backend has finished sending, and then waits for the
	// client to close), or when it returns, whichever comes first. With
	// close_write the next waiter does not wait for the previous client to
	// read the end of its reply and close; but a backend that half-closes
	// and goes on reading can then be handed more than max_connections
	// connections. Where the next handler cannot half-close the client's
	// connection (UDP, proxy_protocol before or after the limit, TLS
	// terminated after it, tee, Caddy's HTTP server as listener wrapper)
	// the slot is freed as with "return".
	Release string `json:"release,omitempty"`

	zone     *Zone
	release  func()
	overflow layer4.Handler
	logger   *zap.Logger

	releaseAtCloseWrite bool
	udp                 udpFlows

	// state of the rate-limited warnings
	lastRefusalWarn atomic.Int64
	refusedSince    atomic.Int64
	warnedPlacement atomic.Bool
	lastPlacement   atomic.Int64 // when the placement was last checked
}

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.connection_limit",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision sets up the handler: it loads the overflow handlers and joins
// the zone, whose settings this config's take over once it is running.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger(h)
	limits, err := h.limits()
	if err != nil {
		return err
	}
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %v", err)
	}
	if h.OverflowRaw != nil {
		mods, err := ctx.LoadModule(h, "OverflowRaw")
		if err != nil {
			return fmt.Errorf("loading overflow handlers: %v", err)
		}
		var chain layer4.Handlers
		for _, m := range mods.([]any) {
			chain = append(chain, m.(layer4.NextHandler))
		}
		h.overflow = chain.Compile()
	}
	// The config's context identifies the config: handlers of one config
	// that share a zone must agree on its settings.
	h.zone, h.release, err = zoneRegistry.Use(h.Zone, ctx.Context, limits)
	if err != nil {
		return err
	}
	return nil
}

// limits checks the configuration and returns the zone settings it gives.
func (h *Handler) limits() (Limits, error) {
	l := Limits{
		MaxConnections: h.MaxConnections,
		MaxWaiting:     h.MaxWaiting,
		WaitTimeout:    time.Duration(h.WaitTimeout),
	}
	switch strings.ToLower(h.Order) {
	case "", "fifo":
		l.Order = FIFO
	case "lifo":
		l.Order = LIFO
	default:
		return l, fmt.Errorf("order: must be fifo or lifo, got %q", h.Order)
	}
	switch strings.ToLower(h.Release) {
	case "", "return":
	case "close_write":
		h.releaseAtCloseWrite = true
	default:
		return l, fmt.Errorf("release: must be return or close_write, got %q", h.Release)
	}
	if h.MaxConnections == 0 {
		return l, fmt.Errorf("max_connections: required, and at least 1")
	}
	if strings.ContainsAny(h.Zone, "/?#%") || strings.TrimSpace(h.Zone) != h.Zone {
		return l, fmt.Errorf("zone: %q must not contain '/', '?', '#', '%%' or surrounding spaces (it names the zone in the admin API)", h.Zone)
	}
	return l, l.Validate()
}

// Cleanup leaves the zone. Connections of this handler that still wait or
// run are not touched: they finish under the zone's settings in force.
// UDP flows are the exception: their server has stopped reading their
// packets, so their slots are freed and their waits abandoned (udpFlows).
func (h *Handler) Cleanup() error {
	if h.zone != nil {
		if n := h.udp.close(h.zone); n > 0 {
			h.logger.Info("freed the slots of UDP flows of a stopped config",
				zap.String("zone", h.Zone), zap.Int("flows", n))
		}
	}
	if h.release != nil {
		h.release()
	}
	return nil
}

// Handle is a connection's whole path through the limit: arrive, admit or
// wait, hand over or refuse, release.
func (h *Handler) Handle(cx *layer4.Connection, next layer4.Handler) error {
	repl := cx.Replacer()
	setRemotePlaceholders(repl, cx.RemoteAddr())

	cw := getConnWait()
	if h.Key != "" {
		cw.Key = repl.ReplaceAll(h.Key, "")
	}
	cw.Priority = h.Priority
	cw.Remote = cx.RemoteAddr()
	cw.prepare(cx.Conn, h.KeepHalfClosed, len(cx.MatchingBytes()) > 0)
	packet := cw.mode == modePacket
	var out Outcome
	var reason Reason
	if packet { // tracked for Cleanup from the moment it asks (flows.go)
		ok := false
		if out, reason, ok = h.udp.acquire(h.zone, cw); !ok {
			drainFlow(cx) // cleaned up: the server has stopped; let the flow end
			return nil
		}
		defer h.udp.remove(cw)
	} else {
		out, reason = h.zone.Acquire(&cw.Waiter, cw, time.Now())
	}
	abandoned := false
	if out == Queued {
		out, reason, abandoned = cw.wait(h.zone)
	}
	switch {
	case abandoned, out == Rejected && reason == ReasonNone: // ReasonNone: abandoned at Cleanup
		h.logEvent("abandoned while waiting", cx, cw, zap.Duration("waited", cw.Waited(time.Now())))
		putConnWait(cw)
		if packet {
			return nil // caddy-l4 closes the flow; a second close could end a newer one
		}
		return cx.Close()
	case out == Rejected:
		waited := cw.Waited(time.Now())
		cx = cw.replayHeld(cx) // a UDP flow's packets go to overflow too
		putConnWait(cw)
		return h.refuse(cx, reason, waited, packet)
	}
	return h.serve(cx, cw, next)
}

// serve hands an admitted connection to the next handler and frees its
// slot exactly once, when that handler returns (by error, panic or not)
// or, with release close_write, when it shuts its sending side first,
// or, when caddy-l4 runs as a listener wrapper of Caddy's HTTP server, when
// the HTTP server closes the connection.
func (h *Handler) serve(cx *layer4.Connection, cw *connWait, next layer4.Handler) error {
	waited := cw.Waited(time.Now())
	repl := cx.Replacer()
	repl.Set(replWaitedMS, waited.Milliseconds())
	repl.Set(replPosition, cw.Position())
	h.logEvent("admitted", cx, cw, zap.Duration("waited", waited), zap.Int("position", cw.Position()),
		zap.Int("udp_packets_dropped_while_waiting", cw.dropped))
	cx = cw.replayHeld(cx)

	if inListenerWrapper(cx) {
		return h.serveHTTP(cx, cw, next)
	}
	var early *heldSlot // release close_write: CloseWrite may free the slot first
	defer func() {
		if early != nil {
			early.free()
		} else {
			h.zone.Release(&cw.Waiter)
		}
		putConnWait(cw)
	}()
	if conn, ok := cx.Conn.(closeWriter); ok && h.releaseAtCloseWrite {
		// Left in place after next returns: a handler such as tee may
		// still use cx from another goroutine, and CloseWrite after the
		// slot was freed changes nothing.
		early = &heldSlot{zone: h.zone, w: &cw.Waiter}
		cx.Conn = &releaseOnCloseWrite{Conn: cx.Conn, cw: conn, slot: early}
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
// cannot be freed when next returns: it is held by the connection itself
// and freed when the HTTP server closes it, or when a read finds the
// client gone. If next failed, or the client is already gone, it is freed
// at once. Should the connection be dropped without being closed through
// the wrapper (a later route takes it and fails), the slot is freed when
// the connection is garbage: it can be held too long, never forever.
func (h *Handler) serveHTTP(cx *layer4.Connection, cw *connWait, next layer4.Handler) error {
	slot := &heldSlot{zone: h.zone, w: &cw.Waiter}
	rc := &releaseOnClose{Conn: cx.Conn, slot: slot}
	runtime.AddCleanup(rc, (*heldSlot).free, slot)
	// The HTTP server gets a copy of cx: caddy-l4 reads cx's byte counts
	// for a log line after handing the connection over, and the copy's
	// counts are the ones the HTTP server's reads and writes update.
	err := next.Handle(cx.Wrap(rc))
	if err != nil || !clientStillThere(rc.Conn) {
		slot.free()
	}
	return err
}

// refuse hands a refused connection to the overflow handlers, or closes
// it; a refused UDP flow is read and dropped until it has been silent for
// a while, or ends (drainFlow).
func (h *Handler) refuse(cx *layer4.Connection, r Reason, waited time.Duration, packet bool) error {
	cx.Replacer().Set(replReason, r.String())
	if h.logger.Core().Enabled(zap.DebugLevel) {
		h.logger.Debug("refused",
			zap.String("remote", cx.RemoteAddr().String()),
			zap.String("zone", h.Zone),
			zap.String("reason", r.String()),
			zap.Duration("waited", waited),
			zap.Bool("overflow", h.overflow != nil))
	}
	h.warnRefusing(r)
	switch {
	case h.overflow != nil:
		return h.overflow.Handle(cx)
	case packet:
		drainFlow(cx)
		return nil
	}
	return cx.Close()
}

// refusalWarnEvery rate-limits the warning that a zone refuses connections.
const refusalWarnEvery = 10 * time.Second

func (h *Handler) warnRefusing(r Reason) {
	h.refusedSince.Add(1)
	now := time.Now().UnixNano()
	last := h.lastRefusalWarn.Load()
	if now-last < int64(refusalWarnEvery) || !h.lastRefusalWarn.CompareAndSwap(last, now) {
		return
	}
	h.logger.Warn("connection limit reached: refusing connections",
		zap.String("zone", h.Zone),
		zap.Int("max_connections", h.MaxConnections),
		zap.Int("max_waiting", h.MaxWaiting),
		zap.String("reason", r.String()),
		zap.Int64("refused_since_last_warning", h.refusedSince.Swap(0)),
		zap.Duration("warning_interval", refusalWarnEvery))
}

func (h *Handler) logEvent(msg string, cx *layer4.Connection, cw *connWait, fields ...zap.Field) {
	if !h.logger.Core().Enabled(zap.DebugLevel) {
		return
	}
	fields = append(fields,
		zap.String("remote", cx.RemoteAddr().String()),
		zap.String("zone", h.Zone),
		zap.String("key", cw.Key))
	h.logger.Debug(msg, fields...)
}

// placementCheckWithin: a next handler that returns this fast is checked
// for not having served the connection at all.
const placementCheckWithin = 5 * time.Millisecond

// placementCheckEvery samples the check: a misplaced handler shows on
// every connection, so one look a second is enough and keeps the syscall
// off the hot path.
const placementCheckEvery = time.Second

// checkPlacement warns (once per handler) when the next handler returned
// at once without serving the connection: then connection_limit is the
// last handler of its route, the route's chain ended at once, and the
// limit does not hold while the connection is served.
func (h *Handler) checkPlacement(cx *layer4.Connection) {
	if h.warnedPlacement.Load() {
		return
	}
	now := time.Now().UnixNano()
	last := h.lastPlacement.Load()
	if now-last < int64(placementCheckEvery) || !h.lastPlacement.CompareAndSwap(last, now) {
		return
	}
	if untouched, known := socketUntouchedConn(cx.Conn); !known || !untouched {
		return
	}
	if h.warnedPlacement.CompareAndSwap(false, true) {
		h.logger.Warn("the handler after connection_limit returned without serving the connection, so the limit does not hold while it is served; put a terminal handler such as proxy after connection_limit in the same route or subroute",
			zap.String("zone", h.Zone),
			zap.String("remote", cx.RemoteAddr().String()))
	}
}

// Placeholders set on each connection's replacer.
const (
	// The client's IP address and port as this handler sees the
	// connection: behind a proxy_protocol handler, the real client.
	replRemoteIP   = "l4.conn.remote_ip"
	replRemotePort = "l4.conn.remote_port"
	// Milliseconds the connection waited (0 if admitted at once).
	replWaitedMS = "l4.connection_limit.waited_ms"
	// Its place in line when it started waiting (1 = next), 0 if admitted
	// at once.
	replPosition = "l4.connection_limit.position"
	// Why it was refused: queue_full, wait_timeout or no_waiting.
	replReason = "l4.connection_limit.reason"
)

func setRemotePlaceholders(repl *caddy.Replacer, addr net.Addr) {
	switch a := addr.(type) {
	case *net.TCPAddr:
		repl.Set(replRemoteIP, a.IP.String())
		repl.Set(replRemotePort, a.Port)
	case *net.UDPAddr:
		repl.Set(replRemoteIP, a.IP.String())
		repl.Set(replRemotePort, a.Port)
	default:
		if addr == nil {
			return
		}
		host, port, err := net.SplitHostPort(addr.String())
		if err != nil {
			host, port = addr.String(), ""
		}
		repl.Set(replRemoteIP, host)
		repl.Set(replRemotePort, port)
	}
}

// inListenerWrapper reports whether caddy-l4 runs as a listener wrapper
// (caddy.listeners.layer4) of Caddy's HTTP server.
func inListenerWrapper(cx *layer4.Connection) bool {
	return cx.Context.Value(caddy.CtxKey("listener")) != nil
}

// clientStillThere reports whether the client is connected and has not
// finished sending; true where that cannot be told.
func clientStillThere(conn net.Conn) bool {
	untouched, known := socketUntouchedConn(conn)
	return untouched || !known
}

// socketUntouchedConn is socketUntouched for the socket under conn; known
// is false where there is none, or the platform cannot tell.
func socketUntouchedConn(conn net.Conn) (untouched, known bool) {
	sc, ok := underlyingSocket(conn)
	if !ok || !canWatch {
		return false, false
	}
	raw, err := sc.(syscall.Conn).SyscallConn()
	if err != nil {
		return false, true
	}
	return socketUntouched(raw), true
}

// heldSlot is a slot held by a connection rather than by a goroutine; it
// is freed once, whoever frees it first.
type heldSlot struct {
	zone  *Zone
	w     *Waiter
	mu    sync.Mutex
	freed bool
}

// free releases the slot the first time; later calls change nothing,
// and do not return before the first one is done: once free returns, the
// Waiter is no longer used, and may go back to the pool.
func (s *heldSlot) free() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.freed {
		s.freed = true
		s.zone.Release(s.w)
	}
}

// releaseOnClose frees its slot when the connection is closed, or when a
// read finds it ended.
type releaseOnClose struct {
	net.Conn
	slot *heldSlot
}

// Read reads, and frees the slot once the client is gone.
func (c *releaseOnClose) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if err != nil && !isTimeout(err) {
		c.slot.free()
	}
	return n, err
}

// Close closes the connection and frees its slot.
func (c *releaseOnClose) Close() error {
	err := c.Conn.Close()
	c.slot.free()
	return err
}

// closeWriter is a connection whose sending side can be shut on its own.
type closeWriter interface {
	CloseWrite() error
}

// releaseOnCloseWrite frees its slot when the next handler shuts the
// sending side of the connection (release close_write). It unwraps
// (NetConn) to the connection it wraps, so that a later connection_limit
// still watches the socket while it waits.
type releaseOnCloseWrite struct {
	net.Conn
	cw   closeWriter
	slot *heldSlot
}

// CloseWrite shuts the sending side, then frees the slot.
func (c *releaseOnCloseWrite) CloseWrite() error {
	err := c.cw.CloseWrite()
	c.slot.free()
	return err
}

// NetConn returns the wrapped connection.
func (c *releaseOnCloseWrite) NetConn() net.Conn { return c.Conn }

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// Interface guards
var (
	_ caddy.Provisioner  = (*Handler)(nil)
	_ caddy.CleanerUpper = (*Handler)(nil)
	_ layer4.NextHandler = (*Handler)(nil)
)
