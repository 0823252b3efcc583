package engine

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Benchmarks of the engine (queue.go).

// BenchmarkAcquireRelease: admit and release with a free slot, reusing one
// Waiter as a pooled connection would.
func BenchmarkAcquireRelease(b *testing.B) {
	b.Run("default_key", func(b *testing.B) { benchAcquireRelease(b, "") })
	b.Run("keyed", func(b *testing.B) { benchAcquireRelease(b, "10.0.0.1") })
}

func benchAcquireRelease(b *testing.B, key string) {
	z := NewZone("bench", Limits{MaxConnections: 100, MaxWaiting: 100, WaitTimeout: time.Second}, nil)
	w := &Waiter{}
	sig := NewSignal()
	now := time.Now()
	b.ReportAllocs()
	for b.Loop() {
		*w = Waiter{Key: key}
		if out, _ := z.Acquire(w, sig, now); out != Admitted {
			b.Fatal("not admitted")
		}
		if !z.Free(w) {
			b.Fatal("not released")
		}
	}
	if a, n := z.Counts(); a != 0 || n != 0 {
		b.Fatalf("counts %d %d", a, n)
	}
}

// BenchmarkHandoff: with max_connections 1, two goroutines take turns; each
// release hands the slot to the other goroutine, parked on its Signal.
// One op is one handoff (release, wake-up, Poll).
func BenchmarkHandoff(b *testing.B) {
	z := NewZone("bench", Limits{MaxConnections: 1}, nil)
	now := time.Now()
	var left [2]atomic.Int64
	half := int64(b.N+1) / 2
	left[0].Store(half)
	left[1].Store(half)
	var handoffs atomic.Int64
	player := func(me int, wg *sync.WaitGroup) {
		defer wg.Done()
		w := &Waiter{}
		sig := NewSignal()
		other := &left[1-me]
		for left[me].Load() > 0 {
			*w = Waiter{}
			out, _ := z.Acquire(w, sig, now)
			for out == Queued {
				<-sig
				out, _, _ = z.Poll(w, now)
				if out == Admitted {
					handoffs.Add(1)
				}
			}
			if out != Admitted {
				panic("handoff: not admitted")
			}
			// Hold the slot until the other player waits for it (or is done).
			for other.Load() > 0 {
				if _, waiting := z.Counts(); waiting > 0 {
					break
				}
				runtime.Gosched()
			}
			z.Free(w)
			left[me].Add(-1)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	var wg sync.WaitGroup
	wg.Add(2)
	go player(0, &wg)
	go player(1, &wg)
	wg.Wait()
	b.StopTimer()
	if h := handoffs.Load(); h < 2*half-2 {
		b.Fatalf("%d handoffs in %d turns", h, 2*half)
	}
}

// BenchmarkEnqueueDrain10k: 10 000 connections with a wait_timeout queue
// behind one slot, then are admitted one by one as each releases.
func BenchmarkEnqueueDrain10k(b *testing.B) {
	const n = 10000
	z := NewZone("bench", Limits{MaxConnections: 1, WaitTimeout: time.Minute}, nil)
	ws := make([]Waiter, n)
	sigs := make([]Signal, n)
	for i := range sigs {
		sigs[i] = NewSignal()
	}
	holder := &Waiter{}
	now := time.Now()
	round := func() {
		*holder = Waiter{}
		z.Acquire(holder, sigs[0], now)
		for i := range ws {
			ws[i] = Waiter{}
			if out, _ := z.Acquire(&ws[i], sigs[i], now); out != Queued {
				panic("not queued")
			}
		}
		prev := holder
		for i := range ws {
			z.Free(prev)
			<-sigs[i]
			if out, _, _ := z.Poll(&ws[i], now); out != Admitted {
				panic("not admitted in order")
			}
			prev = &ws[i]
		}
		z.Free(prev)
	}
	round() // warm up: the priority level exists from now on
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		round()
	}
	b.StopTimer()
	runtime.ReadMemStats(&after)
	b.ReportMetric(float64(after.Mallocs-before.Mallocs)/float64(b.N*n), "allocs/waiter")
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/waiter")
	if a, w := z.Counts(); a != 0 || w != 0 {
		b.Fatalf("counts %d %d", a, w)
	}
}

// BenchmarkContended: admit and release from every P on one zone that
// never makes anyone wait.
func BenchmarkContended(b *testing.B) {
	b.Run("one_key", func(b *testing.B) { benchContended(b, 1) })
	b.Run("8_keys", func(b *testing.B) { benchContended(b, 8) })
}

func benchContended(b *testing.B, nkeys int) {
	z := NewZone("bench", Limits{MaxConnections: 1 << 30}, nil)
	keys := make([]string, nkeys)
	for i := range keys {
		if nkeys > 1 {
			keys[i] = fmt.Sprintf("key-%d", i)
		}
	}
	var next atomic.Int64
	now := time.Now()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		key := keys[int(next.Add(1))%len(keys)]
		w := &Waiter{}
		sig := NewSignal()
		i := 0
		for pb.Next() {
			*w = Waiter{Key: key}
			if nkeys > 1 {
				w.Key = keys[i%nkeys]
				i++
			}
			if out, _ := z.Acquire(w, sig, now); out != Admitted {
				panic("not admitted")
			}
			z.Free(w)
		}
	})
	if a, w := z.Counts(); a != 0 || w != 0 {
		b.Fatalf("counts %d %d", a, w)
	}
}

// BenchmarkFairAdmitFree: a zone of 100 slots, all held, and 10 000
// waiters of 1 tenant or of 10 000 tenants (one each). One op frees the
// oldest slot (which grants it to the next waiter by the fair share),
// claims the grant, and queues the freed connection again: admit + free
// at a steady 10 000 waiting. no_fair is the same without a fair share.
func BenchmarkFairAdmitFree(b *testing.B) {
	b.Run("no_fair", func(b *testing.B) { benchFairAdmitFree(b, 0) })
	b.Run("tenants_1", func(b *testing.B) { benchFairAdmitFree(b, 1) })
	b.Run("tenants_10000", func(b *testing.B) { benchFairAdmitFree(b, 10000) })
}

// grantLog is a Waker that notes which waiter was granted.
type grantLog struct {
	i   int
	log *[]int
}

func (g *grantLog) Wake()           { *g.log = append(*g.log, g.i) }
func (g *grantLog) Arm(_ time.Time) {}

func benchFairAdmitFree(b *testing.B, tenants int) {
	const slots, waiters = 100, 10000
	z := NewZone("bench", Limits{MaxConnections: slots}, nil)
	if tenants > 0 {
		z.SetFair(Fair{Tenant: "{t}"})
	}
	names := make([]string, max(tenants, 1))
	for i := range names {
		names[i] = fmt.Sprintf("tenant-%d", i)
	}
	ws := make([]Waiter, slots+waiters)
	wakers := make([]grantLog, len(ws))
	log := make([]int, 0, 4)
	for i := range ws {
		wakers[i] = grantLog{i: i, log: &log}
	}
	now := time.Now()
	held := make([]int, 0, slots) // a ring, oldest at first
	first := 0
	for i := range ws {
		ws[i] = Waiter{Tenant: names[i%len(names)]}
		out, _ := z.Acquire(&ws[i], &wakers[i], now)
		if (out == Admitted) != (i < slots) {
			b.Fatalf("waiter %d: %v", i, out)
		}
		if out == Admitted {
			held = append(held, i)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		h := held[first]
		log = log[:0]
		z.Free(&ws[h])
		if len(log) != 1 {
			b.Fatalf("%d granted", len(log))
		}
		g := log[0]
		if out, _, _ := z.Poll(&ws[g], now); out != Admitted {
			b.Fatal("not admitted")
		}
		held[first] = g
		first = (first + 1) % slots
		ws[h] = Waiter{Tenant: ws[h].Tenant}
		if out, _ := z.Acquire(&ws[h], &wakers[h], now); out != Queued {
			b.Fatal("not queued")
		}
	}
	b.StopTimer()
	if a, w := z.Counts(); a != slots || w != waiters {
		b.Fatalf("counts %d %d", a, w)
	}
}
