package connlimit

import (
	"errors"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/l4-connlimit/connlimit/internal/engine"
	"github.com/l4-connlimit/connlimit/store"
)

// The collectors live at package level, for the life of the process:
// Caddy hands each loaded config a fresh registry, and they are registered
// into every one of them, so that their values carry over reloads instead
// of starting again at zero. Per-key values never become labels.
var (
	metricActive = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "layer4_connection_limit", Name: "active",
		Help: "Connections let through to the next handler and not yet finished.",
	}, []string{"zone"})
	metricWaiting = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "layer4_connection_limit", Name: "waiting",
		Help: "Connections waiting, unread, for a slot.",
	}, []string{"zone"})
	metricAdmitted = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "layer4_connection_limit", Name: "admitted_total",
		Help: "Connections let through, at once or after waiting.",
	}, []string{"zone"})
	metricRejected = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "layer4_connection_limit", Name: "rejected_total",
		Help: "Connections rejected (handed to overflow, or closed), by reason.",
	}, []string{"zone", "reason"})
	metricAbandoned = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "layer4_connection_limit", Name: "abandoned_total",
		Help: "Waiting connections whose client went away before a slot freed.",
	}, []string{"zone"})
	metricMax = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "layer4_connection_limit", Name: "max_connections",
		Help: "The max_connections in force (per key value, when a key is set).",
	}, []string{"zone"})
	metricOverridden = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "layer4_connection_limit", Name: "limits_overridden",
		Help: "1 while limits set through the admin API are in force over the config's, else 0.",
	}, []string{"zone"})
	metricWait = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "caddy", Subsystem: "layer4_connection_limit", Name: "wait_seconds",
		Help:    "Time each admitted connection waited (0 for those admitted at once).",
		Buckets: []float64{0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300},
	}, []string{"zone"})

	// Zones with fair_share: bounded in cardinality, no tenant labels.
	metricTenantsWaiting = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "layer4_connection_limit", Name: "tenants_waiting",
		Help: "Tenants (fair_share) with at least one connection waiting.",
	}, []string{"zone"})
	metricFairnessIndex = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "layer4_connection_limit", Name: "fairness_index",
		Help: "Jain's fairness index over slots held ÷ weight of the tenants (fair_share) that wait: 1 when they hold equal shares, 1/n when one holds all; 1 when none waits.",
	}, []string{"zone"})

	// Fleet zones (a store): the store as this node sees it, and the
	// fleet's counts as it last learned them.
	metricStoreReachable = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "layer4_connection_limit", Name: "store_reachable",
		Help: "1 while this node reaches the zone's store (the fleet decides), 0 while it admits on its own.",
	}, []string{"zone"})
	metricStoreErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "layer4_connection_limit", Name: "store_errors_total",
		Help: "Store operations that failed, by operation.",
	}, []string{"zone", "op"})
	metricStoreSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "caddy", Subsystem: "layer4_connection_limit", Name: "store_seconds",
		Help:    "Round-trip time of store operations.",
		Buckets: []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2},
	}, []string{"zone"})
	metricFleetActive = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "layer4_connection_limit", Name: "fleet_active",
		Help: "Connections the whole fleet lets through, as this node last learned from the store.",
	}, []string{"zone"})
	metricFleetWaiting = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "layer4_connection_limit", Name: "fleet_waiting",
		Help: "Connections waiting anywhere in the fleet, as this node last learned from the store.",
	}, []string{"zone"})

	allCollectors = []prometheus.Collector{metricActive, metricWaiting, metricAdmitted, metricRejected, metricAbandoned,
		metricMax, metricOverridden, metricWait, metricTenantsWaiting, metricFairnessIndex,
		metricStoreReachable, metricStoreErrors, metricStoreSeconds, metricFleetActive, metricFleetWaiting}
)

// registerMetrics registers the collectors into reg; having them there
// already is success.
func registerMetrics(reg prometheus.Registerer) error {
	if reg == nil {
		return nil
	}
	for _, c := range allCollectors {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) {
				return err
			}
		}
	}
	return nil
}

// zoneMetrics is the Observer of one zone: the children of its label,
// looked up once, so that each event costs an atomic add.
type zoneMetrics struct {
	zone            string
	unreachable     atomic.Bool // as last said in the log
	active, waiting prometheus.Gauge
	max, overridden prometheus.Gauge
	admitted        prometheus.Counter
	rejected        [len(store.Reasons) + 1]prometheus.Counter
	abandoned       prometheus.Counter
	wait            prometheus.Observer
	// made at the first FairChanged (under the zone's lock), so that zones
	// without fair_share export no fair share series
	tenantsWaiting, fairness prometheus.Gauge
	toldWaiting              int // what this zone added to tenantsWaiting
}

func newZoneMetrics(zone string) engine.Observer {
	m := &zoneMetrics{
		zone:       zone,
		max:        metricMax.WithLabelValues(zone),
		overridden: metricOverridden.WithLabelValues(zone),
		active:     metricActive.WithLabelValues(zone),
		waiting:    metricWaiting.WithLabelValues(zone),
		admitted:   metricAdmitted.WithLabelValues(zone),
		abandoned:  metricAbandoned.WithLabelValues(zone),
		wait:       metricWait.WithLabelValues(zone),
	}
	for _, r := range store.Reasons {
		m.rejected[r] = metricRejected.WithLabelValues(zone, r.String())
	}
	return m
}

func (m *zoneMetrics) ActiveDelta(d int)        { m.active.Add(float64(d)) }
func (m *zoneMetrics) WaitingDelta(d int)       { m.waiting.Add(float64(d)) }
func (m *zoneMetrics) Abandoned()               { m.abandoned.Inc() }
func (m *zoneMetrics) Rejected(r engine.Reason) { m.rejected[r].Inc() }
func (m *zoneMetrics) Admitted(waited time.Duration) {
	m.admitted.Inc()
	m.wait.Observe(waited.Seconds())
}

func (m *zoneMetrics) LimitsChanged(l engine.Limits, overridden bool) {
	m.max.Set(float64(l.MaxConnections))
	if overridden {
		m.overridden.Set(1)
	} else {
		m.overridden.Set(0)
	}
}

// FairChanged implements engine.FairObserver.
func (m *zoneMetrics) FairChanged(tenantsWaiting int, index float64) {
	if m.tenantsWaiting == nil {
		m.tenantsWaiting = metricTenantsWaiting.WithLabelValues(m.zone)
		m.fairness = metricFairnessIndex.WithLabelValues(m.zone)
	}
	// Added, like active and waiting, so that handlers without a zone
	// (which share the label "") sum; the index is the last one told.
	m.tenantsWaiting.Add(float64(tenantsWaiting - m.toldWaiting))
	m.toldWaiting = tenantsWaiting
	m.fairness.Set(index)
}

// OverrideEnded logs that a config load ended the limits set through the
// admin API; setting and clearing them is logged by the admin API.
func (m *zoneMetrics) OverrideEnded() {
	caddy.Log().Named("layer4.handlers.connection_limit").Info("a config load changed the zone's settings: the limits override set through the admin API ended",
		zap.String("zone", m.zone))
}

// StoreOp implements engine.FleetObserver.
func (m *zoneMetrics) StoreOp(op string, took time.Duration, err error) {
	metricStoreSeconds.WithLabelValues(m.zone).Observe(took.Seconds())
	if err != nil {
		metricStoreErrors.WithLabelValues(m.zone, op).Inc()
	}
}

// StoreReached implements engine.FleetObserver, and says in the log when the
// store is lost and when it is back.
func (m *zoneMetrics) StoreReached(st store.State, err error) {
	log := caddy.Log().Named("layer4.handlers.connection_limit")
	if err != nil {
		metricStoreReachable.WithLabelValues(m.zone).Set(0)
		if !m.unreachable.Swap(true) {
			log.Warn("the zone's store cannot be reached: this node admits on its own (on_unreachable) until it is back",
				zap.String("zone", m.zone), zap.Error(err))
		}
		return
	}
	metricStoreReachable.WithLabelValues(m.zone).Set(1)
	metricFleetActive.WithLabelValues(m.zone).Set(float64(st.Active))
	metricFleetWaiting.WithLabelValues(m.zone).Set(float64(st.Waiting))
	if m.unreachable.Swap(false) {
		log.Info("the zone's store is reachable again: this node registered what it serves", zap.String("zone", m.zone))
	}
}

// Interface guards
var (
	_ engine.FleetObserver = (*zoneMetrics)(nil)
	_ engine.FairObserver  = (*zoneMetrics)(nil)
)
