package engine

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/l4-connlimit/connlimit/store"
)

// Tests of the engine (queue.go). Times are explicit wherever possible, so
// that nothing depends on the speed of the machine; the goroutine tests use
// generous bounds.

// t0 is the base of the explicit times given to the zone.
var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

func at(d time.Duration) time.Time { return t0.Add(d) }

// testObserver keeps the gauges and counters a metrics Observer would, and
// notices deltas that are not ±1 and gauges that go negative.
type testObserver struct {
	mu        sync.Mutex
	active    int
	waiting   int
	admitted  uint64
	waits     []time.Duration
	rejected  [len(store.Reasons) + 1]uint64
	abandoned uint64
	problems  []string
	// the limits it was told of
	max           int
	overridden    bool
	overrideEnded int
	paused        bool // as last told
}

func (o *testObserver) problem(format string, args ...any) {
	if len(o.problems) < 20 {
		o.problems = append(o.problems, fmt.Sprintf(format, args...))
	}
}

func (o *testObserver) ActiveDelta(d int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if d != 1 && d != -1 {
		o.problem("ActiveDelta(%d)", d)
	}
	o.active += d
	if o.active < 0 {
		o.problem("active gauge went negative: %d", o.active)
	}
}

func (o *testObserver) WaitingDelta(d int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if d != 1 && d != -1 {
		o.problem("WaitingDelta(%d)", d)
	}
	o.waiting += d
	if o.waiting < 0 {
		o.problem("waiting gauge went negative: %d", o.waiting)
	}
}

func (o *testObserver) Admitted(waited time.Duration) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if waited < 0 {
		o.problem("Admitted(%s): negative wait", waited)
	}
	o.admitted++
	if len(o.waits) < 100000 {
		o.waits = append(o.waits, waited)
	}
}

func (o *testObserver) Rejected(r Reason) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if r == ReasonNone || int(r) > len(store.Reasons) {
		o.problem("Rejected(%d)", r)
		return
	}
	o.rejected[r]++
}

func (o *testObserver) Abandoned() {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.abandoned++
}

func (o *testObserver) LimitsChanged(l Limits, overridden bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.max, o.overridden = l.MaxConnections, overridden
}

func (o *testObserver) OverrideEnded() {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.overrideEnded++
}

func (o *testObserver) Paused(p bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.paused = p
}

func (o *testObserver) gauges() (active, waiting int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.active, o.waiting
}

func (o *testObserver) lastWait() time.Duration {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(o.waits) == 0 {
		return -1
	}
	return o.waits[len(o.waits)-1]
}

// checkObserver compares what o saw with the zone's own counts.
func checkObserver(t testing.TB, z *Zone, o *testObserver) {
	t.Helper()
	active, waiting := z.Counts()
	s := z.Snapshot(time.Now(), 0)
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, p := range o.problems {
		t.Errorf("observer: %s", p)
	}
	if o.active != active || o.waiting != waiting {
		t.Errorf("observer gauges (active %d, waiting %d), zone Counts (%d, %d)", o.active, o.waiting, active, waiting)
	}
	if s.Active != active || s.Waiting != waiting {
		t.Errorf("Snapshot (active %d, waiting %d), Counts (%d, %d)", s.Active, s.Waiting, active, waiting)
	}
	if o.admitted != s.Counters.Admitted {
		t.Errorf("observer saw %d admitted, zone counted %d", o.admitted, s.Counters.Admitted)
	}
	if o.rejected != s.Counters.Rejected {
		t.Errorf("observer saw rejected %v, zone counted %v", o.rejected, s.Counters.Rejected)
	}
	if o.abandoned != s.Counters.Abandoned {
		t.Errorf("observer saw %d abandoned, zone counted %d", o.abandoned, s.Counters.Abandoned)
	}
	if o.paused != s.Paused {
		t.Errorf("observer was last told paused %v, zone paused %v", o.paused, s.Paused)
	}
}

// keyCount is how many key values other than "" hold state in z.
func keyCount(z *Zone) int {
	z.mu.Lock()
	defer z.mu.Unlock()
	return len(z.keys)
}

// isPaused reports whether z admits nobody new.
func isPaused(z *Zone) bool {
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.paused
}

// limitsOf returns the settings in force in z.
func limitsOf(z *Zone) Limits {
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.limits
}

// deadlineOf is when the queued waiter w times out under z's wait_timeout.
func deadlineOf(z *Zone, w *Waiter) time.Time {
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.deadline(w)
}

// newTestZone makes a zone with a testObserver that is checked against the
// zone at the end of the test.
func newTestZone(t testing.TB, l Limits) (*Zone, *testObserver) {
	t.Helper()
	if err := l.Validate(); err != nil {
		t.Fatalf("bad test limits: %v", err)
	}
	o := &testObserver{}
	z := NewZone("test", l, o)
	t.Cleanup(func() { checkObserver(t, z, o) })
	return z, o
}

// testWaker records every call the zone makes on it.
type testWaker struct {
	mu    sync.Mutex
	arms  []time.Time
	wakes int
}

func (k *testWaker) Wake() {
	k.mu.Lock()
	k.wakes++
	k.mu.Unlock()
}

func (k *testWaker) Arm(d time.Time) {
	k.mu.Lock()
	k.arms = append(k.arms, d)
	k.mu.Unlock()
}

func (k *testWaker) Wakes() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.wakes
}

func (k *testWaker) Arms() []time.Time {
	k.mu.Lock()
	defer k.mu.Unlock()
	return slices.Clone(k.arms)
}

func (k *testWaker) LastArm() (time.Time, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if len(k.arms) == 0 {
		return time.Time{}, false
	}
	return k.arms[len(k.arms)-1], true
}

// qw is a test connection: its Waiter and its Waker.
type qw struct {
	id int
	w  *Waiter
	k  *testWaker
}

func newQW(id int, key string, prio int) *qw {
	return &qw{id: id, w: &Waiter{Key: key, Priority: prio}, k: &testWaker{}}
}

func mustAcquire(t *testing.T, z *Zone, c *qw, now time.Time, want Outcome, wantR Reason) {
	t.Helper()
	out, r := z.Acquire(c.w, c.k, now)
	if out != want || r != wantR {
		t.Fatalf("Acquire(waiter %d, key %q, prio %d) = %v/%v, want %v/%v", c.id, c.w.Key, c.w.Priority, out, r, want, wantR)
	}
}

func admit(t *testing.T, z *Zone, id int, key string, now time.Time) *qw {
	t.Helper()
	c := newQW(id, key, 0)
	mustAcquire(t, z, c, now, Admitted, ReasonNone)
	return c
}

func enqueue(t *testing.T, z *Zone, id int, key string, prio int, now time.Time) *qw {
	t.Helper()
	c := newQW(id, key, prio)
	mustAcquire(t, z, c, now, Queued, ReasonNone)
	return c
}

func mustCounts(t *testing.T, z *Zone, active, waiting int) {
	t.Helper()
	if a, w := z.Counts(); a != active || w != waiting {
		t.Fatalf("Counts() = (%d, %d), want (%d, %d)", a, w, active, waiting)
	}
}

// granted returns the waiters of cs that hold a granted slot not yet
// claimed, checking that exactly those were woken since wakes0.
func granted(t *testing.T, cs []*qw, wakes0 map[*qw]int) []*qw {
	t.Helper()
	var g []*qw
	for _, c := range cs {
		woken := c.k.Wakes() > wakes0[c]
		if c.w.state == stateGranted {
			g = append(g, c)
			if !woken {
				t.Errorf("waiter %d was granted a slot but not woken", c.id)
			}
		} else if woken && c.w.state == stateWaiting {
			t.Errorf("waiter %d was woken but is still waiting", c.id)
		}
	}
	return g
}

func wakeCounts(cs []*qw) map[*qw]int {
	m := make(map[*qw]int, len(cs))
	for _, c := range cs {
		m[c] = c.k.Wakes()
	}
	return m
}

// drainOrder releases holder, then each waiter in turn as it is granted
// the single slot, and returns the ids in the order they were admitted.
func drainOrder(t *testing.T, z *Zone, holder *qw, cs []*qw, now time.Time) []int {
	t.Helper()
	var order []int
	cur := holder
	for range cs {
		w0 := wakeCounts(cs)
		if !z.Free(cur.w) {
			t.Fatalf("Free(waiter %d) = false", cur.id)
		}
		g := granted(t, cs, w0)
		if len(g) != 1 {
			t.Fatalf("after a release with one slot, %d waiters were granted", len(g))
		}
		cur = g[0]
		if out, r, _ := z.Poll(cur.w, now); out != Admitted || r != ReasonNone {
			t.Fatalf("Poll(granted waiter %d) = %v/%v", cur.id, out, r)
		}
		order = append(order, cur.id)
	}
	if !z.Free(cur.w) {
		t.Fatalf("Free(last waiter %d) = false", cur.id)
	}
	return order
}

func TestEngineLimitsValidate(t *testing.T) {
	good := []Limits{
		{MaxConnections: 1},
		{MaxConnections: 100, MaxWaiting: -1},
		{MaxConnections: 1, MaxWaiting: 5, WaitTimeout: time.Second, Order: LIFO},
	}
	for _, l := range good {
		if err := l.Validate(); err != nil {
			t.Errorf("%+v: %v", l, err)
		}
	}
	bad := []struct {
		l     Limits
		field string
	}{
		{Limits{MaxConnections: 0}, "max_connections"},
		{Limits{MaxConnections: -3}, "max_connections"},
		{Limits{MaxConnections: 1, MaxWaiting: -2}, "max_waiting"},
		{Limits{MaxConnections: 1, WaitTimeout: -time.Second}, "wait_timeout"},
		{Limits{MaxConnections: 1, Order: 7}, "order"},
	}
	for _, c := range bad {
		err := c.l.Validate()
		if err == nil || !strings.Contains(err.Error(), c.field) {
			t.Errorf("%+v: Validate() = %v, want an error naming %s", c.l, err, c.field)
		}
	}
	if FIFO.String() != "fifo" || LIFO.String() != "lifo" {
		t.Errorf("Order strings: %s %s", FIFO, LIFO)
	}
	want := map[Reason]string{ReasonNone: "none", ReasonQueueFull: "queue_full", ReasonWaitTimeout: "wait_timeout", ReasonNoWaiting: "no_waiting"}
	for r, s := range want {
		if r.String() != s {
			t.Errorf("Reason(%d).String() = %q, want %q", r, r.String(), s)
		}
	}
	if len(store.Reasons) != int(len(store.Reasons)+1)-1 {
		t.Errorf("Reasons lists %d reasons, want %d", len(store.Reasons), len(store.Reasons)+1-1)
	}
	for i, r := range store.Reasons {
		if int(r) != i+1 {
			t.Errorf("Reasons[%d] = %d", i, r)
		}
	}
}

func TestZoneAdmitsUpToMax(t *testing.T) {
	z, _ := newTestZone(t, Limits{MaxConnections: 3})
	if z.name != "test" {
		t.Errorf("Name() = %q", z.name)
	}
	var cs []*qw
	for i := range 3 {
		c := admit(t, z, i, "", t0)
		if c.w.Position() != 0 || c.w.Waited(at(time.Hour)) != 0 {
			t.Errorf("admitted at once: Position %d, Waited %v", c.w.Position(), c.w.Waited(at(time.Hour)))
		}
		if c.k.Wakes() != 0 || len(c.k.Arms()) != 0 {
			t.Errorf("admitted at once, yet the waker was used: %d wakes, arms %v", c.k.Wakes(), c.k.Arms())
		}
		cs = append(cs, c)
	}
	mustCounts(t, z, 3, 0)
	q := enqueue(t, z, 3, "", 0, t0)
	mustCounts(t, z, 3, 1)
	// Poll on an active waiter reports it admitted and changes nothing.
	if out, _, _ := z.Poll(cs[0].w, t0); out != Admitted {
		t.Errorf("Poll(active) = %v", out)
	}
	z.Free(cs[0].w)
	if out, _, _ := z.Poll(q.w, at(time.Second)); out != Admitted {
		t.Fatalf("Poll after release = %v", out)
	}
	mustCounts(t, z, 3, 0)
	for _, c := range append(cs[1:], q) {
		z.Free(c.w)
	}
	mustCounts(t, z, 0, 0)
}

func TestQueueFIFOOrder(t *testing.T) {
	z, _ := newTestZone(t, Limits{MaxConnections: 1})
	h := admit(t, z, -1, "", t0)
	var cs []*qw
	for i := range 6 {
		c := enqueue(t, z, i, "", 0, at(time.Duration(i)*time.Millisecond))
		if c.w.Position() != i+1 {
			t.Errorf("waiter %d: Position %d, want %d", i, c.w.Position(), i+1)
		}
		if got, want := c.w.Waited(at(time.Second)), time.Second-time.Duration(i)*time.Millisecond; got != want {
			t.Errorf("waiter %d: Waited %v at t0+1s, want %v", i, got, want)
		}
		cs = append(cs, c)
	}
	got := drainOrder(t, z, h, cs, at(time.Second))
	if want := []int{0, 1, 2, 3, 4, 5}; !slices.Equal(got, want) {
		t.Errorf("FIFO admission order %v, want %v", got, want)
	}
	mustCounts(t, z, 0, 0)
}

func TestQueueLIFOOrder(t *testing.T) {
	z, _ := newTestZone(t, Limits{MaxConnections: 1, Order: LIFO})
	h := admit(t, z, -1, "", t0)
	var cs []*qw
	for i := range 6 {
		c := enqueue(t, z, i, "", 0, t0)
		if c.w.Position() != 1 {
			t.Errorf("LIFO waiter %d: Position %d, want 1", i, c.w.Position())
		}
		cs = append(cs, c)
	}
	got := drainOrder(t, z, h, cs, at(time.Second))
	if want := []int{5, 4, 3, 2, 1, 0}; !slices.Equal(got, want) {
		t.Errorf("LIFO admission order %v, want %v", got, want)
	}
}

func TestQueuePriorities(t *testing.T) {
	prios := []int{0, 5, 0, 10, 5, -1, 10, 0}
	cases := []struct {
		order     Order
		positions []int
		admitted  []int
	}{
		{FIFO, []int{1, 1, 3, 1, 3, 6, 2, 7}, []int{3, 6, 1, 4, 0, 2, 7, 5}},
		{LIFO, []int{1, 1, 2, 1, 2, 6, 1, 5}, []int{6, 3, 4, 1, 7, 2, 0, 5}},
	}
	for _, c := range cases {
		t.Run(c.order.String(), func(t *testing.T) {
			z, _ := newTestZone(t, Limits{MaxConnections: 1, Order: c.order})
			h := admit(t, z, -1, "", t0)
			var cs []*qw
			for i, p := range prios {
				q := enqueue(t, z, i, "", p, t0)
				if q.w.Position() != c.positions[i] {
					t.Errorf("waiter %d (prio %d): Position %d, want %d", i, p, q.w.Position(), c.positions[i])
				}
				cs = append(cs, q)
			}
			s := z.Snapshot(t0, 100)
			var snapPrios []int
			for _, wi := range s.Waiters {
				snapPrios = append(snapPrios, wi.Priority)
			}
			var wantPrios []int
			for _, id := range c.admitted {
				wantPrios = append(wantPrios, prios[id])
			}
			if !slices.Equal(snapPrios, wantPrios) {
				t.Errorf("Snapshot priorities %v, want %v (admission order)", snapPrios, wantPrios)
			}
			got := drainOrder(t, z, h, cs, at(time.Second))
			if !slices.Equal(got, c.admitted) {
				t.Errorf("admission order %v, want %v", got, c.admitted)
			}
		})
	}
}

func TestQueueOrderChangeAppliesToWaiting(t *testing.T) {
	for _, from := range []Order{FIFO, LIFO} {
		to := LIFO
		if from == LIFO {
			to = FIFO
		}
		t.Run(from.String()+"_to_"+to.String(), func(t *testing.T) {
			z, _ := newTestZone(t, Limits{MaxConnections: 1, Order: from})
			h := admit(t, z, -1, "", t0)
			var cs []*qw
			for i := range 4 {
				cs = append(cs, enqueue(t, z, i, "", i%2, t0))
			}
			// ids 1, 3 have priority 1; 0, 2 have priority 0.
			w0 := wakeCounts(cs)
			z.SetLimits(Limits{MaxConnections: 1, Order: to})
			for _, c := range cs {
				if c.k.Wakes() != w0[c] {
					t.Errorf("changing only the order woke waiter %d", c.id)
				}
			}
			if limitsOf(z).Order != to {
				t.Fatalf("Limits().Order = %v", limitsOf(z).Order)
			}
			got := drainOrder(t, z, h, cs, t0)
			want := []int{1, 3, 0, 2}
			if to == LIFO {
				want = []int{3, 1, 2, 0}
			}
			if !slices.Equal(got, want) {
				t.Errorf("after changing order to %v: admission order %v, want %v", to, got, want)
			}
		})
	}
}

func TestQueueMaxWaiting(t *testing.T) {
	t.Run("unbounded", func(t *testing.T) {
		z, o := newTestZone(t, Limits{MaxConnections: 1, MaxWaiting: 0})
		h := admit(t, z, -1, "", t0)
		var cs []*qw
		for i := range 5000 {
			cs = append(cs, enqueue(t, z, i, "", 0, t0))
		}
		mustCounts(t, z, 1, 5000)
		for _, c := range cs {
			if !z.Abandon(c.w) {
				t.Fatalf("Abandon(waiter %d) = false", c.id)
			}
		}
		z.Free(h.w)
		mustCounts(t, z, 0, 0)
		if o.abandoned != 5000 {
			t.Errorf("abandoned %d", o.abandoned)
		}
	})
	t.Run("bounded", func(t *testing.T) {
		z, _ := newTestZone(t, Limits{MaxConnections: 2, MaxWaiting: 3})
		h1 := admit(t, z, -1, "", t0)
		h2 := admit(t, z, -2, "", t0)
		var cs []*qw
		for i := range 3 {
			cs = append(cs, enqueue(t, z, i, "", 0, t0))
		}
		for i := range 4 {
			c := newQW(10+i, "", 100) // a high priority does not jump a full list
			mustAcquire(t, z, c, t0, Rejected, ReasonQueueFull)
			if z.Abandon(c.w) || z.Free(c.w) {
				t.Errorf("Abandon or Free of a rejected waiter reported true")
			}
			if out, r, _ := z.Poll(c.w, t0); out != Rejected || r != ReasonNone {
				t.Errorf("Poll(rejected) = %v/%v, want rejected/none", out, r)
			}
			if c.k.Wakes() != 0 || len(c.k.Arms()) != 0 {
				t.Errorf("rejected waiter's waker was used")
			}
		}
		mustCounts(t, z, 2, 3)
		// One leaves the list: room for exactly one more.
		z.Abandon(cs[1].w)
		cs = append(cs, enqueue(t, z, 3, "", 0, t0))
		mustAcquire(t, z, newQW(20, "", 0), t0, Rejected, ReasonQueueFull)
		// A grant makes room too.
		z.Free(h1.w)
		mustCounts(t, z, 2, 2)
		cs = append(cs, enqueue(t, z, 4, "", 0, t0))
		mustAcquire(t, z, newQW(21, "", 0), t0, Rejected, ReasonQueueFull)
		s := z.Snapshot(t0, 0)
		if s.Counters.Rejected[ReasonQueueFull] != 6 || s.Counters.RejectedTotal() != 6 {
			t.Errorf("Rejected counters %v", s.Counters.Rejected)
		}
		// Clean up.
		z.Free(h2.w)
		for _, c := range cs {
			if c.w.state == stateWaiting || c.w.state == stateGranted {
				z.Abandon(c.w)
			} else {
				z.Free(c.w)
			}
		}
		mustCounts(t, z, 0, 0)
	})
	t.Run("none", func(t *testing.T) {
		z, _ := newTestZone(t, Limits{MaxConnections: 2, MaxWaiting: -1})
		h1 := admit(t, z, 0, "", t0)
		admit(t, z, 1, "", t0)
		for i := range 3 {
			mustAcquire(t, z, newQW(10+i, "", 9), t0, Rejected, ReasonNoWaiting)
		}
		mustCounts(t, z, 2, 0)
		z.Free(h1.w)
		admit(t, z, 2, "", t0)
		s := z.Snapshot(t0, 0)
		if s.Counters.Rejected[ReasonNoWaiting] != 3 || s.Counters.Admitted != 3 {
			t.Errorf("counters %+v", s.Counters)
		}
	})
	t.Run("lowered", func(t *testing.T) {
		// A smaller max_waiting rejects newcomers until the list is
		// shorter and rejects nobody already waiting.
		z, _ := newTestZone(t, Limits{MaxConnections: 1, MaxWaiting: 10})
		h := admit(t, z, -1, "", t0)
		var cs []*qw
		for i := range 5 {
			cs = append(cs, enqueue(t, z, i, "", 0, t0))
		}
		z.SetLimits(Limits{MaxConnections: 1, MaxWaiting: 2})
		mustCounts(t, z, 1, 5)
		mustAcquire(t, z, newQW(9, "", 0), t0, Rejected, ReasonQueueFull)
		for _, c := range cs {
			if c.w.state != stateWaiting {
				t.Errorf("waiter %d was cut by a lower max_waiting", c.id)
			}
		}
		z.Abandon(cs[0].w)
		z.Abandon(cs[1].w)
		mustAcquire(t, z, newQW(10, "", 0), t0, Rejected, ReasonQueueFull) // 3 waiting > 2
		z.Abandon(cs[2].w)
		mustAcquire(t, z, newQW(11, "", 0), t0, Rejected, ReasonQueueFull) // 2 waiting, not < 2
		z.Abandon(cs[3].w)
		c := enqueue(t, z, 12, "", 0, t0) // 1 waiting: room for one
		mustAcquire(t, z, newQW(13, "", 0), t0, Rejected, ReasonQueueFull)
		z.SetLimits(Limits{MaxConnections: 1, MaxWaiting: -1})
		mustAcquire(t, z, newQW(14, "", 0), t0, Rejected, ReasonNoWaiting)
		for _, x := range []*qw{cs[4], c} {
			if x.w.state != stateWaiting {
				t.Errorf("waiter %d was cut by max_waiting -1", x.id)
			}
		}
		got := drainOrder(t, z, h, []*qw{cs[4], c}, t0)
		if !slices.Equal(got, []int{4, 12}) {
			t.Errorf("order %v", got)
		}
	})
}

func TestQueuePerKeyBounds(t *testing.T) {
	z, _ := newTestZone(t, Limits{MaxConnections: 1, MaxWaiting: 2})
	keys := []string{"", "a", "b"}
	holders := map[string]*qw{}
	waiters := map[string][]*qw{}
	id := 0
	for _, k := range keys {
		holders[k] = admit(t, z, id, k, t0)
		id++
	}
	if keyCount(z) != 2 {
		t.Errorf("Keys() = %d, want 2 (the empty key is not counted)", keyCount(z))
	}
	for _, k := range keys {
		for range 2 {
			waiters[k] = append(waiters[k], enqueue(t, z, id, k, 0, t0))
			if got := waiters[k][len(waiters[k])-1].w.Position(); got != len(waiters[k]) {
				t.Errorf("key %q: Position %d, want %d (positions count within the key)", k, got, len(waiters[k]))
			}
			id++
		}
	}
	for _, k := range keys {
		mustAcquire(t, z, newQW(id, k, 0), t0, Rejected, ReasonQueueFull)
		id++
	}
	mustCounts(t, z, 3, 6)
	// A new key value has its own slot and list.
	c := admit(t, z, id, "c", t0)
	if keyCount(z) != 3 {
		t.Errorf("Keys() = %d, want 3", keyCount(z))
	}
	z.Free(c.w)
	if keyCount(z) != 2 {
		t.Errorf("Keys() = %d after the only connection of key c left, want 2", keyCount(z))
	}
	// Snapshot groups each key's waiters in admission order.
	s := z.Snapshot(t0, 100)
	if len(s.Waiters) != 6 {
		t.Fatalf("Snapshot has %d waiters, want 6", len(s.Waiters))
	}
	for i := 0; i < 6; i += 2 {
		if s.Waiters[i].Key != s.Waiters[i+1].Key {
			t.Errorf("Snapshot does not group the waiters of one key: %+v", s.Waiters)
		}
	}
	// A release in key a grants to key a only.
	all := append(append(slices.Clone(waiters[""]), waiters["a"]...), waiters["b"]...)
	w0 := wakeCounts(all)
	z.Free(holders["a"].w)
	g := granted(t, all, w0)
	if len(g) != 1 || g[0] != waiters["a"][0] {
		t.Fatalf("release in key a granted %v", g)
	}
	mustCounts(t, z, 3, 5)
	// Key a has room for one more waiter now, the others do not.
	extra := enqueue(t, z, 100, "a", 0, t0)
	mustAcquire(t, z, newQW(101, "b", 0), t0, Rejected, ReasonQueueFull)
	mustAcquire(t, z, newQW(102, "", 0), t0, Rejected, ReasonQueueFull)

	// Clean up: claim and release everything.
	z.Poll(g[0].w, t0)
	z.Free(g[0].w)
	for _, k := range keys {
		if k != "a" {
			z.Free(holders[k].w)
		}
	}
	for range 10 {
		for _, c := range append(all, extra) {
			if c.w.state == stateGranted {
				z.Poll(c.w, t0)
				z.Free(c.w)
			}
		}
	}
	mustCounts(t, z, 0, 0)
	if keyCount(z) != 0 {
		t.Errorf("Keys() = %d at the end, want 0", keyCount(z))
	}
}

func TestZoneKeysFreed(t *testing.T) {
	z, o := newTestZone(t, Limits{MaxConnections: 1, MaxWaiting: 1, WaitTimeout: time.Second})
	const n = 3000
	for i := range n {
		k := fmt.Sprintf("key-%d", i)
		h := admit(t, z, 0, k, t0)
		switch i % 5 {
		case 0: // only admitted and released
		case 1: // a waiter that times out
			q := enqueue(t, z, 1, k, i%3, t0)
			if out, r, _ := z.Poll(q.w, at(time.Second)); out != Rejected || r != ReasonWaitTimeout {
				t.Fatalf("Poll = %v/%v", out, r)
			}
		case 2: // a waiter that is abandoned, and one rejected
			q := enqueue(t, z, 1, k, 0, t0)
			mustAcquire(t, z, newQW(2, k, 0), t0, Rejected, ReasonQueueFull)
			z.Abandon(q.w)
		case 3: // a waiter granted, then abandoned before claiming
			q := enqueue(t, z, 1, k, 0, t0)
			z.Free(h.w)
			if !z.Abandon(q.w) {
				t.Fatal("Abandon(granted) = false")
			}
			h = nil
		case 4: // a waiter granted and released after the holder
			q := enqueue(t, z, 1, k, 0, t0)
			z.Free(h.w)
			z.Poll(q.w, t0)
			h = q
		}
		if h != nil {
			z.Free(h.w)
		}
	}
	// Keys rejected outright (max_waiting -1 while paused) hold no state.
	z.SetLimits(Limits{MaxConnections: 1, MaxWaiting: -1})
	z.SetPaused(true)
	for i := range n {
		mustAcquire(t, z, newQW(i, fmt.Sprintf("gone-%d", i), 0), t0, Rejected, ReasonNoWaiting)
	}
	z.SetPaused(false)
	mustCounts(t, z, 0, 0)
	if k := keyCount(z); k != 0 {
		t.Errorf("Keys() = %d after %d distinct keys came and went, want 0", k, 2*n)
	}
	z.mu.Lock()
	spare := len(z.spare)
	z.mu.Unlock()
	if spare > maxSpare {
		t.Errorf("%d spare key states kept, bound is %d", spare, maxSpare)
	}
	if o.admitted == 0 {
		t.Error("nothing admitted")
	}
}

func TestQueueWaitTimeoutPoll(t *testing.T) {
	z, _ := newTestZone(t, Limits{MaxConnections: 1, WaitTimeout: 10 * time.Second})
	h := admit(t, z, 0, "", t0)
	q := enqueue(t, z, 1, "", 0, at(time.Second))
	want := at(11 * time.Second)
	if d, ok := q.k.LastArm(); !ok || !d.Equal(want) {
		t.Errorf("Arm at queueing: %v, want %v", q.k.Arms(), want)
	}
	if d := deadlineOf(z, q.w); !d.Equal(want) {
		t.Errorf("Deadline() = %v, want %v", d, want)
	}
	for i, now := range []time.Time{at(time.Second), at(5 * time.Second), at(11*time.Second - 1)} {
		out, r, d := z.Poll(q.w, now)
		if out != Queued || r != ReasonNone || !d.Equal(want) {
			t.Fatalf("Poll at %v = %v/%v/%v, want queued until %v", now.Sub(t0), out, r, d, want)
		}
		if n := len(q.k.Arms()); n != i+2 {
			t.Errorf("after %d queued polls, Arm was called %d times, want %d", i+1, n, i+2)
		}
	}
	out, r, d := z.Poll(q.w, want)
	if out != Rejected || r != ReasonWaitTimeout || !d.IsZero() {
		t.Fatalf("Poll at the deadline = %v/%v/%v, want rejected/wait_timeout", out, r, d)
	}
	mustCounts(t, z, 1, 0)
	// Nothing more happens to a timed-out waiter.
	if out, r, _ := z.Poll(q.w, want); out != Rejected || r != ReasonNone {
		t.Errorf("second Poll = %v/%v, want rejected/none", out, r)
	}
	if z.Abandon(q.w) || z.Free(q.w) {
		t.Errorf("Abandon or Free of a timed-out waiter reported true")
	}
	wakes := q.k.Wakes()
	z.Free(h.w)
	if q.k.Wakes() != wakes {
		t.Errorf("a timed-out waiter was woken by a release")
	}
	mustCounts(t, z, 0, 0)
	s := z.Snapshot(want, 0)
	if s.Counters.Rejected[ReasonWaitTimeout] != 1 || s.Counters.Admitted != 1 {
		t.Errorf("counters %+v", s.Counters)
	}
}

func TestQueueWaitTimeoutZeroMeansNever(t *testing.T) {
	z, _ := newTestZone(t, Limits{MaxConnections: 1})
	h := admit(t, z, 0, "", t0)
	q := enqueue(t, z, 1, "", 0, t0)
	if arms := q.k.Arms(); len(arms) != 1 || !arms[0].IsZero() {
		t.Errorf("Arm at queueing: %v, want one zero deadline", arms)
	}
	if d := deadlineOf(z, q.w); !d.IsZero() {
		t.Errorf("Deadline() = %v, want zero", d)
	}
	out, _, d := z.Poll(q.w, at(1000*time.Hour))
	if out != Queued || !d.IsZero() {
		t.Errorf("Poll after 1000h = %v, deadline %v; want queued, no deadline", out, d)
	}
	z.Free(h.w)
	if out, _, _ := z.Poll(q.w, at(2000*time.Hour)); out != Admitted {
		t.Errorf("Poll = %v", out)
	}
	z.Free(q.w)
}

func TestQueueWaitTimeoutChange(t *testing.T) {
	z, _ := newTestZone(t, Limits{MaxConnections: 1, WaitTimeout: 10 * time.Second})
	h := admit(t, z, 0, "", t0)
	hx := admit(t, z, 9, "x", t0)
	a := enqueue(t, z, 1, "", 0, t0)                 // deadline 10s
	b := enqueue(t, z, 2, "", 0, at(4*time.Second))  // deadline 14s
	c := enqueue(t, z, 3, "x", 5, at(6*time.Second)) // another key
	all := []*qw{a, b, c}
	w0 := wakeCounts(all)
	// Unchanged wait_timeout: nobody is woken.
	z.SetLimits(Limits{MaxConnections: 1, WaitTimeout: 10 * time.Second, MaxWaiting: 7})
	for _, x := range all {
		if x.k.Wakes() != w0[x] {
			t.Errorf("waiter %d woken though wait_timeout did not change", x.id)
		}
	}
	// A new wait_timeout wakes everyone; it counts from when each began.
	z.SetLimits(Limits{MaxConnections: 1, WaitTimeout: 5 * time.Second})
	for _, x := range all {
		if x.k.Wakes() != w0[x]+1 {
			t.Errorf("waiter %d: %d wakes after a wait_timeout change, want %d", x.id, x.k.Wakes(), w0[x]+1)
		}
	}
	now := at(7 * time.Second)
	if out, r, _ := z.Poll(a.w, now); out != Rejected || r != ReasonWaitTimeout {
		t.Errorf("a (5s timeout, waited 7s): %v/%v", out, r)
	}
	if out, _, d := z.Poll(b.w, now); out != Queued || !d.Equal(at(9*time.Second)) {
		t.Errorf("b: %v until %v, want queued until 9s", out, d.Sub(t0))
	}
	if d, _ := b.k.LastArm(); !d.Equal(at(9 * time.Second)) {
		t.Errorf("b re-armed with %v, want 9s", d.Sub(t0))
	}
	// No timeout at all.
	z.SetLimits(Limits{MaxConnections: 1})
	if out, _, d := z.Poll(b.w, at(time.Hour)); out != Queued || !d.IsZero() {
		t.Errorf("b without wait_timeout: %v until %v", out, d)
	}
	if out, _, d := z.Poll(c.w, at(time.Hour)); out != Queued || !d.IsZero() {
		t.Errorf("c without wait_timeout: %v until %v", out, d)
	}
	// And back: both long past the deadline.
	z.SetLimits(Limits{MaxConnections: 1, WaitTimeout: time.Minute})
	for _, x := range []*qw{b, c} {
		if out, r, _ := z.Poll(x.w, at(time.Hour)); out != Rejected || r != ReasonWaitTimeout {
			t.Errorf("waiter %d: %v/%v", x.id, out, r)
		}
	}
	z.Free(h.w)
	z.Free(hx.w)
	mustCounts(t, z, 0, 0)
	if keyCount(z) != 0 {
		t.Errorf("Keys() = %d", keyCount(z))
	}
}

func TestQueueWaitTimeoutGoroutine(t *testing.T) {
	const timeout = 100 * time.Millisecond
	z, _ := newTestZone(t, Limits{MaxConnections: 1, WaitTimeout: timeout})
	h := admit(t, z, 0, "", time.Now())

	type result struct {
		out     Outcome
		r       Reason
		elapsed time.Duration
	}
	run := func() (chan result, *Waiter) {
		w := &Waiter{}
		sig := NewSignal()
		start := time.Now()
		out, r := z.Acquire(w, sig, start)
		if out != Queued {
			t.Fatalf("Acquire = %v/%v", out, r)
		}
		ch := make(chan result, 1)
		go func() {
			out, r := z.Wait(w, sig, nil)
			ch <- result{out, r, time.Since(start)}
		}()
		return ch, w
	}

	// Times out: not before the deadline, and not very long after.
	ch, _ := run()
	select {
	case res := <-ch:
		if res.out != Rejected || res.r != ReasonWaitTimeout {
			t.Errorf("waiter ended %v/%v, want rejected/wait_timeout", res.out, res.r)
		}
		if res.elapsed < timeout || res.elapsed > timeout+5*time.Second {
			t.Errorf("timed out after %v, want %v (generous upper bound)", res.elapsed, timeout)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("waiter never timed out")
	}

	// Admitted by a release from another goroutine well before the deadline.
	z.SetLimits(Limits{MaxConnections: 1, WaitTimeout: time.Hour})
	ch, w := run()
	time.Sleep(10 * time.Millisecond)
	go z.Free(h.w)
	select {
	case res := <-ch:
		if res.out != Admitted {
			t.Errorf("waiter ended %v/%v, want admitted", res.out, res.r)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("waiter was never admitted")
	}
	if !z.Free(w) {
		t.Error("Free of the admitted waiter = false")
	}

	// Woken by a shorter wait_timeout set while it sleeps on a long timer.
	h = admit(t, z, 0, "", time.Now())
	ch, _ = run()
	time.Sleep(10 * time.Millisecond)
	z.SetLimits(Limits{MaxConnections: 1, WaitTimeout: time.Millisecond})
	select {
	case res := <-ch:
		if res.out != Rejected || res.r != ReasonWaitTimeout {
			t.Errorf("waiter ended %v/%v, want rejected/wait_timeout", res.out, res.r)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a shorter wait_timeout did not end the wait: the waiter was not woken")
	}
	z.Free(h.w)
	mustCounts(t, z, 0, 0)
}

func TestQueueWakerArmAndWake(t *testing.T) {
	z, _ := newTestZone(t, Limits{MaxConnections: 2, WaitTimeout: time.Minute})
	h1 := admit(t, z, 0, "", t0)
	h2 := admit(t, z, 1, "", t0)
	var cs []*qw
	for i := range 6 {
		c := enqueue(t, z, 10+i, "", 0, at(time.Duration(i)*time.Second))
		arms := c.k.Arms()
		if len(arms) != 1 || !arms[0].Equal(at(time.Duration(i)*time.Second+time.Minute)) {
			t.Errorf("waiter %d: Arm calls %v at queueing", c.id, arms)
		}
		if c.k.Wakes() != 0 {
			t.Errorf("waiter %d woken at queueing", c.id)
		}
		cs = append(cs, c)
	}
	// Each Queued Poll arms again.
	for n := 2; n <= 4; n++ {
		z.Poll(cs[0].w, at(time.Second))
		if got := len(cs[0].k.Arms()); got != n {
			t.Errorf("Arm calls %d after %d polls, want %d", got, n-1, n)
		}
	}
	// A release wakes exactly the granted waiter, once; its Poll claims
	// the slot without arming.
	w0 := wakeCounts(cs)
	z.Free(h1.w)
	g := granted(t, cs, w0)
	if len(g) != 1 || g[0] != cs[0] || cs[0].k.Wakes() != w0[cs[0]]+1 {
		t.Fatalf("release woke %v", g)
	}
	arms := len(cs[0].k.Arms())
	if out, _, _ := z.Poll(cs[0].w, at(10*time.Second)); out != Admitted {
		t.Fatal("granted waiter not admitted")
	}
	if len(cs[0].k.Arms()) != arms {
		t.Errorf("Poll that admits called Arm")
	}
	// Raising max_connections admits waiters at once, in order.
	w0 = wakeCounts(cs)
	z.SetLimits(Limits{MaxConnections: 4, WaitTimeout: time.Minute})
	g = granted(t, cs, w0)
	if len(g) != 2 || g[0] != cs[1] || g[1] != cs[2] {
		t.Fatalf("raising max_connections by 2 granted %d waiters: %v", len(g), g)
	}
	mustCounts(t, z, 4, 3)
	for _, c := range g {
		if out, _, _ := z.Poll(c.w, at(10*time.Second)); out != Admitted {
			t.Fatal("granted waiter not admitted")
		}
	}
	// Lowering max_connections cuts nobody, wakes nobody; newcomers wait
	// until the count is below the new limit.
	w0 = wakeCounts(cs)
	z.SetLimits(Limits{MaxConnections: 1, WaitTimeout: time.Minute})
	mustCounts(t, z, 4, 3)
	for _, c := range []*qw{h2, cs[0], cs[1], cs[2]} {
		if c.w.state != stateActive {
			t.Errorf("holder %d was cut by a lower max_connections", c.id)
		}
	}
	for _, c := range cs {
		if c.k.Wakes() != w0[c] {
			t.Errorf("waiter %d woken by a lower max_connections", c.id)
		}
	}
	for i, c := range []*qw{h2, cs[0], cs[1]} {
		z.Free(c.w)
		if g := granted(t, cs, w0); len(g) != 0 {
			t.Fatalf("release %d with %d active over a limit of 1 granted %v", i, 3-i, g)
		}
	}
	mustCounts(t, z, 1, 3)
	z.Free(cs[2].w) // now 0 < 1: one grant
	g = granted(t, cs, w0)
	if len(g) != 1 || g[0] != cs[3] {
		t.Fatalf("release below the lowered limit granted %v", g)
	}
	z.Poll(cs[3].w, at(10*time.Second))
	z.Free(cs[3].w)
	z.Poll(cs[4].w, at(10*time.Second))
	z.Free(cs[4].w)
	z.Poll(cs[5].w, at(10*time.Second))
	z.Free(cs[5].w)
	mustCounts(t, z, 0, 0)
	for _, c := range cs {
		if c.k.Wakes() == 0 {
			t.Errorf("waiter %d was never woken", c.id)
		}
	}
}

func TestQueueAbandon(t *testing.T) {
	z, o := newTestZone(t, Limits{MaxConnections: 1})
	idle := &Waiter{}
	if z.Abandon(idle) || z.Free(idle) {
		t.Error("Abandon or Free of a waiter never used reported true")
	}
	h := admit(t, z, 0, "", t0)
	if z.Abandon(h.w) {
		t.Error("Abandon(active) = true")
	}
	mustCounts(t, z, 1, 0)

	a := enqueue(t, z, 1, "", 0, t0)
	b := enqueue(t, z, 2, "", 0, t0)
	c := enqueue(t, z, 3, "", 0, t0)
	// Abandon while waiting.
	if !z.Abandon(a.w) {
		t.Fatal("Abandon(waiting) = false")
	}
	mustCounts(t, z, 1, 2)
	if z.Abandon(a.w) {
		t.Error("second Abandon = true")
	}
	if out, r, _ := z.Poll(a.w, t0); out != Abandoned || r != ReasonNone {
		t.Errorf("Poll(abandoned) = %v/%v, want abandoned/none", out, r)
	}
	// Abandon after the grant, before Poll claimed it: the slot goes on.
	z.Free(h.w)
	if b.w.state != stateGranted {
		t.Fatal("b not granted")
	}
	mustCounts(t, z, 1, 1)
	cw := c.k.Wakes()
	if !z.Abandon(b.w) {
		t.Fatal("Abandon(granted) = false")
	}
	if c.w.state != stateGranted || c.k.Wakes() != cw+1 {
		t.Fatalf("the slot of an abandoned grant did not go to the next waiter (state %d, wakes %d)", c.w.state, c.k.Wakes())
	}
	mustCounts(t, z, 1, 0)
	if out, _, _ := z.Poll(b.w, t0); out != Abandoned {
		t.Errorf("Poll(abandoned grant) = %v, want abandoned", out)
	}
	if z.Free(b.w) {
		t.Error("Free(abandoned grant) = true")
	}
	// Free of a granted, unclaimed waiter is rejected: it must Poll or Abandon.
	if z.Free(c.w) {
		t.Error("Free(granted, not claimed) = true")
	}
	if out, _, _ := z.Poll(c.w, at(time.Second)); out != Admitted {
		t.Fatal("c not admitted")
	}
	if z.Abandon(c.w) {
		t.Error("Abandon(active) = true")
	}
	if !z.Free(c.w) {
		t.Fatal("Release(c) = false")
	}
	if z.Abandon(c.w) {
		t.Error("Abandon(released) = true")
	}
	mustCounts(t, z, 0, 0)
	if o.abandoned != 2 {
		t.Errorf("abandoned %d, want 2", o.abandoned)
	}
	// The abandoned grant left no slot behind.
	d := admit(t, z, 4, "", t0)
	enqueue(t, z, 5, "", 0, t0)
	z.Free(d.w)
}

func TestQueueAbandonGrantedLastFreesKey(t *testing.T) {
	z, _ := newTestZone(t, Limits{MaxConnections: 1})
	h := admit(t, z, 0, "k", t0)
	q := enqueue(t, z, 1, "k", 0, t0)
	z.Free(h.w)
	z.Abandon(q.w)
	mustCounts(t, z, 0, 0)
	if keyCount(z) != 0 {
		t.Errorf("Keys() = %d", keyCount(z))
	}
}

func TestQueueReleaseExactlyOnce(t *testing.T) {
	z, o := newTestZone(t, Limits{MaxConnections: 2})
	a := admit(t, z, 0, "", t0)
	b := admit(t, z, 1, "k", t0)
	if !z.Free(a.w) {
		t.Fatal("first Release = false")
	}
	mustCounts(t, z, 1, 0)
	for range 3 {
		if z.Free(a.w) {
			t.Error("second Release = true")
		}
	}
	mustCounts(t, z, 1, 0)
	if act, _ := o.gauges(); act != 1 {
		t.Errorf("observer active %d", act)
	}
	// Concurrent releases of one waiter: exactly one wins.
	var wins atomic.Int32
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if z.Free(b.w) {
				wins.Add(1)
			}
		}()
	}
	wg.Wait()
	if wins.Load() != 1 {
		t.Errorf("%d concurrent Releases succeeded, want 1", wins.Load())
	}
	mustCounts(t, z, 0, 0)
}

func TestQueueWaiterReuse(t *testing.T) {
	z, _ := newTestZone(t, Limits{MaxConnections: 1})
	w := &Waiter{}
	sig := NewSignal()
	for i := range 3 {
		if out, _ := z.Acquire(w, sig, t0); out != Admitted {
			t.Fatalf("round %d: %v", i, out)
		}
		func() {
			defer func() {
				if recover() == nil {
					t.Error("Acquire of a waiter in use did not panic")
				}
			}()
			z.Acquire(w, sig, t0)
		}()
		z.Free(w)
		func() {
			defer func() {
				if recover() == nil {
					t.Error("Acquire of a released waiter did not panic")
				}
			}()
			z.Acquire(w, sig, t0)
		}()
		*w = Waiter{}
	}
	mustCounts(t, z, 0, 0)
}

func TestQueuePaused(t *testing.T) {
	z, o := newTestZone(t, Limits{MaxConnections: 3, MaxWaiting: 3, WaitTimeout: 10 * time.Second})
	h := admit(t, z, 0, "", t0)
	z.SetPaused(true)
	if !isPaused(z) || !z.Snapshot(t0, 0).Paused {
		t.Fatal("not paused")
	}
	// Under the limit, yet nobody is admitted.
	a := enqueue(t, z, 1, "", 0, t0)
	b := enqueue(t, z, 2, "", 1, at(time.Second))
	c := enqueue(t, z, 3, "", 0, at(2*time.Second))
	mustAcquire(t, z, newQW(4, "", 0), t0, Rejected, ReasonQueueFull) // bound applies
	other := enqueue(t, z, 5, "other", 0, t0)                         // per key
	mustCounts(t, z, 1, 4)
	// A release does not admit while paused; nor does a raise.
	z.Free(h.w)
	z.SetLimits(Limits{MaxConnections: 10, MaxWaiting: 3, WaitTimeout: 10 * time.Second})
	mustCounts(t, z, 0, 4)
	for _, x := range []*qw{a, b, c, other} {
		if x.w.state != stateWaiting {
			t.Errorf("waiter %d admitted while paused", x.id)
		}
	}
	// Timeouts apply.
	if out, r, _ := z.Poll(a.w, at(10*time.Second)); out != Rejected || r != ReasonWaitTimeout {
		t.Errorf("Poll while paused past the deadline = %v/%v", out, r)
	}
	// No waiting, no admission.
	z.SetLimits(Limits{MaxConnections: 10, MaxWaiting: -1, WaitTimeout: 10 * time.Second})
	mustAcquire(t, z, newQW(6, "new", 0), t0, Rejected, ReasonNoWaiting)
	z.SetLimits(Limits{MaxConnections: 2, MaxWaiting: 3, WaitTimeout: 10 * time.Second})
	// Pausing again is harmless.
	z.SetPaused(true)
	mustCounts(t, z, 0, 3)
	// Resume: admits at once, in order, up to the limit of each key.
	ks := []*qw{b, c, other}
	w0 := wakeCounts(ks)
	z.SetPaused(false)
	if isPaused(z) {
		t.Fatal("still paused")
	}
	g := granted(t, ks, w0)
	if len(g) != 3 {
		t.Fatalf("resume granted %d of 3", len(g))
	}
	mustCounts(t, z, 3, 0)
	for _, x := range g {
		if out, _, _ := z.Poll(x.w, at(3*time.Second)); out != Admitted {
			t.Errorf("waiter %d: %v", x.id, out)
		}
	}
	d := enqueue(t, z, 7, "", 0, at(3*time.Second)) // key "" is full (2)
	z.Free(b.w)
	if d.w.state != stateGranted {
		t.Error("release after resume did not grant")
	}
	z.Poll(d.w, at(3*time.Second))
	for _, x := range []*qw{c, other, d} {
		z.Free(x.w)
	}
	mustCounts(t, z, 0, 0)
	if o.admitted != 5 {
		t.Errorf("admitted %d", o.admitted)
	}
}

type remoteName string

func (r remoteName) String() string { return string(r) }

func TestQueueCountersAndSnapshot(t *testing.T) {
	z, o := newTestZone(t, Limits{MaxConnections: 2, MaxWaiting: 4, WaitTimeout: time.Minute})
	s := z.Snapshot(t0, 10)
	if s.Name != "test" || s.Active != 0 || s.Waiting != 0 || s.OldestWait != 0 || len(s.Waiters) != 0 || s.Counters != (Counters{}) {
		t.Errorf("empty zone snapshot %+v", s)
	}
	if s.Limits != (Limits{MaxConnections: 2, MaxWaiting: 4, WaitTimeout: time.Minute}) {
		t.Errorf("Snapshot limits %+v", s.Limits)
	}
	h1 := admit(t, z, 0, "", t0)
	h2 := admit(t, z, 1, "", t0)
	var cs []*qw
	for i := range 4 {
		c := newQW(10+i, "", i%2)
		c.w.Remote = remoteName(fmt.Sprintf("client-%d", i))
		mustAcquire(t, z, c, at(time.Duration(i)*time.Second), Queued, ReasonNone)
		cs = append(cs, c)
	}
	mustAcquire(t, z, newQW(20, "", 0), at(5*time.Second), Rejected, ReasonQueueFull)
	now := at(10 * time.Second)
	s = z.Snapshot(now, 10)
	if s.Active != 2 || s.Waiting != 4 {
		t.Errorf("Snapshot counts %d/%d", s.Active, s.Waiting)
	}
	if s.OldestWait != 10*time.Second {
		t.Errorf("OldestWait %v, want 10s", s.OldestWait)
	}
	// Admission order: priority 1 (ids 11, 13) then 0 (10, 12), FIFO.
	want := []WaiterInfo{
		{Remote: "client-1", Priority: 1, Waited: 9 * time.Second},
		{Remote: "client-3", Priority: 1, Waited: 7 * time.Second},
		{Remote: "client-0", Priority: 0, Waited: 10 * time.Second},
		{Remote: "client-2", Priority: 0, Waited: 8 * time.Second},
	}
	if !slices.Equal(s.Waiters, want) {
		t.Errorf("Snapshot waiters\n got %+v\nwant %+v", s.Waiters, want)
	}
	// Capped by maxWaiters; OldestWait still covers everyone.
	s = z.Snapshot(now, 2)
	if !slices.Equal(s.Waiters, want[:2]) || s.OldestWait != 10*time.Second {
		t.Errorf("Snapshot(2): %+v, oldest %v", s.Waiters, s.OldestWait)
	}
	if s = z.Snapshot(now, 0); len(s.Waiters) != 0 {
		t.Errorf("Snapshot(0) lists %d waiters", len(s.Waiters))
	}
	if s = z.Snapshot(now, -1); len(s.Waiters) != 0 {
		t.Errorf("Snapshot(-1) lists %d waiters", len(s.Waiters))
	}
	// The LIFO view of the same waiters.
	z.SetLimits(Limits{MaxConnections: 2, MaxWaiting: 4, WaitTimeout: time.Minute, Order: LIFO})
	s = z.Snapshot(now, 10)
	wantLIFO := []WaiterInfo{want[1], want[0], want[3], want[2]}
	if !slices.Equal(s.Waiters, wantLIFO) {
		t.Errorf("LIFO snapshot waiters\n got %+v\nwant %+v", s.Waiters, wantLIFO)
	}
	z.SetLimits(Limits{MaxConnections: 2, MaxWaiting: 4, WaitTimeout: time.Minute})

	// Outcomes: 11 admitted after 9s+... ; 13 abandoned; 10 times out;
	// 12 admitted.
	z.Free(h1.w) // grants 11
	if out, _, _ := z.Poll(cs[1].w, at(12*time.Second)); out != Admitted {
		t.Fatal("11 not admitted")
	}
	if o.lastWait() != 11*time.Second {
		t.Errorf("observer: waited %v, want 11s", o.lastWait())
	}
	z.Abandon(cs[3].w)
	if out, r, _ := z.Poll(cs[0].w, at(time.Minute)); out != Rejected || r != ReasonWaitTimeout {
		t.Fatalf("10: %v/%v", out, r)
	}
	s = z.Snapshot(at(time.Minute), 10)
	if s.OldestWait != time.Minute-2*time.Second || len(s.Waiters) != 1 || s.Waiters[0].Remote != "client-2" {
		t.Errorf("snapshot after: oldest %v, waiters %+v", s.OldestWait, s.Waiters)
	}
	z.SetLimits(Limits{MaxConnections: 2, MaxWaiting: -1, WaitTimeout: time.Minute})
	mustAcquire(t, z, newQW(21, "", 0), t0, Rejected, ReasonNoWaiting)
	z.Free(h2.w) // grants 12
	z.Poll(cs[2].w, at(time.Minute))
	z.Free(cs[1].w)
	z.Free(cs[2].w)
	s = z.Snapshot(at(time.Minute), 10)
	wantC := Counters{Admitted: 4, Abandoned: 1}
	wantC.Rejected[ReasonQueueFull] = 1
	wantC.Rejected[ReasonWaitTimeout] = 1
	wantC.Rejected[ReasonNoWaiting] = 1
	if s.Counters != wantC {
		t.Errorf("Counters %+v, want %+v", s.Counters, wantC)
	}
	if s.Counters.RejectedTotal() != 3 {
		t.Errorf("RejectedTotal %d", s.Counters.RejectedTotal())
	}
	if s.OldestWait != 0 || s.Active != 0 || s.Waiting != 0 {
		t.Errorf("final snapshot %+v", s)
	}
	// Waits seen by the observer: 0, 0 (at once), 11s, 58s.
	o.mu.Lock()
	waits := slices.Clone(o.waits)
	o.mu.Unlock()
	if !slices.Equal(waits, []time.Duration{0, 0, 11 * time.Second, 58 * time.Second}) {
		t.Errorf("observer waits %v", waits)
	}
}

// An override sets limits over the config's at run time: raising the
// limit admits waiters at once, lowering it cuts nobody, bad values change
// nothing, the same config keeps it and a new config ends it.
func TestZoneOverride(t *testing.T) {
	config := Limits{MaxConnections: 2, MaxWaiting: 10}
	z, o := newTestZone(t, config)
	var held []*qw
	for i := range 2 {
		held = append(held, admit(t, z, i, "", t0))
	}
	var waiting []*qw
	for i := range 3 {
		waiting = append(waiting, enqueue(t, z, 10+i, "", 0, t0))
	}
	wakes := wakeCounts(waiting)

	if err := z.SetOverride(Override{MaxConnections: ptr(4)}); err != nil {
		t.Fatal(err)
	}
	if g := granted(t, waiting, wakes); len(g) != 2 {
		t.Fatalf("raising the limit to 4 granted %d waiters at once, want 2", len(g))
	}
	mustCounts(t, z, 4, 1)
	s := z.Snapshot(t0, 0)
	if s.Limits.MaxConnections != 4 || s.Config != config || s.Override.MaxConnections == nil || *s.Override.MaxConnections != 4 {
		t.Fatalf("snapshot limits %+v, config %+v, override %+v", s.Limits, s.Config, s.Override)
	}
	if o.max != 4 || !o.overridden {
		t.Fatalf("observer told max %d, overridden %v; want 4, true", o.max, o.overridden)
	}

	// Lowering cuts nobody: the four stay, and a freed slot admits nobody
	// while the count is not below the new limit.
	if err := z.SetOverride(Override{MaxConnections: ptr(1)}); err != nil {
		t.Fatal(err)
	}
	mustCounts(t, z, 4, 1)
	z.Free(held[0].w)
	mustCounts(t, z, 3, 1)

	// Out of range: an error naming the field, and nothing changes.
	for _, bad := range []Override{{MaxConnections: ptr(0)}, {MaxWaiting: ptr(-2)}, {WaitTimeout: ptr(-time.Second)}} {
		err := z.SetOverride(bad)
		if err == nil {
			t.Fatalf("SetOverride(%+v) accepted", bad)
		}
		if l := limitsOf(z); l.MaxConnections != 1 || l.MaxWaiting != 10 || l.WaitTimeout != 0 {
			t.Fatalf("a bad override changed the limits to %+v (%v)", l, err)
		}
	}
	if err := z.SetOverride(Override{MaxWaiting: ptr(-2)}); err == nil || !strings.Contains(err.Error(), "max_waiting") {
		t.Errorf("error %v does not name max_waiting", err)
	}

	// Fields merge with the override already in force.
	if err := z.SetOverride(Override{WaitTimeout: ptr(3 * time.Second)}); err != nil {
		t.Fatal(err)
	}
	if l := limitsOf(z); l.MaxConnections != 1 || l.WaitTimeout != 3*time.Second || l.MaxWaiting != 10 {
		t.Fatalf("merged limits %+v", l)
	}

	// A config load with the same settings keeps the override; new ones end it.
	z.SetLimits(config)
	if l := limitsOf(z); l.MaxConnections != 1 || o.overrideEnded != 0 {
		t.Fatalf("the same config ended the override: %+v, ended %d", l, o.overrideEnded)
	}
	newConfig := Limits{MaxConnections: 3, MaxWaiting: 10}
	z.SetLimits(newConfig)
	if l := limitsOf(z); l != newConfig || o.overrideEnded != 1 || o.overridden || !z.Snapshot(t0, 0).Override.IsZero() {
		t.Fatalf("a new config left limits %+v, ended %d, overridden %v", l, o.overrideEnded, o.overridden)
	}
	if z.ClearOverride() {
		t.Error("ClearOverride with no override reported true")
	}

	// Clearing puts the config back in force.
	if err := z.SetOverride(Override{MaxConnections: ptr(5)}); err != nil {
		t.Fatal(err)
	}
	if !z.ClearOverride() || limitsOf(z) != newConfig || o.overridden {
		t.Fatalf("after ClearOverride: %+v, overridden %v", limitsOf(z), o.overridden)
	}
	for _, c := range append(held[1:], waiting...) {
		z.Abandon(c.w)
		z.Free(c.w)
	}
}
