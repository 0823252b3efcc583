package engine

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/l4-connlimit/connlimit/store"
)

// The stress tests: many goroutines on one zone at once, under -race.

// stressConfig describes one run of runStress.
type stressConfig struct {
	goroutines int
	keys       []string
	// maxConns are the values of max_connections used during the run; the
	// check is against the largest (lowering cuts nobody).
	maxConns []int
}

func TestQueueStress(t *testing.T) {
	runStress(t, stressConfig{goroutines: 4000, keys: []string{"", "a", "b", "c"}, maxConns: []int{3}})
}

func TestQueueStressChangingMax(t *testing.T) {
	runStress(t, stressConfig{goroutines: 2000, keys: []string{"", "x"}, maxConns: []int{1, 2, 5}})
}

func runStress(t *testing.T, cfg stressConfig) {
	maxHeld := slices.Max(cfg.maxConns)
	limits := func() Limits {
		return Limits{
			MaxConnections: cfg.maxConns[rand.IntN(len(cfg.maxConns))],
			MaxWaiting:     []int{-1, 0, 5, 50, 200, 200}[rand.IntN(6)],
			WaitTimeout:    []time.Duration{0, time.Millisecond, 5 * time.Millisecond, 20 * time.Millisecond, 50 * time.Millisecond}[rand.IntN(5)],
			Order:          Order(rand.IntN(2)),
		}
	}
	l := limits()
	l.MaxConnections = cfg.maxConns[0]
	z, o := newTestZone(t, l)
	prios := []int{-1, 0, 0, 0, 3}

	held := make([]atomic.Int32, len(cfg.keys))
	var attempts, admitted, abandoned, failures atomic.Int64
	var rejected [len(store.Reasons) + 1]atomic.Int64
	var peak atomic.Int32

	fail := func(format string, args ...any) {
		if failures.Add(1) <= 10 {
			t.Errorf(format, args...)
		}
	}

	hold := func(w *Waiter, ki int) {
		n := held[ki].Add(1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		if n > int32(maxHeld) {
			fail("key %q: %d hold a slot, max_connections is at most %d", cfg.keys[ki], n, maxHeld)
		}
		if z.Abandon(w) {
			fail("Abandon(active) = true")
		}
		if rand.IntN(4) == 0 {
			time.Sleep(time.Duration(rand.IntN(300)) * time.Microsecond)
		}
		held[ki].Add(-1)
		if !z.Free(w) {
			fail("Release(admitted) = false")
		}
		if z.Free(w) {
			fail("second Release = true")
		}
	}

	start := time.Now()
	done := make(chan struct{})
	controlDone := make(chan struct{})
	go func() { // the operator: new settings and pauses
		defer close(controlDone)
		for {
			select {
			case <-done:
				z.SetPaused(false)
				return
			case <-time.After(time.Duration(500+rand.IntN(2000)) * time.Microsecond):
			}
			switch rand.IntN(3) {
			case 0:
				z.SetPaused(!isPaused(z))
			default:
				z.SetLimits(limits())
			}
		}
	}()

	var wg sync.WaitGroup
	for range cfg.goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(rand.IntN(300)) * time.Millisecond)
			w := &Waiter{}
			sig := NewSignal()
			for range 1 + rand.IntN(3) {
				ki := rand.IntN(len(cfg.keys))
				*w = Waiter{Key: cfg.keys[ki], Priority: prios[rand.IntN(len(prios))]}
				attempts.Add(1)
				out, r := z.Acquire(w, sig, time.Now())
				switch out {
				case Admitted:
					admitted.Add(1)
					hold(w, ki)
				case Rejected:
					if r == ReasonNone || r == ReasonWaitTimeout {
						fail("Acquire rejected with reason %v", r)
					}
					rejected[r].Add(1)
				case Queued:
					var leave chan struct{}
					if rand.IntN(3) == 0 {
						l := make(chan struct{})
						leave = l
						timer := time.AfterFunc(time.Duration(rand.IntN(15000))*time.Microsecond, func() { close(l) })
						defer timer.Stop()
					}
					out, r := z.Wait(w, sig, leave)
					switch {
					case out == Abandoned:
						abandoned.Add(1)
					case out == Admitted:
						admitted.Add(1)
						hold(w, ki)
					case out == Rejected && r == ReasonWaitTimeout:
						rejected[r].Add(1)
					default:
						fail("wait ended %v/%v", out, r)
					}
				}
				// Drain a wake-up left over, as a pooled Signal would be.
				select {
				case <-sig:
				default:
				}
			}
		}()
	}
	allDone := make(chan struct{})
	go func() { wg.Wait(); close(allDone) }()
	select {
	case <-allDone:
	case <-time.After(90 * time.Second):
		s := z.Snapshot(time.Now(), 20)
		panic(fmt.Sprintf("stress test stuck: %+v", s))
	}
	close(done)
	<-controlDone
	elapsed := time.Since(start)

	if isPaused(z) {
		t.Error("zone still paused")
	}
	mustCounts(t, z, 0, 0)
	if keyCount(z) != 0 {
		t.Errorf("Keys() = %d at the end", keyCount(z))
	}
	if a, w := o.gauges(); a != 0 || w != 0 {
		t.Errorf("observer gauges (%d, %d) at the end", a, w)
	}
	s := z.Snapshot(time.Now(), 0)
	c := s.Counters
	if got := c.Admitted + c.RejectedTotal() + c.Abandoned; got != uint64(attempts.Load()) {
		t.Errorf("admitted %d + rejected %d + abandoned %d = %d, attempts %d", c.Admitted, c.RejectedTotal(), c.Abandoned, got, attempts.Load())
	}
	if c.Admitted != uint64(admitted.Load()) || c.Abandoned != uint64(abandoned.Load()) {
		t.Errorf("zone counted admitted %d abandoned %d, goroutines saw %d and %d", c.Admitted, c.Abandoned, admitted.Load(), abandoned.Load())
	}
	for _, r := range store.Reasons {
		if c.Rejected[r] != uint64(rejected[r].Load()) {
			t.Errorf("zone counted %d %v, goroutines saw %d", c.Rejected[r], r, rejected[r].Load())
		}
	}
	t.Logf("%d attempts in %v: admitted %d, rejected %v, abandoned %d; peak holders of one key %d (limit %d)",
		attempts.Load(), elapsed.Round(time.Millisecond), c.Admitted, c.Rejected, c.Abandoned, peak.Load(), maxHeld)
	if c.Admitted == 0 || c.RejectedTotal()+c.Abandoned == 0 {
		t.Errorf("the run did not exercise both admissions and rejections: %+v", c)
	}
}

// TestFairStress: many goroutines of several tenants on one zone with a
// fair share whose weights and fair_max change, under -race: the zone
// never holds more than max_connections, no tenant more than the largest
// fair_max, and every attempt ends once.
func TestFairStress(t *testing.T) {
	const maxConns, maxFair = 6, 3
	tenants := []string{"", "a", "b", "c", "d", "e", "f", "g"}
	randFair := func() Fair {
		f := Fair{Tenant: "{t}", Max: 2 + rand.IntN(maxFair-1)}
		if rand.IntN(2) == 0 {
			f.Weights = map[string]int{tenants[rand.IntN(len(tenants))]: 1 + rand.IntN(5)}
		}
		return f
	}
	z, _ := newFairZone(t, Limits{MaxConnections: maxConns, WaitTimeout: 20 * time.Millisecond}, randFair())
	held := make([]atomic.Int32, len(tenants))
	var total atomic.Int32
	var attempts, ended, failures atomic.Int64
	fail := func(format string, args ...any) {
		if failures.Add(1) <= 10 {
			t.Errorf(format, args...)
		}
	}
	hold := func(w *Waiter, ti int) {
		if n := held[ti].Add(1); n > maxFair {
			fail("tenant %q holds %d slots, fair_max is at most %d", tenants[ti], n, maxFair)
		}
		if n := total.Add(1); n > maxConns {
			fail("%d hold a slot, max_connections is %d", n, maxConns)
		}
		if rand.IntN(3) == 0 {
			time.Sleep(time.Duration(rand.IntN(300)) * time.Microsecond)
		}
		total.Add(-1)
		held[ti].Add(-1)
		if !z.Free(w) {
			fail("Free(admitted) = false")
		}
	}
	done := make(chan struct{})
	controlDone := make(chan struct{})
	go func() {
		defer close(controlDone)
		for {
			select {
			case <-done:
				z.SetPaused(false)
				return
			case <-time.After(time.Duration(500+rand.IntN(2000)) * time.Microsecond):
			}
			switch rand.IntN(4) {
			case 0:
				z.SetPaused(!isPaused(z))
			case 1:
				z.SetLimits(Limits{MaxConnections: maxConns, MaxWaiting: []int{0, 50, 500}[rand.IntN(3)],
					WaitTimeout: 20 * time.Millisecond, Order: Order(rand.IntN(2))})
			default:
				z.SetFair(randFair())
			}
		}
	}()
	var wg sync.WaitGroup
	for i := range 2000 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(rand.IntN(300)) * time.Millisecond)
			w := &Waiter{}
			sig := NewSignal()
			// Tenant a is heavy: a third of all connections.
			ti := i % len(tenants)
			if i%3 == 0 {
				ti = 1
			}
			for range 1 + rand.IntN(3) {
				*w = Waiter{Tenant: tenants[ti], Priority: []int{0, 0, 0, 1}[rand.IntN(4)]}
				attempts.Add(1)
				out, _ := z.Acquire(w, sig, time.Now())
				if out == Queued {
					var leave chan struct{}
					if rand.IntN(4) == 0 {
						l := make(chan struct{})
						leave = l
						timer := time.AfterFunc(time.Duration(rand.IntN(10000))*time.Microsecond, func() { close(l) })
						defer timer.Stop()
					}
					out, _ = z.Wait(w, sig, leave)
				}
				ended.Add(1)
				if out == Admitted {
					hold(w, ti)
				}
				select {
				case <-sig:
				default:
				}
			}
		}()
	}
	allDone := make(chan struct{})
	go func() { wg.Wait(); close(allDone) }()
	select {
	case <-allDone:
	case <-time.After(90 * time.Second):
		panic(fmt.Sprintf("fair stress test stuck: %+v", z.SnapshotTenants(time.Now(), 20, 20)))
	}
	close(done)
	<-controlDone
	mustCounts(t, z, 0, 0)
	s := z.Snapshot(time.Now(), 0)
	if s.Tenants != 0 || s.TenantsWaiting != 0 {
		t.Errorf("%d tenants (%d waiting) left at the end", s.Tenants, s.TenantsWaiting)
	}
	c := s.Counters
	if got := c.Admitted + c.RejectedTotal() + c.Abandoned; got != uint64(attempts.Load()) || ended.Load() != attempts.Load() {
		t.Errorf("admitted+rejected+abandoned %d, ended %d, attempts %d", got, ended.Load(), attempts.Load())
	}
	t.Logf("%d attempts: admitted %d, rejected %v, abandoned %d", attempts.Load(), c.Admitted, c.Rejected, c.Abandoned)
}
