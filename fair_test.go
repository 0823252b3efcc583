package connlimit

import (
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/l4-connlimit/connlimit/internal/testkit"
)

// fair_share end to end: real Caddy in-process, real clients from
// distinct 127.0.0.x source addresses (each its own tenant by
// {l4.conn.remote_ip}), and a gated backend that shows who got a slot.

const byIP = "{l4.conn.remote_ip}"

// queueFrom connects a client of tenant ip that waits: the zone then has
// active and waiting connections.
func queueFrom(t *testing.T, ip, listen, id, zone string, active, waiting int) *client {
	t.Helper()
	c := dialFrom(t, ip, listen, id)
	c.hello("")
	waitCounts(t, zone, active, waiting)
	return c
}

// holdFrom connects a client of tenant ip that is admitted at once.
func holdFrom(t *testing.T, be *backend, ip, listen, id string) *client {
	t.Helper()
	c := dialFrom(t, ip, listen, id)
	c.hello("")
	if got := be.waitArrivals(1, 5*time.Second); got[0] != id {
		t.Fatalf("%s reached the backend, want %s", got[0], id)
	}
	return c
}

// nextArrival finishes c and returns who reaches the backend next.
func nextArrival(t *testing.T, be *backend, c *client) string {
	t.Helper()
	finish(be, c)
	return be.waitArrivals(1, 5*time.Second)[0]
}

// A light tenant that arrives behind a heavy tenant's backlog gets the
// next free slot; the heavy tenant's waiters keep their order.
func TestFairShareLightTenantAheadOfHeavyBacklog(t *testing.T) {
	const zone = "fair-light"
	be := newBackend(t, true)
	listen := limitedRoute(t, be, obj{"max_connections": 2, "zone": zone, "fair_share": byIP})
	cs := map[string]*client{}
	cs["h0"] = holdFrom(t, be, "127.0.0.2", listen, "h0")
	cs["h1"] = holdFrom(t, be, "127.0.0.2", listen, "h1")
	for i := 2; i < 8; i++ {
		id := fmt.Sprintf("h%d", i)
		cs[id] = queueFrom(t, "127.0.0.2", listen, id, zone, 2, i-1)
	}
	cs["l0"] = queueFrom(t, "127.0.0.3", listen, "l0", zone, 2, 7)
	if got := nextArrival(t, be, cs["h0"]); got != "l0" {
		t.Fatalf("after a heavy slot freed, %s got it; want the light tenant's l0 (ahead of 6 heavy waiters)", got)
	}
	// The light tenant has no more waiters: the heavy backlog, in order.
	want := []string{"h2", "h3", "h4", "h5", "h6", "h7"}
	done := []string{"h1", "l0", "h2", "h3", "h4", "h5"}
	for i, id := range done {
		if got := nextArrival(t, be, cs[id]); got != want[i] {
			t.Fatalf("after %s, %s got the slot; want %s", id, got, want[i])
		}
	}
	finish(be, cs["h6"])
	finish(be, cs["h7"])
	waitCounts(t, zone, 0, 0)
	if _, peak, _, _ := be.stats(); peak != 2 {
		t.Fatalf("backend peak %d, want 2", peak)
	}
}

// A tenant alone uses every slot; with two backlogged tenants, weights 3
// and 1 share 4 slots 3 and 1.
func TestFairShareWeightsGiveProportionalShares(t *testing.T) {
	const zone = "fair-weights"
	be := newBackend(t, true)
	listen := limitedRoute(t, be, obj{"max_connections": 4, "zone": zone, "fair_share": byIP,
		"weights": obj{"127.0.0.2": 3}})
	cs := map[string]*client{}
	tenantOf := map[string]string{}
	var held []string  // oldest first
	for i := range 4 { // B alone takes every slot
		id := fmt.Sprintf("b%d", i)
		cs[id] = holdFrom(t, be, "127.0.0.3", listen, id)
		tenantOf[id] = "B"
		held = append(held, id)
	}
	waiting := 0
	for i := range 10 {
		for _, tn := range []struct{ name, ip string }{{"A", "127.0.0.2"}, {"B", "127.0.0.3"}} {
			id := fmt.Sprintf("%s%d", strings.ToLower(tn.name), i+4)
			waiting++
			cs[id] = queueFrom(t, tn.ip, listen, id, zone, 4, waiting)
			tenantOf[id] = tn.name
		}
	}
	for round := range 12 {
		got := nextArrival(t, be, cs[held[0]])
		held = append(held[1:], got)
		count := map[string]int{}
		for _, id := range held {
			count[tenantOf[id]]++
		}
		// From the third turnover on, A (weight 3) holds 3 and B 1.
		if round >= 2 && (count["A"] != 3 || count["B"] != 1) {
			t.Fatalf("turnover %d: held %v (%v); want A 3 and B 1", round, count, held)
		}
	}
	s := namedZone(t, zone).SnapshotTenants(time.Now(), 0, 10)
	if s.FairIndex < 0.99 || s.TenantsWaiting != 2 || len(s.TenantList) != 2 ||
		s.TenantList[0].Tenant != "127.0.0.2" || s.TenantList[0].Active != 3 || s.TenantList[0].Weight != 3 {
		t.Fatalf("zone's tenants %+v, index %g", s.TenantList, s.FairIndex)
	}
	for len(held) > 0 { // drain: each freed slot goes to a waiter while any wait
		_, w := zoneCounts(zone)
		finish(be, cs[held[0]])
		held = held[1:]
		if w > 0 {
			held = append(held, be.waitArrivals(1, 5*time.Second)[0])
		}
	}
	waitCounts(t, zone, 0, 0)
}

// fair_max caps a tenant even alone: its other connections wait while
// slots are free, and another tenant is admitted at once.
func TestFairShareFairMaxCapsATenantAlone(t *testing.T) {
	const zone = "fair-max"
	be := newBackend(t, true)
	listen := limitedRoute(t, be, obj{"max_connections": 4, "zone": zone, "fair_share": byIP, "fair_max": 2})
	a0 := holdFrom(t, be, "127.0.0.2", listen, "a0")
	a1 := holdFrom(t, be, "127.0.0.2", listen, "a1")
	a2 := queueFrom(t, "127.0.0.2", listen, "a2", zone, 2, 1)
	a3 := queueFrom(t, "127.0.0.2", listen, "a3", zone, 2, 2)
	be.noArrival(200 * time.Millisecond)
	b0 := holdFrom(t, be, "127.0.0.3", listen, "b0")
	waitCounts(t, zone, 3, 2)
	if got := nextArrival(t, be, a0); got != "a2" {
		t.Fatalf("after a0, %s got the slot; want a2", got)
	}
	waitCounts(t, zone, 3, 1)
	finish(be, b0)
	be.noArrival(200 * time.Millisecond) // a3 stays: A holds 2 of 4
	waitCounts(t, zone, 2, 1)
	if got := nextArrival(t, be, a1); got != "a3" {
		t.Fatalf("after a1, %s got the slot; want a3", got)
	}
	finish(be, a2)
	finish(be, a3)
	waitCounts(t, zone, 0, 0)
	if _, peak, _, _ := be.stats(); peak != 3 {
		t.Fatalf("backend peak %d, want 3", peak)
	}
}

// Two routes share a zone with a fair share and different priorities: a
// waiter of the higher priority is admitted first, even when its tenant
// holds more slots than the tenant waiting at the lower one.
func TestFairSharePrioritiesComeFirst(t *testing.T) {
	const zone = "fair-prio"
	be := newBackend(t, true)
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	shared := func(prio int) obj {
		return limit(obj{"max_connections": 2, "zone": zone, "priority": prio, "fair_share": byIP})
	}
	loadConfig(t, l4ConfigRoutes("", listen,
		obj{
			"match":  []obj{{"remote_ip": obj{"ranges": []string{"127.0.0.2/32"}}}},
			"handle": []obj{shared(10), proxyTo(be.addr())},
		},
		obj{"handle": []obj{shared(0), proxyTo(be.addr())}},
	))
	defer stopCaddy(t)

	x := holdFrom(t, be, "127.0.0.1", listen, "x")
	h := holdFrom(t, be, "127.0.0.2", listen, "high-holder")
	low := queueFrom(t, "127.0.0.3", listen, "low", zone, 2, 1)   // holds 0, priority 0
	high := queueFrom(t, "127.0.0.2", listen, "high", zone, 2, 2) // holds 1, priority 10
	low2 := queueFrom(t, "127.0.0.4", listen, "low2", zone, 2, 3) // holds 0, priority 0
	if got := nextArrival(t, be, x); got != "high" {
		t.Fatalf("after x, %s got the slot; want high (priority 10) before low (priority 0)", got)
	}
	if got := nextArrival(t, be, h); got != "low" {
		t.Fatalf("after the high holder, %s got the slot; want low (first of priority 0)", got)
	}
	if got := nextArrival(t, be, high); got != "low2" {
		t.Fatalf("after high, %s got the slot; want low2", got)
	}
	finish(be, low)
	finish(be, low2)
	waitCounts(t, zone, 0, 0)
}

// The admin API, the metrics and `caddy connection-limit status <zone>`
// show the tenants.
func TestFairShareAdminMetricsAndStatus(t *testing.T) {
	be := newBackend(t, true)
	admin := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	listen := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	zone := fmt.Sprintf("fairops%d", time.Now().UnixNano())
	loadConfig(t, l4Config(admin, listen, limit(obj{"max_connections": 2, "zone": zone, "fair_share": byIP,
		"weights": obj{"127.0.0.3": 2}, "fair_max": 2}), proxyTo(be.addr())))
	defer stopCaddy(t)

	cs := []*client{
		holdFrom(t, be, "127.0.0.2", listen, "a0"),
		holdFrom(t, be, "127.0.0.2", listen, "a1"),
		queueFrom(t, "127.0.0.2", listen, "a2", zone, 2, 1),
		queueFrom(t, "127.0.0.3", listen, "b0", zone, 2, 2),
		queueFrom(t, "127.0.0.2", listen, "a3", zone, 2, 3),
	}
	z := getZone(t, admin, zone)
	f := z.Fair
	if f == nil || f.FairShare != byIP || f.Weights["127.0.0.3"] != 2 || f.FairMax != 2 ||
		f.Tenants != 2 || f.TenantsWaiting != 2 || math.Abs(f.FairnessIndex-0.5) > 1e-9 {
		t.Fatalf("zone's fair share %+v; want 2 tenants waiting and index 0.5 (x = 2/1 and 0/2)", f)
	}
	if len(z.TenantList) != 2 || z.TenantsShownMax != maxListedTenants || z.TenantsTruncated {
		t.Fatalf("tenants %+v (shown max %d, truncated %v)", z.TenantList, z.TenantsShownMax, z.TenantsTruncated)
	}
	a, b := z.TenantList[0], z.TenantList[1]
	if a.Tenant != "127.0.0.2" || a.Active != 2 || a.Waiting != 2 || a.Weight != 1 || a.OldestWait <= 0 ||
		b.Tenant != "127.0.0.3" || b.Active != 0 || b.Waiting != 1 || b.Weight != 2 || b.OldestWait <= 0 || b.OldestWait > a.OldestWait {
		t.Fatalf("tenants %+v", z.TenantList)
	}
	if len(z.Waiters) != 3 || z.Waiters[0].Tenant != "127.0.0.2" || z.Waiters[1].Tenant != "127.0.0.3" {
		t.Fatalf("waiters %+v", z.Waiters)
	}
	expectMetrics(t, admin, zone, map[string]float64{"tenants_waiting": 2, "fairness_index": 0.5})

	// The zone list has the fair share too, without the tenants.
	code, body := adminDo(t, http.MethodGet, "http://"+admin+"/connection_limit/", "", nil)
	if code != http.StatusOK || !strings.Contains(string(body), `"fair":{"fair_share":"{l4.conn.remote_ip}"`) || strings.Contains(string(body), `"tenants":[`) {
		t.Fatalf("zone list: %d %s", code, body)
	}

	out, _, err := runCLI(t, nil, "status", zone, "--address", admin)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"fair_share {l4.conn.remote_ip}, weights 127.0.0.3=2, fair_max 2; 2 tenants waiting, fairness index 0.50",
		"tenants (2 of 2, by slots held):",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	if row := columnGap.Split(strings.TrimSpace(lineWith(out, "127.0.0.2  ")), -1); len(row) != 5 || row[1] != "2" || row[2] != "2" || row[3] != "1" {
		t.Errorf("tenant row %q:\n%s", row, out)
	}
	if !strings.Contains(out, "TENANT") || !strings.Contains(out, "longest waiters (3 of 3 waiting):") {
		t.Errorf("no waiters with their tenant:\n%s", out)
	}

	for _, c := range cs[:2] {
		finish(be, c)
	}
	for range 3 {
		id := be.waitArrivals(1, 5*time.Second)[0]
		for _, c := range cs {
			if c.id == id {
				finish(be, c)
			}
		}
	}
	waitCounts(t, zone, 0, 0)
	expectMetrics(t, admin, zone, map[string]float64{"tenants_waiting": 0, "fairness_index": 1})
}

// lineWith is the first line of out that contains s.
func lineWith(out, s string) string {
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, s) {
			return l
		}
	}
	return ""
}

// Every error of the fair share options, from JSON, names the field.
func TestFairShareConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		fields obj
		want   string
	}{
		{obj{"fair_share": byIP, "weights": obj{"a": 0}}, `weights: the weight of tenant "a" must be at least 1, got 0`},
		{obj{"fair_share": byIP, "weights": obj{"a": -2}}, `weights: the weight of tenant "a" must be at least 1, got -2`},
		{obj{"fair_share": byIP, "weights": obj{"a": "x"}}, "weights"},
		{obj{"fair_share": byIP, "fair_max": 0}, "fair_max must be at least 1, got 0"},
		{obj{"fair_share": byIP, "fair_max": -1}, "fair_max must be at least 1, got -1"},
		{obj{"fair_share": byIP, "fair_max": "two"}, "fair_max"},
		{obj{"weights": obj{"a": 2}}, "weights: needs fair_share"},
		{obj{"fair_max": 2}, "fair_max: needs fair_share"},
		{obj{"fair_share": byIP, "key": byIP}, "fair_share and key cannot be used together"},
	} {
		fields := obj{"max_connections": 2}
		for k, v := range tc.fields {
			fields[k] = v
		}
		raw, _ := json.Marshal(l4Config("", "127.0.0.1:0", limit(fields)))
		err := caddy.Validate(mustConfig(t, raw))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: error %v, want one containing %q", tc.fields, err, tc.want)
		}
	}
	// Two handlers of one zone must agree on every fair share setting.
	for _, tc := range []struct {
		a, b obj
		want string
	}{
		{obj{"fair_share": byIP}, obj{"fair_share": "{l4.tls.server_name}"}, `fair_share "{l4.conn.remote_ip}" and "{l4.tls.server_name}"`},
		{obj{"fair_share": byIP}, obj{}, `fair_share "{l4.conn.remote_ip}" and ""`},
		{obj{"fair_share": byIP, "weights": obj{"a": 2}}, obj{"fair_share": byIP, "weights": obj{"a": 3}}, "weights map[a:2] and map[a:3]"},
		{obj{"fair_share": byIP, "fair_max": 2}, obj{"fair_share": byIP}, "fair_max 2 and 0"},
	} {
		h := func(f obj) obj {
			fields := obj{"max_connections": 2, "zone": "twice"}
			for k, v := range f {
				fields[k] = v
			}
			return limit(fields)
		}
		raw, _ := json.Marshal(l4ConfigRoutes("", "127.0.0.1:0",
			obj{"match": []obj{{"remote_ip": obj{"ranges": []string{"127.0.0.2/32"}}}}, "handle": []obj{h(tc.a)}},
			obj{"handle": []obj{h(tc.b)}}))
		err := caddy.Validate(mustConfig(t, raw))
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "fair_share, weights and fair_max") {
			t.Errorf("%v then %v: error %v, want one containing %q", tc.a, tc.b, err, tc.want)
		}
	}
}

func mustConfig(t *testing.T, raw []byte) *caddy.Config {
	t.Helper()
	var cfg caddy.Config
	if err := json.Unmarshal(raw, &cfg); err != nil {
		t.Fatal(err)
	}
	return &cfg
}

// A fleet zone is fair across nodes: the store picks the tenant
// fleet-wide, so a light tenant waiting on one node is admitted ahead of a
// heavy tenant's backlog on every node, and the heavy tenant's waiters
// keep their order among themselves.
func TestFairShareFleetZoneAcrossNodes(t *testing.T) {
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	nodes := startFleet(t, 2, be.addr(), obj{"max_connections": 2, "fair_share": byIP}, redisStore(r, nil))
	a, b := nodes[0], nodes[1]
	h1 := holdFrom(t, be, "127.0.0.2", a.listen, "H1")
	h2 := holdFrom(t, be, "127.0.0.2", b.listen, "H2")
	queue := func(n *caddyProc, ip, id string, want int) *client {
		c := dialFrom(t, ip, n.listen, id)
		c.hello("")
		waitNodes(t, 10*time.Second, fmt.Sprintf("%s queued in the store (fleet waiting %d)", id, want), "db", []*caddyProc{n}, func(vs []zoneDetailJSON) bool {
			return vs[0].Fleet != nil && vs[0].Fleet.StoreError == "" && vs[0].Fleet.Waiting == want
		})
		return c
	}
	h3 := queue(a, "127.0.0.2", "H3", 1)
	h4 := queue(b, "127.0.0.2", "H4", 2)
	l1 := queue(b, "127.0.0.3", "L1", 3)
	var got []string
	got = append(got, ffNext(t, be, h1)) // H holds 1, L 0: L1, from node B, ahead of H3 and H4
	got = append(got, ffNext(t, be, h2)) // H 0, L 1: H's first waiter, on node A
	got = append(got, ffNext(t, be, l1)) // H 1, L 0 and nobody of L waits: H4
	if want := "L1 H3 H4"; strings.Join(got, " ") != want {
		t.Fatalf("admitted %s, want %s: the light tenant first, then H's waiters in their order", strings.Join(got, " "), want)
	}
	if _, peak, _, _ := be.stats(); peak != 2 {
		t.Fatalf("backend peak %d, want max 2 throughout", peak)
	}
	ffFinish(be, h3)
	ffFinish(be, h4)
	ffDrained(t, nodes)
}
