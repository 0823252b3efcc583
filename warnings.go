package connlimit

import (
	"sync"
	"time"

	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"

	"github.com/l4-connlimit/connlimit/internal/engine"
	"github.com/l4-connlimit/connlimit/internal/platform"
)

// What the handler tells the operator: a debug line per event, a warning
// (rate-limited) while a zone rejects connections, a warning (once) when
// the handler is placed where the limit cannot hold, and a warning (once
// per process) when config reloads can reset connections.

// The events of Handle are logged by functions of their own, so that the
// fields they build do not sit in Handle's frame, which is on the stack of
// every waiting connection (one more byte there can double it to 8 KiB).

func (h *Handler) logAbandoned(cx *layer4.Connection, w *engine.Waiter, waited time.Duration) {
	h.logEvent("abandoned while waiting", cx, w, zap.Duration("waited", waited))
}

// logRejected logs a rejection, and warns (rate-limited) that the zone
// rejects connections.
func (h *Handler) logRejected(cx *layer4.Connection, w *engine.Waiter, r engine.Reason, waited time.Duration) {
	h.logEvent("rejected", cx, w, zap.String("reason", r.String()),
		zap.Duration("waited", waited), zap.Bool("overflow", h.overflow != nil))
	h.warnRejecting(r)
}

func (h *Handler) logAdmitted(cx *layer4.Connection, w *engine.Waiter, waited time.Duration, dropped int) {
	h.logEvent("admitted", cx, w, zap.Duration("waited", waited), zap.Int("position", w.Position()),
		zap.Int("udp_packets_dropped_while_waiting", dropped))
}

// logEvent logs one connection's event at debug level.
func (h *Handler) logEvent(msg string, cx *layer4.Connection, w *engine.Waiter, fields ...zap.Field) {
	if !h.logger.Core().Enabled(zap.DebugLevel) {
		return
	}
	fields = append(fields,
		zap.String("remote", cx.RemoteAddr().String()),
		zap.String("zone", h.Zone),
		zap.String("key", w.Key))
	h.logger.Debug(msg, fields...)
}

// rejectionWarnEvery rate-limits the warning that a zone rejects
// connections.
const rejectionWarnEvery = 10 * time.Second

// warnRejecting warns that the zone rejects connections, at most once per
// rejectionWarnEvery, with how many were rejected since the last warning.
func (h *Handler) warnRejecting(r engine.Reason) {
	h.rejectedSince.Add(1)
	now := time.Now().UnixNano()
	last := h.lastRejectionWarn.Load()
	if now-last < int64(rejectionWarnEvery) || !h.lastRejectionWarn.CompareAndSwap(last, now) {
		return
	}
	h.logger.Warn("connection limit reached: rejecting connections",
		zap.String("zone", h.Zone),
		zap.Int("max_connections", h.MaxConnections),
		zap.Int("max_waiting", h.MaxWaiting),
		zap.String("reason", r.String()),
		zap.Int64("rejected_since_last_warning", h.rejectedSince.Swap(0)),
		zap.Duration("warning_interval", rejectionWarnEvery))
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
	if probeConn(cx.Conn) != platform.PeerThere {
		return
	}
	if h.warnedPlacement.CompareAndSwap(false, true) {
		h.logger.Warn("the handler after connection_limit returned without serving the connection, so the limit does not hold while it is served; put a terminal handler such as proxy after connection_limit in the same route or subroute",
			zap.String("zone", h.Zone),
			zap.String("remote", cx.RemoteAddr().String()))
	}
}

// reloadLoss makes the reload warning once per process, not per reload.
var reloadLoss sync.Once

// readMigrateReq reads net.ipv4.tcp_migrate_req; tests replace it.
var readMigrateReq = platform.TCPMigrateReq

// warnReloadLoss warns, once per process, that config loads can reset
// connections: Caddy opens each new config's listener with SO_REUSEPORT
// and closes the old one, and Linux resets the connections still queued
// on the old socket unless net.ipv4.tcp_migrate_req is 1. Zones are what
// operators reload to change, so handlers with a zone ask.
func (h *Handler) warnReloadLoss() {
	reloadLoss.Do(func() {
		if on, known := readMigrateReq(); known && !on {
			h.logger.Warn("net.ipv4.tcp_migrate_req is 0: each config load can reset connections the kernel accepted on the old listener but Caddy had not yet taken; set it to 1 (sysctl -w net.ipv4.tcp_migrate_req=1, Linux 5.14 or later) so that they move to the new listener, or change limits without a load through POST /connection_limit/<zone>/limits",
				zap.String("zone", h.Zone))
		}
	})
}
