package connlimit

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/l4-connlimit/connlimit/internal/testkit"
	"github.com/l4-connlimit/connlimit/store/redisstore"
)

// Operating a fleet zone, end to end with Caddy processes and a real
// redis-server (issue 11, points 8 to 10): config reloads, limits changed
// by a load or the limits route, pause and resume, the admin API's view
// and the metrics, bad data in the store, a password and TLS.

// opPropagation is how soon every node must show a change made through
// one node: the others learn it at their next renewal, every
// min(lease/3, 1s), a third of a second with the tests' 1s lease.
const opPropagation = time.Second

// opFields are the handler fields of zone db with max_connections max.
func opFields(max int) obj { return obj{"zone": "db", "max_connections": max} }

// opStoreTot reads the fleet's totals straight from the store.
func opStoreTot(t testing.TB, r *testkit.Redis, prefix string) (active, waiting int) {
	t.Helper()
	v, err := r.Array("HMGET", prefix+":{db}:tot", "a", "w")
	if err != nil {
		t.Fatalf("reading the store's totals: %v", err)
	}
	n := func(x any) int {
		s, _ := x.(string)
		i, _ := strconv.Atoi(s)
		return i
	}
	return n(v[0]), n(v[1])
}

// opQueue connects a client named id to node p and waits until the store
// counts it waiting: its place in the fleet's line is then fixed.
func opQueue(t *testing.T, r *testkit.Redis, p *caddyProc, id string) *client {
	t.Helper()
	_, before := opStoreTot(t, r, redisstore.DefaultKeyPrefix)
	c := dial(t, p.listen, id)
	c.hello("")
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, w := opStoreTot(t, r, redisstore.DefaultKeyPrefix); w == before+1 {
			return c
		}
		if time.Now().After(deadline) {
			t.Fatalf("client %s on node %s: the store does not count it waiting", id, p.name)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// opHandOn finishes c (frees its slot) and expects the next connection at
// the backend to be want's.
func opHandOn(t *testing.T, be *backend, c *client, want string) {
	t.Helper()
	finish(be, c)
	if got := be.waitArrivals(1, 5*time.Second)[0]; got != want {
		t.Fatalf("after %s left, %s reached the backend; want %s", c.id, got, want)
	}
}

// opServeAll lets every client (all at or on their way to the gated
// backend) through, and checks each gets its own answer.
func opServeAll(t *testing.T, be *backend, clients ...*client) {
	t.Helper()
	var wg sync.WaitGroup
	for _, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := c.readLine(20 * time.Second)
			if err != nil || got != "ok "+c.id {
				t.Errorf("client %s: got %q (err %v), want %q", c.id, got, err, "ok "+c.id)
			}
			_ = c.conn.Close()
		}()
	}
	be.let(len(clients))
	wg.Wait()
}

// opDrained waits until every node and the fleet hold nothing.
func opDrained(t *testing.T, nodes []*caddyProc) {
	t.Helper()
	waitNodes(t, 5*time.Second, "the fleet to drain", "db", nodes, func(vs []zoneDetailJSON) bool {
		for _, v := range vs {
			if v.Active != 0 || v.Waiting != 0 || v.Fleet == nil || v.Fleet.Active != 0 || v.Fleet.Waiting != 0 {
				return false
			}
		}
		return true
	})
}

// opCounts: each node's own active and waiting, the fleet's totals as the
// store says (in the one-zone view), every node registered.
func opCounts(own [][2]int, fleetActive, fleetWaiting int) func([]zoneDetailJSON) bool {
	return func(vs []zoneDetailJSON) bool {
		for i, v := range vs {
			if v.Fleet == nil || v.Fleet.Store != "registered" || v.Fleet.Active != fleetActive || v.Fleet.Waiting != fleetWaiting {
				return false
			}
			if own != nil && (v.Active != own[i][0] || v.Waiting != own[i][1]) {
				return false
			}
		}
		return true
	}
}

// opEveryNodeShows waits until every node's view has max_connections max
// in force, and returns how long that took from since.
func opEveryNodeShows(t *testing.T, nodes []*caddyProc, max int, since time.Time, within time.Duration) time.Duration {
	t.Helper()
	waitNodes(t, within-time.Since(since), fmt.Sprintf("every node to show max_connections %d", max), "db", nodes, func(vs []zoneDetailJSON) bool {
		for _, v := range vs {
			if v.MaxConnections != max {
				return false
			}
		}
		return true
	})
	return time.Since(since)
}

// opReload loads fields and store st on node p, on its own addresses;
// more, if not nil, changes the config before.
func opReload(t *testing.T, p *caddyProc, be *backend, fields, st obj, more func(cfg obj)) {
	t.Helper()
	cfg := nodeConfigAt(p.admin, p.listen, be.addr(), fields, st)
	if more != nil {
		more(cfg)
	}
	p.load(cfg)
}

// opLogLevel sets a node config's log level.
func opLogLevel(cfg obj, level string) obj {
	cfg["logging"] = obj{"logs": obj{"default": obj{"level": level, "writer": obj{"output": "stderr"}}}}
	return cfg
}

// opSecret is a password made for one test.
func opSecret(t *testing.T, what string) string {
	t.Helper()
	var b [12]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return what + "-" + hex.EncodeToString(b[:])
}

// 8. A config reload on one node keeps its registration: while slots are
// held and waiters wait on both nodes, the store's totals, the node count
// and each node's own counts never change across two reloads of node A,
// and A's waiters keep their places in the fleet's line (a node that
// registered anew would queue them again at the end).
func TestFleetReloadKeepsRegistration(t *testing.T) {
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	st := redisStore(r, nil)
	nodes := startFleet(t, 2, be.addr(), obj{"max_connections": 2}, st)
	a, b := nodes[0], nodes[1]

	a1 := takeSlot(t, be, a.listen, "a1")
	b1 := takeSlot(t, be, b.listen, "b1")
	a2 := opQueue(t, r, a, "a2")
	b2 := opQueue(t, r, b, "b2")
	a3 := opQueue(t, r, a, "a3")
	b3 := opQueue(t, r, b, "b3")
	before := waitNodes(t, 5*time.Second, "1 active and 2 waiting on each node", "db", nodes,
		opCounts([][2]int{{1, 2}, {1, 2}}, 2, 4))
	ids := []string{before[0].Fleet.Node, before[1].Fleet.Node}
	if ids[0] == ids[1] || before[0].Fleet.NodeCount != 2 {
		t.Fatalf("node ids %q, node count %d", ids, before[0].Fleet.NodeCount)
	}

	// Sample the store and both nodes' views until the end of the reloads
	// and two leases after.
	var (
		mu      sync.Mutex
		bad     []string
		samples int
	)
	stop, stopped := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(stopped)
		for {
			select {
			case <-stop:
				return
			default:
			}
			var errs []string
			tot, err := r.Array("HMGET", "connlimit:{db}:tot", "a", "w")
			n, err2 := r.Int("ZCARD", "connlimit:{db}:nodes")
			switch {
			case err != nil || err2 != nil:
				errs = append(errs, fmt.Sprintf("store: %v %v", err, err2))
			case tot[0] != "2" || tot[1] != "4" || n != 2:
				errs = append(errs, fmt.Sprintf("store: active %v waiting %v, %d nodes", tot[0], tot[1], n))
			}
			for i, p := range nodes {
				code, body, err := p.try(http.MethodGet, "/connection_limit/db", "")
				if err != nil { // a load replaces the admin server
					continue
				}
				var v zoneDetailJSON
				if code != http.StatusOK || json.Unmarshal(body, &v) != nil || v.Fleet == nil {
					errs = append(errs, fmt.Sprintf("node %s: %d %s", p.name, code, body))
					continue
				}
				if v.Active != 1 || v.Waiting != 2 || v.Fleet.Node != ids[i] || v.Fleet.Store != "registered" ||
					v.Fleet.Active != 2 || v.Fleet.Waiting != 4 || v.Fleet.NodeCount != 2 || v.Fleet.StoreError != "" {
					errs = append(errs, fmt.Sprintf("node %s: active %d waiting %d, node %s %s %q, fleet %d/%d in %d nodes",
						p.name, v.Active, v.Waiting, v.Fleet.Node, v.Fleet.Store, v.Fleet.StoreError,
						v.Fleet.Active, v.Fleet.Waiting, v.Fleet.NodeCount))
				}
			}
			mu.Lock()
			samples++
			if len(bad) < 20 {
				bad = append(bad, errs...)
			}
			mu.Unlock()
			time.Sleep(5 * time.Millisecond)
		}
	}()

	// An unrelated change: a second layer4 server, an echo.
	echo := fmt.Sprintf("127.0.0.1:%d", freePortNode())
	opReload(t, a, be, opFields(2), st, func(cfg obj) {
		servers := cfg["apps"].(obj)["layer4"].(obj)["servers"].(obj)
		servers["echo"] = obj{"listen": []string{echo}, "routes": []obj{{"handle": []obj{{"handler": "echo"}}}}}
	})
	e := dial(t, echo, "echo")
	e.hello("")
	e.expectLine("echo", 5*time.Second) // the new config is in
	_ = e.conn.Close()
	time.Sleep(500 * time.Millisecond)
	opReload(t, a, be, opFields(2), st, nil) // and back
	time.Sleep(2 * time.Second)              // two leases
	close(stop)
	<-stopped
	if len(bad) > 0 {
		t.Fatalf("across the reloads of node A (%d samples), the fleet changed:\n  %s", samples, strings.Join(bad, "\n  "))
	}
	t.Logf("%d samples of the store and both nodes across two reloads of A: unchanged", samples)
	if samples < 20 {
		t.Fatalf("only %d samples", samples)
	}

	// The line kept its order: a2, b2, a3, b3 (arrived in that order).
	opHandOn(t, be, a1, "a2")
	opHandOn(t, be, b1, "b2")
	opHandOn(t, be, a2, "a3")
	opHandOn(t, be, b2, "b3")
	opServeAll(t, be, a3, b3)
	if _, peak, total, _ := be.stats(); peak > 2 || total != 6 {
		t.Fatalf("backend peak %d (max 2), %d connections (want 6)", peak, total)
	}
	opDrained(t, nodes)
}

// 8. Changing max_connections by a config load on any node changes the
// fleet's limit for every node (the newest load wins), shown in every
// node's admin API within a second; raising it admits waiters on the
// other nodes, lowering it cuts nobody.
func TestFleetReloadChangesLimits(t *testing.T) {
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	st := redisStore(r, nil)
	nodes := startFleet(t, 3, be.addr(), obj{"max_connections": 1}, st)
	a, b, c := nodes[0], nodes[1], nodes[2]

	a1 := takeSlot(t, be, a.listen, "a1")
	b1 := opQueue(t, r, b, "b1")
	c1 := opQueue(t, r, c, "c1")
	b2 := opQueue(t, r, b, "b2")
	c2 := opQueue(t, r, c, "c2")

	// A's config raises it to 3: the first two waiters, on B and C, go in.
	start := time.Now()
	opReload(t, a, be, opFields(3), st, nil)
	took := opEveryNodeShows(t, nodes, 3, start, opPropagation)
	got := be.waitArrivals(2, opPropagation-time.Since(start))
	slices.Sort(got)
	if !slices.Equal(got, []string{"b1", "c1"}) {
		t.Fatalf("raising max_connections to 3 admitted %v; want b1 and c1", got)
	}
	t.Logf("A's load of max_connections 3: every node shows it %s after the load began", took.Round(time.Millisecond))
	waitNodes(t, 2*time.Second, "3 active, 2 waiting", "db", nodes, opCounts([][2]int{{1, 0}, {1, 1}, {1, 1}}, 3, 2))

	// B's newer config lowers it to 2: every node, A too, has 2 in force;
	// nobody is cut, and nobody goes in until fewer than 2 are active.
	start = time.Now()
	opReload(t, b, be, opFields(2), st, nil)
	took = opEveryNodeShows(t, nodes, 2, start, opPropagation)
	t.Logf("B's newer load of max_connections 2: every node shows it %s after the load began", took.Round(time.Millisecond))
	vs := waitNodes(t, 2*time.Second, "3 active, 2 waiting", "db", nodes, opCounts([][2]int{{1, 0}, {1, 1}, {1, 1}}, 3, 2))
	for i, want := range []int{3, 2, 1} { // what each node's own config says
		if vs[i].Config.MaxConnections != want || vs[i].Override != nil {
			t.Fatalf("node %s: config max_connections %d, override %+v; want %d and none", nodes[i].name, vs[i].Config.MaxConnections, vs[i].Override, want)
		}
	}
	finish(be, a1)
	waitNodes(t, 2*time.Second, "2 active, 2 waiting", "db", nodes, opCounts([][2]int{{0, 0}, {1, 1}, {1, 1}}, 2, 2))
	be.noArrival(500 * time.Millisecond)

	// C's config raises it to 4: b2 and c2 go in.
	start = time.Now()
	opReload(t, c, be, opFields(4), st, nil)
	took = opEveryNodeShows(t, nodes, 4, start, opPropagation)
	got = be.waitArrivals(2, opPropagation-time.Since(start))
	slices.Sort(got)
	if !slices.Equal(got, []string{"b2", "c2"}) {
		t.Fatalf("raising max_connections to 4 admitted %v; want b2 and c2", got)
	}
	t.Logf("C's load of max_connections 4: every node shows it %s after the load began", took.Round(time.Millisecond))

	opServeAll(t, be, b1, c1, b2, c2)
	if _, peak, total, _ := be.stats(); peak > 4 || total != 5 {
		t.Fatalf("backend peak %d (max 4), %d connections (want 5)", peak, total)
	}
	opDrained(t, nodes)
}

// 8 (and issue 10's limits route). POST /connection_limit/db/limits on
// any node changes the fleet's limit: waiters on the other nodes go in,
// every node shows it; DELETE puts that node's config's limit back in
// force for the fleet, which cuts nobody.
func TestFleetLimitsRoute(t *testing.T) {
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	nodes := startFleet(t, 3, be.addr(), obj{"max_connections": 1}, redisStore(r, nil))
	a, b, c := nodes[0], nodes[1], nodes[2]

	a1 := takeSlot(t, be, a.listen, "a1")
	a2 := opQueue(t, r, a, "a2")
	c1 := opQueue(t, r, c, "c1")

	start := time.Now()
	b.do(http.MethodPost, "/connection_limit/db/limits", `{"max_connections": 3}`)
	got := be.waitArrivals(2, opPropagation)
	slices.Sort(got)
	if !slices.Equal(got, []string{"a2", "c1"}) {
		t.Fatalf("POST limits on B admitted %v; want a2 and c1", got)
	}
	took := opEveryNodeShows(t, nodes, 3, start, opPropagation)
	t.Logf("POST limits {max_connections: 3} on B: every node shows it %s later", took.Round(time.Millisecond))
	vs := waitNodes(t, 2*time.Second, "3 active", "db", nodes, opCounts([][2]int{{2, 0}, {0, 0}, {1, 0}}, 3, 0))
	if o := vs[1].Override; o == nil || o.MaxConnections == nil || *o.MaxConnections != 3 || vs[1].Config.MaxConnections != 1 {
		t.Fatalf("node B: override %+v, config %+v; want the override of 3 over a config of 1", o, vs[1].Config)
	}
	for _, i := range []int{0, 2} {
		if vs[i].Override != nil || vs[i].Config.MaxConnections != 1 {
			t.Fatalf("node %s: override %+v, config %+v; want none over a config of 1", nodes[i].name, vs[i].Override, vs[i].Config)
		}
	}

	// A bad value is refused, and the fleet keeps 3.
	code, body, err := b.try(http.MethodPost, "/connection_limit/db/limits", `{"max_connections": 0}`)
	if err != nil || code != http.StatusBadRequest || !strings.Contains(string(body), "max_connections") {
		t.Fatalf("POST limits {max_connections: 0}: %d %s (%v); want 400 naming max_connections", code, body, err)
	}
	time.Sleep(opPropagation / 2)
	opEveryNodeShows(t, nodes, 3, time.Now(), time.Second)

	// DELETE on B: B's config (1) is the fleet's again; nobody is cut, a
	// newcomer waits until fewer than 1 are active.
	start = time.Now()
	b.do(http.MethodDelete, "/connection_limit/db/limits", "")
	took = opEveryNodeShows(t, nodes, 1, start, opPropagation)
	t.Logf("DELETE limits on B: every node shows the config's 1 again %s later", took.Round(time.Millisecond))
	c2 := opQueue(t, r, c, "c2")
	waitNodes(t, 2*time.Second, "3 active, 1 waiting", "db", nodes, opCounts([][2]int{{2, 0}, {0, 0}, {1, 1}}, 3, 1))
	finish(be, a1)
	finish(be, a2)
	be.noArrival(300 * time.Millisecond)
	opHandOn(t, be, c1, "c2")
	opServeAll(t, be, c2)
	if _, peak, total, _ := be.stats(); peak > 3 || total != 4 {
		t.Fatalf("backend peak %d (max 3), %d connections (want 4)", peak, total)
	}
	opDrained(t, nodes)
}

// 9. Pause through one node's admin API pauses the whole fleet, on every
// node within a second: a slot freed admits nobody anywhere, newcomers
// wait. Resume through another node resumes it, in the fleet's order.
func TestFleetPauseResume(t *testing.T) {
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	nodes := startFleet(t, 3, be.addr(), obj{"max_connections": 1}, redisStore(r, nil))
	a, b, c := nodes[0], nodes[1], nodes[2]

	a1 := takeSlot(t, be, a.listen, "a1")
	b1 := opQueue(t, r, b, "b1")
	c1 := opQueue(t, r, c, "c1")

	start := time.Now()
	a.do(http.MethodPost, "/connection_limit/db/pause", "")
	waitNodes(t, opPropagation, "every node paused", "db", nodes, func(vs []zoneDetailJSON) bool {
		for _, v := range vs {
			if !v.Paused {
				return false
			}
		}
		return true
	})
	t.Logf("paused through A: every node says so %s later", time.Since(start).Round(time.Millisecond))

	finish(be, a1) // a slot frees on A: nobody anywhere takes it
	a2 := opQueue(t, r, a, "a2")
	waitNodes(t, 2*time.Second, "nothing active, 3 waiting", "db", nodes, opCounts([][2]int{{0, 1}, {0, 1}, {0, 1}}, 0, 3))
	be.noArrival(700 * time.Millisecond)
	for _, v := range waitNodes(t, time.Second, "still paused", "db", nodes, func([]zoneDetailJSON) bool { return true }) {
		if !v.Paused || v.Active != 0 || v.Waiting != 1 {
			t.Fatalf("while paused: %s", describeViews(nodes, []zoneDetailJSON{v}))
		}
	}

	start = time.Now()
	c.do(http.MethodPost, "/connection_limit/db/resume", "")
	if got := be.waitArrivals(1, opPropagation)[0]; got != "b1" {
		t.Fatalf("after resume, %s went in first; want b1", got)
	}
	waitNodes(t, opPropagation-time.Since(start), "every node resumed", "db", nodes, func(vs []zoneDetailJSON) bool {
		for _, v := range vs {
			if v.Paused {
				return false
			}
		}
		return true
	})
	t.Logf("resumed through C: every node says so %s later", time.Since(start).Round(time.Millisecond))
	opHandOn(t, be, b1, "c1")
	opHandOn(t, be, c1, "a2")
	opServeAll(t, be, a2)
	if _, peak, total, _ := be.stats(); peak > 1 || total != 4 {
		t.Fatalf("backend peak %d (max 1), %d connections (want 4)", peak, total)
	}
	opDrained(t, nodes)
}

// 9. GET /connection_limit/<zone> on any node keeps its fields with their
// meaning for this node (active, waiting, counters, waiters are its own;
// max_connections is the fleet's in force) and adds the fleet: this
// node's id, the store's state, the fleet's totals, and every node seen
// with its counts and when it renewed. The list adds the fleet too.
func TestFleetOperatingView(t *testing.T) {
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	nodes := startFleet(t, 3, be.addr(), obj{"max_connections": 1}, redisStore(r, nil))
	a, b := nodes[0], nodes[1]

	a1 := takeSlot(t, be, a.listen, "a1")
	b1 := opQueue(t, r, b, "b1")
	own := [][2]int{{1, 0}, {0, 1}, {0, 0}}
	// every node's report reaches the store at its next renewal
	vs := waitNodes(t, 2*time.Second, "each node's counts in the store", "db", nodes, func(vs []zoneDetailJSON) bool {
		if !opCounts(own, 1, 1)(vs) {
			return false
		}
		for _, v := range vs {
			if len(v.Fleet.Nodes) != 3 {
				return false
			}
			for _, n := range v.Fleet.Nodes {
				for i, w := range vs {
					if n.ID == w.Fleet.Node && (n.Active != own[i][0] || n.Waiting != own[i][1]) {
						return false
					}
				}
			}
		}
		return true
	})
	ids := map[string]bool{}
	latest := 0.0 // the longest since a renewal, over every node
	for i, v := range vs {
		p := nodes[i]
		f := v.Fleet
		ids[f.Node] = true
		if v.MaxConnections != 1 || v.Paused || f.Store != "registered" || f.StoreError != "" || f.NodeCount != 3 ||
			f.OnUnreachable != "local_share" || f.LearnedAgo != 0 {
			t.Errorf("node %s: max %d paused %v fleet %+v", p.name, v.MaxConnections, v.Paused, f)
		}
		if want := uint64(own[i][0]); v.Admitted != want {
			t.Errorf("node %s: admitted %d, want %d (its own)", p.name, v.Admitted, want)
		}
		if len(v.Waiters) != own[i][1] {
			t.Errorf("node %s: waiters %+v, want %d (its own)", p.name, v.Waiters, own[i][1])
		}
		for _, n := range f.Nodes {
			latest = max(latest, n.RenewedAgo)
			if n.RenewedAgo < 0 || n.RenewedAgo > 1.5 || n.ExpiresIn <= 0 || n.ExpiresIn > 1 {
				t.Errorf("node %s sees node %s renewed %.3fs ago, lease expiring in %.3fs (lease 1s, renewed every 1/3s)",
					p.name, n.ID, n.RenewedAgo, n.ExpiresIn)
			}
		}
		// the fields of a zone of its own are all there
		var raw map[string]json.RawMessage
		if err := json.Unmarshal(p.do(http.MethodGet, "/connection_limit/db", ""), &raw); err != nil {
			t.Fatal(err)
		}
		for _, k := range []string{"zone", "max_connections", "max_waiting", "wait_timeout", "order", "active", "waiting",
			"oldest_wait_seconds", "paused", "admitted", "rejected", "rejected_by_reason", "abandoned", "config",
			"override", "waiters", "waiters_shown_max", "waiters_truncated", "fleet"} {
			if _, ok := raw[k]; !ok {
				t.Errorf("node %s: the zone's view has no %q", p.name, k)
			}
		}
		var fr map[string]json.RawMessage
		_ = json.Unmarshal(raw["fleet"], &fr)
		for _, k := range []string{"node", "store", "on_unreachable", "local_share", "active", "waiting", "node_count", "nodes"} {
			if _, ok := fr[k]; !ok {
				t.Errorf("node %s: the fleet's view has no %q: %s", p.name, k, raw["fleet"])
			}
		}
	}
	if len(ids) != 3 {
		t.Errorf("node ids %v, want 3 different", ids)
	}
	if latest < 0.01 { // each renews every 1/3 s, at its own times
		t.Errorf("every node renewed less than 10ms ago, by every view: renewed_seconds_ago is not when it renewed")
	}
	for _, n := range vs[0].Fleet.Nodes {
		if !ids[n.ID] {
			t.Errorf("the store knows node %q, which is none of the three", n.ID)
		}
	}

	// The list: the fleet's totals, without the nodes.
	var list struct {
		Zones []zoneJSON `json:"zones"`
	}
	if err := json.Unmarshal(b.do(http.MethodGet, "/connection_limit/", ""), &list); err != nil {
		t.Fatal(err)
	}
	if len(list.Zones) != 1 || list.Zones[0].Fleet == nil || list.Zones[0].Waiting != 1 || list.Zones[0].Active != 0 ||
		list.Zones[0].Fleet.Active != 1 || list.Zones[0].Fleet.Waiting != 1 || list.Zones[0].Fleet.Store != "registered" ||
		list.Zones[0].Fleet.Nodes != nil {
		t.Errorf("B's list: %+v", list.Zones)
	}
	if t.Failed() {
		t.FailNow()
	}

	opHandOn(t, be, a1, "b1")
	opServeAll(t, be, b1)
	opDrained(t, nodes)
}

// 9. Metrics on each node's admin API: the store reachable, its round
// trips (a histogram) and errors by operation, the fleet's active and
// waiting as gauges of their own; the node's own gauges keep their label
// and exist at 0 on a node that got no connection.
func TestFleetMetrics(t *testing.T) {
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	nodes := startFleet(t, 3, be.addr(), obj{"max_connections": 1}, redisStore(r, nil))
	a, b, c := nodes[0], nodes[1], nodes[2]

	a1 := takeSlot(t, be, a.listen, "a1")
	b1 := opQueue(t, r, b, "b1")

	const p = "caddy_layer4_connection_limit_"
	series := func(name string) string { return p + name + `{zone="db"}` }
	errs := func(op string) string { return p + `store_errors_total{op="` + op + `",zone="db"}` }
	mode := func(m string) string { return p + `store_mode{mode="` + m + `",zone="db"}` }
	// inMode: store_mode says m, and only m, of the four modes.
	inMode := func(m map[string]float64, want string) bool {
		for _, md := range []string{"registered", "registering", "unreachable", "local_share"} {
			v, ok := m[mode(md)]
			if !ok || (md == want) != (v == 1) || (v != 0 && v != 1) {
				return false
			}
		}
		return true
	}
	scrapeUntil := func(n *caddyProc, what string, cond func(m map[string]float64) bool) map[string]float64 {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			m := scrape(t, n.admin)
			if cond(m) {
				return m
			}
			if time.Now().After(deadline) {
				var lines []string
				for k, v := range m {
					lines = append(lines, fmt.Sprintf("%s %v", k, v))
				}
				slices.Sort(lines)
				t.Fatalf("node %s: %s; metrics:\n%s", n.name, what, strings.Join(lines, "\n"))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}

	own := map[*caddyProc][2]float64{a: {1, 0}, b: {0, 1}, c: {0, 0}}
	for _, n := range nodes {
		m := scrapeUntil(n, "the fleet's gauges at 1 active and 1 waiting", func(m map[string]float64) bool {
			return m[series("fleet_active")] == 1 && m[series("fleet_waiting")] == 1
		})
		for _, name := range []string{"active", "waiting", "store_reachable", "fleet_active", "fleet_waiting",
			"max_connections", "max_waiting", "paused", "local_share", "store_seconds_count", "store_seconds_sum", "admitted_total"} {
			if _, ok := m[series(name)]; !ok {
				t.Errorf("node %s: no %s", n.name, series(name))
			}
		}
		want := map[string]float64{
			"active": own[n][0], "waiting": own[n][1], "admitted_total": own[n][0],
			"store_reachable": 1, "max_connections": 1, "max_waiting": 0, "paused": 0,
			"local_share": 1, // the automatic share: max_connections 1 over 3 nodes, at least 1
		}
		for name, v := range want {
			if m[series(name)] != v {
				t.Errorf("node %s: %s = %v, want %v", n.name, series(name), m[series(name)], v)
			}
		}
		if !inMode(m, "registered") {
			t.Errorf("node %s: store_mode not registered alone: %v %v %v %v", n.name,
				m[mode("registered")], m[mode("registering")], m[mode("unreachable")], m[mode("local_share")])
		}
		count := m[series("store_seconds_count")]
		if count < 1 || m[p+`store_seconds_bucket{zone="db",le="+Inf"}`] != count || m[series("store_seconds_sum")] <= 0 {
			t.Errorf("node %s: store_seconds count %v, +Inf bucket %v, sum %v", n.name, count,
				m[p+`store_seconds_bucket{zone="db",le="+Inf"}`], m[series("store_seconds_sum")])
		}
		for _, op := range storeOps { // at 0, so that rate() counts the first error
			if v, ok := m[errs(op)]; !ok || v != 0 {
				t.Errorf("node %s: %s = %v (exported: %v) before any error, want 0", n.name, errs(op), v, ok)
			}
		}
		for k, v := range m {
			if strings.HasPrefix(k, p+"store_errors_total") && v != 0 {
				t.Errorf("node %s: %s = %v before any error", n.name, k, v)
			}
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	// The store answers with errors (its cfg key holds a string): every
	// node counts them by operation and says the store is not reachable;
	// B's share (1 of max 1) admits its waiter on its own.
	if _, err := r.Do("DEL", "connlimit:{db}:cfg"); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Do("SET", "connlimit:{db}:cfg", "not a hash"); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		// the renewals fail (a node registers only once one is answered)
		scrapeUntil(n, "store_reachable 0, renew errors counted, on its local share", func(m map[string]float64) bool {
			return m[series("store_reachable")] == 0 && m[errs("renew")] >= 2 && m[errs("register")] == 0 &&
				inMode(m, "local_share") && m[series("local_share")] == 1
		})
	}
	if got := be.waitArrivals(1, 5*time.Second)[0]; got != "b1" {
		t.Fatalf("%s went in on its node's share; want b1", got)
	}
	if _, err := r.Do("DEL", "connlimit:{db}:cfg"); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		scrapeUntil(n, "the store reachable again, 2 active in the fleet", func(m map[string]float64) bool {
			return m[series("store_reachable")] == 1 && m[series("fleet_active")] == 2 && m[series("fleet_waiting")] == 0 &&
				inMode(m, "registered")
		})
	}
	// A pause through one node pauses every node, and so says its gauge.
	for _, paused := range []bool{true, false} {
		path, want := "/connection_limit/db/resume", 0.0
		if paused {
			path, want = "/connection_limit/db/pause", 1
		}
		c.do(http.MethodPost, path, "")
		for _, n := range nodes {
			scrapeUntil(n, fmt.Sprintf("paused %v", want), func(m map[string]float64) bool {
				v, ok := m[series("paused")]
				return ok && v == want
			})
		}
	}
	opServeAll(t, be, a1, b1)
	opDrained(t, nodes)
	for n, want := range map[*caddyProc]float64{a: 1, b: 1, c: 0} {
		scrapeUntil(n, "its own gauges back at 0, its admissions counted", func(m map[string]float64) bool {
			return m[series("active")] == 0 && m[series("waiting")] == 0 && m[series("admitted_total")] == want &&
				m[series("fleet_active")] == 0 && m[series("fleet_waiting")] == 0
		})
	}
}

// 10. Every key of a zone is under key_prefix with the zone as Cluster
// hash tag. A key of the wrong type, or a garbled value, under the prefix
// gives a clear error in the node's view and log and the fallback (each
// node admits its local_share), never a panic or a stuck zone; once the
// data is good again every node registers anew and the fleet's counts
// are the truth.
func TestFleetBadData(t *testing.T) {
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	st := redisStore(r, obj{"key_prefix": "cltest", "local_share": 1})
	nodes := startFleet(t, 2, be.addr(), obj{"max_connections": 2, "key": "{l4.conn.remote_ip}"}, st)
	a, b := nodes[0], nodes[1]
	tot := func() (int, int) { return opStoreTot(t, r, "cltest") }
	queue := func(p *caddyProc, id string, waiting int) *client {
		t.Helper()
		c := dial(t, p.listen, id)
		c.hello("")
		testkit.WaitFor(t, 5*time.Second, id+" waiting in the store", func() bool { _, w := tot(); return w == waiting })
		return c
	}

	a1 := takeSlot(t, be, a.listen, "a1")
	a2 := takeSlot(t, be, a.listen, "a2")
	a3 := queue(a, "a3", 1)
	b1 := queue(b, "b1", 2)
	waitNodes(t, 2*time.Second, "2 active, 2 waiting", "db", nodes, opCounts([][2]int{{2, 1}, {0, 1}}, 2, 2))

	// Every key is "cltest:{db}:...", nothing else is in the database.
	keys, err := r.Strings("KEYS", "*")
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]bool{}
	for _, k := range keys {
		rest, ok := strings.CutPrefix(k, "cltest:{db}:")
		if !ok {
			t.Errorf("key %q is not under cltest:{db}:", k)
		}
		kind, _, _ := strings.Cut(rest, ":")
		kinds[kind] = true
	}
	for _, k := range []string{"cfg", "nodes", "info", "epochs", "tot", "active", "waiting", "wkeys", "held", "tickets", "prios", "q"} {
		if !kinds[k] {
			t.Errorf("no key of kind %q among %q", k, keys)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	unreachable := func(what, want string, nodes ...*caddyProc) {
		t.Helper()
		waitNodes(t, 5*time.Second, what, "db", nodes, func(vs []zoneDetailJSON) bool {
			for _, v := range vs {
				if v.Fleet == nil || v.Fleet.Store != "unreachable" || !strings.Contains(v.Fleet.StoreError, want) {
					return false
				}
			}
			return true
		})
	}
	// recovered waits until every node is registered again without error
	// and the counts are the truth: the store's totals (and the key's
	// count) are the sums of the nodes' own, and the backend serves as
	// many as are active. It returns how many are active.
	recovered := func(what string) int {
		t.Helper()
		var active int
		waitNodes(t, 5*time.Second, what, "db", nodes, func(vs []zoneDetailJSON) bool {
			ownA, ownW := 0, 0
			for _, v := range vs {
				if v.Fleet == nil || v.Fleet.Store != "registered" || v.Fleet.StoreError != "" || v.Fleet.NodeCount != 2 || v.MaxConnections != 2 {
					return false
				}
				ownA += v.Active
				ownW += v.Waiting
			}
			a, w := tot()
			key, _ := r.Str("HGET", "cltest:{db}:active", "127.0.0.1")
			beActive, _, _, _ := be.stats()
			active = a
			return opCounts(nil, a, w)(vs) && a == ownA && w == ownW && (key == strconv.Itoa(a) || a == 0 && key == "") && beActive == a
		})
		return active
	}
	// noneAdmitted: the backend gets no new connection for d.
	noneAdmitted := func(d time.Duration) {
		t.Helper()
		_, _, before, _ := be.stats()
		time.Sleep(d)
		if _, _, after, _ := be.stats(); after != before {
			t.Fatalf("%d connections went in, want none", after-before)
		}
	}
	alive := func() {
		t.Helper()
		for _, n := range nodes {
			if n.exited() || strings.Contains(n.log(), "panic") {
				t.Fatalf("node %s exited or panicked:\n%s", n.name, n.log())
			}
		}
	}

	// The cfg key holds a string.
	if _, err := r.Do("SET", "cltest:{db}:cfg", "garbage"); err != nil {
		t.Fatal(err)
	}
	unreachable("every node to say the store fails with WRONGTYPE", "WRONGTYPE", a, b)
	for _, n := range nodes {
		if !strings.Contains(n.log(), "cannot be reached") || !strings.Contains(n.log(), "WRONGTYPE") {
			t.Fatalf("node %s: its log does not say the store fails, and why:\n%s", n.name, n.log())
		}
	}
	// the fallback: each node admits up to 1 (per key) on its own; A holds
	// 2 already, B none
	if got := be.waitArrivals(1, 5*time.Second)[0]; got != "b1" {
		t.Fatalf("%s went in on its node's share; want b1", got)
	}
	a4 := dial(t, a.listen, "a4")
	a4.hello("")
	b2 := dial(t, b.listen, "b2")
	b2.hello("")
	waitNodes(t, 2*time.Second, "A: 2 active 2 waiting, B: 1 active 1 waiting", "db", nodes, func(vs []zoneDetailJSON) bool {
		return vs[0].Active == 2 && vs[0].Waiting == 2 && vs[1].Active == 1 && vs[1].Waiting == 1
	})
	be.noArrival(300 * time.Millisecond)
	alive()

	// Deleted: every node registers what it holds and who waits there.
	// Their leases lapsed meanwhile: the first to register finds the
	// other's slots reaped, and may admit one of its own waiters at once
	// (the same as when Redis comes back empty); the counts are the
	// truth once both registered.
	if _, err := r.Do("DEL", "cltest:{db}:cfg"); err != nil {
		t.Fatal(err)
	}
	n := recovered("every node registered again, the counts the truth")
	t.Logf("after the wrong type: %d active (max 2)", n)
	for _, n := range nodes {
		if !strings.Contains(n.log(), "reachable again") {
			t.Fatalf("node %s: its log does not say the store is back:\n%s", n.name, n.log())
		}
	}

	// A garbled value.
	if _, err := r.Do("HSET", "cltest:{db}:cfg", "max", "lots"); err != nil {
		t.Fatal(err)
	}
	unreachable("every node to say the store holds a garbled cfg.max", `garbled value in cfg.max: "lots"`, a, b)
	noneAdmitted(300 * time.Millisecond) // A holds 2, B at least 1: their shares
	alive()
	if _, err := r.Do("HSET", "cltest:{db}:cfg", "max", "2"); err != nil {
		t.Fatal(err)
	}
	n = recovered("every node registered again, the counts the truth")
	t.Logf("after the garbled cfg.max: %d active (max 2)", n)

	// The key's active count is garbled: B's next take reads it and
	// fails. One call's error does not make B fall back: its newcomer
	// waits on B, and B registers at once, which counts the key's slots
	// again from every node's own. The count heals with nobody putting
	// it back, and the counts are the truth.
	good, err := r.Str("HGET", "cltest:{db}:active", "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Do("HSET", "cltest:{db}:active", "127.0.0.1", "x"); err != nil {
		t.Fatal(err)
	}
	b3 := dial(t, b.listen, "b3")
	b3.hello("")
	testkit.WaitFor(t, 5*time.Second, "B's failed take counted", func() bool {
		return scrape(t, b.admin)[`caddy_layer4_connection_limit_store_errors_total{op="take",zone="db"}`] >= 1
	})
	if got := recovered("B registered again, the garbled count healed"); got != n {
		t.Fatalf("%d active after the garbled count, %d before", got, n)
	}
	if v, _ := r.Str("HGET", "cltest:{db}:active", "127.0.0.1"); v != good {
		t.Fatalf("the key's count is %q after B registered, want %q", v, good)
	}
	alive()

	// Everyone is served; the fleet drains to nothing.
	opServeAll(t, be, a1, a2, a3, a4, b1, b2, b3)
	opDrained(t, nodes)
	if a, w := tot(); a != 0 || w != 0 {
		t.Fatalf("the store counts %d active, %d waiting after the drain", a, w)
	}
	alive()
}

// opNoSecret fails if any of secrets shows in a node's log, its zone's
// view or its config as the admin API shows it.
func opNoSecret(t *testing.T, nodes []*caddyProc, secrets ...string) {
	t.Helper()
	for _, n := range nodes {
		shown := map[string]string{
			"log":       n.log(),
			"zone view": string(n.do(http.MethodGet, "/connection_limit/db", "")),
			"zone list": string(n.do(http.MethodGet, "/connection_limit/", "")),
			"config":    string(n.do(http.MethodGet, "/config/", "")),
		}
		for where, s := range shown {
			for _, secret := range secrets {
				if strings.Contains(s, secret) {
					t.Errorf("node %s: its %s shows the password %q", n.name, where, secret)
				}
			}
		}
	}
}

// opServedThroughFleet: a client of A holds the one slot, a client of B
// waits for it, and is served once A's leaves.
func opServedThroughFleet(t *testing.T, r *testkit.Redis, be *backend, a, b *caddyProc) {
	t.Helper()
	registered(t, "db", a, b)
	a1 := takeSlot(t, be, a.listen, "a1")
	b1 := opQueue(t, r, b, "b1")
	waitNodes(t, 2*time.Second, "1 active on A, 1 waiting on B", "db", []*caddyProc{a, b},
		opCounts([][2]int{{1, 0}, {0, 1}}, 1, 1))
	opHandOn(t, be, a1, "b1")
	opServeAll(t, be, b1)
	opDrained(t, []*caddyProc{a, b})
}

// 10. A Redis with a password: the nodes give it as a placeholder that
// the environment fills; they share the zone. A node with a wrong
// password says the store refuses it. No password shows in any node's
// log (at INFO, and at DEBUG, which has go-redis's own lines), view or
// config.
func TestFleetSecurePassword(t *testing.T) {
	t.Setenv("CONNLIMIT_TEST_LOG", "") // the nodes' level is what nodeConfig gives, or set below
	secret, wrong := opSecret(t, "pw"), opSecret(t, "wrong")
	r := testkit.StartRedis(t, testkit.RedisConfig{Password: secret})
	be := newBackend(t, true)
	st := redisStore(r, obj{"password": "{env.CONNLIMIT_REDIS_PASSWORD}"})
	fields := obj{"zone": "db", "max_connections": 1}
	a := startNode(t, "A", nodeConfig(be.addr(), fields, st), "CONNLIMIT_REDIS_PASSWORD="+secret)
	b := startNode(t, "B", opLogLevel(nodeConfig(be.addr(), fields, st), "DEBUG"), "CONNLIMIT_REDIS_PASSWORD="+secret)
	c := startNode(t, "C", opLogLevel(nodeConfig(be.addr(), fields, st), "DEBUG"), "CONNLIMIT_REDIS_PASSWORD="+wrong)
	opServedThroughFleet(t, r, be, a, b)

	waitNodes(t, 5*time.Second, "C to say the store refuses its password", "db", []*caddyProc{c}, func(vs []zoneDetailJSON) bool {
		return vs[0].Fleet != nil && vs[0].Fleet.Store == "unreachable" && strings.Contains(vs[0].Fleet.StoreError, "WRONGPASS")
	})
	if n, err := r.Int("ZCARD", "connlimit:{db}:nodes"); err != nil || n != 2 {
		t.Fatalf("the store knows %d nodes (%v), want 2", n, err)
	}
	for _, n := range []*caddyProc{b, c} {
		if !strings.Contains(n.log(), `"level":"debug"`) {
			t.Fatalf("node %s logs nothing at debug:\n%s", n.name, n.log())
		}
	}
	if !strings.Contains(c.log(), "WRONGPASS") {
		t.Errorf("node C's log does not say why the store refuses it:\n%s", c.log())
	}
	opNoSecret(t, []*caddyProc{a, b, c}, secret, wrong)
}

// 10. A Redis that speaks TLS only, with an ACL user: nodes with tls and
// the test CA's file share the zone; a node that trusts only the system's
// roots is refused by its own check of the certificate. No password shows.
func TestFleetSecureTLS(t *testing.T) {
	t.Setenv("CONNLIMIT_TEST_LOG", "")
	secret := opSecret(t, "tls-pw")
	r := testkit.StartRedis(t, testkit.RedisConfig{TLS: true, User: "fleet", UserPassword: secret})
	be := newBackend(t, true)
	st := redisStore(r, obj{"tls": true, "tls_ca_file": r.CAFile, "username": "fleet",
		"password": "{env.CONNLIMIT_REDIS_PASSWORD}"})
	noCA := redisStore(r, obj{"tls": true, "username": "fleet", "password": "{env.CONNLIMIT_REDIS_PASSWORD}"})
	fields := obj{"zone": "db", "max_connections": 1}
	env := "CONNLIMIT_REDIS_PASSWORD=" + secret
	a := startNode(t, "A", nodeConfig(be.addr(), fields, st), env)
	b := startNode(t, "B", opLogLevel(nodeConfig(be.addr(), fields, st), "DEBUG"), env)
	c := startNode(t, "C", opLogLevel(nodeConfig(be.addr(), fields, noCA), "DEBUG"), env)
	opServedThroughFleet(t, r, be, a, b)

	waitNodes(t, 5*time.Second, "C to say the store's certificate is not trusted", "db", []*caddyProc{c}, func(vs []zoneDetailJSON) bool {
		return vs[0].Fleet != nil && vs[0].Fleet.Store == "unreachable" && strings.Contains(vs[0].Fleet.StoreError, "certificate")
	})
	if n, err := r.Int("ZCARD", "connlimit:{db}:nodes"); err != nil || n != 2 {
		t.Fatalf("the store knows %d nodes (%v), want 2", n, err)
	}
	// A plain connection to the TLS port gets nowhere.
	plain, err := net.DialTimeout("tcp", r.Addr(), time.Second)
	if err == nil {
		_ = plain.SetDeadline(time.Now().Add(time.Second))
		_, _ = plain.Write([]byte("PING\r\n"))
		buf := make([]byte, 64)
		n, _ := plain.Read(buf)
		_ = plain.Close()
		if strings.Contains(string(buf[:n]), "PONG") {
			t.Fatal("the TLS-only redis-server answered a plain PING")
		}
	}
	opNoSecret(t, []*caddyProc{a, b, c}, secret)
}

// 8. A load that fails (its listener cannot start) while it brings a new
// fleet zone leaves the running config serving, and the zone it made
// goes away quietly: no warning that the store cannot be reached (it can:
// the zone only left its fleet).
func TestFleetReloadFailedLoad(t *testing.T) {
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	st := redisStore(r, nil)
	nodes := startFleet(t, 1, be.addr(), obj{"max_connections": 1}, st)
	a := nodes[0]
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	for i := range 8 {
		cfg := nodeConfigAt(a.admin, a.listen, be.addr(), opFields(1), st)
		servers := cfg["apps"].(obj)["layer4"].(obj)["servers"].(obj)
		servers["other"] = obj{"listen": []string{busy.Addr().String()}, "routes": []obj{{"handle": []obj{
			limit(obj{"zone": fmt.Sprintf("other%d", i), "max_connections": 1, "store": st}), proxyTo(be.addr())}}}}
		raw, _ := json.Marshal(cfg)
		code, body, err := a.try(http.MethodPost, "/load", string(raw))
		if err != nil || code != http.StatusBadRequest || !strings.Contains(string(body), "address already in use") {
			t.Fatalf("a load with a listener on a busy port: %d %s (%v); want it refused", code, body, err)
		}
	}
	time.Sleep(1500 * time.Millisecond)
	if l := a.log(); strings.Contains(l, "cannot be reached") {
		t.Fatalf("node A warns that a store cannot be reached:\n%s", l)
	}
	var list struct {
		Zones []zoneJSON `json:"zones"`
	}
	if err := json.Unmarshal(a.do(http.MethodGet, "/connection_limit/", ""), &list); err != nil {
		t.Fatal(err)
	}
	if len(list.Zones) != 1 || list.Zones[0].Zone != "db" {
		t.Fatalf("zones after the failed loads: %+v; want db alone", list.Zones)
	}
	registered(t, "db", a)
	c := takeSlot(t, be, a.listen, "c")
	finish(be, c)
	opDrained(t, nodes)
}
