package connlimit

import (
	"fmt"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/l4-connlimit/connlimit/internal/testkit"
	"github.com/l4-connlimit/connlimit/store"
	"github.com/l4-connlimit/connlimit/store/redisstore"
)

// Fleet zones when something fails, end to end: a node killed (kill -9),
// a node stalled (SIGSTOP, SIGCONT), Redis killed and started again empty,
// and a node started while Redis is down. Separate Caddy processes share
// zone db through a real redis-server, in front of one gated backend.
// The store's lease is 1 s (redisStore), so a node renews every 333 ms;
// the Redis outage tests use 3 s (ffOutageLease). The helpers here are
// named ff... (fleet failures).

const ffLease = time.Second // redisStore's lease

// ffFinish lets c's connection through the backend's gate, checks its
// answer and that it still carries bytes both ways, and closes it.
func ffFinish(b *backend, c *client) {
	c.t.Helper()
	b.letID(c.id)
	c.expectLine("ok "+c.id, 10*time.Second)
	msg := "still here " + c.id
	if _, err := c.conn.Write([]byte(msg + "\n")); err != nil {
		c.t.Fatalf("client %s: write: %v", c.id, err)
	}
	c.expectLine(msg, 10*time.Second)
	_ = c.conn.Close()
}

// ffNext finishes c and returns who reaches the backend next: the
// waiter given the slot c freed.
func ffNext(t *testing.T, b *backend, c *client) string {
	t.Helper()
	ffFinish(b, c)
	return b.waitArrivals(1, 5*time.Second)[0]
}

// waiter dials addr as id and sends its line: it waits at the node (or is
// admitted: the caller says which it expects).
func ffWaiter(t *testing.T, addr, id string) *client {
	t.Helper()
	c := dial(t, addr, id)
	c.hello("")
	return c
}

// ffQueueAt dials a waiter at node n and waits until the store counts it
// in the fleet's waiting list (want fleet waiting), so that the fleet's
// order is the order of the calls.
func ffQueueAt(t *testing.T, n *caddyProc, id string, want int) *client {
	t.Helper()
	c := ffWaiter(t, n.listen, id)
	waitNodes(t, 10*time.Second, fmt.Sprintf("%s queued in the store (fleet waiting %d)", id, want), "db", []*caddyProc{n}, func(vs []zoneDetailJSON) bool {
		return vs[0].Fleet != nil && vs[0].Fleet.StoreError == "" && vs[0].Fleet.Waiting == want
	})
	return c
}

// ffTruthful: every node is registered and the store's fleet counts (as
// the first node's one-zone view reads them) are the sum of what the
// nodes themselves hold and keep waiting.
func ffTruthful(nodeCount int) func([]zoneDetailJSON) bool {
	return func(vs []zoneDetailJSON) bool {
		a, w := 0, 0
		for _, v := range vs {
			if v.Fleet == nil || v.Fleet.Store != "registered" || v.Fleet.StoreError != "" {
				return false
			}
			a += v.Active
			w += v.Waiting
		}
		f := vs[0].Fleet
		return f.NodeCount == nodeCount && f.Active == a && f.Waiting == w
	}
}

// ffDrained waits until every node and the store count nothing.
func ffDrained(t *testing.T, nodes []*caddyProc) {
	t.Helper()
	waitNodes(t, 10*time.Second, "the fleet to drain", "db", nodes, func(vs []zoneDetailJSON) bool {
		for _, v := range vs {
			if v.Active != 0 || v.Waiting != 0 || v.Fleet == nil || v.Fleet.StoreError != "" || v.Fleet.Active != 0 || v.Fleet.Waiting != 0 {
				return false
			}
		}
		return true
	})
}

// ffStoreTraces lists what the store still holds of node in zone db: its
// keys (held slots, tickets, grants), its lease, info and epoch, and its
// tickets in the waiting lists.
func ffStoreTraces(t *testing.T, r *testkit.Redis, node string) []string {
	t.Helper()
	base := redisstore.DefaultKeyPrefix + ":{db}"
	keys, err := r.Strings("KEYS", base+":*")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, k := range keys {
		if strings.Contains(k, node) {
			out = append(out, "key "+k)
		}
		if strings.HasPrefix(k, base+":q:") {
			ms, err := r.Strings("ZRANGE", k, 0, -1)
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range ms {
				if strings.HasSuffix(m, "\n"+node) {
					out = append(out, fmt.Sprintf("ticket %q in %s", m, k))
				}
			}
		}
	}
	if _, err := r.Str("ZSCORE", base+":nodes", node); err == nil {
		out = append(out, "lease in "+base+":nodes")
	}
	for _, h := range []string{"info", "epochs"} {
		if n, _ := r.Int("HEXISTS", base+":"+h, node); n == 1 {
			out = append(out, "field in "+base+":"+h)
		}
	}
	return out
}

// arrival is a connection that reached the backend, and when.
type ffArrival struct {
	id string
	at time.Time
}

// ffCollectArrivals gathers n arrivals at the backend for at most within,
// in a goroutine of its own (it never fails the test: the caller checks
// what it got).
func ffCollectArrivals(b *backend, n int, within time.Duration) <-chan []ffArrival {
	done := make(chan []ffArrival, 1)
	go func() {
		var got []ffArrival
		deadline := time.NewTimer(within)
		defer deadline.Stop()
		for len(got) < n {
			select {
			case id := <-b.arrivals:
				got = append(got, ffArrival{id, time.Now()})
			case <-deadline.C:
				done <- got
				return
			}
		}
		done <- got
	}()
	return done
}

func ffArrivalIDs(as []ffArrival) []string {
	var ids []string
	for _, a := range as {
		ids = append(ids, a.id)
	}
	return ffSorted(ids)
}

func ffSorted(ids []string) []string {
	ids = slices.Clone(ids)
	slices.Sort(ids)
	return ids
}

// 5. A crashed node gives its slots back by itself: kill -9 of node C,
// which holds k slots and has w waiters (first in the fleet's line):
// within lease + 1 s the store holds nothing of C any more (its slots,
// its tickets, its lease), and the waiters of A and B are admitted with
// C's slots. No operator action.
func TestFleetCrash(t *testing.T) {
	const max, k, w = 4, 3, 2
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	nodes := startFleet(t, 3, be.addr(), obj{"max_connections": max}, redisStore(r, nil))
	a, b, c := nodes[0], nodes[1], nodes[2]
	live := []*caddyProc{a, b}

	// The fleet is full: A holds 1 slot, C holds k.
	a0 := takeSlot(t, be, a.listen, "A0")
	for i := range k {
		takeSlot(t, be, c.listen, fmt.Sprintf("C%d", i))
	}
	// C's w waiters are first in the fleet's line, then A's and B's: were
	// C's tickets left in the store, C's freed slots would go to them.
	queued := 0
	for i := range w {
		queued++
		ffQueueAt(t, c, fmt.Sprintf("C%d", k+i), queued)
	}
	var others []*client
	for _, o := range []struct {
		n  *caddyProc
		id string
	}{{a, "A1"}, {b, "B0"}, {b, "B1"}} {
		queued++
		others = append(others, ffQueueAt(t, o.n, o.id, queued))
	}
	be.noArrival(200 * time.Millisecond)
	cID := c.zone("db").Fleet.Node
	if tr := ffStoreTraces(t, r, cID); len(tr) == 0 {
		t.Fatalf("the store holds nothing of node C (%s) before the crash", cID)
	}

	got := ffCollectArrivals(be, len(others), 10*time.Second)
	killed := time.Now()
	c.kill()
	waitNodes(t, 10*time.Second, "C gone from the store", "db", live, func(vs []zoneDetailJSON) bool {
		f := vs[0].Fleet
		if f == nil || f.NodeCount != 2 || len(f.Nodes) != 2 {
			return false
		}
		for _, n := range f.Nodes {
			if n.ID == cID {
				return false
			}
		}
		return true
	})
	gone := time.Since(killed)
	arrived := <-got
	if len(arrived) != len(others) {
		t.Fatalf("after C's crash only %v of A1, B0, B1 reached the backend within 10s", ffArrivalIDs(arrived))
	}
	admitted := arrived[len(arrived)-1].at.Sub(killed)
	t.Logf("kill -9 of C (%d slots, %d waiters): C gone from the store after %s, its slots' last taker at the backend after %s (lease %s)",
		k, w, gone.Round(time.Millisecond), admitted.Round(time.Millisecond), ffLease)
	if ids := ffArrivalIDs(arrived); !slices.Equal(ids, []string{"A1", "B0", "B1"}) {
		t.Errorf("C's slots went to %v, want A1, B0, B1", ids)
	}
	if bound := ffLease + time.Second; gone > bound || admitted > bound {
		t.Errorf("C gone from the store after %s, its waiters' replacements admitted after %s: want both within lease + 1s = %s", gone, admitted, bound)
	}
	if tr := ffStoreTraces(t, r, cID); len(tr) != 0 {
		t.Errorf("the store still holds of the crashed node C: %v", tr)
	}
	// The fleet's count is the truth: A's and B's own.
	views := waitNodes(t, 5*time.Second, "the fleet's count to be A's and B's", "db", live, ffTruthful(2))
	if f := views[0].Fleet; f.Active != max || f.Waiting != 0 {
		t.Errorf("after C's crash the store says %d active, %d waiting; want %d, 0\n%s", f.Active, f.Waiting, max, describeViews(live, views))
	}

	ffFinish(be, a0)
	for _, o := range others {
		ffFinish(be, o)
	}
	ffDrained(t, live)
	for _, n := range live {
		if n.exited() {
			t.Errorf("node %s exited", n.name)
		}
	}
}

// ffSignalRedis sends sig to the test's redis-server.
func ffSignalRedis(t *testing.T, r *testkit.Redis, sig syscall.Signal) {
	t.Helper()
	if err := r.Signal(sig); err != nil {
		t.Fatalf("redis-server: %v: %v", sig, err)
	}
}

// 6. A stalled node: SIGSTOP node C, which holds k slots, for longer than
// its lease, then SIGCONT. The others take over C's slots once its lease
// ran out (not before); C, awake, finds its lease lapsed, admits nobody
// new until it has registered again the k connections it still serves,
// and the fleet's count is the truth again within one lease.
//
// C is stopped while store calls of its own are in flight (their replies
// come while it is stopped, and it finds their deadlines passed when it
// wakes), as a busy node would be, and a newcomer reaches it while it is
// stopped: neither may be admitted on C's own (its local_share, here all
// of max, is for a store that cannot be reached, not for a lapsed lease).
//
// The bound: while C is stopped its k connections still run (their
// sockets are the kernel's), and the others fill all of max_connections
// without them: the backend sees up to max + k at once, and no more. Once
// C has registered again, the fleet counts max + k and admits nobody until
// the count is below max again. So the backend can be k above max (k: the
// stalled node's connections) for as long as the stall and those k
// connections last, and the test asserts the backend's peak is exactly
// max + k.
func TestFleetStall(t *testing.T) {
	const max, k = 4, 2
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	nodes := startFleet(t, 3, be.addr(), obj{"max_connections": max}, redisStore(r, obj{"local_share": max}))
	a, b, c := nodes[0], nodes[1], nodes[2]
	live := []*caddyProc{a, b}

	// Full: A holds max - k, C holds k; A2, B0, B1 wait in that order.
	cl := map[string]*client{}
	for i := range max - k {
		id := fmt.Sprintf("A%d", i)
		cl[id] = takeSlot(t, be, a.listen, id)
	}
	for i := range k {
		id := fmt.Sprintf("C%d", i)
		cl[id] = takeSlot(t, be, c.listen, id)
	}
	for i, o := range []struct {
		n  *caddyProc
		id string
	}{{a, "A2"}, {b, "B0"}, {b, "B1"}} {
		cl[o.id] = ffQueueAt(t, o.n, o.id, i+1)
	}
	be.noArrival(200 * time.Millisecond)

	// Redis holds still for a moment, while C2 arrives at C: C's Take for
	// it (and maybe a renewal) is in flight when C stops. Redis answers
	// once C is stopped; C finds the answers too late when it wakes.
	quiet := time.Now()
	ffSignalRedis(t, r, syscall.SIGSTOP)
	t.Cleanup(func() {
		_ = r.Signal(syscall.SIGCONT)
	})
	cl["C2"] = ffWaiter(t, c.listen, "C2")
	time.Sleep(300 * time.Millisecond)
	got := ffCollectArrivals(be, k, 10*time.Second)
	stopped := time.Now()
	c.signal(syscall.SIGSTOP)
	t.Cleanup(func() { _ = c.cmd.Process.Signal(syscall.SIGCONT) })
	ffSignalRedis(t, r, syscall.SIGCONT)
	// A newcomer while C is stopped: the kernel accepts it; C sees it
	// when it wakes.
	cl["C3"] = ffWaiter(t, c.listen, "C3")

	arrived := <-got
	if len(arrived) != k {
		t.Fatalf("while C was stopped only %v of A2, B0 reached the backend within 10s", ffArrivalIDs(arrived))
	}
	first, last := arrived[0].at.Sub(stopped), arrived[k-1].at.Sub(stopped)
	t.Logf("SIGSTOP of C (%d slots): its slots taken over after %s and %s (%s after C last reached the store; lease %s)",
		k, first.Round(time.Millisecond), last.Round(time.Millisecond), arrived[k-1].at.Sub(quiet).Round(time.Millisecond), ffLease)
	if ids := ffArrivalIDs(arrived); !slices.Equal(ids, []string{"A2", "B0"}) {
		t.Errorf("C's slots went to %v, want A2, B0 (first in line)", ids)
	}
	// C renewed in the store at most a renewal period (lease/3) before
	// Redis held still: its lease ran out no sooner than 2/3 of a lease
	// after that.
	if early := quiet.Add(ffLease - store.RenewEvery(ffLease) - 50*time.Millisecond); arrived[0].at.Before(early) {
		t.Errorf("C's slots were taken over %s after it stopped: before its lease (%s) could run out", first, ffLease)
	}
	if last > ffLease+time.Second {
		t.Errorf("C's slots were taken over %s after it stopped: want within lease + 1s", last)
	}
	be.noArrival(300 * time.Millisecond) // B1 waits: the store counts max without C
	views := waitNodes(t, 5*time.Second, "the store to count A and B only", "db", live, ffTruthful(2))
	if f := views[0].Fleet; f.Active != max || f.Waiting != 1 {
		t.Errorf("while C is stopped the store says %d active, %d waiting; want %d, 1", f.Active, f.Waiting, max)
	}
	if active, peak, _, _ := be.stats(); active != max+k || peak != max+k {
		t.Errorf("while C is stopped the backend has %d connections (peak %d), want max + k = %d", active, peak, max+k)
	}

	// Stopped for longer than 2 leases in all, then awake.
	time.Sleep(time.Until(stopped.Add(2*ffLease + 500*time.Millisecond)))
	woke := time.Now()
	c.signal(syscall.SIGCONT)
	nodes = []*caddyProc{a, b, c}
	views = waitNodes(t, 10*time.Second, "C registered again with its 4 connections, the fleet's count the truth", "db", nodes, func(vs []zoneDetailJSON) bool {
		return ffTruthful(3)(vs) && vs[2].Active+vs[2].Waiting == k+2
	})
	converged := time.Since(woke)
	t.Logf("SIGCONT of C after %s stopped: the fleet's count the truth again after %s:\n%s",
		woke.Sub(stopped).Round(time.Millisecond), converged.Round(time.Millisecond), describeViews(nodes, views))
	if converged > ffLease {
		t.Errorf("the fleet's count took %s after C woke to be the truth: want within one lease (%s)", converged, ffLease)
	}
	if v := views[2]; v.Active != k || v.Waiting != 2 {
		t.Errorf("C, awake, has %d active and %d waiting: it admitted on its own (want its %d, and C2 and C3 waiting)", v.Active, v.Waiting, k)
	}
	if f := views[0].Fleet; f.Active != max+k || f.Waiting != 3 {
		t.Errorf("after C woke the store says %d active, %d waiting; want max + k = %d, and B1, C2, C3", f.Active, f.Waiting, max+k)
	}
	// C admitted neither C2 nor C3 on its own, nor before it counted its
	// k connections again.
	be.noArrival(300 * time.Millisecond)

	// The fleet counts max + k: it admits nobody until below max.
	for _, id := range []string{"A0", "A1"} {
		ffFinish(be, cl[id])
		be.noArrival(400 * time.Millisecond)
	}
	// Below max: the next in line, B1 (queued before C registered again),
	// then C's waiters.
	ffFinish(be, cl["C0"])
	if ids := be.waitArrivals(1, 5*time.Second); ids[0] != "B1" {
		t.Errorf("a slot freed below max went to %s, want B1", ids[0])
	}
	ffFinish(be, cl["C1"])
	ffFinish(be, cl["A2"])
	if ids := be.waitArrivals(2, 5*time.Second); !slices.Equal(ffSorted(ids), []string{"C2", "C3"}) {
		t.Errorf("the next slots went to %v, want C2 and C3", ids)
	}
	be.noArrival(200 * time.Millisecond)
	for _, id := range []string{"B0", "B1", "C2", "C3"} {
		ffFinish(be, cl[id])
	}
	ffDrained(t, nodes)
	if _, peak, total, _ := be.stats(); peak != max+k || total != 9 {
		t.Errorf("backend peak %d, want exactly max + k = %d; %d connections, want 9", peak, max+k, total)
	}
}

// ffWarnings counts the lines of a node's log that say, at warn, that its
// store cannot be reached (metrics.go says it once per outage).
func ffWarnings(log string) int {
	n := 0
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, "the zone's store cannot be reached") && strings.Contains(l, `"level":"warn"`) {
			n++
		}
	}
	return n
}

// ffOutage kills redis-server and waits until every node says its store
// cannot be reached, in its one-zone view (which answers: no node hangs)
// and in its log; it returns how long they took to notice.
func ffOutage(t *testing.T, r *testkit.Redis, nodes []*caddyProc) time.Duration {
	t.Helper()
	killed := time.Now()
	r.Kill()
	waitNodes(t, 10*time.Second, "every node to find its store unreachable", "db", nodes, func(vs []zoneDetailJSON) bool {
		for _, v := range vs {
			if v.Fleet == nil || v.Fleet.Store != "unreachable" || v.Fleet.StoreError == "" {
				return false
			}
		}
		return true
	})
	noticed := time.Since(killed)
	for _, n := range nodes {
		testkit.WaitFor(t, 5*time.Second, "node "+n.name+"'s warning that its store cannot be reached", func() bool { return ffWarnings(n.log()) == 1 })
	}
	return noticed
}

// ffAlive checks that every node still runs and its admin API answers
// within a few seconds, and returns their views.
func ffAlive(t *testing.T, nodes []*caddyProc) []zoneDetailJSON {
	t.Helper()
	views := make([]zoneDetailJSON, len(nodes))
	for i, n := range nodes {
		if n.exited() {
			t.Fatalf("node %s exited:\n%s", n.name, testkit.Tail(n.log(), 2000))
		}
		start := time.Now()
		views[i] = n.zone("db")
		if took := time.Since(start); took > 3*time.Second {
			t.Errorf("node %s's admin API took %s to answer", n.name, took)
		}
	}
	return views
}

// ffOutageLease is the lease of the Redis outage tests. A node whose
// store was down for a few seconds re-registers up to about a second
// later than its next renewal once the store is back: go-redis stops
// dialing after as many failed dials as its pool has connections, and
// then tries one dial a second until one succeeds. With a 1 s lease the
// fleet's count is then the truth again only up to ~1.33 s after Redis
// came back (renewal period 333 ms + 1 s); from a lease of 1.5 s up, it
// is within one lease, which these tests check with 3 s (renewal period
// 1 s + 1 s: a margin of a second on 2 shared cores).
const ffOutageLease = 3 * time.Second

// ffBack starts redis-server again, empty, and waits until every node
// has registered what it serves and who waits at it, so that the fleet's
// count is the truth; it returns how long that took.
func ffBack(t *testing.T, r *testkit.Redis, nodes []*caddyProc, active, waiting int) ([]zoneDetailJSON, time.Duration) {
	t.Helper()
	r.Restart()
	restarted := time.Now()
	views := waitNodes(t, 10*time.Second, "every node registered again, the fleet's count the truth", "db", nodes, func(vs []zoneDetailJSON) bool {
		return ffTruthful(len(nodes))(vs) && vs[0].Fleet.Active == active && vs[0].Fleet.Waiting == waiting
	})
	return views, time.Since(restarted)
}

// 7a. Redis goes away during load and comes back empty, with
// on_unreachable local_share N: no node crashes or hangs, admitted
// connections keep running, each node admits up to N on its own (counting
// what it holds; N here is neither max_connections nor the automatic
// share), and once Redis is back every node registers what it serves and
// who waits, within one lease: the fleet's count is the truth again, it
// admits nobody until below max, no waiter is forgotten and no slot leaks.
func TestFleetRedisLocalShare(t *testing.T) {
	const max, share = 3, 2 // the automatic share would be 3/2 = 1
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	nodes := startFleet(t, 2, be.addr(), obj{"max_connections": max},
		redisStore(r, obj{"on_unreachable": "local_share", "local_share": share, "lease": ffOutageLease.String()}))
	a, b := nodes[0], nodes[1]

	// Full: A holds 2, B holds 1; B1, then A2, wait in the store.
	cl := map[string]*client{}
	for _, o := range []struct {
		n  *caddyProc
		id string
	}{{a, "A0"}, {b, "B0"}, {a, "A1"}} {
		cl[o.id] = takeSlot(t, be, o.n.listen, o.id)
	}
	cl["B1"] = ffQueueAt(t, b, "B1", 1)
	cl["A2"] = ffQueueAt(t, a, "A2", 2)
	be.noArrival(200 * time.Millisecond)

	noticed := ffOutage(t, r, nodes)
	t.Logf("Redis killed: both nodes unreachable after %s", noticed.Round(time.Millisecond))
	// B holds 1 of its share of 2: its waiter B1 is admitted on B's own;
	// A holds 2, its share: A2 waits.
	if ids := be.waitArrivals(1, 5*time.Second); ids[0] != "B1" {
		t.Fatalf("%s admitted during the outage, want B1 (B's share)", ids[0])
	}
	// Newcomers wait: each node is at its share.
	cl["A3"] = ffWaiter(t, a.listen, "A3")
	cl["B2"] = ffWaiter(t, b.listen, "B2")
	be.noArrival(500 * time.Millisecond)
	// An admitted connection keeps running and ends well; its slot goes
	// to A's next waiter, on A's own.
	ffFinish(be, cl["A0"])
	if ids := be.waitArrivals(1, 5*time.Second); ids[0] != "A2" {
		t.Fatalf("%s admitted when A0 ended during the outage, want A2", ids[0])
	}
	be.noArrival(500 * time.Millisecond)
	views := ffAlive(t, nodes)
	for i, want := range [][2]int{{share, 1}, {share, 1}} { // A: A1 A2 | A3; B: B0 B1 | B2
		if v := views[i]; v.Active != want[0] || v.Waiting != want[1] || v.Fleet.Store != "unreachable" {
			t.Errorf("node %s during the outage: %d active, %d waiting, store %s; want %d, %d, unreachable (its share %d)",
				nodes[i].name, v.Active, v.Waiting, v.Fleet.Store, want[0], want[1], share)
		}
	}
	if v := views[0].Fleet; v.OnUnreachable != "local_share" || v.LocalShare != share {
		t.Errorf("A's fleet view says on_unreachable %q, local_share %d", v.OnUnreachable, v.LocalShare)
	}
	for _, n := range nodes {
		if m := scrape(t, n.admin)[`caddy_layer4_connection_limit_store_reachable{zone="db"}`]; m != 0 {
			t.Errorf("node %s: store_reachable %v during the outage, want 0", n.name, m)
		}
	}

	// Redis is back, empty. It grants nobody for a lease (it lost the
	// state the nodes knew), by when both nodes have registered what
	// they hold: 4 active (max 3), A3 and B2 waiting. Before, the first
	// node to register found only its own slots counted and admitted one
	// of its waiters at once: 5 active.
	views, took := ffBack(t, r, nodes, 2*share, 2)
	t.Logf("Redis back empty: the fleet's count the truth again after %s:\n%s", took.Round(time.Millisecond), describeViews(nodes, views))
	if took > ffOutageLease {
		t.Errorf("the fleet's count took %s to be the truth after Redis came back: want within one lease (%s)", took, ffOutageLease)
	}
	if views[0].MaxConnections != max || views[0].Fleet.NodeCount != 2 {
		t.Errorf("after the restart: max %d, %d nodes; want %d, 2", views[0].MaxConnections, views[0].Fleet.NodeCount, max)
	}
	for _, n := range nodes {
		if m := scrape(t, n.admin)[`caddy_layer4_connection_limit_store_reachable{zone="db"}`]; m != 1 {
			t.Errorf("node %s: store_reachable %v once Redis is back, want 1", n.name, m)
		}
		if !strings.Contains(n.log(), "the zone's store is reachable again") {
			t.Errorf("node %s does not say in its log that its store is back", n.name)
		}
	}
	// 4 active of 3: nobody is admitted until the count is below max.
	be.noArrival(300 * time.Millisecond)
	ffFinish(be, cl["A1"])
	be.noArrival(400 * time.Millisecond)
	ffFinish(be, cl["B0"])
	x := be.waitArrivals(1, 5*time.Second)[0]
	ffFinish(be, cl["A2"])
	y := be.waitArrivals(1, 5*time.Second)[0]
	if got := ffSorted([]string{x, y}); !slices.Equal(got, []string{"A3", "B2"}) {
		t.Errorf("after the outage %v were admitted, want A3 and B2", got)
	}
	for _, id := range []string{"B1", "A3", "B2"} {
		ffFinish(be, cl[id])
	}
	ffDrained(t, nodes)
	// The backend saw max before the outage, each node's share during it
	// (2 x 2), and no more once Redis was back.
	if _, peak, total, _ := be.stats(); peak != 2*share || total != 7 {
		t.Errorf("backend peak %d, want 2 nodes x local_share %d = %d; %d connections, want 7", peak, share, 2*share, total)
	}
	ffAlive(t, nodes)
}

// 7b. Redis goes away during load and comes back empty, with
// on_unreachable refuse: nobody new is admitted while it is away (not
// even where a node holds nothing), waiters wait or time out, admitted
// connections keep running; once Redis is back every node registers what
// it serves within one lease, and the waiters of the outage are admitted
// once the store, which lost its data, has learnt for a lease.
func TestFleetRedisRefuse(t *testing.T) {
	const max = 2
	const waitTimeout = 8 * time.Second
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	be := newBackend(t, true)
	nodes := startFleet(t, 2, be.addr(), obj{"max_connections": max, "wait_timeout": waitTimeout.String()},
		redisStore(r, obj{"on_unreachable": "refuse", "lease": ffOutageLease.String()}))
	a, b := nodes[0], nodes[1]

	cl := map[string]*client{}
	cl["A0"] = takeSlot(t, be, a.listen, "A0")
	cl["B0"] = takeSlot(t, be, b.listen, "B0")

	noticed := ffOutage(t, r, nodes)
	t.Logf("Redis killed: both nodes unreachable after %s", noticed.Round(time.Millisecond))
	cl["A1"] = ffWaiter(t, a.listen, "A1")
	cl["B1"] = ffWaiter(t, b.listen, "B1")
	arrived := time.Now()
	// A0 ends well during the outage; A holds nothing now, and still
	// admits nobody.
	ffFinish(be, cl["A0"])
	be.noArrival(time.Second)
	views := ffAlive(t, nodes)
	for i, want := range [][2]int{{0, 1}, {1, 1}} {
		if v := views[i]; v.Active != want[0] || v.Waiting != want[1] || v.Fleet.Store != "unreachable" || v.Fleet.OnUnreachable != "refuse" {
			t.Errorf("node %s during the outage: %d active, %d waiting, store %s, on_unreachable %s; want %d, %d, unreachable, refuse",
				nodes[i].name, v.Active, v.Waiting, v.Fleet.Store, v.Fleet.OnUnreachable, want[0], want[1])
		}
	}
	// A1 and B1 time out: closed unserved, counted as such.
	cl["A1"].expectClosed(waitTimeout + 5*time.Second)
	cl["B1"].expectClosed(5 * time.Second)
	if waited := time.Since(arrived); waited < waitTimeout-100*time.Millisecond {
		t.Errorf("A1 and B1 were closed after %s, before their wait_timeout %s", waited, waitTimeout)
	}
	views = ffAlive(t, nodes)
	for i, v := range views {
		if v.RejectedByReason["wait_timeout"] != 1 || v.Waiting != 0 {
			t.Errorf("node %s: %d rejected by wait_timeout, %d waiting; want 1, 0", nodes[i].name, v.RejectedByReason["wait_timeout"], v.Waiting)
		}
	}
	// Newcomers late in the outage wait, and are admitted once Redis is back.
	cl["A2"] = ffWaiter(t, a.listen, "A2")
	cl["B2"] = ffWaiter(t, b.listen, "B2")
	be.noArrival(300 * time.Millisecond)

	// Back, empty: every node registers within one lease (B0 active, A2
	// and B2 waiting); the store grants nobody until a lease after it
	// found itself empty, then one of A2 and B2 (the fleet has room for
	// one), and the other waits.
	back := time.Now()
	views, took := ffBack(t, r, nodes, 1, 2)
	t.Logf("Redis back empty: the fleet's count the truth again after %s:\n%s", took.Round(time.Millisecond), describeViews(nodes, views))
	if took > ffOutageLease {
		t.Errorf("the fleet's count took %s to be the truth after Redis came back: want within one lease (%s)", took, ffOutageLease)
	}
	x := be.waitArrivals(1, 5*time.Second)[0]
	if d := time.Since(back); d < ffOutageLease-200*time.Millisecond {
		t.Errorf("%s admitted %s after Redis came back empty: before the store can have learnt who holds what (one lease, %s)", x, d, ffOutageLease)
	}
	be.noArrival(200 * time.Millisecond)
	ffFinish(be, cl["B0"])
	y := be.waitArrivals(1, 5*time.Second)[0]
	if got := ffSorted([]string{x, y}); !slices.Equal(got, []string{"A2", "B2"}) {
		t.Errorf("after the outage %v were admitted, want A2 and B2", got)
	}
	ffFinish(be, cl["A2"])
	ffFinish(be, cl["B2"])
	ffDrained(t, nodes)
	if _, peak, total, _ := be.stats(); peak != max || total != 4 {
		t.Errorf("backend peak %d, want max %d; %d connections, want 4", peak, max, total)
	}
}

// 7c. Caddy starts while Redis is down: provisioning succeeds, the node
// says in a warning that the zone's store cannot be reached, admits on
// its own (the automatic share of a node that never reached its store:
// 1), and registers once Redis is up, its waiter then admitted by the
// fleet.
func TestFleetStartsWithRedisDown(t *testing.T) {
	r := testkit.StartRedis(t, testkit.RedisConfig{})
	r.Kill()
	be := newBackend(t, true)
	a := startNode(t, "A", nodeConfig(be.addr(), obj{"zone": "db", "max_connections": 2}, redisStore(r, nil)))
	nodes := []*caddyProc{a}
	testkit.WaitFor(t, 5*time.Second, "A's warning that its store cannot be reached", func() bool { return ffWarnings(a.log()) == 1 })
	v := a.zone("db")
	if v.Fleet == nil || v.Fleet.Store != "unreachable" || v.Fleet.StoreError == "" {
		t.Fatalf("A started with Redis down: fleet view %+v, want store unreachable with its error", v.Fleet)
	}
	a0 := takeSlot(t, be, a.listen, "A0")
	a1 := ffWaiter(t, a.listen, "A1")
	be.noArrival(500 * time.Millisecond)

	r.Restart()
	restarted := time.Now()
	views := waitNodes(t, 10*time.Second, "A registered, its waiter admitted", "db", nodes, func(vs []zoneDetailJSON) bool {
		return ffTruthful(1)(vs) && vs[0].Active == 2
	})
	t.Logf("Redis up: A registered and its waiter admitted after %s", time.Since(restarted).Round(time.Millisecond))
	if f := views[0].Fleet; f.Active != 2 || f.Waiting != 0 || views[0].MaxConnections != 2 {
		t.Errorf("after Redis came up the store says %d active, %d waiting, max %d; want 2, 0, 2", f.Active, f.Waiting, views[0].MaxConnections)
	}
	if ids := be.waitArrivals(1, 5*time.Second); ids[0] != "A1" {
		t.Errorf("%s admitted, want A1", ids[0])
	}
	ffFinish(be, a0)
	ffFinish(be, a1)
	ffDrained(t, nodes)
}
