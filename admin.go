package connlimit

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/l4-connlimit/connlimit/internal/engine"
	"github.com/l4-connlimit/connlimit/store"
)

func init() {
	caddy.RegisterModule(AdminAPI{})
}

// AdminAPI is the admin endpoint of connection_limit: it shows every zone,
// pauses or resumes admission to a named zone, and changes its limits
// without a config load.
//
//	GET    /connection_limit/               all zones (and private handlers)
//	GET    /connection_limit/<zone>         one zone, with its waiters (and tenants)
//	POST   /connection_limit/<zone>/pause   admit nobody new; everyone waits
//	POST   /connection_limit/<zone>/resume  admit again
//	POST   /connection_limit/<zone>/limits  set limits over the config's, e.g. {"max_connections": 20}
//	DELETE /connection_limit/<zone>/limits  back to the config's limits
type AdminAPI struct{}

// CaddyModule returns the Caddy module information.
func (AdminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.connection_limit",
		New: func() caddy.Module { return new(AdminAPI) },
	}
}

// Routes returns the admin routes: one prefix, since zone names are part
// of the paths; serve hands each request to the handler of its route.
func (a AdminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{Pattern: adminPrefix, Handler: caddy.AdminHandlerFunc(a.serve)}}
}

const (
	adminPrefix = "/connection_limit/"
	// maxListedWaiters caps the waiters shown for one zone.
	maxListedWaiters = 100
	// maxListedTenants caps the tenants shown for one zone with a fair
	// share: those that hold the most slots.
	maxListedTenants = 100
	// maxLimitsBody caps the body of a limits request.
	maxLimitsBody = 4 << 10
)

type zoneJSON struct {
	Zone             string            `json:"zone"`
	MaxConnections   int               `json:"max_connections"`
	MaxWaiting       int               `json:"max_waiting"`
	WaitTimeout      string            `json:"wait_timeout"`
	Order            string            `json:"order"`
	Active           int               `json:"active"`
	Waiting          int               `json:"waiting"`
	OldestWait       float64           `json:"oldest_wait_seconds"`
	Paused           bool              `json:"paused"`
	Admitted         uint64            `json:"admitted"`
	Rejected         uint64            `json:"rejected"`
	RejectedByReason map[string]uint64 `json:"rejected_by_reason"`
	Abandoned        uint64            `json:"abandoned"`
	// Config is what the config sets; Override what the limits route set
	// over it (null: nothing). The fields above are the limits in force.
	Config   limitsJSON    `json:"config"`
	Override *overrideJSON `json:"override"`
	// Fleet is set for a zone shared through a store. The fields above
	// are then this node's (active, waiting, counters), but for the
	// limits, which are the fleet's in force.
	Fleet *fleetJSON `json:"fleet,omitempty"`
	// Fair is set for a zone that shares its slots fairly between tenants.
	Fair *fairJSON `json:"fair,omitempty"`
}

// fairJSON is a zone's fair share: its settings, and its tenants now.
type fairJSON struct {
	FairShare string         `json:"fair_share"`
	Weights   map[string]int `json:"weights"`
	FairMax   int            `json:"fair_max"` // 0: none
	// Tenants that hold a slot or wait, those that wait, and Jain's
	// fairness index over active ÷ weight of those that wait (1 when
	// none does).
	Tenants        int     `json:"tenants"`
	TenantsWaiting int     `json:"tenants_waiting"`
	FairnessIndex  float64 `json:"fairness_index"`
}

// tenantJSON is one tenant in the one-zone view.
type tenantJSON struct {
	Tenant     string  `json:"tenant"`
	Active     int     `json:"active"`
	Waiting    int     `json:"waiting"`
	Weight     int     `json:"weight"`
	OldestWait float64 `json:"oldest_wait_seconds"`
}

// fleetJSON is a fleet zone as this node sees it.
type fleetJSON struct {
	Node string `json:"node"`
	// Store is registered (the store decides), registering (admitting
	// nobody new until it is), holding (the store cannot be reached, the
	// node's lease runs still: it hands the slots it holds to its own
	// waiters, no more), or unreachable (its lease ran out: admitting on
	// its own, on_unreachable).
	Store         string `json:"store"`
	StoreError    string `json:"store_error,omitempty"`
	OnUnreachable string `json:"on_unreachable"`
	LocalShare    int    `json:"local_share"`
	// The fleet's totals and nodes, as this node last learned them.
	Active     int     `json:"active"`
	Waiting    int     `json:"waiting"`
	NodeCount  int     `json:"node_count"`
	LearnedAgo float64 `json:"learned_seconds_ago"`
	// Nodes, in the one-zone view: every node the store knows.
	Nodes []nodeJSON `json:"nodes,omitempty"`
}

type nodeJSON struct {
	ID         string  `json:"id"`
	Active     int     `json:"active"`
	Waiting    int     `json:"waiting"`
	RenewedAgo float64 `json:"renewed_seconds_ago"`
	ExpiresIn  float64 `json:"lease_expires_in_seconds"`
}

func fleetView(f *engine.FleetView, now time.Time) *fleetJSON {
	v := &fleetJSON{
		Node: f.Node, Store: f.State, StoreError: f.Error,
		OnUnreachable: "local_share", LocalShare: f.Unreachable.Share,
		Active: f.Fleet.Active, Waiting: f.Fleet.Waiting, NodeCount: f.Fleet.NodeCount, LearnedAgo: -1,
	}
	if f.Unreachable.Refuse {
		v.OnUnreachable = "refuse"
	}
	if !f.Learned.IsZero() {
		v.LearnedAgo = now.Sub(f.Learned).Seconds()
	}
	return v
}

type limitsJSON struct {
	MaxConnections int    `json:"max_connections"`
	MaxWaiting     int    `json:"max_waiting"`
	WaitTimeout    string `json:"wait_timeout"`
	Order          string `json:"order"`
}

// overrideJSON is the body of POST .../limits, and how an override is
// shown: the fields it sets.
type overrideJSON struct {
	MaxConnections *int    `json:"max_connections,omitempty"`
	MaxWaiting     *int    `json:"max_waiting,omitempty"`
	WaitTimeout    *string `json:"wait_timeout,omitempty"`
}

// zoneDetailJSON is the one-zone view: the zone and its waiters.
type zoneDetailJSON struct {
	zoneJSON
	Waiters          []waiterJSON `json:"waiters"`
	WaitersShownMax  int          `json:"waiters_shown_max"`
	WaitersTruncated bool         `json:"waiters_truncated"`
	// With a fair share: the tenants that hold the most slots.
	TenantList       []tenantJSON `json:"tenants,omitempty"`
	TenantsShownMax  int          `json:"tenants_shown_max,omitempty"`
	TenantsTruncated bool         `json:"tenants_truncated,omitempty"`
}

type waiterJSON struct {
	RemoteAddr string  `json:"remote_addr"`
	Key        string  `json:"key"`
	Tenant     string  `json:"tenant,omitempty"`
	Priority   int     `json:"priority"`
	Waited     float64 `json:"waited_seconds"`
}

// zoneView is the admin API's view of z, from its snapshot s.
func zoneView(z *engine.Zone, s engine.Snapshot) zoneJSON {
	v := zoneJSON{
		Zone:             s.Name,
		MaxConnections:   s.Limits.MaxConnections,
		MaxWaiting:       s.Limits.MaxWaiting,
		WaitTimeout:      s.Limits.WaitTimeout.String(),
		Order:            s.Limits.Order.String(),
		Active:           s.Active,
		Waiting:          s.Waiting,
		OldestWait:       s.OldestWait.Seconds(),
		Paused:           s.Paused,
		Admitted:         s.Counters.Admitted,
		Rejected:         s.Counters.RejectedTotal(),
		RejectedByReason: make(map[string]uint64, len(store.Reasons)),
		Abandoned:        s.Counters.Abandoned,
		Config: limitsJSON{
			MaxConnections: s.Config.MaxConnections,
			MaxWaiting:     s.Config.MaxWaiting,
			WaitTimeout:    s.Config.WaitTimeout.String(),
			Order:          s.Config.Order.String(),
		},
	}
	for _, r := range store.Reasons {
		v.RejectedByReason[r.String()] = s.Counters.Rejected[r]
	}
	if f := z.FleetView(); f != nil {
		v.Fleet = fleetView(f, time.Now())
	}
	if f := s.Fair; f.On() {
		v.Fair = &fairJSON{FairShare: f.Tenant, Weights: f.Weights, FairMax: f.Max,
			Tenants: s.Tenants, TenantsWaiting: s.TenantsWaiting, FairnessIndex: s.FairIndex}
		if v.Fair.Weights == nil {
			v.Fair.Weights = map[string]int{}
		}
	}
	if o := s.Override; !o.IsZero() {
		v.Override = &overrideJSON{MaxConnections: o.MaxConnections, MaxWaiting: o.MaxWaiting}
		if o.WaitTimeout != nil {
			d := o.WaitTimeout.String()
			v.Override.WaitTimeout = &d
		}
	}
	return v
}

// serve routes a request by its path.
func (a AdminAPI) serve(w http.ResponseWriter, r *http.Request) error {
	rest := strings.Trim(strings.TrimPrefix(r.URL.Path, adminPrefix), "/")
	name, action, _ := strings.Cut(rest, "/")
	switch {
	case rest == "":
		return a.handleList(w, r)
	case action == "":
		return a.handleZone(w, r, name)
	case action == "pause" || action == "resume":
		return a.handlePause(w, r, name, action == "pause")
	case action == "limits":
		return a.handleLimits(w, r, name)
	}
	return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("no such endpoint: %s", r.URL.Path)}
}

// handleList: GET /connection_limit/
func (AdminAPI) handleList(w http.ResponseWriter, r *http.Request) error {
	if err := allowMethods(w, r, http.MethodGet); err != nil {
		return err
	}
	zones := zones.Zones()
	list := make([]zoneJSON, 0, len(zones))
	now := time.Now()
	for _, z := range zones {
		list = append(list, zoneView(z, z.Snapshot(now, 0)))
	}
	return writeJSON(w, map[string]any{"zones": list})
}

// handleZone: GET /connection_limit/<zone>
func (AdminAPI) handleZone(w http.ResponseWriter, r *http.Request, name string) error {
	if err := allowMethods(w, r, http.MethodGet); err != nil {
		return err
	}
	z, err := lookupZone(name)
	if err != nil {
		return err
	}
	s := z.SnapshotTenants(time.Now(), maxListedWaiters, maxListedTenants)
	v := zoneDetailJSON{zoneJSON: zoneView(z, s)}
	v.Waiters = make([]waiterJSON, 0, len(s.Waiters))
	for _, wi := range s.Waiters {
		v.Waiters = append(v.Waiters, waiterJSON{RemoteAddr: wi.Remote, Key: wi.Key, Tenant: wi.Tenant, Priority: wi.Priority, Waited: wi.Waited.Seconds()})
	}
	v.WaitersShownMax = maxListedWaiters
	v.WaitersTruncated = s.Waiting > len(s.Waiters)
	if s.Fair.On() {
		v.TenantList = make([]tenantJSON, 0, len(s.TenantList))
		for _, ti := range s.TenantList {
			v.TenantList = append(v.TenantList, tenantJSON{Tenant: ti.Tenant, Active: ti.Active, Waiting: ti.Waiting,
				Weight: ti.Weight, OldestWait: ti.OldestWait.Seconds()})
		}
		v.TenantsShownMax = maxListedTenants
		v.TenantsTruncated = s.Tenants > len(s.TenantList)
	}
	if st, ok, err := z.FleetStatus(r.Context()); ok {
		if err != nil {
			v.Fleet.StoreError = err.Error()
		} else {
			v.Fleet.Active, v.Fleet.Waiting, v.Fleet.NodeCount, v.Fleet.LearnedAgo = st.Active, st.Waiting, st.NodeCount, 0
			for _, n := range st.Nodes {
				v.Fleet.Nodes = append(v.Fleet.Nodes, nodeJSON{ID: n.ID, Active: n.Active, Waiting: n.Waiting,
					RenewedAgo: n.Renewed.Seconds(), ExpiresIn: n.Expires.Seconds()})
			}
		}
	}
	return writeJSON(w, v)
}

// handlePause: POST /connection_limit/<zone>/pause and .../resume
func (AdminAPI) handlePause(w http.ResponseWriter, r *http.Request, name string, pause bool) error {
	if err := allowMethods(w, r, http.MethodPost); err != nil {
		return err
	}
	z, err := lookupZone(name)
	if err != nil {
		return err
	}
	z.SetPaused(pause)
	msg := "zone resumed"
	if pause {
		msg = "zone paused"
	}
	adminLogger().Info(msg, zap.String("zone", name))
	return writeJSON(w, zoneView(z, z.Snapshot(time.Now(), 0)))
}

// handleLimits: POST /connection_limit/<zone>/limits sets limits over the
// config's at once (the fields given; others as before), DELETE puts the
// config's back. A config load that changes the zone's settings ends the
// override; one that leaves them as they were keeps it.
func (AdminAPI) handleLimits(w http.ResponseWriter, r *http.Request, name string) error {
	if err := allowMethods(w, r, http.MethodPost, http.MethodDelete); err != nil {
		return err
	}
	z, err := lookupZone(name)
	if err != nil {
		return err
	}
	if r.Method == http.MethodDelete {
		if z.ClearOverride() {
			adminLogger().Info("limits override cleared: the config's limits are in force", zap.String("zone", name))
		}
		return writeJSON(w, zoneView(z, z.Snapshot(time.Now(), 0)))
	}
	o, err := decodeOverride(r.Body)
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
	}
	if err := z.SetOverride(o); err != nil {
		return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
	}
	s := z.Snapshot(time.Now(), 0)
	adminLogger().Info("limits override set",
		zap.String("zone", name),
		zap.Int("max_connections", s.Limits.MaxConnections),
		zap.Int("max_waiting", s.Limits.MaxWaiting),
		zap.Duration("wait_timeout", s.Limits.WaitTimeout))
	return writeJSON(w, zoneView(z, s))
}

// decodeOverride reads a limits body: a JSON object with any of
// max_connections, max_waiting and wait_timeout (a duration string), and
// nothing else.
func decodeOverride(body io.Reader) (engine.Override, error) {
	raw, err := io.ReadAll(io.LimitReader(body, maxLimitsBody+1))
	if err != nil {
		return engine.Override{}, fmt.Errorf("reading the body: %v", err)
	}
	if len(raw) > maxLimitsBody {
		return engine.Override{}, fmt.Errorf("body larger than %d bytes", maxLimitsBody)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	var v overrideJSON
	if err := dec.Decode(&v); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) && te.Field != "" {
			return engine.Override{}, fmt.Errorf("%s: must be %s, got %s", te.Field, jsonKind(te.Field), te.Value)
		}
		return engine.Override{}, fmt.Errorf("body must be a JSON object with any of max_connections, max_waiting and wait_timeout: %v", err)
	}
	if dec.More() {
		return engine.Override{}, fmt.Errorf("body must be one JSON object")
	}
	o := engine.Override{MaxConnections: v.MaxConnections, MaxWaiting: v.MaxWaiting}
	if v.WaitTimeout != nil {
		d, err := caddy.ParseDuration(*v.WaitTimeout)
		if err != nil {
			return engine.Override{}, fmt.Errorf("wait_timeout: %v", err)
		}
		o.WaitTimeout = &d
	}
	if o.IsZero() {
		return engine.Override{}, fmt.Errorf("body sets none of max_connections, max_waiting and wait_timeout")
	}
	return o, nil
}

func jsonKind(field string) string {
	if field == "wait_timeout" {
		return "a duration string such as \"30s\""
	}
	return "an integer"
}

func adminLogger() *zap.Logger { return caddy.Log().Named("layer4.handlers.connection_limit") }

func lookupZone(name string) (*engine.Zone, error) {
	z, ok := zones.Zone(name)
	if !ok {
		return nil, caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("unknown zone %q", name)}
	}
	return z, nil
}

func allowMethods(w http.ResponseWriter, r *http.Request, methods ...string) error {
	for _, m := range methods {
		if r.Method == m {
			return nil
		}
	}
	allow := strings.Join(methods, ", ")
	w.Header().Set("Allow", allow)
	return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method %s not allowed; use %s", r.Method, allow)}
}

func writeJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(v)
}

// Interface guard
var _ caddy.AdminRouter = AdminAPI{}
