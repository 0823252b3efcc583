package connlimit

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

func init() {
	caddy.RegisterModule(AdminAPI{})
}

// AdminAPI is the admin endpoint of connection_limit: it shows every zone
// and pauses or resumes admission to a named zone.
//
//	GET  /connection_limit/              all zones (and private handlers)
//	GET  /connection_limit/<zone>        one zone, with its waiters
//	POST /connection_limit/<zone>/pause  admit nobody new; everyone waits
//	POST /connection_limit/<zone>/resume admit again
type AdminAPI struct{}

// CaddyModule returns the Caddy module information.
func (AdminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.connection_limit",
		New: func() caddy.Module { return new(AdminAPI) },
	}
}

// Routes returns the admin routes.
func (a AdminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{Pattern: adminPrefix, Handler: caddy.AdminHandlerFunc(a.serve)}}
}

const (
	adminPrefix = "/connection_limit/"
	// maxListedWaiters caps the waiters shown for one zone.
	maxListedWaiters = 100
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
}

// zoneDetailJSON is the one-zone view: the zone and its waiters.
type zoneDetailJSON struct {
	zoneJSON
	Waiters          []waiterJSON `json:"waiters"`
	WaitersShownMax  int          `json:"waiters_shown_max"`
	WaitersTruncated bool         `json:"waiters_truncated"`
}

type waiterJSON struct {
	RemoteAddr string  `json:"remote_addr"`
	Key        string  `json:"key"`
	Priority   int     `json:"priority"`
	Waited     float64 `json:"waited_seconds"`
}

func zoneView(s Snapshot) zoneJSON {
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
		RejectedByReason: make(map[string]uint64, len(Reasons)),
		Abandoned:        s.Counters.Abandoned,
	}
	for _, r := range Reasons {
		v.RejectedByReason[r.String()] = s.Counters.Rejected[r]
	}
	return v
}

func (a AdminAPI) serve(w http.ResponseWriter, r *http.Request) error {
	rest := strings.Trim(strings.TrimPrefix(r.URL.Path, adminPrefix), "/")
	name, action, _ := strings.Cut(rest, "/")
	switch {
	case rest == "":
		if err := allowMethod(w, r, http.MethodGet); err != nil {
			return err
		}
		zones := zoneRegistry.Zones()
		list := make([]zoneJSON, 0, len(zones))
		now := time.Now()
		for _, z := range zones {
			list = append(list, zoneView(z.Snapshot(now, 0)))
		}
		return writeJSON(w, map[string]any{"zones": list})
	case action == "":
		if err := allowMethod(w, r, http.MethodGet); err != nil {
			return err
		}
		z, err := lookupZone(name)
		if err != nil {
			return err
		}
		s := z.Snapshot(time.Now(), maxListedWaiters)
		v := zoneDetailJSON{zoneJSON: zoneView(s)}
		v.Waiters = make([]waiterJSON, 0, len(s.Waiters))
		for _, wi := range s.Waiters {
			v.Waiters = append(v.Waiters, waiterJSON{RemoteAddr: wi.Remote, Key: wi.Key, Priority: wi.Priority, Waited: wi.Waited.Seconds()})
		}
		v.WaitersShownMax = maxListedWaiters
		v.WaitersTruncated = s.Waiting > len(s.Waiters)
		return writeJSON(w, v)
	case action == "pause" || action == "resume":
		if err := allowMethod(w, r, http.MethodPost); err != nil {
			return err
		}
		z, err := lookupZone(name)
		if err != nil {
			return err
		}
		z.SetPaused(action == "pause")
		caddy.Log().Named("layer4.handlers.connection_limit").Info("zone "+action+"d", zap.String("zone", name))
		return writeJSON(w, zoneView(z.Snapshot(time.Now(), 0)))
	}
	return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("no such endpoint: %s", r.URL.Path)}
}

func lookupZone(name string) (*Zone, error) {
	z, ok := zoneRegistry.Zone(name)
	if !ok {
		return nil, caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("unknown zone %q", name)}
	}
	return z, nil
}

func allowMethod(w http.ResponseWriter, r *http.Request, m string) error {
	if r.Method == m {
		return nil
	}
	w.Header().Set("Allow", m)
	return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method %s not allowed; use %s", r.Method, m)}
}

func writeJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(v)
}

// Interface guard
var _ caddy.AdminRouter = AdminAPI{}
