package connlimit

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	_ "github.com/caddyserver/caddy/v2/modules/metrics"
	"github.com/l4-connlimit/connlimit/internal/testkit"
)

// One scenario read through /metrics and the admin endpoints at every
// step: limit reached, waiters, each kind of rejection, an abandoned waiter,
// a pause and resume with waiters queued, and reloads in between.
func TestMetricsAndAdminAPI(t *testing.T) {
	be := newBackend(t, true)
	admin := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	// Counters live as long as the process: a zone of its own per run.
	ops := fmt.Sprintf("ops%d", time.Now().UnixNano())
	cfg := func(fields obj) obj {
		f := obj{"max_connections": 2, "zone": ops}
		for k, v := range fields {
			f[k] = v
		}
		return l4Config(admin, listen, limit(f), proxyTo(be.addr()))
	}
	loadConfig(t, cfg(obj{"max_waiting": 2}))
	defer stopCaddy(t)

	clients := map[string]*client{}
	connect := func(id string) *client {
		c := dial(t, listen, id)
		c.hello("")
		clients[id] = c
		return c
	}
	connect("h1")
	connect("h2")
	be.waitArrivals(2, 5*time.Second)
	connect("w1")
	waitCounts(t, ops, 2, 1)
	connect("w2")
	waitCounts(t, ops, 2, 2)
	rejected := func(id string) {
		c := dial(t, listen, id)
		c.hello("")
		c.expectClosed(5 * time.Second)
	}
	rejected("full") // queue_full

	z := getZone(t, admin, ops)
	expectZone(t, z, 2, 2, 2, 1, 0, false)
	if len(z.Waiters) != 2 || z.Waiters[0].RemoteAddr != clients["w1"].conn.LocalAddr().String() || z.Waiters[1].RemoteAddr != clients["w2"].conn.LocalAddr().String() {
		t.Fatalf("waiters %+v, want w1 then w2", z.Waiters)
	}
	if z.OldestWait <= 0 || z.Waiters[0].Waited < z.Waiters[1].Waited || z.WaitersShownMax != maxListedWaiters || z.WaitersTruncated {
		t.Fatalf("zone view %+v", z)
	}
	expectMetrics(t, admin, ops, map[string]float64{
		"active": 2, "waiting": 2, "admitted_total": 2, "abandoned_total": 0,
		"rejected_total|reason=\"queue_full\"": 1, "rejected_total|reason=\"no_waiting\"": 0,
		"wait_seconds_count": 2, "wait_seconds_bucket|le=\"0.0001\"": 2,
		"max_connections": 2, "max_waiting": 2, "paused": 0,
	})

	// A waiter leaves: abandoned.
	_ = clients["w2"].conn.Close()
	delete(clients, "w2")
	waitCounts(t, ops, 2, 1)

	// Pause: a freed slot admits nobody; resume admits at once.
	if code, body := adminDo(t, http.MethodPost, "http://"+admin+"/connection_limit/"+ops+"/pause", "", nil); code != http.StatusOK || !strings.Contains(string(body), `"paused":true`) {
		t.Fatalf("pause: %d %s", code, body)
	}
	finish(be, clients["h1"])
	delete(clients, "h1")
	connect("w3")
	waitCounts(t, ops, 1, 2)
	be.noArrival(200 * time.Millisecond)
	expectZone(t, getZone(t, admin, ops), 1, 2, 2, 1, 1, true)
	expectMetrics(t, admin, ops, map[string]float64{"paused": 1, "max_waiting": 2})

	// A reload keeps the pause, the counts and the metrics.
	loadConfig(t, cfg(obj{"max_waiting": -1}))
	expectZone(t, getZone(t, admin, ops), 1, 2, 2, 1, 1, true)
	expectMetrics(t, admin, ops, map[string]float64{"paused": 1, "max_waiting": -1})
	rejected("nowait") // no_waiting
	if code, body := adminDo(t, http.MethodPost, "http://"+admin+"/connection_limit/"+ops+"/resume", "", nil); code != http.StatusOK {
		t.Fatalf("resume: %d %s", code, body)
	}
	if id := be.waitArrivals(1, time.Second)[0]; id != "w1" {
		t.Fatalf("%s admitted after resume, want w1", id)
	}
	expectZone(t, getZone(t, admin, ops), 2, 1, 3, 2, 1, false)
	expectMetrics(t, admin, ops, map[string]float64{"paused": 0})

	// A wait_timeout that the remaining waiter has already outlived.
	time.Sleep(60 * time.Millisecond)
	loadConfig(t, cfg(obj{"wait_timeout": "50ms"}))
	clients["w3"].expectClosed(5 * time.Second) // wait_timeout
	delete(clients, "w3")
	expectZone(t, getZone(t, admin, ops), 2, 0, 3, 3, 1, false)
	expectMetrics(t, admin, ops, map[string]float64{
		"active": 2, "waiting": 0, "admitted_total": 3, "abandoned_total": 1,
		"rejected_total|reason=\"queue_full\"":   1,
		"rejected_total|reason=\"no_waiting\"":   1,
		"rejected_total|reason=\"wait_timeout\"": 1,
		"wait_seconds_count":                     3,
	})

	for id, c := range clients {
		finish(be, c)
		delete(clients, id)
	}
	waitCounts(t, ops, 0, 0)
	expectMetrics(t, admin, ops, map[string]float64{"active": 0, "waiting": 0, "admitted_total": 3})

	// The list shows the zone; errors are JSON with the right status.
	code, body := adminDo(t, http.MethodGet, "http://"+admin+"/connection_limit/", "", nil)
	var list struct{ Zones []zoneJSON }
	if err := json.Unmarshal(body, &list); code != http.StatusOK || err != nil {
		t.Fatalf("list: %d %s %v", code, body, err)
	}
	found := false
	for _, z := range list.Zones {
		found = found || (z.Zone == ops && z.Admitted == 3 && z.MaxConnections == 2)
	}
	if !found {
		t.Fatalf("zone ops not in %s", body)
	}
	for _, tc := range []struct {
		method, path string
		code         int
	}{
		{http.MethodGet, "/connection_limit/nonesuch", http.StatusNotFound},
		{http.MethodPost, "/connection_limit/nonesuch/pause", http.StatusNotFound},
		{http.MethodPost, "/connection_limit/" + ops + "", http.StatusMethodNotAllowed},
		{http.MethodGet, "/connection_limit/" + ops + "/pause", http.StatusMethodNotAllowed},
		{http.MethodDelete, "/connection_limit/", http.StatusMethodNotAllowed},
		{http.MethodPost, "/connection_limit/" + ops + "/frobnicate", http.StatusNotFound},
	} {
		code, body := adminDo(t, tc.method, "http://"+admin+tc.path, "", nil)
		if code != tc.code || !strings.Contains(string(body), `"error"`) {
			t.Errorf("%s %s: %d %s, want %d with a JSON error", tc.method, tc.path, code, body, tc.code)
		}
	}
}

// POST /connection_limit/<zone>/limits changes a running zone's limits
// without a config load; DELETE puts the config's back; a config load with
// the same settings keeps the override, one with new settings ends it.
func TestLimitsRouteChangesAZoneWithoutReload(t *testing.T) {
	be := newBackend(t, true)
	admin := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	zone := fmt.Sprintf("ovr%d", time.Now().UnixNano())
	cfg := func(max int) obj {
		return l4Config(admin, listen, limit(obj{"max_connections": max, "zone": zone}), proxyTo(be.addr()))
	}
	loadConfig(t, cfg(1))
	defer stopCaddy(t)
	limitsURL := "http://" + admin + "/connection_limit/" + zone + "/limits"
	post := func(body string) (int, string) {
		code, b := adminDo(t, http.MethodPost, limitsURL, "application/json", []byte(body))
		return code, string(b)
	}

	var clients []*client
	clients = append(clients, takeSlot(t, be, listen, "h"))
	for i := range 3 {
		c := dial(t, listen, fmt.Sprintf("w%d", i))
		c.hello("")
		clients = append(clients, c)
	}
	waitCounts(t, zone, 1, 3)

	// Raising the limit admits waiters at once.
	if code, body := post(`{"max_connections": 3}`); code != http.StatusOK {
		t.Fatalf("POST limits: %d %s", code, body)
	}
	be.waitArrivals(2, 5*time.Second)
	waitCounts(t, zone, 3, 1)
	z := getZone(t, admin, zone)
	if z.MaxConnections != 3 || z.Config.MaxConnections != 1 || z.Override == nil || z.Override.MaxConnections == nil || *z.Override.MaxConnections != 3 {
		t.Fatalf("zone view after the override: max %d, config %+v, override %+v", z.MaxConnections, z.Config, z.Override)
	}
	expectMetrics(t, admin, zone, map[string]float64{"max_connections": 3, "limits_overridden": 1})

	// Bad values answer 400 with the field named, and change nothing.
	for body, field := range map[string]string{
		`{"max_connections": 0}`:       "max_connections",
		`{"max_connections": "many"}`:  "max_connections",
		`{"max_waiting": -5}`:          "max_waiting",
		`{"wait_timeout": "soon"}`:     "wait_timeout",
		`{"wait_timeout": "-1s"}`:      "wait_timeout",
		`{"order": "lifo"}`:            "order",
		`{}`:                           "max_connections, max_waiting and wait_timeout",
		`[1]`:                          "JSON object",
		`{"max_connections": 2} {"x"}`: "one JSON object",
	} {
		code, resp := post(body)
		if code != http.StatusBadRequest || !strings.Contains(resp, field) {
			t.Errorf("POST %s: %d %s; want 400 naming %s", body, code, resp, field)
		}
	}
	if code, _ := adminDo(t, http.MethodGet, limitsURL, "", nil); code != http.StatusMethodNotAllowed {
		t.Errorf("GET limits: %d, want 405", code)
	}
	if code, _ := adminDo(t, http.MethodPost, "http://"+admin+"/connection_limit/nosuchzone/limits", "application/json", []byte(`{"max_connections": 2}`)); code != http.StatusNotFound {
		t.Errorf("POST limits of an unknown zone: %d, want 404", code)
	}
	if z := getZone(t, admin, zone); z.MaxConnections != 3 {
		t.Fatalf("bad bodies changed max_connections to %d", z.MaxConnections)
	}

	// Lowering cuts nobody.
	if code, body := post(`{"max_connections": 2, "wait_timeout": "1m"}`); code != http.StatusOK {
		t.Fatalf("POST limits: %d %s", code, body)
	}
	waitCounts(t, zone, 3, 1)
	be.noArrival(100 * time.Millisecond)

	// A config load with the same settings keeps the override.
	if code, body := adminLoad(t, admin, cfg(1)); code != http.StatusOK {
		t.Fatalf("load: %d %s", code, body)
	}
	if z := getZone(t, admin, zone); z.MaxConnections != 2 || z.WaitTimeout != "1m0s" || z.Override == nil {
		t.Fatalf("a load with the same settings: max %d, wait_timeout %s, override %+v", z.MaxConnections, z.WaitTimeout, z.Override)
	}
	// One with new settings ends it: max 4 admits the last waiter.
	if code, body := adminLoad(t, admin, cfg(4)); code != http.StatusOK {
		t.Fatalf("load: %d %s", code, body)
	}
	be.waitArrivals(1, 5*time.Second)
	waitCounts(t, zone, 4, 0)
	if z := getZone(t, admin, zone); z.MaxConnections != 4 || z.WaitTimeout != "0s" || z.Override != nil {
		t.Fatalf("a load with new settings: max %d, wait_timeout %s, override %+v", z.MaxConnections, z.WaitTimeout, z.Override)
	}
	expectMetrics(t, admin, zone, map[string]float64{"max_connections": 4, "limits_overridden": 0})

	// DELETE puts the config's limits back.
	if code, body := post(`{"max_connections": 1}`); code != http.StatusOK {
		t.Fatalf("POST limits: %d %s", code, body)
	}
	if code, body := adminDo(t, http.MethodDelete, limitsURL, "", nil); code != http.StatusOK || !strings.Contains(string(body), `"max_connections":4`) || !strings.Contains(string(body), `"override":null`) {
		t.Fatalf("DELETE limits: %d %s", code, body)
	}
	for _, c := range clients {
		finish(be, c)
	}
	waitCounts(t, zone, 0, 0)
}

// A fleet zone whose store cannot be reached says so in store_mode: with
// on_unreachable refuse it is unreachable (nobody new is admitted), with
// local_share it admits on its share, which local_share gives; a zone
// without a store has no store_mode. No redis-server is needed: the store's
// address is a port nobody listens on.
func TestMetricsStoreModeWhileUnreachable(t *testing.T) {
	be := newBackend(t, false)
	admin := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	nobody := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	id := time.Now().UnixNano()
	refuse, share, alone := fmt.Sprintf("refuse%d", id), fmt.Sprintf("share%d", id), fmt.Sprintf("alone%d", id)
	store := func(fields obj) obj {
		s := obj{"backend": "redis", "address": nobody, "lease": "1s"}
		for k, v := range fields {
			s[k] = v
		}
		return s
	}
	// Three limits in a row on one route: each zone is made at provision.
	cfg := l4Config(admin, fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t)),
		limit(obj{"zone": refuse, "max_connections": 4, "store": store(obj{"on_unreachable": "refuse"})}),
		limit(obj{"zone": share, "max_connections": 4, "store": store(obj{"on_unreachable": "local_share", "local_share": 3})}),
		limit(obj{"zone": alone, "max_connections": 4}),
		proxyTo(be.addr()))
	loadConfig(t, cfg)
	defer stopCaddy(t)

	const p = "caddy_layer4_connection_limit_"
	mode := func(zone, m string) string { return fmt.Sprintf(`%sstore_mode{mode="%s",zone="%s"}`, p, m, zone) }
	want := map[string]float64{
		mode(refuse, "unreachable"): 1, mode(refuse, "registered"): 0, mode(refuse, "registering"): 0, mode(refuse, "local_share"): 0,
		mode(share, "local_share"): 1, mode(share, "registered"): 0, mode(share, "registering"): 0, mode(share, "unreachable"): 0,
		p + `local_share{zone="` + refuse + `"}`:     0,
		p + `local_share{zone="` + share + `"}`:      3,
		p + `store_reachable{zone="` + refuse + `"}`: 0,
		p + `store_reachable{zone="` + share + `"}`:  0,
	}
	var m map[string]float64
	deadline := time.Now().Add(10 * time.Second)
	for {
		m = scrape(t, admin)
		ok := true
		for k, v := range want {
			if g, found := m[k]; !found || g != v {
				ok = false
			}
		}
		if ok {
			break
		}
		if time.Now().After(deadline) {
			for k, v := range want {
				if g, found := m[k]; !found || g != v {
					t.Errorf("%s = %v (exported: %v), want %v", k, g, found, v)
				}
			}
			t.FailNow()
		}
		time.Sleep(50 * time.Millisecond)
	}
	for k := range m {
		if strings.Contains(k, `zone="`+alone+`"`) && (strings.Contains(k, "store_") || strings.Contains(k, "local_share") || strings.Contains(k, "fleet_")) {
			t.Errorf("a zone without a store exports %s", k)
		}
	}
	if _, ok := m[p+`paused{zone="`+alone+`"}`]; !ok {
		t.Errorf("no paused gauge for the zone without a store")
	}
}
