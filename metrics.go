package connlimit

import (
	"errors"
	"sync"
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
	metricMaxWaiting = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "layer4_connection_limit", Name: "max_waiting",
		Help: "The max_waiting in force (per key value, when a key is set): -1 nobody waits, 0 no bound.",
	}, []string{"zone"})
	metricPaused = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: "caddy", Subsystem: "layer4_connection_limit", Name: "paused",
		Help: "1 while the zone is paused (admits nobody new), else 0.",
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
		metricMax, metricMaxWaiting, metricPaused, metricOverridden, metricWait, metricTenantsWaiting, metricFairnessIndex,
		metricStoreReachable, metricStoreErrors, metricStoreSeconds, metricFleetActive, metricFleetWaiting,
		fleetCollector{}}
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
	storeOnce       sync.Once   // store_errors_total at 0 for every operation
	active, waiting prometheus.Gauge
	max, overridden prometheus.Gauge
	maxWaiting      prometheus.Gauge
	paused          prometheus.Gauge
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
		maxWaiting: metricMaxWaiting.WithLabelValues(zone),
		paused:     metricPaused.WithLabelValues(zone),
		active:     metricActive.WithLabelValues(zone),
		waiting:    metricWaiting.WithLabelValues(zone),
		admitted:   metricAdmitted.WithLabelValues(zone),
		abandoned:  metricAbandoned.WithLabelValues(zone),
		wait:       metricWait.WithLabelValues(zone),
	}
	for _, r := range store.Reasons {
		m.rejected[r] = metricRejected.WithLabelValues(zone, r.String())
	}
	m.paused.Set(0) // a new zone starts resumed, whatever one of the same name was
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
	m.maxWaiting.Set(float64(l.MaxWaiting))
	if overridden {
		m.overridden.Set(1)
	} else {
		m.overridden.Set(0)
	}
}

func (m *zoneMetrics) Paused(p bool) {
	if p {
		m.paused.Set(1)
	} else {
		m.paused.Set(0)
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

// storeOps are the operations fleet_node.go names in StoreOp.
var storeOps = []string{"take", "give", "leave", "renew", "register", "set_limits", "set_paused", "status", "deregister"}

// storeErrorsAtZero exports store_errors_total at 0 for every operation
// once the zone is seen to have a store, so that rate() and increase()
// count a first error too (a series that appears at 1 shows no increase).
func (m *zoneMetrics) storeErrorsAtZero() {
	m.storeOnce.Do(func() {
		for _, op := range storeOps {
			metricStoreErrors.WithLabelValues(m.zone, op)
		}
	})
}

// StoreOp implements engine.FleetObserver.
func (m *zoneMetrics) StoreOp(op string, took time.Duration, err error) {
	m.storeErrorsAtZero()
	metricStoreSeconds.WithLabelValues(m.zone).Observe(took.Seconds())
	if err != nil {
		metricStoreErrors.WithLabelValues(m.zone, op).Inc()
	}
}

// StoreReached implements engine.FleetObserver, and says in the log when the
// store is lost and when it is back.
func (m *zoneMetrics) StoreReached(st store.State, err error) {
	m.storeErrorsAtZero()
	log := caddy.Log().Named("layer4.handlers.connection_limit")
	if err != nil {
		metricStoreReachable.WithLabelValues(m.zone).Set(0)
		if !m.unreachable.Swap(true) {
			log.Warn("the zone's store cannot be reached: this node hands the slots it holds to its own waiters until its lease runs out, then admits on its own (on_unreachable) until the store is back",
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

// The store mode of a fleet zone and its local share are read from the
// zone at each scrape (FleetView), not kept from events: the node changes
// mode under the zone's lock in several places (a failed take, a renewal,
// a registration), and whether an unreachable store means admitting on
// a share depends on the zone's on_unreachable, which no event carries.
// A zone that has no store, or is gone, has no series.
var (
	descStoreMode = prometheus.NewDesc("caddy_layer4_connection_limit_store_mode",
		"The node's mode in the zone's fleet, one series per mode, 1 for the one it is in: registered (the store decides), "+
			"registering (nobody new is admitted until it has registered), holding (the store cannot be reached and the node's lease runs still: "+
			"it hands the slots it holds to its own waiters, no more), unreachable (its lease ran out, on_unreachable refuse: nobody new is admitted), "+
			"local_share (its lease ran out: the node admits up to local_share on its own).",
		[]string{"zone", "mode"}, nil)
	descLocalShare = prometheus.NewDesc("caddy_layer4_connection_limit_local_share",
		"How many connections (per key value) this node admits on its own while the zone's store is unreachable, counting those it holds: "+
			"on_unreachable local_share n, or max_connections divided by the nodes last seen; 0 with refuse.",
		[]string{"zone"}, nil)
	// storeModes in the order the series are written.
	storeModes = []string{"registered", "registering", "holding", "unreachable", "local_share"}
)

// fleetCollector writes store_mode and local_share for every fleet zone
// of the process.
type fleetCollector struct{}

func (fleetCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descStoreMode
	ch <- descLocalShare
}

func (fleetCollector) Collect(ch chan<- prometheus.Metric) {
	for _, z := range zones.Zones() {
		v := z.FleetView()
		if v == nil {
			continue
		}
		s := z.Snapshot(time.Now(), 0)
		mode := v.State
		if mode == "unreachable" && !v.Unreachable.Refuse { // FleetView.State: registered, registering, holding or unreachable
			mode = "local_share"
		}
		for _, m := range storeModes {
			val := 0.0
			if m == mode {
				val = 1
			}
			ch <- prometheus.MustNewConstMetric(descStoreMode, prometheus.GaugeValue, val, s.Name, m)
		}
		share := v.Unreachable.Admits(s.Limits.MaxConnections, v.Fleet.NodeCount)
		ch <- prometheus.MustNewConstMetric(descLocalShare, prometheus.GaugeValue, float64(share), s.Name)
	}
}

// Interface guards
var (
	_ engine.FleetObserver = (*zoneMetrics)(nil)
	_ engine.FairObserver  = (*zoneMetrics)(nil)
	_ prometheus.Collector = fleetCollector{}
)
