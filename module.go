// Package connlimit is a caddy-l4 handler that lets at most N connections
// of a route through to the next handler at once and makes the rest wait,
// unread, until a slot frees.
//
// This package is the Caddy face: the handler's module and Caddyfile, the
// admin API, the command, the metrics, and the files a connection passes
// through (wait.go, udp.go, release.go, warnings.go). The engine that
// counts and orders is internal/engine; the socket watching is
// internal/platform; a fleet zone's store is the contract of package store,
// with Redis in store/redisstore.
package connlimit

import (
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"

	"github.com/l4-connlimit/connlimit/internal/engine"
	"github.com/l4-connlimit/connlimit/store"
)

func init() {
	caddy.RegisterModule(&Handler{})
}

// zones holds every zone of the process, across config reloads.
var zones = engine.NewRegistry(newZoneMetrics)

// Handler limits how many connections are handled by the rest of its
// route at once. Connections beyond the limit wait, unread (the kernel
// keeps the bytes the client sends, and applies backpressure), until a slot
// frees; then they are handed to the next handler with every byte intact.
// Connections that cannot wait are rejected: handed to the overflow
// handlers, or closed.
//
// The limit holds while the next handler runs: put a terminal handler such
// as `proxy` after connection_limit in the same route (or subroute).
//
// This handler sets these placeholders, for the handlers after it (and
// the overflow handlers):
//
// Placeholder | Description
// ------------|-------------
// `{l4.conn.remote_ip}` | The client's IP address as this handler sees the connection: behind a proxy_protocol handler, the real client
// `{l4.conn.remote_port}` | The client's port, likewise
// `{l4.connection_limit.waited_ms}` | Milliseconds the connection waited (0 if admitted at once)
// `{l4.connection_limit.position}` | Its place in line when it started waiting (1 = next; with fair_share, in its tenant's line), 0 if admitted at once
// `{l4.connection_limit.reason}` | Why it was rejected: `queue_full`, `wait_timeout` or `no_waiting` (overflow handlers only)
type Handler struct {
	// How many connections are let through to the next handler at once
	// (per key value, when key is set). Required; at least 1.
	MaxConnections int `json:"max_connections,omitempty"`

	// How many connections may wait for a slot (per key value, when key is
	// set). 0 (the default) sets no bound; -1 lets nobody wait.
	MaxWaiting int `json:"max_waiting,omitempty"`

	// How long a connection may wait before it is rejected. 0 (the default)
	// waits until it is admitted or its client leaves.
	WaitTimeout caddy.Duration `json:"wait_timeout,omitempty"`

	// The order in which waiters of equal priority are admitted: "fifo"
	// (the default; oldest first) or "lifo" (newest first).
	Order string `json:"order,omitempty"`

	// The handlers that rejected connections are handed to (waiting list
	// full, wait timed out, or no waiting allowed), for example a proxy to
	// a spill-over server. Without them a rejected connection is closed.
	OverflowRaw []json.RawMessage `json:"overflow,omitempty" caddy:"namespace=layer4.handlers inline_key=handler"`

	// Handlers with the same zone share one count and one waiting list,
	// across routes, servers and config reloads. Every handler of a zone in
	// one config must have the same max_connections, max_waiting,
	// wait_timeout, order, fair_share, weights and fair_max; the settings
	// of the newest config apply to everyone in the zone. Without a zone,
	// each handler counts alone.
	Zone string `json:"zone,omitempty"`

	// Shares the zone with every Caddy process whose handlers name the
	// same zone and store: max_connections, max_waiting and the waiting
	// order then hold across the fleet, while each process keeps its own
	// waiters, unread. A module of layer4.connection_limit.stores (inline
	// key "backend"; "redis" is built in). Requires zone. Default: none,
	// the zone is this process's alone.
	StoreRaw json.RawMessage `json:"store,omitempty" caddy:"namespace=layer4.connection_limit.stores inline_key=backend"`

	// A separate count and waiting list for each distinct value of this
	// placeholder expression, for example {l4.conn.remote_ip}:
	// max_connections and max_waiting then apply per key value. An empty
	// value is one key of its own.
	Key string `json:"key,omitempty"`

	// Shares the zone's slots fairly between tenants, named by this
	// placeholder expression, for example {l4.conn.remote_ip} or
	// {l4.tls.server_name}: a freed slot goes to the waiting tenant that
	// holds the fewest slots for its weight. max_connections and
	// max_waiting stay zone-wide; an empty value is one tenant of its own.
	// Not with key. Default: none, one waiting list in the zone's order.
	FairShare string `json:"fair_share,omitempty"`

	// The weight of each tenant named here (by its fair_share value), at
	// least 1: a tenant of weight 3 gets three times the slots of one of
	// weight 1 when both wait. Needs fair_share. Default: every tenant 1.
	Weights map[string]int `json:"weights,omitempty"`

	// The most slots one tenant may hold at once, even when nobody else
	// waits; at least 1. Needs fair_share. Default: none (up to
	// max_connections).
	FairMax *int `json:"fair_max,omitempty"`

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

	zone     *engine.Zone
	leave    func() // leaves the zone's registry entry
	release  releaseMode
	overflow layer4.Handler
	logger   *zap.Logger
	udp      udpFlows
	live     *liveConns // fleet zones: closed when Caddy exits (stop.go)

	// state of the warnings (warnings.go)
	lastRejectionWarn atomic.Int64
	rejectedSince     atomic.Int64
	warnedPlacement   atomic.Bool
	lastPlacement     atomic.Int64 // when the placement was last checked
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
	fair, err := h.fair()
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
	var fleet *engine.Fleet
	if h.StoreRaw != nil {
		if h.Zone == "" {
			return fmt.Errorf("store: needs a zone: the zone's name (with the store's key_prefix) names the fleet's shared state")
		}
		mod, err := ctx.LoadModule(h, "StoreRaw")
		if err != nil {
			return fmt.Errorf("loading store: %v", err)
		}
		fleet = storeFleet(mod.(store.Module))
		h.live = new(liveConns)
	}
	// The config's context identifies the config: handlers of one config
	// that share a zone must agree on its settings.
	h.zone, h.leave, err = zones.UseFair(h.Zone, ctx.Context, limits, fair, fleet)
	if err != nil {
		return err
	}
	if h.Zone != "" {
		h.warnReloadLoss()
	}
	return nil
}

// limits checks the configuration and returns the zone settings it gives.
func (h *Handler) limits() (engine.Limits, error) {
	l := engine.Limits{
		MaxConnections: h.MaxConnections,
		MaxWaiting:     h.MaxWaiting,
		WaitTimeout:    time.Duration(h.WaitTimeout),
	}
	var err error
	if l.Order, err = store.ParseOrder(h.Order); err != nil {
		return l, fmt.Errorf("order %v", err)
	}
	if h.release, err = parseRelease(h.Release); err != nil {
		return l, fmt.Errorf("release %v", err)
	}
	if h.MaxConnections == 0 {
		return l, fmt.Errorf("max_connections: required, and at least 1")
	}
	if strings.ContainsAny(h.Zone, "/?#%") || strings.TrimSpace(h.Zone) != h.Zone {
		return l, fmt.Errorf("zone: %q must not contain '/', '?', '#', '%%' or surrounding spaces (it names the zone in the admin API)", h.Zone)
	}
	return l, l.Validate()
}

// fair checks the fair share options and returns the fair share they give.
func (h *Handler) fair() (engine.Fair, error) {
	f := engine.Fair{Tenant: h.FairShare, Weights: h.Weights}
	if h.FairMax != nil {
		if *h.FairMax < 1 {
			return f, fmt.Errorf("fair_max must be at least 1, got %d (leave it out for no cap)", *h.FairMax)
		}
		f.Max = *h.FairMax
	}
	if err := f.Validate(); err != nil {
		return f, err
	}
	if h.FairShare != "" && h.Key != "" {
		return f, fmt.Errorf("fair_share and key cannot be used together: key gives each key value a max_connections of its own, fair_share shares one max_connections between tenants")
	}
	return f, nil
}

// Cleanup leaves the zone. Connections of this handler that still wait or
// run are not touched: they finish under the zone's settings in force.
// UDP flows are the exception: their server has stopped reading their
// packets, so their slots are freed and their waits abandoned (udp.go).
// So are a fleet zone's connections when Caddy exits: they are closed, so
// that their slots and places go back to the fleet at once (stop.go).
func (h *Handler) Cleanup() error {
	if h.live != nil && caddy.Exiting() {
		n, all := h.live.closeAll(exitDrain)
		h.logger.Info("Caddy exits: closed the fleet zone's connections, so that their slots and places go back to the fleet at once",
			zap.String("zone", h.Zone), zap.Int("connections", n), zap.Bool("all_ended", all))
	}
	if h.zone != nil {
		if n := h.udp.close(h.zone); n > 0 {
			h.logger.Info("freed the slots of UDP flows of a stopped config",
				zap.String("zone", h.Zone), zap.Int("flows", n))
		}
	}
	if h.leave != nil {
		h.leave()
	}
	return nil
}

// Handle is a connection's whole path through the limit: arrive, admit or
// wait, hand over or reject, free the slot.
func (h *Handler) Handle(cx *layer4.Connection, next layer4.Handler) error {
	// Arrive: a stream (wait.go) or a UDP flow (udp.go).
	repl := cx.Replacer()
	setRemotePlaceholders(repl, cx.RemoteAddr())
	if h.live != nil && !isPacketFlow(cx.Conn) {
		if !h.live.add(cx.Conn) {
			return nil // Caddy is exiting
		}
		defer h.live.done(cx.Conn)
	}
	a := h.arrive(cx)
	w := a.waiter()
	if h.Key != "" {
		w.Key = repl.ReplaceAll(h.Key, "")
	}
	if h.FairShare != "" {
		w.Tenant = repl.ReplaceAll(h.FairShare, "")
	}
	w.Priority = h.Priority
	w.Remote = cx.RemoteAddr()

	// Admit at once, or wait.
	out, reason := a.admit(h.zone)
	waited := w.Waited(time.Now())

	// Hand over, or reject.
	switch out {
	case engine.Abandoned:
		h.logAbandoned(cx, w, waited)
		defer a.done()
		return a.end(cx)
	case engine.Rejected:
		cx = a.handOn(cx) // a UDP flow's held packets go to overflow too
		repl.Set(replReason, reason.String())
		h.logRejected(cx, w, reason, waited)
		defer a.done()
		if h.overflow != nil {
			return h.overflow.Handle(cx)
		}
		return a.end(cx)
	}
	repl.Set(replWaitedMS, waited.Milliseconds())
	repl.Set(replPosition, w.Position())
	h.logAdmitted(cx, w, waited, a.dropped())
	cx = a.handOn(cx)

	// Free the slot: when next returns, or earlier (release.go).
	return h.serve(cx, &heldSlot{zone: h.zone, a: a}, next)
}

// arrive returns the arrival of cx: a UDP flow, or a stream.
func (h *Handler) arrive(cx *layer4.Connection) arrival {
	if isPacketFlow(cx.Conn) {
		return h.udp.arrive(cx.Conn)
	}
	return newStreamWait(cx.Conn, h.KeepHalfClosed, len(cx.MatchingBytes()) > 0)
}

// Placeholders set on each connection's replacer (see the table above).
const (
	replRemoteIP   = "l4.conn.remote_ip"
	replRemotePort = "l4.conn.remote_port"
	replWaitedMS   = "l4.connection_limit.waited_ms"
	replPosition   = "l4.connection_limit.position"
	replReason     = "l4.connection_limit.reason"
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

// Interface guards
var (
	_ caddy.Provisioner  = (*Handler)(nil)
	_ caddy.CleanerUpper = (*Handler)(nil)
	_ layer4.NextHandler = (*Handler)(nil)
)
