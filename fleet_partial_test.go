package connlimit

import (
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/l4-connlimit/connlimit/internal/testkit"
)

// Fleet zones when only part of the fleet fails: one node's link to Redis
// cut, one reply lost, a registration the store lost. Each node reaches
// Redis through a link of its own, an in-process Toxiproxy on 127.0.0.1,
// that the test cuts, slows or heals. The helpers here are named pf...
// (partial failures).

var (
	pfOnce   sync.Once
	pfServer *toxiproxy.ApiServer
)

// pfLink is one node's link to Redis.
type pfLink struct {
	p *toxiproxy.Proxy
}

// newPFLink starts a link to upstream on a free loopback port, stopped at
// t's cleanup.
func newPFLink(t *testing.T, name, upstream string) *pfLink {
	t.Helper()
	pfOnce.Do(func() {
		pfServer = toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	})
	p := toxiproxy.NewProxy(pfServer, name+"-"+strconv.FormatInt(time.Now().UnixNano(), 36), "127.0.0.1:0", upstream)
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Stop)
	return &pfLink{p: p}
}

// Addr is where the node connects.
func (l *pfLink) Addr() string { return l.p.Listen }

// Cut closes the link's connections and refuses new ones.
func (l *pfLink) Cut() { l.p.Stop() }

// Heal opens the link again, on the same address.
func (l *pfLink) Heal(t *testing.T) {
	t.Helper()
	var err error
	for range 50 { // the port is free again at once; bounded anyway
		if err = l.p.Start(); err == nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("healing the link: %v", err)
}

// Slow adds latency to every reply of the link.
func (l *pfLink) Slow(t *testing.T, latency time.Duration) {
	t.Helper()
	js := fmt.Sprintf(`{"name": "slow", "type": "latency", "stream": "downstream", "attributes": {"latency": %d}}`, latency.Milliseconds())
	if _, err := l.p.Toxics.AddToxicJson(strings.NewReader(js)); err != nil {
		t.Fatal(err)
	}
}

// pfFleet starts n nodes of zone db, each reaching r through a link of
// its own.
func pfFleet(t *testing.T, r *testkit.Redis, n int, backend string, fields obj, store obj) ([]*caddyProc, []*pfLink) {
	t.Helper()
	f := obj{"zone": "db"}
	for k, v := range fields {
		f[k] = v
	}
	nodes := make([]*caddyProc, n)
	links := make([]*pfLink, n)
	for i := range nodes {
		name := string(rune('A' + i))
		links[i] = newPFLink(t, name, r.Addr())
		st := obj{}
		for k, v := range store {
			st[k] = v
		}
		st["address"] = links[i].Addr()
		nodes[i] = startNode(t, name, nodeConfig(backend, f, st))
	}
	registered(t, "db", nodes...)
	return nodes, links
}

// pfLeaseOver reports whether the store's lease of node has run out by
// Redis' own clock (or the node was reaped), asked through Redis directly.
func pfLeaseOver(t *testing.T, r *testkit.Redis, node string) bool {
	t.Helper()
	tm, err := r.Strings("TIME")
	if err != nil {
		t.Fatal(err)
	}
	sec, _ := strconv.ParseInt(tm[0], 10, 64)
	usec, _ := strconv.ParseInt(tm[1], 10, 64)
	now := sec*1000 + usec/1000
	exp, err := r.Str("ZSCORE", "connlimit:{db}:nodes", node)
	if err != nil {
		return true // reaped
	}
	e, _ := strconv.ParseFloat(exp, 64)
	return int64(e) <= now
}

// 1. One node cut off from Redis while the fleet is full keeps the slots
// the store counts for it, no more, until its lease has run out by the
// store's clock: a slot one of its connections frees goes to its own next
// waiter at once; only then does it admit on its share. The others go on
// at max_connections meanwhile. (Before, any failed call made the node
// fall back on its share at once: within about 2 s of the cut it admitted
// a waiter beyond max, its lease still running.)
func TestFleetOneNodeCutOffUsesItsLeaseToTheEnd(t *testing.T) {
	const lease = 3 * time.Second
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	nodes, links := pfFleet(t, r, 3, be.addr(), obj{"max_connections": 3},
		redisStore(r, obj{"lease": lease.String(), "local_share": 2}))
	a, b, c := nodes[0], nodes[1], nodes[2]
	cID := c.zone("db").Fleet.Node

	cl := map[string]*client{}
	cl["A0"] = takeSlot(t, be, a.listen, "A0")
	cl["B0"] = takeSlot(t, be, b.listen, "B0")
	cl["C0"] = takeSlot(t, be, c.listen, "C0")
	cl["C1"] = ffQueueAt(t, c, "C1", 1)
	cl["C2"] = ffQueueAt(t, c, "C2", 2)

	links[2].Cut()
	cut := time.Now()
	waitNodes(t, 5*time.Second, "C to hold what it holds", "db", []*caddyProc{c}, func(vs []zoneDetailJSON) bool {
		return vs[0].Fleet != nil && vs[0].Fleet.Store == "holding"
	})
	be.noArrival(300 * time.Millisecond) // C admits nobody beyond its slot
	ffFinish(be, cl["C0"])
	if ids := be.waitArrivals(1, 2*time.Second); ids[0] != "C1" {
		t.Fatalf("%s admitted when C0 ended, want C1 on C's own slot", ids[0])
	}
	took := time.Since(cut)
	if active, _, _, _ := be.stats(); active != 3 {
		t.Fatalf("backend serves %d after C handed its slot on, want 3", active)
	}
	// C2 waits until C's lease has surely run out, then goes in on C's
	// share (2, counting C1).
	ids := be.waitArrivals(1, 3*lease)
	over := pfLeaseOver(t, r, cID)
	t.Logf("C cut off: C1 in on C's own slot %s after the cut; %s in on C's share %s after it (C's lease over by Redis' clock: %v)",
		took.Round(time.Millisecond), ids[0], time.Since(cut).Round(time.Millisecond), over)
	if ids[0] != "C2" || !over {
		t.Fatalf("%s admitted while C's lease in the store still ran (%v), want C2 only once it ran out", ids[0], over)
	}
	if _, peak, _, _ := be.stats(); peak > 4 {
		t.Fatalf("backend peak %d: beyond max 3 + what C held when its lease ran out (1)", peak)
	}
	links[2].Heal(t)
	waitNodes(t, 10*time.Second, "C registered again, the fleet's count the truth", "db", nodes, ffTruthful(3))
	for _, id := range []string{"A0", "B0", "C1", "C2"} {
		ffFinish(be, cl[id])
	}
	ffDrained(t, nodes)
}

// 3. A registration the store lost or replayed (a failover to a replica
// that had not received the node's last Register): the node's epoch in
// the store goes back. The node finds it at its next renewal and
// registers again, so the grants made for it carry its epoch and are not
// dropped. (Before, the renewals went on succeeding, every grant to the
// node carried the old epoch and was dropped, and its waiter was never
// admitted.)
func TestFleetEpochRolledBack(t *testing.T) {
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	nodes := startFleet(t, 2, be.addr(), obj{"max_connections": 1}, redisStore(r, nil))
	a, b := nodes[0], nodes[1]
	bID := b.zone("db").Fleet.Node
	a0 := takeSlot(t, be, a.listen, "A0")
	b0 := ffQueueAt(t, b, "B0", 1)
	ep, err := r.Int("HGET", "connlimit:{db}:epochs", bID)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Do("HSET", "connlimit:{db}:epochs", bID, ep-1); err != nil {
		t.Fatal(err)
	}
	testkit.WaitFor(t, 5*time.Second, "B to register again", func() bool {
		n, _ := r.Int("HGET", "connlimit:{db}:epochs", bID)
		return n > ep
	})
	ffFinish(be, a0)
	if ids := be.waitArrivals(1, 5*time.Second); ids[0] != "B0" {
		t.Fatalf("%s admitted, want B0", ids[0])
	}
	ffFinish(be, b0)
	ffDrained(t, nodes)
}

// 8. A UDP flow of a fleet zone does not hold the handler's lock across
// its store round trip: flows that arrive together ask the store
// together, each in about one round trip, even when Redis answers slowly.
// (Before, each new flow waited for the one before it: with four flows
// and 300 ms round trips the last was admitted after 1.2 s.)
func TestFleetUDPFlowsAskTheStoreTogether(t *testing.T) {
	const latency = 300 * time.Millisecond
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	link := newPFLink(t, "udp", r.Addr())
	echo := newUDPEcho(t)
	port := freeUDPPort(t)
	loadConfig(t, udpConfig(port, echo, obj{"max_connections": 8, "zone": "udp-fleet",
		"store": obj{"backend": "redis", "address": link.Addr(), "lease": "3s"}}, "5s"))
	defer stopCaddy(t)
	warm := dialUDP(t, port, "warm")
	warm.send("warm")
	warm.expect("warm", 10*time.Second) // registered, and the store's connections made
	link.Slow(t, latency)

	const flows = 4
	start := time.Now()
	var wg sync.WaitGroup
	took := make([]time.Duration, flows)
	for i := range flows {
		f := dialUDP(t, port, fmt.Sprintf("F%d", i))
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := fmt.Sprintf("F%d-0", i)
			f.send(msg)
			f.expect(msg, 10*time.Second)
			took[i] = time.Since(start)
		}()
	}
	wg.Wait()
	fastest, slowest := took[0], took[0]
	for _, d := range took {
		fastest, slowest = min(fastest, d), max(slowest, d)
	}
	t.Logf("%d UDP flows through a store %s away: admitted and echoed after %v", flows, latency, took)
	// One after the other, the last would come (flows-1) round trips after
	// the first; a round trip more or less is the store's own (a pooled
	// connection dialled, a renewal under way).
	if slowest-fastest >= (flows-1)*latency*2/3 {
		t.Fatalf("the slowest of %d flows took %s, the fastest %s: they asked the store one after the other (%s each)", flows, slowest, fastest, latency)
	}
}

// 10. A node warns, once it reached Redis, when Redis' maxmemory-policy
// may evict the zone's keys (allkeys-*), which would lose the fleet's
// slots and waiters as a restart empty does; noeviction says nothing.
func TestFleetWarnsOfAnEvictingRedis(t *testing.T) {
	be := newBackend(t, false)
	for _, tc := range []struct {
		policy string
		warn   bool
	}{{"allkeys-lru", true}, {"noeviction", false}} {
		r := testkit.StartRedis(t, testkit.RedisConfig{Args: []string{"--maxmemory-policy", tc.policy}})
		nodes := startFleet(t, 1, be.addr(), obj{"max_connections": 1}, redisStore(r, nil))
		const warning = "may evict its keys"
		if tc.warn {
			testkit.WaitFor(t, 5*time.Second, "the warning of "+tc.policy, func() bool { return strings.Contains(nodes[0].log(), warning) })
			continue
		}
		time.Sleep(500 * time.Millisecond)
		if strings.Contains(nodes[0].log(), warning) {
			t.Fatalf("a warning with maxmemory-policy %s:\n%s", tc.policy, nodes[0].log())
		}
	}
}

// 4. A node that stops cleanly (SIGTERM: Caddy exits) leaves the fleet at
// once: it closes its connections, so that its waiters leave the line and
// the slots of connections that end go back, and, drained, it
// deregisters. The slot that frees next on another node goes to that
// node's waiter at once, and the store keeps nothing of the stopped node.
// (Before, the stopped node's waiter stayed first in line and absorbed
// the slot that freed, and the node's entry went only when its lease ran
// out: with a 4 s lease the next waiter was admitted 3.7 s after the node
// had exited.)
func TestFleetNodeStopsCleanly(t *testing.T) {
	const lease = 4 * time.Second
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	nodes := startFleet(t, 2, be.addr(), obj{"max_connections": 1}, redisStore(r, obj{"lease": lease.String()}))
	a, b := nodes[0], nodes[1]
	aID := a.zone("db").Fleet.Node
	b0 := takeSlot(t, be, b.listen, "B0")
	a1 := ffQueueAt(t, a, "A1", 1)
	b1 := ffQueueAt(t, b, "B1", 2)

	a.signal(syscall.SIGTERM)
	testkit.WaitFor(t, 10*time.Second, "A to exit", a.exited)
	exited := time.Now()
	a1.expectClosed(5 * time.Second)
	if tr := ffStoreTraces(t, r, aID); len(tr) != 0 {
		t.Fatalf("the store still holds A's once it exited: %v", tr)
	}
	ffFinish(be, b0)
	ids := be.waitArrivals(1, 3*lease)
	took := time.Since(exited)
	t.Logf("A stopped (SIGTERM): when B0 ended, %s was admitted %s after A had exited", ids[0], took.Round(time.Millisecond))
	if ids[0] != "B1" || took > lease/2 {
		t.Fatalf("%s admitted %s after A exited, want B1 at once, not a lease (%s) later", ids[0], took, lease)
	}
	if _, peak, _, _ := be.stats(); peak != 1 {
		t.Fatalf("backend peak %d, want max 1 throughout", peak)
	}
	ffFinish(be, b1)
	ffDrained(t, []*caddyProc{b})
}

// 4b. A config without the zone: the node's waiters leave the fleet's
// line at once, and get the slots its own connections free; the others
// do not wait behind them. Once drained, the node leaves the store.
// (Before, its tickets stayed first in line and took the next slot that
// freed anywhere.)
func TestFleetConfigWithoutTheZoneLeavesTheLine(t *testing.T) {
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	fields := obj{"zone": "db", "max_connections": 2}
	nodes := startFleet(t, 2, be.addr(), fields, redisStore(r, nil))
	a, b := nodes[0], nodes[1]
	aID := a.zone("db").Fleet.Node
	a0 := takeSlot(t, be, a.listen, "A0")
	b0 := takeSlot(t, be, b.listen, "B0")
	a1 := ffQueueAt(t, a, "A1", 1)
	b1 := ffQueueAt(t, b, "B1", 2)

	cfg := nodeConfigAt(a.admin, a.listen, be.addr(), fields, nil)
	cfg["apps"] = obj{"layer4": obj{"servers": obj{"test": obj{
		"listen": []string{a.listen},
		"routes": []obj{{"handle": []obj{proxyTo(be.addr())}}},
	}}}}
	a.load(cfg)
	waitNodes(t, 5*time.Second, "A1 out of the fleet's line", "db", []*caddyProc{b}, func(vs []zoneDetailJSON) bool {
		return vs[0].Fleet != nil && vs[0].Fleet.Waiting == 1 && vs[0].Fleet.Active == 2
	})
	if id := ffNext(t, be, b0); id != "B1" {
		t.Fatalf("%s admitted when B0 ended, want B1 (A1's config is gone)", id)
	}
	if id := ffNext(t, be, a0); id != "A1" {
		t.Fatalf("%s admitted when A0 ended, want A1, with A's own slot", id)
	}
	if _, peak, _, _ := be.stats(); peak != 2 {
		t.Fatalf("backend peak %d, want max 2 throughout", peak)
	}
	ffFinish(be, a1)
	ffFinish(be, b1)
	testkit.WaitFor(t, 5*time.Second, "A, drained, out of the store", func() bool {
		return len(ffStoreTraces(t, r, aID)) == 0
	})
	ffDrained(t, []*caddyProc{b})
}

// 6. A reload that changes a store setting (here the lease) moves the
// zone to the new store settings with its held slots and waiters counted,
// and never admits on its own past the bound on the way. (Before, the
// zone left its fleet first and counted alone for a moment: with the
// fleet full, it admitted its waiters up to max_connections on its own.)
func TestFleetReloadWithOtherStoreSettingsKeepsTheBound(t *testing.T) {
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	fields := obj{"zone": "db", "max_connections": 2}
	nodes := startFleet(t, 2, be.addr(), fields, redisStore(r, nil))
	a, b := nodes[0], nodes[1]
	a0 := takeSlot(t, be, a.listen, "A0")
	b0 := takeSlot(t, be, b.listen, "B0")
	a1 := ffQueueAt(t, a, "A1", 1)
	a2 := ffQueueAt(t, a, "A2", 2)

	a.load(nodeConfigAt(a.admin, a.listen, be.addr(), fields, redisStore(r, obj{"lease": "2s"})))
	be.noArrival(time.Second) // the fleet is full: nobody goes in, here or anywhere
	waitNodes(t, 5*time.Second, "A registered under its new settings, the fleet's count the truth", "db", nodes, ffTruthful(2))
	ffFinish(be, b0)
	if ids := be.waitArrivals(1, 5*time.Second); ids[0] != "A1" {
		t.Fatalf("%s admitted, want A1 (first in line, its place kept)", ids[0])
	}
	if _, peak, _, _ := be.stats(); peak != 2 {
		t.Fatalf("backend peak %d, want max 2 throughout the reload", peak)
	}
	for _, c := range []*client{a0, a1} {
		ffFinish(be, c)
	}
	be.waitArrivals(1, 5*time.Second)
	ffFinish(be, a2)
	ffDrained(t, nodes)
}

// 2b. A count the store lost or garbled without any call failing (a
// failover that lost a give, a restore): the next renewal's check finds
// the store counts another number of slots for the node than it holds,
// and the node registers again; the fleet's count is the truth within
// about a renewal, and the slot the store wrongly counted goes to the next
// waiter. (Before, nothing compared the counts: the fleet ran one slot
// short until the node happened to register again.)
func TestFleetCountHealsAtARenewal(t *testing.T) {
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	nodes := startFleet(t, 2, be.addr(), obj{"max_connections": 2}, redisStore(r, nil))
	a, b := nodes[0], nodes[1]
	a0 := takeSlot(t, be, a.listen, "A0")
	b0 := takeSlot(t, be, b.listen, "B0")
	b1 := ffQueueAt(t, b, "B1", 1)
	// The store counts a slot more for A than it holds: as if the write
	// of one of A's gives had been lost.
	for _, cmd := range [][]any{
		{"HINCRBY", "connlimit:{db}:held:" + a.zone("db").Fleet.Node, "", 1},
		{"HINCRBY", "connlimit:{db}:active", "", 1},
		{"HINCRBY", "connlimit:{db}:tot", "a", 1},
	} {
		if _, err := r.Do(cmd...); err != nil {
			t.Fatal(err)
		}
	}
	wrong := time.Now()
	waitNodes(t, 5*time.Second, "the store's count the truth again", "db", nodes, func(vs []zoneDetailJSON) bool {
		return ffTruthful(2)(vs) && vs[0].Fleet.Active == 2 && vs[0].Fleet.Waiting == 1
	})
	t.Logf("the store's count was the truth again %s after it went wrong (renewals every 333 ms)", time.Since(wrong).Round(time.Millisecond))
	ffFinish(be, b0)
	if ids := be.waitArrivals(1, 5*time.Second); ids[0] != "B1" {
		t.Fatalf("%s admitted, want B1", ids[0])
	}
	if _, peak, _, _ := be.stats(); peak != 2 {
		t.Fatalf("backend peak %d, want 2", peak)
	}
	ffFinish(be, a0)
	ffFinish(be, b1)
	ffDrained(t, nodes)
}

// 5. The operator's word is the fleet's, in the store: an override made
// through one node outlives another node that restarts with the same
// config, and a pause and the override outlive a Redis that comes back
// empty (the first node to register writes them back). A config with
// other settings still ends the override, as in one process. (Before, the
// restarted node wrote its config's limits over the override, and the
// fleet resumed by itself when Redis lost its data.)
func TestFleetOperatorsWordOutlivesNodesAndStore(t *testing.T) {
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, false)
	fields := obj{"zone": "db", "max_connections": 2}
	nodes := startFleet(t, 2, be.addr(), fields, redisStore(r, obj{"lease": ffOutageLease.String()}))
	a, b := nodes[0], nodes[1]
	maxIs := func(what string, n int, paused bool, on ...*caddyProc) {
		t.Helper()
		waitNodes(t, 10*time.Second, what, "db", on, func(vs []zoneDetailJSON) bool {
			for _, v := range vs {
				if v.MaxConnections != n || v.Paused != paused {
					return false
				}
			}
			return true
		})
	}
	a.do(http.MethodPost, "/connection_limit/db/limits", `{"max_connections": 5}`)
	maxIs("every node at the override, max 5", 5, false, a, b)

	// B restarts with the same config: the override stays.
	b.kill()
	b2 := startNode(t, "B2", nodeConfig(be.addr(), fields, redisStore(r, obj{"lease": ffOutageLease.String()})))
	registered(t, "db", a, b2)
	time.Sleep(500 * time.Millisecond) // B2 wrote its config's word
	maxIs("the override kept after B restarted with the same config", 5, false, a, b2)

	// Paused, then Redis comes back empty: pause and override come back.
	a.do(http.MethodPost, "/connection_limit/db/pause", "")
	maxIs("every node paused", 5, true, a, b2)
	r.Kill()
	r.Restart()
	waitNodes(t, 10*time.Second, "both registered again", "db", []*caddyProc{a, b2}, ffTruthful(2))
	if p, _ := r.Str("HGET", "connlimit:{db}:cfg", "paused"); p != "1" {
		t.Fatalf("the store says paused %q after it came back empty, want 1", p)
	}
	maxIs("pause and override back in the store", 5, true, a, b2)
	a.do(http.MethodPost, "/connection_limit/db/resume", "")

	// A config with other settings ends the override fleet-wide.
	fields3 := obj{"zone": "db", "max_connections": 3}
	b2.load(nodeConfigAt(b2.admin, b2.listen, be.addr(), fields3, redisStore(r, obj{"lease": ffOutageLease.String()})))
	maxIs("the newest config's max 3 everywhere", 3, false, a, b2)
}
