package engine

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// Tests of the Registry (registry.go). Owners stand for loaded configs.

type owner struct{ name string }

func mustUse(t *testing.T, r *Registry, name string, o any, l Limits) (*Zone, func()) {
	t.Helper()
	z, release, err := r.Use(name, o, l, nil)
	if err != nil {
		t.Fatalf("Use(%q, %v, %+v): %v", name, o, l, err)
	}
	if z == nil || release == nil {
		t.Fatalf("Use(%q) returned a nil zone or release", name)
	}
	return z, release
}

func zoneNames(zs []*Zone) []string {
	var names []string
	for _, z := range zs {
		names = append(names, z.name)
	}
	return names
}

func mustLimits(t *testing.T, z *Zone, want Limits) {
	t.Helper()
	if got := limitsOf(z); got != want {
		t.Fatalf("limits in force %+v, want %+v", got, want)
	}
}

var (
	limA = Limits{MaxConnections: 1, MaxWaiting: 10, WaitTimeout: time.Minute}
	limB = Limits{MaxConnections: 3, MaxWaiting: 5, WaitTimeout: time.Second, Order: LIFO}
	limC = Limits{MaxConnections: 7, MaxWaiting: -1}
)

func TestRegistrySharedZone(t *testing.T) {
	r := NewRegistry(nil)
	a := &owner{"A"}
	z1, rel1 := mustUse(t, r, "web", a, limA)
	z2, rel2 := mustUse(t, r, "web", a, limA)
	if z1 != z2 {
		t.Fatal("two handlers naming one zone got different zones")
	}
	if z1.name != "web" {
		t.Errorf("Name() = %q", z1.name)
	}
	zb, relb := mustUse(t, r, "api", a, limB)
	if zb == z1 {
		t.Fatal("two names share one zone")
	}
	mustLimits(t, z1, limA)
	mustLimits(t, zb, limB)
	if z, ok := r.Zone("web"); !ok || z != z1 {
		t.Errorf("Zone(web) = %v, %v", z, ok)
	}
	if _, ok := r.Zone("nope"); ok {
		t.Error("Zone(nope) found")
	}
	if got := zoneNames(r.Zones()); !slices.Equal(got, []string{"api", "web"}) {
		t.Errorf("Zones() = %v, want sorted [api web]", got)
	}
	// One count behind both handles.
	w := &Waiter{}
	if out, _ := z1.Acquire(w, NewSignal(), t0); out != Admitted {
		t.Fatal(out)
	}
	if a, _ := z2.Counts(); a != 1 {
		t.Errorf("the other handle sees %d active", a)
	}
	if out, _ := z2.Acquire(&Waiter{}, NewSignal(), t0); out != Queued {
		t.Errorf("second connection over max_connections 1 through the other handle: %v", out)
	}
	rel1()
	rel2()
	relb()
	// web still has connections: it stays listed; api is gone.
	if got := zoneNames(r.Zones()); !slices.Equal(got, []string{"web"}) {
		t.Errorf("Zones() after release = %v, want [web]", got)
	}
	if _, ok := r.Zone("api"); ok {
		t.Error("a released, idle zone is still known")
	}
}

func TestRegistrySameOwnerDifferentLimits(t *testing.T) {
	cases := []struct {
		change func(*Limits)
		field  string
	}{
		{func(l *Limits) { l.MaxConnections++ }, "max_connections"},
		{func(l *Limits) { l.MaxWaiting = -1 }, "max_waiting"},
		{func(l *Limits) { l.WaitTimeout = 0 }, "wait_timeout"},
		{func(l *Limits) { l.Order = LIFO }, "order"},
	}
	for _, c := range cases {
		t.Run(c.field, func(t *testing.T) {
			r := NewRegistry(nil)
			a, b := &owner{"A"}, &owner{"B"}
			z, rel := mustUse(t, r, "shared", a, limA)
			l := limA
			c.change(&l)
			z2, rel2, err := r.Use("shared", a, l, nil)
			if err == nil {
				t.Fatal("one config naming a zone with two settings: no error")
			}
			if !strings.Contains(err.Error(), c.field) || !strings.Contains(err.Error(), `"shared"`) {
				t.Errorf("error %q does not name the field %s and the zone", err, c.field)
			}
			if z2 != nil || rel2 != nil {
				t.Error("a failed Use returned a zone or a release")
			}
			mustLimits(t, z, limA)
			// Another config may use other settings (they wait their turn).
			zb, relb := mustUse(t, r, "shared", b, l)
			if zb != z {
				t.Error("another config got another zone")
			}
			mustLimits(t, z, limA)
			// The failed Use took no reference: one release of A is enough.
			rel()
			mustLimits(t, z, l)
			relb()
			if _, ok := r.Zone("shared"); ok {
				t.Error("zone still known after every user left")
			}
		})
	}
}

func TestRegistryInvalidLimits(t *testing.T) {
	r := NewRegistry(nil)
	for _, name := range []string{"bad", ""} {
		z, rel, err := r.Use(name, &owner{"A"}, Limits{MaxConnections: 0}, nil)
		if err == nil || !strings.Contains(err.Error(), "max_connections") {
			t.Errorf("Use(%q) with max_connections 0: %v", name, err)
		}
		if z != nil || rel != nil {
			t.Error("invalid limits returned a zone")
		}
	}
	if len(r.Zones()) != 0 {
		t.Errorf("invalid limits left zones: %v", zoneNames(r.Zones()))
	}
}

func TestRegistryRefcount(t *testing.T) {
	r := NewRegistry(nil)
	a, b := &owner{"A"}, &owner{"B"}
	z, relA1 := mustUse(t, r, "z", a, limA)
	_, relA2 := mustUse(t, r, "z", a, limA)
	_, relB := mustUse(t, r, "z", b, limB)
	mustLimits(t, z, limA)
	relA1()
	// A has one handler left: it is still the newest confirmed user.
	mustLimits(t, z, limA)
	if _, ok := r.Zone("z"); !ok {
		t.Fatal("zone forgotten while in use")
	}
	relA2()
	mustLimits(t, z, limB)
	relB()
	if _, ok := r.Zone("z"); ok {
		t.Error("zone still known after every user left")
	}
}

func TestRegistryNewOwnerTakesHoldWhenOldLeaves(t *testing.T) {
	r := NewRegistry(nil)
	a, b := &owner{"A"}, &owner{"B"}
	z, relA := mustUse(t, r, "z", a, limA) // max_connections 1
	mustLimits(t, z, limA)
	// Two connections wait under A's settings.
	h := &Waiter{}
	z.Acquire(h, NewSignal(), t0)
	k1, k2 := &testWaker{}, &testWaker{}
	w1, w2 := &Waiter{}, &Waiter{}
	if out, _ := z.Acquire(w1, k1, t0); out != Queued {
		t.Fatal(out)
	}
	z.Acquire(w2, k2, t0)

	// B is provisioned while A runs: A's settings stay.
	zb, relB := mustUse(t, r, "z", b, limB)
	if zb != z {
		t.Fatal("new config got another zone")
	}
	mustLimits(t, z, limA)
	if k1.Wakes() != 0 || k2.Wakes() != 0 {
		t.Error("a pending config's settings woke waiters")
	}
	// A is cleaned up after B started: B's settings (3 slots) take hold
	// and admit the waiters at once.
	relA()
	mustLimits(t, z, limB)
	if w1.state != stateGranted || w2.state != stateGranted || k1.Wakes() == 0 || k2.Wakes() == 0 {
		t.Errorf("B's max_connections 3 did not admit the waiters (states %d %d)", w1.state, w2.state)
	}
	for _, w := range []*Waiter{w1, w2} {
		z.Poll(w, t0)
		z.Free(w)
	}
	z.Free(h)
	relB()
	if len(r.Zones()) != 0 {
		t.Errorf("zones left: %v", zoneNames(r.Zones()))
	}
}

func TestRegistryNewOwnerReleasedUnused(t *testing.T) {
	r := NewRegistry(nil)
	a, b, c := &owner{"A"}, &owner{"B"}, &owner{"C"}
	z, relA := mustUse(t, r, "z", a, limA)
	_, relB1 := mustUse(t, r, "z", b, limB)
	_, relB2 := mustUse(t, r, "z", b, limB)
	relB1()
	relB2() // B failed to start
	mustLimits(t, z, limA)
	// A's handlers still share the zone with A's settings.
	z2, relA2 := mustUse(t, r, "z", a, limA)
	if z2 != z {
		t.Fatal("zone changed")
	}
	// The next config takes over once A is gone.
	_, relC := mustUse(t, r, "z", c, limC)
	mustLimits(t, z, limA)
	relA()
	mustLimits(t, z, limA) // one handler of A is left
	relA2()
	mustLimits(t, z, limC)
	relC()
}

func TestRegistryFirstUserTakesHoldAtOnce(t *testing.T) {
	r := NewRegistry(nil)
	z, rel := mustUse(t, r, "z", &owner{"A"}, limB)
	mustLimits(t, z, limB)
	rel()
	// A zone nobody uses and nobody is in is forgotten: the next Use
	// makes a fresh one.
	z2, rel2 := mustUse(t, r, "z", &owner{"B"}, limC)
	if z2 == z {
		t.Error("an idle zone without users was kept")
	}
	mustLimits(t, z2, limC)
	rel2()
}

func TestRegistryDrainingZoneReused(t *testing.T) {
	r := NewRegistry(nil)
	z, rel := mustUse(t, r, "z", &owner{"A"}, limA)
	w := &Waiter{}
	z.Acquire(w, NewSignal(), t0)
	rel() // config gone, one connection left
	if got := zoneNames(r.Zones()); !slices.Equal(got, []string{"z"}) {
		t.Fatalf("a zone with a connection left is not listed: %v", got)
	}
	if zz, ok := r.Zone("z"); !ok || zz != z {
		t.Fatal("a zone with a connection left is not known")
	}
	mustLimits(t, z, limA) // drains under the last settings
	// A config that names it again gets the same zone (the connection
	// still counts) and, being its only user, its settings at once.
	z2, rel2 := mustUse(t, r, "z", &owner{"B"}, limB)
	if z2 != z {
		t.Fatal("a draining zone was not reused")
	}
	mustLimits(t, z, limB)
	if a, _ := z.Counts(); a != 1 {
		t.Errorf("active %d", a)
	}
	rel2()
	z.Free(w)
	if _, ok := r.Zone("z"); ok {
		t.Error("a drained zone without users is still known")
	}
	if len(r.Zones()) != 0 {
		t.Errorf("Zones() = %v", zoneNames(r.Zones()))
	}
}

func TestRegistryPrivateZones(t *testing.T) {
	r := NewRegistry(nil)
	a := &owner{"A"}
	p1, rel1 := mustUse(t, r, "", a, limA)
	p2, rel2 := mustUse(t, r, "", a, limB) // another handler, other settings: fine
	if p1 == p2 {
		t.Fatal("two private zones are one")
	}
	if p1.name != "" || p2.name != "" {
		t.Error("private zones have names")
	}
	mustLimits(t, p1, limA)
	mustLimits(t, p2, limB)
	_, relN := mustUse(t, r, "named", a, limA)
	p3, rel3 := mustUse(t, r, "", a, limA)
	if _, ok := r.Zone(""); ok {
		t.Error(`Zone("") found a private zone`)
	}
	zs := r.Zones()
	if len(zs) != 4 || zs[0].name != "named" || zs[1] != p1 || zs[2] != p2 || zs[3] != p3 {
		t.Fatalf("Zones() = %v, want named then private in order", zoneNames(zs))
	}
	// A private zone does not count for another.
	w := &Waiter{}
	p1.Acquire(w, NewSignal(), t0)
	if out, _ := p3.Acquire(&Waiter{}, NewSignal(), t0); out != Admitted {
		t.Fatal("private zones share a count")
	}
	p3.Free(&Waiter{}) // a waiter that holds nothing: harmless
	q := &Waiter{}
	if out, _ := p1.Acquire(q, NewSignal(), t0); out != Queued {
		t.Fatal(out)
	}
	// Released but not drained: still listed.
	rel1()
	rel2()
	if zs := r.Zones(); !slices.Contains(zs, p1) || slices.Contains(zs, p2) {
		t.Errorf("after release: Zones() has p1 %v (want true), p2 %v (want false)", slices.Contains(zs, p1), slices.Contains(zs, p2))
	}
	p1.Free(w) // grants q
	if !slices.Contains(r.Zones(), p1) {
		t.Error("p1 dropped while a granted connection is in it")
	}
	p1.Poll(q, t0)
	p1.Free(q)
	if slices.Contains(r.Zones(), p1) {
		t.Error("p1 still listed after released and drained")
	}
	// p3 holds a connection, but its handler is alive: listed.
	if !slices.Contains(r.Zones(), p3) {
		t.Error("p3 not listed")
	}
	rel3()
	relN()
	// p3 still has its first connection (never released, on purpose).
	if got := r.Zones(); len(got) != 1 || got[0] != p3 {
		t.Errorf("Zones() = %v, want [p3]", zoneNames(got))
	}
}

func TestRegistryReleasedZoneUnpaused(t *testing.T) {
	for _, name := range []string{"named", ""} {
		t.Run(fmt.Sprintf("%q", name), func(t *testing.T) {
			r := NewRegistry(nil)
			z, rel := mustUse(t, r, name, &owner{"A"}, limA)
			z.SetPaused(true)
			w := &Waiter{}
			k := &testWaker{}
			if out, _ := z.Acquire(w, k, t0); out != Queued {
				t.Fatal(out)
			}
			rel()
			if isPaused(z) {
				t.Fatal("a zone no config uses is still paused: its waiters are stranded")
			}
			if w.state != stateGranted || k.Wakes() == 0 {
				t.Fatal("unpausing a released zone did not admit its waiter")
			}
			if !slices.Contains(r.Zones(), z) {
				t.Error("zone dropped with a connection in it")
			}
			z.Poll(w, t0)
			z.Free(w)
			if slices.Contains(r.Zones(), z) {
				t.Error("zone listed after drained")
			}
		})
	}
}

func TestRegistryPauseSurvivesReload(t *testing.T) {
	// A pause (from the admin API) is the zone's state, not a setting of
	// one config: a reload that keeps the zone keeps it paused.
	r := NewRegistry(nil)
	z, relA := mustUse(t, r, "z", &owner{"A"}, limA)
	z.SetPaused(true)
	_, relB := mustUse(t, r, "z", &owner{"B"}, limB)
	relA()
	mustLimits(t, z, limB)
	if !isPaused(z) {
		t.Error("reload unpaused the zone")
	}
	relB()
	if isPaused(z) {
		t.Error("still paused after the last user left")
	}
}

func TestRegistryReleaseTwice(t *testing.T) {
	r := NewRegistry(nil)
	a, b := &owner{"A"}, &owner{"B"}
	z, relA1 := mustUse(t, r, "z", a, limA)
	_, relA2 := mustUse(t, r, "z", a, limA)
	_, relB := mustUse(t, r, "z", b, limB)
	relA1()
	relA1()
	relA1()
	// Only one of A's two references went away.
	mustLimits(t, z, limA)
	relA2()
	mustLimits(t, z, limB)
	relA2()
	relB()
	relB()
	if len(r.Zones()) != 0 {
		t.Errorf("Zones() = %v", zoneNames(r.Zones()))
	}
	p, relP := mustUse(t, r, "", a, limA)
	relP()
	relP()
	if slices.Contains(r.Zones(), p) {
		t.Error("released private zone listed")
	}
	// Releasing again after the zone was forgotten does not disturb a new
	// zone of the same name.
	z2, relZ2 := mustUse(t, r, "z", b, limC)
	relA1()
	relB()
	mustLimits(t, z2, limC)
	if zz, ok := r.Zone("z"); !ok || zz != z2 {
		t.Error("stale releases disturbed a new zone")
	}
	relZ2()
}

func TestRegistryObserver(t *testing.T) {
	var mu sync.Mutex
	made := map[string]*testObserver{}
	var order []string
	r := NewRegistry(func(zone string) Observer {
		mu.Lock()
		defer mu.Unlock()
		o := &testObserver{}
		made[zone] = o
		order = append(order, zone)
		return o
	})
	z, rel := mustUse(t, r, "z", &owner{"A"}, limA)
	_, rel2 := mustUse(t, r, "z", &owner{"B"}, limA)
	p, relP := mustUse(t, r, "", &owner{"A"}, limA)
	if !slices.Equal(order, []string{"z", ""}) {
		t.Errorf("observers made for %q, want one per zone", order)
	}
	w := &Waiter{}
	z.Acquire(w, NewSignal(), t0)
	if a, _ := made["z"].gauges(); a != 1 {
		t.Errorf("zone z's observer saw active %d", a)
	}
	pw := &Waiter{}
	p.Acquire(pw, NewSignal(), t0)
	if a, _ := made[""].gauges(); a != 1 {
		t.Errorf("private zone's observer saw active %d", a)
	}
	z.Free(w)
	p.Free(pw)
	checkObserver(t, z, made["z"])
	checkObserver(t, p, made[""])
	rel()
	rel2()
	relP()
}

func TestRegistryConcurrent(t *testing.T) {
	r := NewRegistry(nil)
	names := []string{"", "a", "b", "c"}
	var wg sync.WaitGroup
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			o := &owner{fmt.Sprint(g)}
			l := Limits{MaxConnections: 1 + g%3}
			for range 300 {
				name := names[rand.IntN(len(names))]
				z, rel, err := r.Use(name, o, l, nil)
				if err != nil {
					t.Error(err)
					return
				}
				w := &Waiter{}
				if out, _ := z.Acquire(w, NewSignal(), time.Now()); out == Queued {
					z.Abandon(w)
				} else {
					z.Free(w)
				}
				if rand.IntN(2) == 0 {
					r.Zones()
					r.Zone(name)
				}
				rel()
			}
		}()
	}
	wg.Wait()
	if zs := r.Zones(); len(zs) != 0 {
		t.Errorf("Zones() after everyone left: %v", zoneNames(zs))
	}
}

// TestRegistryReleasedUnusedWithTwoPending: when a config that never
// served (B) is released while an older running config (A) and a newer
// pending one (C) are registered, A's settings stay in force: C has not
// started. (Caddy loads configs one at a time, so this needs two
// provisioned-but-unstarted configs at once, e.g. an in-process
// caddy.Validate during a reload.)
func TestRegistryReleasedUnusedWithTwoPending(t *testing.T) {
	r := NewRegistry(nil)
	z, relA := mustUse(t, r, "z", &owner{"A"}, limA)
	_, relB := mustUse(t, r, "z", &owner{"B"}, limB)
	_, relC := mustUse(t, r, "z", &owner{"C"}, limC)
	relB() // B fails; A still runs, C is not started
	if got := limitsOf(z); got != limA {
		t.Errorf("after an unstarted config was released, limits %+v are in force, want A's %+v", got, limA)
	}
	relA()
	mustLimits(t, z, limC)
	relC()
}

func TestRegistryForgetsDrainedZonesOnUse(t *testing.T) {
	// Zones that drain after their last user left are forgotten by the
	// next Use, even if nobody lists the zones: memory does not grow with
	// the number of reloads.
	r := NewRegistry(nil)
	for i := range 100 {
		name := ""
		if i%2 == 0 {
			name = "named"
		}
		z, rel := mustUse(t, r, name, &owner{fmt.Sprint(i)}, limA)
		w := &Waiter{}
		z.Acquire(w, NewSignal(), t0)
		rel()
		z.Free(w) // drained after its config left
	}
	_, rel := mustUse(t, r, "", &owner{"last"}, limA)
	r.mu.Lock()
	named, private := len(r.named), len(r.private)
	r.mu.Unlock()
	if named != 0 || private != 1 {
		t.Errorf("registry keeps %d named and %d private zones, want 0 and 1", named, private)
	}
	rel()
}
