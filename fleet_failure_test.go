package connlimit

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// (Helpers here are named ff...: fleet failures.)

// Fleet zones when something fails, end to end: a node killed (kill -9),
// a node stalled (SIGSTOP, SIGCONT), Redis killed and started again empty,
// and a node started while Redis is down. Separate Caddy processes share
// zone db through a real redis-server, in front of one gated backend.
// The store's lease is 1 s (redisStore), so a node renews every 333 ms.

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
func ffStoreTraces(t *testing.T, r *redisServer, node string) []string {
	t.Helper()
	ctx := context.Background()
	a := r.Admin()
	base := DefaultKeyPrefix + ":{db}"
	keys, err := a.Keys(ctx, base+":*").Result()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, k := range keys {
		if strings.Contains(k, node) {
			out = append(out, "key "+k)
		}
		if strings.HasPrefix(k, base+":q:") {
			ms, err := a.ZRange(ctx, k, 0, -1).Result()
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
	if _, err := a.ZScore(ctx, base+":nodes", node).Result(); err == nil {
		out = append(out, "lease in "+base+":nodes")
	}
	for _, h := range []string{"info", "epochs"} {
		if ok, _ := a.HExists(ctx, base+":"+h, node).Result(); ok {
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
	r := startRedis(t, redisConfig{})
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
func ffSignalRedis(t *testing.T, r *redisServer, sig syscall.Signal) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cmd == nil {
		t.Fatal("redis-server is not running")
	}
	if err := r.cmd.Process.Signal(sig); err != nil {
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
	r := startRedis(t, redisConfig{})
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
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.cmd != nil {
			_ = r.cmd.Process.Signal(syscall.SIGCONT)
		}
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
	if early := quiet.Add(ffLease - RenewEvery(ffLease) - 50*time.Millisecond); arrived[0].at.Before(early) {
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
