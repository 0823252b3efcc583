package engine

import (
	"cmp"
	"fmt"
	"maps"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// Tests of the fair share (fair.go): the order and the counts.

// fairObserver is a testObserver that also keeps what FairChanged said.
type fairObserver struct {
	testObserver
	fmu      sync.Mutex
	told     int
	tenantsW int
	index    float64
}

func (o *fairObserver) FairChanged(n int, j float64) {
	o.fmu.Lock()
	defer o.fmu.Unlock()
	o.told++
	o.tenantsW, o.index = n, j
}

func (o *fairObserver) fair() (int, float64) {
	o.fmu.Lock()
	defer o.fmu.Unlock()
	return o.tenantsW, o.index
}

// newFairZone makes a zone with fair share f whose observer and internal
// state are checked at the end of the test.
func newFairZone(t testing.TB, l Limits, f Fair) (*Zone, *fairObserver) {
	t.Helper()
	if err := f.Validate(); err != nil {
		t.Fatalf("bad test fair share: %v", err)
	}
	o := &fairObserver{}
	z := NewZone("test", l, o)
	z.SetFair(f)
	t.Cleanup(func() {
		checkObserver(t, z, &o.testObserver)
		checkFair(t, z)
	})
	return z, o
}

// tw is a test connection of a tenant.
func tw(id int, tenant string, prio int) *qw {
	c := newQW(id, "", prio)
	c.w.Tenant = tenant
	return c
}

func fairAcquire(t *testing.T, z *Zone, id int, tenant string, prio int, now time.Time, want Outcome) *qw {
	t.Helper()
	c := tw(id, tenant, prio)
	out, r := z.Acquire(c.w, c.k, now)
	if out != want {
		t.Fatalf("Acquire(waiter %d, tenant %q, prio %d) = %v/%v, want %v", id, tenant, prio, out, r, want)
	}
	return c
}

// claim polls every granted waiter of cs, so that it holds its slot.
func claim(t *testing.T, z *Zone, cs []*qw, now time.Time) []*qw {
	t.Helper()
	var got []*qw
	for _, c := range cs {
		if c.w.state == stateGranted {
			if out, _, _ := z.Poll(c.w, now); out != Admitted {
				t.Fatalf("Poll(granted %d) = %v", c.id, out)
			}
			got = append(got, c)
		}
	}
	return got
}

// checkFair checks the fair queue's own bookkeeping: counts, lists, heaps
// and the sums of Jain's index.
func checkFair(t testing.TB, z *Zone) {
	t.Helper()
	z.mu.Lock()
	defer z.mu.Unlock()
	fq := z.fair
	if fq == nil {
		return
	}
	waiting, nw := 0, 0
	var s1, s2 float64
	for name, tn := range fq.tenants {
		if tn.name != name || tn.fq != fq {
			t.Errorf("tenant %q: named %q, fq ok %v", name, tn.name, tn.fq == fq)
		}
		if tn.active < 0 || (tn.active == 0 && tn.waiting == 0) != tn.idle {
			t.Errorf("tenant %q kept with active %d, waiting %d, idle %v", name, tn.active, tn.waiting, tn.idle)
		}
		if tn.weight != fq.cfg.weight(name) {
			t.Errorf("tenant %q: weight %d, config %d", name, tn.weight, fq.cfg.weight(name))
		}
		n := 0
		for i, tl := range tn.levels {
			if i > 0 && tn.levels[i-1].prio <= tl.prio {
				t.Errorf("tenant %q: levels out of order", name)
			}
			if tl.n == 0 || tl.t != tn || tl.tl != tl {
				t.Errorf("tenant %q prio %d: bad list (n %d)", name, tl.prio, tl.n)
			}
			inHeap := tl.hi >= 0 && tl.hi < len(tl.pl.heap) && tl.pl.heap[tl.hi].tl == tl
			if inHeap != fq.eligible(tn) || (tl.hi >= 0 && !inHeap) {
				t.Errorf("tenant %q prio %d: in heap %v (hi %d), eligible %v", name, tl.prio, inHeap, tl.hi, fq.eligible(tn))
			}
			c := 0
			var prev *Waiter
			for w := tl.head; w != nil; w = w.next {
				if w.lvl != &tl.level || w.tn != tn || w.state != stateWaiting || w.Priority != tl.prio || w.prev != prev {
					t.Errorf("tenant %q prio %d: bad waiter", name, tl.prio)
				}
				if prev != nil && prev.seq >= w.seq {
					t.Errorf("tenant %q prio %d: waiters out of arrival order", name, tl.prio)
				}
				prev = w
				c++
			}
			if c != tl.n || prev != tl.tail {
				t.Errorf("tenant %q prio %d: %d waiters, n %d", name, tl.prio, c, tl.n)
			}
			n += c
		}
		if n != tn.waiting {
			t.Errorf("tenant %q: %d waiters, waiting %d", name, n, tn.waiting)
		}
		waiting += n
		if tn.waiting > 0 {
			nw++
			x := float64(tn.active) / float64(tn.weight)
			s1 += x
			s2 += x * x
		}
	}
	if waiting != z.def.waiting {
		t.Errorf("tenants wait %d, zone %d", waiting, z.def.waiting)
	}
	if nw != fq.nWaiting || math.Abs(s1-fq.s1) > 1e-6 || math.Abs(s2-fq.s2) > 1e-6 {
		t.Errorf("index sums: n %d s1 %g s2 %g, kept n %d s1 %g s2 %g", nw, s1, s2, fq.nWaiting, fq.s1, fq.s2)
	}
	idle := 0
	for tn := fq.idleHead; tn != nil; tn = tn.idleNext {
		if !tn.idle || fq.tenants[tn.name] != tn || (tn.idleNext == nil) != (tn == fq.idleTail) {
			t.Errorf("idle list: tenant %q", tn.name)
		}
		idle++
	}
	if idle != fq.idleN || idle > maxIdle {
		t.Errorf("%d idle tenants listed, %d counted (at most %d)", idle, fq.idleN, maxIdle)
	}
	for _, pl := range fq.prios {
		for i := range pl.heap {
			e := &pl.heap[i]
			if e.tl.hi != i || e.tl.pl != pl {
				t.Errorf("prio %d: heap index %d of %d", pl.prio, e.tl.hi, i)
			}
			if *e != fq.entry(e.tl) {
				t.Errorf("prio %d: stale key %+v, now %+v", pl.prio, *e, fq.entry(e.tl))
			}
			if i > 0 && heapLess(e, &pl.heap[(i-1)/arity]) {
				t.Errorf("prio %d: heap out of order at %d", pl.prio, i)
			}
		}
		for _, tl := range fq.lists(pl) {
			if tl.pl != pl || tl.prio != pl.prio {
				t.Errorf("prio %d: a list of prio %d", pl.prio, tl.prio)
			}
		}
	}
	// No eligible waiter waits while a slot is free (and admission is on).
	if !z.paused && z.def.active < z.localSlots(&z.def) && fq.anyEligible() {
		t.Errorf("a slot is free (%d of %d) while an eligible waiter waits", z.def.active, z.limits.MaxConnections)
	}
}

func TestFairValidate(t *testing.T) {
	good := []Fair{
		{},
		{Tenant: "{x}"},
		{Tenant: "{x}", Weights: map[string]int{"a": 1, "": 7}, Max: 3},
	}
	for _, f := range good {
		if err := f.Validate(); err != nil {
			t.Errorf("Validate(%+v) = %v", f, err)
		}
	}
	bad := []struct {
		f    Fair
		want string
	}{
		{Fair{Tenant: "{x}", Weights: map[string]int{"b": 2, "a": 0}}, `weights: the weight of tenant "a" must be at least 1, got 0`},
		{Fair{Tenant: "{x}", Weights: map[string]int{"a": -3}}, `weights: the weight of tenant "a" must be at least 1, got -3`},
		{Fair{Tenant: "{x}", Max: -1}, "fair_max must be at least 1, got -1"},
		{Fair{Weights: map[string]int{"a": 2}}, "weights: needs fair_share"},
		{Fair{Max: 2}, "fair_max: needs fair_share"},
	}
	for _, c := range bad {
		err := c.f.Validate()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Validate(%+v) = %v, want %q", c.f, err, c.want)
		}
	}
	a := Fair{Tenant: "{x}", Weights: map[string]int{"a": 2}, Max: 3}
	for _, c := range []struct {
		b    Fair
		want string
	}{
		{a, ""},
		{Fair{Tenant: "{y}", Weights: map[string]int{"a": 2}, Max: 3}, "fair_share"},
		{Fair{Tenant: "{x}", Weights: map[string]int{"a": 3}, Max: 3}, "weights"},
		{Fair{Tenant: "{x}", Max: 3}, "weights"},
		{Fair{Tenant: "{x}", Weights: map[string]int{"a": 2}}, "fair_max"},
	} {
		if d := a.Differs(c.b); (d == "") != (c.want == "") || !strings.HasPrefix(d, c.want) {
			t.Errorf("Differs(%+v) = %q, want %q...", c.b, d, c.want)
		}
	}
}

// A light tenant that arrives behind a heavy tenant's backlog gets the
// next free slot.
func TestFairLightAheadOfHeavyBacklog(t *testing.T) {
	z, _ := newFairZone(t, Limits{MaxConnections: 2}, Fair{Tenant: "{t}"})
	h1 := fairAcquire(t, z, 1, "H", 0, t0, Admitted)
	h2 := fairAcquire(t, z, 2, "H", 0, t0, Admitted)
	var backlog []*qw
	for i := range 5 {
		backlog = append(backlog, fairAcquire(t, z, 10+i, "H", 0, at(time.Second), Queued))
	}
	l := fairAcquire(t, z, 20, "L", 0, at(2*time.Second), Queued)
	if l.w.Position() != 1 {
		t.Errorf("light waiter's Position %d, want 1 (first of its tenant)", l.w.Position())
	}
	z.Free(h1.w)
	if l.w.state != stateGranted {
		t.Fatalf("the light tenant was not granted the freed slot (state %d)", l.w.state)
	}
	for _, c := range backlog {
		if c.w.state != stateWaiting {
			t.Fatalf("heavy waiter %d granted before the light one", c.id)
		}
	}
	claim(t, z, []*qw{l}, at(3*time.Second))
	// Now H holds 1 and L holds 1: the next slot goes to H (L has no waiter).
	z.Free(h2.w)
	if g := claim(t, z, backlog, at(3*time.Second)); len(g) != 1 || g[0] != backlog[0] {
		t.Fatalf("heavy backlog not served in its order: %v", g)
	}
	mustCounts(t, z, 2, 4)
}

// With every tenant backlogged, a tenant with weight 3 holds three times
// the slots of one with weight 1, and one with fair_max holds no more.
func TestFairWeightsGiveProportionalShares(t *testing.T) {
	z, o := newFairZone(t, Limits{MaxConnections: 8}, Fair{Tenant: "{t}", Weights: map[string]int{"A": 3}})
	var all, held []*qw
	id := 0
	add := func(tenant string, want Outcome) {
		c := fairAcquire(t, z, id, tenant, 0, t0, want)
		id++
		all = append(all, c)
		if want == Admitted {
			held = append(held, c)
		}
	}
	for range 8 {
		add("B", Admitted) // B alone takes every slot: work-conserving
	}
	for range 40 {
		add("A", Queued)
		add("B", Queued)
		add("C", Queued)
	}
	// Turn over: free the oldest held connection, claim what was granted.
	for range 60 {
		c := held[0]
		held = held[1:]
		z.Free(c.w)
		held = append(held, claim(t, z, all, t0)...)
	}
	count := map[string]int{}
	for _, c := range held {
		count[c.w.Tenant]++
	}
	// Shares: 8 × 3/5 = 4.8, 8 × 1/5 = 1.6: each holds ⌊share⌋ or one more.
	if count["A"] < 4 || count["A"] > 5 || count["B"] < 1 || count["B"] > 2 || count["C"] < 1 || count["C"] > 2 {
		t.Fatalf("held slots %v, want A 4-5, B 1-2, C 1-2", count)
	}
	if n, j := o.fair(); n != 3 || j < 0.9 {
		t.Errorf("observer: %d tenants waiting, index %g; want 3 and near 1", n, j)
	}
	s := z.SnapshotTenants(t0, 0, 100)
	if s.TenantsWaiting != 3 || s.Tenants != 3 || len(s.TenantList) != 3 || s.TenantList[0].Tenant != "A" || s.TenantList[0].Weight != 3 {
		t.Fatalf("snapshot %+v", s.TenantList)
	}
	for _, c := range all {
		z.Abandon(c.w)
	}
	for _, c := range held {
		z.Free(c.w)
	}
	mustCounts(t, z, 0, 0)
	if s := z.Snapshot(t0, 0); s.Tenants != 0 || s.TenantsWaiting != 0 || s.FairIndex != 1 {
		t.Errorf("empty zone: %d tenants, %d waiting, index %g", s.Tenants, s.TenantsWaiting, s.FairIndex)
	}
	if n, j := o.fair(); n != 0 || j != 1 {
		t.Errorf("observer at the end: %d tenants waiting, index %g", n, j)
	}
}

// fair_max caps a tenant even alone; its waiters hold back nobody, and
// still count toward max_waiting.
func TestFairMaxCapsATenantAlone(t *testing.T) {
	z, _ := newFairZone(t, Limits{MaxConnections: 5, MaxWaiting: 3}, Fair{Tenant: "{t}", Max: 2})
	a1 := fairAcquire(t, z, 1, "A", 0, t0, Admitted)
	fairAcquire(t, z, 2, "A", 0, t0, Admitted)
	a3 := fairAcquire(t, z, 3, "A", 5, t0, Queued) // a higher priority: still not eligible
	a4 := fairAcquire(t, z, 4, "A", 0, t0, Queued)
	mustCounts(t, z, 2, 2)
	// Another tenant is admitted at once while slots are free.
	fairAcquire(t, z, 5, "B", 0, t0, Admitted)
	fairAcquire(t, z, 6, "B", -1, t0, Admitted)
	fairAcquire(t, z, 7, "C", 0, t0, Admitted)
	mustCounts(t, z, 5, 2)
	// A's waiters count toward max_waiting.
	c8 := fairAcquire(t, z, 8, "C", 0, t0, Queued)
	out, r := z.Acquire(tw(9, "D", 0).w, &testWaker{}, t0)
	if out != Rejected || r != ReasonQueueFull {
		t.Fatalf("fourth waiter: %v/%v, want rejected queue_full", out, r)
	}
	// A frees one: A is below fair_max again, and its priority-5 waiter
	// goes first.
	z.Free(a1.w)
	if a3.w.state != stateGranted || a4.w.state != stateWaiting || c8.w.state != stateWaiting {
		t.Fatalf("states a3 %d a4 %d c8 %d", a3.w.state, a4.w.state, c8.w.state)
	}
	claim(t, z, []*qw{a3}, t0)
	want := []TenantInfo{{Tenant: "A", Weight: 1, Active: 2, Waiting: 1}, {Tenant: "B", Weight: 1, Active: 2}, {Tenant: "C", Weight: 1, Active: 1, Waiting: 1}}
	if s := z.SnapshotTenants(t0, 10, 10); !slices.Equal(s.TenantList, want) {
		t.Fatalf("tenants %+v, want %+v", s.TenantList, want)
	}
	for _, c := range []*qw{a4, c8} {
		z.Abandon(c.w)
	}
}

// A higher priority is admitted before any lower one, whatever the
// tenants hold; within a priority, tenants share fairly.
func TestFairPrioritiesComeFirst(t *testing.T) {
	z, _ := newFairZone(t, Limits{MaxConnections: 1}, Fair{Tenant: "{t}"})
	h := fairAcquire(t, z, 0, "H", 0, t0, Admitted)
	var cs []*qw
	// H (holding 1) waits at priority 1; L (holding 0) at priority 0.
	cs = append(cs, fairAcquire(t, z, 1, "L", 0, t0, Queued))
	cs = append(cs, fairAcquire(t, z, 2, "H", 1, t0, Queued))
	cs = append(cs, fairAcquire(t, z, 3, "M", 1, t0, Queued))
	cs = append(cs, fairAcquire(t, z, 4, "L", 0, t0, Queued))
	// Priority 1 first: H and M both hold 0 when the slot is freed (H's
	// slot is given back first): tie, H's waiter arrived first. Then M
	// (holds 0 vs H's 1). Then priority 0: L twice.
	if got := drainOrder(t, z, h, cs, t0); !slices.Equal(got, []int{2, 3, 1, 4}) {
		t.Fatalf("admitted %v, want [2 3 1 4]", got)
	}
}

// Ties go to the tenant whose next waiter comes first in the zone's order:
// the oldest for FIFO, the newest for LIFO; within a tenant, the zone's
// order.
func TestFairTiesAndOrderWithinTenant(t *testing.T) {
	for _, order := range []Order{FIFO, LIFO} {
		t.Run(order.String(), func(t *testing.T) {
			z, _ := newFairZone(t, Limits{MaxConnections: 1, Order: order}, Fair{Tenant: "{t}"})
			h := fairAcquire(t, z, 0, "X", 0, t0, Admitted)
			var cs []*qw
			for i, tn := range []string{"A", "B", "A", "B", "C"} {
				cs = append(cs, fairAcquire(t, z, i+1, tn, 0, at(time.Duration(i)*time.Second), Queued))
			}
			// One slot: each grant's tenant then holds it alone, so every
			// pick is a tie at 0 held.
			want := []int{1, 2, 3, 4, 5}
			if order == LIFO {
				want = []int{5, 4, 3, 2, 1}
			}
			if got := drainOrder(t, z, h, cs, at(time.Minute)); !slices.Equal(got, want) {
				t.Fatalf("admitted %v, want %v", got, want)
			}
		})
	}
}

// With two slots, a tenant holding one loses ties to tenants holding none.
func TestFairFewestHeldFirst(t *testing.T) {
	z, _ := newFairZone(t, Limits{MaxConnections: 3}, Fair{Tenant: "{t}"})
	a := fairAcquire(t, z, 1, "A", 0, t0, Admitted)
	b := fairAcquire(t, z, 2, "A", 0, t0, Admitted)
	fairAcquire(t, z, 3, "B", 0, t0, Admitted)
	a4 := fairAcquire(t, z, 4, "A", 0, t0, Queued)
	b5 := fairAcquire(t, z, 5, "B", 0, t0, Queued)
	c6 := fairAcquire(t, z, 6, "C", 0, t0, Queued)
	z.Free(a.w) // A 1, B 1, C 0: C
	if c6.w.state != stateGranted {
		t.Fatal("C, holding none, was not first")
	}
	z.Free(b.w) // A 0, B 1, C 1: A
	if a4.w.state != stateGranted || b5.w.state != stateWaiting {
		t.Fatal("A, holding none after its free, was not next")
	}
	claim(t, z, []*qw{a4, c6}, t0)
	z.Abandon(b5.w)
}

// A wait timeout, an abandon and a reject leave no tenant behind.
func TestFairTimeoutAbandonTidy(t *testing.T) {
	z, _ := newFairZone(t, Limits{MaxConnections: 1, WaitTimeout: time.Second, MaxWaiting: 2}, Fair{Tenant: "{t}"})
	h := fairAcquire(t, z, 0, "H", 0, t0, Admitted)
	a := fairAcquire(t, z, 1, "A", 0, t0, Queued)
	b := fairAcquire(t, z, 2, "B", 0, t0, Queued)
	if out, r := z.Acquire(tw(3, "C", 0).w, &testWaker{}, t0); out != Rejected || r != ReasonQueueFull {
		t.Fatalf("third waiter %v/%v", out, r)
	}
	if out, r, _ := z.Poll(a.w, at(2*time.Second)); out != Rejected || r != ReasonWaitTimeout {
		t.Fatalf("poll after the timeout: %v/%v", out, r)
	}
	if !z.Abandon(b.w) {
		t.Fatal("abandon")
	}
	if s := z.Snapshot(t0, 0); s.Tenants != 1 || s.TenantsWaiting != 0 {
		t.Fatalf("tenants %d, waiting %d; want only H", s.Tenants, s.TenantsWaiting)
	}
	// A granted slot that is abandoned goes to the next tenant.
	g := fairAcquire(t, z, 4, "G", 0, t0, Queued)
	k := fairAcquire(t, z, 5, "K", 0, t0, Queued)
	z.Free(h.w)
	if g.w.state != stateGranted {
		t.Fatal("G not granted")
	}
	z.Abandon(g.w)
	if k.w.state != stateGranted {
		t.Fatal("K not granted after G left")
	}
	claim(t, z, []*qw{k}, t0)
	z.Free(k.w)
	if s := z.Snapshot(t0, 0); s.Tenants != 0 {
		t.Fatalf("%d tenants left", s.Tenants)
	}
}

// Turning the fair share on and off keeps every waiter, in order.
func TestFairOnAndOff(t *testing.T) {
	z, _ := newTestZone(t, Limits{MaxConnections: 1})
	h := admit(t, z, 0, "", t0)
	var cs []*qw
	for i, tn := range []string{"A", "A", "A", "B"} {
		c := tw(i+1, tn, 0)
		mustAcquire(t, z, c, t0, Queued, ReasonNone)
		cs = append(cs, c)
	}
	z.SetFair(Fair{Tenant: "{t}"})
	checkFair(t, z)
	if s := z.Snapshot(t0, 0); s.Tenants != 2 || s.TenantsWaiting != 2 || s.Waiting != 4 {
		t.Fatalf("after on: %d tenants, %d waiting, %d waiters", s.Tenants, s.TenantsWaiting, s.Waiting)
	}
	// h holds a slot for no tenant: all tie at 0 held, by arrival.
	z.Free(h.w)
	g := claim(t, z, cs, t0)
	if len(g) != 1 || g[0].id != 1 {
		t.Fatalf("granted %v", g)
	}
	// A holds 1 now: B first.
	z.SetFair(Fair{Tenant: "{t}", Weights: map[string]int{"A": 2}})
	checkFair(t, z)
	// Off again: the three left, in arrival order.
	z.SetFair(Fair{})
	if s := z.Snapshot(t0, 10); len(s.Waiters) != 3 || s.Tenants != 0 {
		t.Fatalf("after off: %+v", s)
	}
	if got := drainOrder(t, z, g[0], cs[1:], t0); !slices.Equal(got, []int{2, 3, 4}) {
		t.Fatalf("admitted %v after off, want [2 3 4]", got)
	}
}

// Raising fair_max grants to waiters that were not eligible; a new order
// applies to those who wait.
func TestFairSetConfigRegrants(t *testing.T) {
	z, _ := newFairZone(t, Limits{MaxConnections: 4}, Fair{Tenant: "{t}", Max: 1})
	fairAcquire(t, z, 0, "A", 0, t0, Admitted)
	a1 := fairAcquire(t, z, 1, "A", 0, t0, Queued)
	a2 := fairAcquire(t, z, 2, "A", 0, t0, Queued)
	a3 := fairAcquire(t, z, 3, "A", 0, t0, Queued)
	z.SetLimits(Limits{MaxConnections: 4, Order: LIFO})
	checkFair(t, z)
	z.SetFair(Fair{Tenant: "{t}", Max: 2})
	if a3.w.state != stateGranted || a1.w.state != stateWaiting || a2.w.state != stateWaiting {
		t.Fatal("fair_max 2 (LIFO) did not grant the newest of A")
	}
	claim(t, z, []*qw{a3}, t0)
	z.SetFair(Fair{Tenant: "{t}"})
	if a1.w.state != stateGranted || a2.w.state != stateGranted {
		t.Fatal("no fair_max did not grant the rest")
	}
	claim(t, z, []*qw{a1, a2}, t0)
}

// The snapshot lists waiters by priority and arrival, tenants by slots
// held, and the oldest wait of each.
func TestFairSnapshot(t *testing.T) {
	z, _ := newFairZone(t, Limits{MaxConnections: 2}, Fair{Tenant: "{t}", Weights: map[string]int{"B": 4}})
	fairAcquire(t, z, 0, "B", 0, t0, Admitted)
	fairAcquire(t, z, 1, "B", 0, t0, Admitted)
	var cs []*qw
	for i, c := range []struct {
		tn   string
		prio int
	}{{"A", 0}, {"B", 0}, {"C", 2}, {"A", 2}, {"B", 0}} {
		cs = append(cs, fairAcquire(t, z, 10+i, c.tn, c.prio, at(time.Duration(i)*time.Second), Queued))
	}
	s := z.SnapshotTenants(at(10*time.Second), 100, 2)
	var ids []string
	for _, w := range s.Waiters {
		ids = append(ids, fmt.Sprint(w.Priority, "/", w.Waited))
	}
	if want := "2/8s 2/7s 0/10s 0/9s 0/6s"; strings.Join(ids, " ") != want {
		t.Errorf("waiters %v, want %s", ids, want)
	}
	if s.OldestWait != 10*time.Second {
		t.Errorf("oldest wait %s", s.OldestWait)
	}
	want := []TenantInfo{{Tenant: "B", Weight: 4, Active: 2, Waiting: 2, OldestWait: 9 * time.Second}, {Tenant: "A", Weight: 1, Active: 0, Waiting: 2, OldestWait: 10 * time.Second}}
	if !slices.Equal(s.TenantList, want) || s.Tenants != 3 || s.TenantsWaiting != 3 {
		t.Errorf("tenants %+v (%d, %d waiting), want %+v", s.TenantList, s.Tenants, s.TenantsWaiting, want)
	}
	if s.Fair.Tenant != "{t}" || s.Fair.Weights["B"] != 4 {
		t.Errorf("fair %+v", s.Fair)
	}
	// Jain's index over x = 2/4, 0, 0: (0.5)² / (3 × 0.25) = 1/3.
	if math.Abs(s.FairIndex-1.0/3) > 1e-9 {
		t.Errorf("index %g, want 1/3", s.FairIndex)
	}
	for _, c := range cs {
		z.Abandon(c.w)
	}
}

// A Key is ignored with a fair share: one count for the zone.
func TestFairIgnoresKey(t *testing.T) {
	z, _ := newFairZone(t, Limits{MaxConnections: 1}, Fair{Tenant: "{t}"})
	c := tw(1, "A", 0)
	c.w.Key = "k"
	mustAcquire(t, z, c, t0, Admitted, ReasonNone)
	d := tw(2, "A", 0)
	d.w.Key = "j"
	mustAcquire(t, z, d, t0, Queued, ReasonNone)
	if keyCount(z) != 0 {
		t.Fatal("a key state was made")
	}
	z.Free(c.w)
	claim(t, z, []*qw{d}, t0)
	z.Free(d.w)
}

func TestRegistryFairSettings(t *testing.T) {
	r := NewRegistry(nil)
	l := Limits{MaxConnections: 2}
	f := Fair{Tenant: "{t}", Weights: map[string]int{"a": 2}, Max: 1}
	z, leave, err := r.UseFair("z", "cfg1", l, f, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer leave()
	if s := z.Snapshot(t0, 0); s.Fair.Differs(f) != "" {
		t.Fatalf("fair in force %+v", s.Fair)
	}
	for _, c := range []struct {
		f    Fair
		want string
	}{
		{Fair{Tenant: "{u}", Weights: f.Weights, Max: 1}, "fair_share"},
		{Fair{Tenant: "{t}", Max: 1}, "weights"},
		{Fair{Tenant: "{t}", Weights: f.Weights, Max: 2}, "fair_max"},
		{Fair{}, "fair_share"},
	} {
		_, _, err := r.UseFair("z", "cfg1", l, c.f, nil)
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "fair_share, weights and fair_max") {
			t.Errorf("UseFair(%+v) = %v, want an error naming %s", c.f, err, c.want)
		}
	}
	_, _, err = r.UseFair("z", "cfg1", l, Fair{Tenant: "{t}", Max: -1}, nil)
	if err == nil || !strings.Contains(err.Error(), "fair_max") {
		t.Errorf("bad fair_max: %v", err)
	}
	// A newer config's settings take hold once the old one is gone.
	_, leave2, err := r.UseFair("z", "cfg2", l, Fair{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer leave2()
	if s := z.Snapshot(t0, 0); !s.Fair.On() {
		t.Fatal("the running config's fair share was replaced before it left")
	}
	leave()
	if s := z.Snapshot(t0, 0); s.Fair.On() {
		t.Fatal("the newest config's (no fair share) did not take hold")
	}
}

// TestFairSimulatedShares runs the zone in virtual time with the load of
// bench/fair (max 20, holds of 20-22 ms, H with 200 clients in a closed
// loop, four light tenants with 4 each, clients that come back 1-2 ms
// after their connection ends): the engine's policy alone, without the
// machine's latency. The light tenants wait for about the next free slot,
// and with H of weight 3 every tenant holds its weighted share.
func TestFairSimulatedShares(t *testing.T) {
	for _, weighted := range []bool{false, true} {
		t.Run(fmt.Sprint("weighted=", weighted), func(t *testing.T) {
			f := Fair{Tenant: "{t}"}
			if weighted {
				f.Weights = map[string]int{"H": 3}
			}
			waits, held := simulateFair(f, 20*time.Second)
			p := func(q float64) time.Duration { return waits[int(q*float64(len(waits)-1))] }
			var hs []string
			for _, tn := range slices.Sorted(maps.Keys(held)) {
				hs = append(hs, fmt.Sprintf("%s %.2f", tn, held[tn]))
			}
			t.Logf("light waits: n %d, p50 %s, p90 %s, p99 %s; mean slots held: %s", len(waits), p(0.5), p(0.9), p(0.99), strings.Join(hs, ", "))
			if p(0.99) > 15*time.Millisecond {
				t.Errorf("light tenants' p99 wait %s, want at most 15 ms (under one hold)", p(0.99))
			}
			total := 0.0
			for _, h := range held {
				total += h
			}
			if total < 19.8 {
				t.Errorf("slots held %.2f on average, want 20 (work-conserving)", total)
			}
			for tn, h := range held {
				switch {
				case weighted: // all backlogged: H 20 × 3/7, each light one 20/7
					want := 20.0 / 7
					if tn == "H" {
						want = 20 * 3.0 / 7
					}
					if math.Abs(h/want-1) > 0.10 {
						t.Errorf("tenant %s held %.2f on average, want %.2f ±10 %%", tn, h, want)
					}
				case tn != "H": // 4 clients, a share of 4: they get about all they ask for
					if h < 0.8*4 {
						t.Errorf("light tenant %s held %.2f on average, want at least 3.2 of its 4 clients", tn, h)
					}
				}
			}
		})
	}
}

// simulateFair drives a zone of 20 slots with fair share f in virtual
// time for d, and returns the light tenants' waits (sorted, after the
// first second) and each tenant's mean slots held.
func simulateFair(f Fair, d time.Duration) ([]time.Duration, map[string]float64) {
	rng := rand.New(rand.NewPCG(18, 20))
	z := NewZone("sim", Limits{MaxConnections: 20}, nil)
	z.SetFair(f)
	type conn struct {
		w      Waiter
		arrive time.Duration
		k      *grantNote
	}
	var granted []int
	var cs []*conn
	for i := range 216 {
		tn := "H"
		if i >= 200 {
			tn = fmt.Sprintf("L%d", (i-200)/4)
		}
		cs = append(cs, &conn{w: Waiter{Tenant: tn}, k: &grantNote{i: i, to: &granted}})
	}
	// Events in virtual time: a client arrives, or its connection ends.
	type event struct {
		at   time.Duration
		free bool
		c    int
	}
	var evs []event
	push := func(e event) {
		i, _ := slices.BinarySearchFunc(evs, e.at, func(a event, t time.Duration) int { return cmp.Compare(a.at, t+1) })
		evs = slices.Insert(evs, i, e)
	}
	for i := range cs {
		push(event{at: time.Duration(i) * 10 * time.Microsecond, c: i})
	}
	hold := func() time.Duration { return 20*time.Millisecond + time.Duration(rng.IntN(2000))*time.Microsecond }
	back := func() time.Duration { return time.Millisecond + time.Duration(rng.IntN(1000))*time.Microsecond }
	var waits []time.Duration
	area := map[string]time.Duration{}
	active := map[string]int{}
	last := time.Second
	for len(evs) > 0 && evs[0].at < d {
		e := evs[0]
		evs = evs[1:]
		if e.at > time.Second {
			for tn, n := range active {
				area[tn] += time.Duration(n) * (e.at - last)
			}
			last = e.at
		}
		c := cs[e.c]
		granted = granted[:0]
		now := t0.Add(e.at)
		if e.free {
			z.Free(&c.w)
			active[c.w.Tenant]--
			push(event{at: e.at + back(), c: e.c})
		} else {
			c.w = Waiter{Tenant: c.w.Tenant}
			c.arrive = e.at
			if out, _ := z.Acquire(&c.w, c.k, now); out == Admitted {
				granted = append(granted, e.c)
			}
		}
		for _, g := range granted {
			gc := cs[g]
			z.Poll(&gc.w, now)
			active[gc.w.Tenant]++
			push(event{at: e.at + hold(), free: true, c: g})
			if gc.w.Tenant != "H" && e.at > time.Second {
				waits = append(waits, e.at-gc.arrive)
			}
		}
	}
	held := map[string]float64{}
	for tn, a := range area {
		held[tn] = float64(a) / float64(last-time.Second)
	}
	slices.Sort(waits)
	return waits, held
}

// grantNote is a Waker that notes whom the zone granted a slot.
type grantNote struct {
	i  int
	to *[]int
}

func (g *grantNote) Wake()         { *g.to = append(*g.to, g.i) }
func (g *grantNote) Arm(time.Time) {}
