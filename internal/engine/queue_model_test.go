package engine

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// The model test: a zone driven at random, step by step, against a plain
// model of what it must do.

// TestQueueModel drives a zone with random operations and compares every
// outcome, count and grant with a simple reference model.
func TestQueueModel(t *testing.T) {
	for seed := uint64(1); seed <= 20; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { runModel(t, seed, 3000) })
	}
}

type mConn struct {
	c     *qw
	seq   int
	enq   time.Time
	state waiterState
}

type model struct {
	limits Limits
	paused bool
	active map[string]int
	wait   map[string][]*mConn // in arrival order
	stats  Counters
}

func (m *model) next(key string) (int, *mConn) {
	best := -1
	for i, c := range m.wait[key] {
		if best < 0 {
			best = i
			continue
		}
		b := m.wait[key][best]
		switch {
		case c.c.w.Priority > b.c.w.Priority:
			best = i
		case c.c.w.Priority == b.c.w.Priority && m.limits.Order == LIFO:
			best = i // later arrival
		}
	}
	if best < 0 {
		return -1, nil
	}
	return best, m.wait[key][best]
}

func (m *model) grant(key string) {
	for !m.paused && len(m.wait[key]) > 0 && m.active[key] < m.limits.MaxConnections {
		i, c := m.next(key)
		m.wait[key] = slices.Delete(m.wait[key], i, i+1)
		c.state = stateGranted
		m.active[key]++
	}
}

func (m *model) grantAll() {
	for k := range m.wait {
		m.grant(k)
	}
}

func (m *model) removeWaiting(c *mConn) {
	k := c.c.w.Key
	i := slices.Index(m.wait[k], c)
	m.wait[k] = slices.Delete(m.wait[k], i, i+1)
}

func runModel(t *testing.T, seed uint64, steps int) {
	rng := rand.New(rand.NewPCG(seed, 99))
	keys := []string{"", "a", "b"}
	prios := []int{-1, 0, 0, 2}
	randLimits := func() Limits {
		return Limits{
			MaxConnections: 1 + rng.IntN(3),
			MaxWaiting:     []int{-1, 0, 0, 2, 5}[rng.IntN(5)],
			WaitTimeout:    []time.Duration{0, 5 * time.Second, 20 * time.Second}[rng.IntN(3)],
			Order:          Order(rng.IntN(2)),
		}
	}
	l := randLimits()
	z, _ := newTestZone(t, l)
	m := &model{limits: l, active: map[string]int{}, wait: map[string][]*mConn{}}
	var conns []*mConn
	now := t0
	seq := 0
	live := func(states ...waiterState) []*mConn {
		var r []*mConn
		for _, c := range conns {
			if slices.Contains(states, c.state) {
				r = append(r, c)
			}
		}
		return r
	}
	check := func(step int, what string) {
		t.Helper()
		act, wait := 0, 0
		for _, k := range keys {
			act += m.active[k]
			wait += len(m.wait[k])
		}
		if a, w := z.Counts(); a != act || w != wait {
			t.Fatalf("step %d (%s): Counts (%d, %d), model (%d, %d)", step, what, a, w, act, wait)
		}
		for _, c := range conns {
			if c.c.w.state != c.state {
				t.Fatalf("step %d (%s): waiter %d state %d, model %d", step, what, c.c.id, c.c.w.state, c.state)
			}
		}
		if s := z.Snapshot(now, 0); s.Counters != m.stats {
			t.Fatalf("step %d (%s): counters %+v, model %+v", step, what, s.Counters, m.stats)
		}
		keysHeld := 0
		for _, k := range keys[1:] {
			if m.active[k] > 0 || len(m.wait[k]) > 0 {
				keysHeld++
			}
		}
		if keyCount(z) != keysHeld {
			t.Fatalf("step %d (%s): Keys() %d, model %d", step, what, keyCount(z), keysHeld)
		}
	}
	for step := range steps {
		now = now.Add(time.Duration(rng.IntN(3000)) * time.Millisecond)
		var what string
		switch op := rng.IntN(100); {
		case op < 40: // acquire
			key := keys[rng.IntN(len(keys))]
			c := &mConn{c: newQW(seq, key, prios[rng.IntN(len(prios))]), seq: seq, enq: now}
			seq++
			what = fmt.Sprintf("acquire %d key %q prio %d", c.c.id, key, c.c.w.Priority)
			wantPos := 0
			var wantOut Outcome
			var wantR Reason
			switch {
			case !m.paused && m.active[key] < m.limits.MaxConnections:
				wantOut = Admitted
				c.state = stateActive
				m.active[key]++
				m.stats.Admitted++
			case m.limits.MaxWaiting < 0:
				wantOut, wantR = Rejected, ReasonNoWaiting
			case m.limits.MaxWaiting > 0 && len(m.wait[key]) >= m.limits.MaxWaiting:
				wantOut, wantR = Rejected, ReasonQueueFull
			default:
				wantOut = Queued
				c.state = stateWaiting
				for _, o := range m.wait[key] {
					if o.c.w.Priority > c.c.w.Priority || (o.c.w.Priority == c.c.w.Priority && m.limits.Order == FIFO) {
						wantPos++
					}
				}
				wantPos++
				m.wait[key] = append(m.wait[key], c)
			}
			if wantOut == Rejected {
				c.state = stateFreed
				m.stats.Rejected[wantR]++
			}
			out, r := z.Acquire(c.c.w, c.c.k, now)
			if out != wantOut || r != wantR {
				t.Fatalf("step %d (%s): %v/%v, model %v/%v", step, what, out, r, wantOut, wantR)
			}
			if c.c.w.Position() != wantPos {
				t.Fatalf("step %d (%s): Position %d, model %d", step, what, c.c.w.Position(), wantPos)
			}
			conns = append(conns, c)
		case op < 60: // release an active one
			act := live(stateActive)
			if len(act) == 0 {
				continue
			}
			c := act[rng.IntN(len(act))]
			what = fmt.Sprintf("release %d", c.c.id)
			c.state = stateFreed
			m.active[c.c.w.Key]--
			m.grant(c.c.w.Key)
			if !z.Free(c.c.w) {
				t.Fatalf("step %d (%s): false", step, what)
			}
		case op < 80: // poll a waiting or granted one
			ws := live(stateWaiting, stateGranted)
			if len(ws) == 0 {
				continue
			}
			c := ws[rng.IntN(len(ws))]
			what = fmt.Sprintf("poll %d", c.c.id)
			wantOut, wantR := Queued, ReasonNone
			var wantD time.Time
			if m.limits.WaitTimeout > 0 {
				wantD = c.enq.Add(m.limits.WaitTimeout)
			}
			switch {
			case c.state == stateGranted:
				wantOut, wantD = Admitted, time.Time{}
				c.state = stateActive
				m.stats.Admitted++
			case !wantD.IsZero() && !now.Before(wantD):
				wantOut, wantR, wantD = Rejected, ReasonWaitTimeout, time.Time{}
				c.state = stateFreed
				m.removeWaiting(c)
				m.stats.Rejected[ReasonWaitTimeout]++
			}
			out, r, d := z.Poll(c.c.w, now)
			if out != wantOut || r != wantR || !d.Equal(wantD) {
				t.Fatalf("step %d (%s): %v/%v/%v, model %v/%v/%v", step, what, out, r, d, wantOut, wantR, wantD)
			}
		case op < 88: // abandon a waiting or granted one
			ws := live(stateWaiting, stateGranted)
			if len(ws) == 0 {
				continue
			}
			c := ws[rng.IntN(len(ws))]
			what = fmt.Sprintf("abandon %d", c.c.id)
			if c.state == stateWaiting {
				m.removeWaiting(c)
			} else {
				m.active[c.c.w.Key]--
				m.grant(c.c.w.Key)
			}
			c.state = stateAbandoned
			m.stats.Abandoned++
			if !z.Abandon(c.c.w) {
				t.Fatalf("step %d (%s): false", step, what)
			}
		case op < 94: // new limits
			l := randLimits()
			what = fmt.Sprintf("limits %+v", l)
			old := m.limits
			m.limits = l
			if l.MaxConnections > old.MaxConnections {
				m.grantAll()
			}
			z.SetLimits(l)
		default: // pause or resume
			p := rng.IntN(3) == 0
			what = fmt.Sprintf("paused %v", p)
			m.paused = p
			if !p {
				m.grantAll()
			}
			z.SetPaused(p)
		}
		check(step, what)
		// Done ones were checked once; they never change again.
		conns = slices.DeleteFunc(conns, func(c *mConn) bool { return c.state == stateFreed || c.state == stateAbandoned })
	}
	// Wind down: resume, drop every waiter, release every holder.
	z.SetPaused(false)
	m.paused = false
	m.grantAll()
	check(steps, "resume")
	for _, c := range live(stateWaiting, stateGranted) {
		z.Abandon(c.c.w)
	}
	for _, c := range conns {
		if c.c.w.state == stateGranted {
			z.Poll(c.c.w, now)
		}
		z.Free(c.c.w)
	}
	for range 5 {
		for _, c := range conns {
			if c.c.w.state == stateGranted {
				z.Abandon(c.c.w)
			}
		}
	}
	mustCounts(t, z, 0, 0)
	if keyCount(z) != 0 {
		t.Errorf("Keys() = %d at the end", keyCount(z))
	}
	s := z.Snapshot(now, 0)
	total := s.Counters.Admitted + s.Counters.RejectedTotal() + s.Counters.Abandoned
	if total != uint64(seq) {
		t.Errorf("admitted+rejected+abandoned = %d, attempts %d", total, seq)
	}
}

// TestQueueModelFair drives a zone with a fair share among tenants, with
// random weights, fair_max, priorities, orders, pauses and the fair share
// turned off and on, against a plain model of the rules.
func TestQueueModelFair(t *testing.T) {
	for seed := uint64(1); seed <= 20; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { runFairModel(t, seed, 3000) })
	}
}

// fairModel is the reference: one zone-wide count, and a list of waiters
// in arrival order; every choice is made by looking at all of them.
type fairModel struct {
	limits  Limits
	fair    Fair
	paused  bool
	active  int
	tactive map[string]int  // slots held per tenant, of those counted for one
	counted map[*mConn]bool // holds a slot counted for its tenant
	wait    []*mConn        // in arrival order
	stats   Counters
}

func (m *fairModel) eligible(tenant string) bool {
	return !m.fair.On() || m.fair.Max == 0 || m.tactive[tenant] < m.fair.Max
}

// next is the waiter the rules admit next, or nil.
func (m *fairModel) next() *mConn {
	if !m.fair.On() {
		var best *mConn
		for _, c := range m.wait {
			if best == nil || c.c.w.Priority > best.c.w.Priority ||
				(c.c.w.Priority == best.c.w.Priority && m.limits.Order == LIFO) {
				best = c
			}
		}
		return best
	}
	top, found := 0, false
	for _, c := range m.wait {
		if m.eligible(c.c.w.Tenant) && (!found || c.c.w.Priority > top) {
			top, found = c.c.w.Priority, true
		}
	}
	if !found {
		return nil
	}
	// Each tenant's next waiter of that priority, in the zone's order.
	cand := map[string]*mConn{}
	for _, c := range m.wait {
		tn := c.c.w.Tenant
		if c.c.w.Priority != top || !m.eligible(tn) {
			continue
		}
		if cand[tn] == nil || m.limits.Order == LIFO {
			cand[tn] = c
		}
	}
	var best *mConn
	for tn, c := range cand {
		if best == nil {
			best = c
			continue
		}
		bt := best.c.w.Tenant
		a := m.tactive[tn] * m.fair.weight(bt)
		b := m.tactive[bt] * m.fair.weight(tn)
		switch {
		case a < b:
			best = c
		case a == b && m.limits.Order == FIFO && c.seq < best.seq:
			best = c
		case a == b && m.limits.Order == LIFO && c.seq > best.seq:
			best = c
		}
	}
	return best
}

func (m *fairModel) grant() {
	for !m.paused && m.active < m.limits.MaxConnections {
		c := m.next()
		if c == nil {
			return
		}
		m.remove(c)
		c.state = stateGranted
		m.hold(c)
	}
}

func (m *fairModel) hold(c *mConn) {
	m.active++
	if m.fair.On() {
		m.tactive[c.c.w.Tenant]++
		m.counted[c] = true
	}
}

func (m *fairModel) release(c *mConn) {
	m.active--
	if m.counted[c] {
		m.tactive[c.c.w.Tenant]--
		delete(m.counted, c)
	}
	m.grant()
}

func (m *fairModel) remove(c *mConn) {
	i := slices.Index(m.wait, c)
	m.wait = slices.Delete(m.wait, i, i+1)
}

// tenants: how many hold a counted slot or wait, how many wait, and Jain's
// index over active ÷ weight of those that wait.
func (m *fairModel) tenants() (held, waiting int, index float64) {
	if !m.fair.On() {
		return 0, 0, 0
	}
	all := map[string]bool{}
	waits := map[string]bool{}
	for tn, n := range m.tactive {
		if n > 0 {
			all[tn] = true
		}
	}
	for _, c := range m.wait {
		all[c.c.w.Tenant] = true
		waits[c.c.w.Tenant] = true
	}
	var s1, s2 float64
	for tn := range waits {
		x := float64(m.tactive[tn]) / float64(m.fair.weight(tn))
		s1 += x
		s2 += x * x
	}
	index = 1
	if len(waits) > 0 && s2 > 1e-12 {
		index = s1 * s1 / (float64(len(waits)) * s2)
	}
	return len(all), len(waits), index
}

func runFairModel(t *testing.T, seed uint64, steps int) {
	rng := rand.New(rand.NewPCG(seed, 18))
	tenants := []string{"", "a", "b", "c", "d"}
	prios := []int{-1, 0, 0, 0, 2}
	randLimits := func() Limits {
		return Limits{
			MaxConnections: 1 + rng.IntN(5),
			MaxWaiting:     []int{-1, 0, 0, 0, 4, 8}[rng.IntN(6)],
			WaitTimeout:    []time.Duration{0, 0, 5 * time.Second, 20 * time.Second}[rng.IntN(4)],
			Order:          Order(rng.IntN(2)),
		}
	}
	randFair := func() Fair {
		if rng.IntN(10) == 0 {
			return Fair{}
		}
		f := Fair{Tenant: "{t}", Max: []int{0, 0, 1, 2, 3}[rng.IntN(5)]}
		for _, tn := range tenants {
			if rng.IntN(3) == 0 {
				if f.Weights == nil {
					f.Weights = map[string]int{}
				}
				f.Weights[tn] = 1 + rng.IntN(4)
			}
		}
		return f
	}
	l := randLimits()
	f := randFair()
	if !f.On() {
		f.Tenant = "{t}"
	}
	o := &fairObserver{}
	z := NewZone("test", l, o)
	z.SetFair(f)
	m := &fairModel{limits: l, fair: f, tactive: map[string]int{}, counted: map[*mConn]bool{}}
	var conns []*mConn
	now := t0
	seq := 0
	live := func(states ...waiterState) []*mConn {
		var r []*mConn
		for _, c := range conns {
			if slices.Contains(states, c.state) {
				r = append(r, c)
			}
		}
		return r
	}
	check := func(step int, what string) {
		t.Helper()
		if a, w := z.Counts(); a != m.active || w != len(m.wait) {
			t.Fatalf("step %d (%s): Counts (%d, %d), model (%d, %d)", step, what, a, w, m.active, len(m.wait))
		}
		for _, c := range conns {
			if c.c.w.state != c.state {
				t.Fatalf("step %d (%s): waiter %d (tenant %q prio %d) state %d, model %d", step, what, c.c.id, c.c.w.Tenant, c.c.w.Priority, c.c.w.state, c.state)
			}
		}
		s := z.SnapshotTenants(now, 0, 100)
		if s.Counters != m.stats {
			t.Fatalf("step %d (%s): counters %+v, model %+v", step, what, s.Counters, m.stats)
		}
		held, waiting, index := m.tenants()
		if s.Tenants != held || s.TenantsWaiting != waiting || (m.fair.On() && math.Abs(s.FairIndex-index) > 1e-9) {
			t.Fatalf("step %d (%s): tenants %d, waiting %d, index %g; model %d, %d, %g", step, what, s.Tenants, s.TenantsWaiting, s.FairIndex, held, waiting, index)
		}
		if n, j := o.fair(); m.fair.On() && (n != waiting || math.Abs(j-index) > 1e-9) {
			t.Fatalf("step %d (%s): observer told %d waiting, index %g; model %d, %g", step, what, n, j, waiting, index)
		}
		for _, ti := range s.TenantList {
			if ti.Active != m.tactive[ti.Tenant] || ti.Weight != m.fair.weight(ti.Tenant) {
				t.Fatalf("step %d (%s): tenant %+v, model active %d", step, what, ti, m.tactive[ti.Tenant])
			}
		}
		checkFair(t, z)
		if t.Failed() {
			t.FailNow()
		}
	}
	for step := range steps {
		now = now.Add(time.Duration(rng.IntN(3000)) * time.Millisecond)
		var what string
		switch op := rng.IntN(100); {
		case op < 40: // acquire
			c := &mConn{c: newQW(seq, "", prios[rng.IntN(len(prios))]), seq: seq, enq: now}
			c.c.w.Tenant = tenants[rng.IntN(len(tenants))]
			seq++
			tn := c.c.w.Tenant
			what = fmt.Sprintf("acquire %d tenant %q prio %d", c.c.id, tn, c.c.w.Priority)
			wantPos := 0
			var wantOut Outcome
			var wantR Reason
			switch {
			case !m.paused && m.active < m.limits.MaxConnections && m.eligible(tn) && m.next() == nil:
				wantOut = Admitted
				c.state = stateActive
				m.hold(c)
				m.stats.Admitted++
			case m.limits.MaxWaiting < 0:
				wantOut, wantR = Rejected, ReasonNoWaiting
			case m.limits.MaxWaiting > 0 && len(m.wait) >= m.limits.MaxWaiting:
				wantOut, wantR = Rejected, ReasonQueueFull
			default:
				wantOut = Queued
				c.state = stateWaiting
				for _, o := range m.wait {
					if m.fair.On() && o.c.w.Tenant != tn {
						continue
					}
					if o.c.w.Priority > c.c.w.Priority || (o.c.w.Priority == c.c.w.Priority && m.limits.Order == FIFO) {
						wantPos++
					}
				}
				wantPos++
				m.wait = append(m.wait, c)
			}
			if wantOut == Rejected {
				c.state = stateFreed
				m.stats.Rejected[wantR]++
			}
			out, r := z.Acquire(c.c.w, c.c.k, now)
			if out != wantOut || r != wantR {
				t.Fatalf("step %d (%s): %v/%v, model %v/%v", step, what, out, r, wantOut, wantR)
			}
			if c.c.w.Position() != wantPos {
				t.Fatalf("step %d (%s): Position %d, model %d", step, what, c.c.w.Position(), wantPos)
			}
			conns = append(conns, c)
		case op < 62: // release an active one
			act := live(stateActive)
			if len(act) == 0 {
				continue
			}
			c := act[rng.IntN(len(act))]
			what = fmt.Sprintf("release %d", c.c.id)
			c.state = stateFreed
			m.release(c)
			if !z.Free(c.c.w) {
				t.Fatalf("step %d (%s): false", step, what)
			}
		case op < 80: // poll a waiting or granted one
			ws := live(stateWaiting, stateGranted)
			if len(ws) == 0 {
				continue
			}
			c := ws[rng.IntN(len(ws))]
			what = fmt.Sprintf("poll %d", c.c.id)
			wantOut, wantR := Queued, ReasonNone
			var wantD time.Time
			if m.limits.WaitTimeout > 0 {
				wantD = c.enq.Add(m.limits.WaitTimeout)
			}
			switch {
			case c.state == stateGranted:
				wantOut, wantD = Admitted, time.Time{}
				c.state = stateActive
				m.stats.Admitted++
			case !wantD.IsZero() && !now.Before(wantD):
				wantOut, wantR, wantD = Rejected, ReasonWaitTimeout, time.Time{}
				c.state = stateFreed
				m.remove(c)
				m.stats.Rejected[ReasonWaitTimeout]++
			}
			out, r, d := z.Poll(c.c.w, now)
			if out != wantOut || r != wantR || !d.Equal(wantD) {
				t.Fatalf("step %d (%s): %v/%v/%v, model %v/%v/%v", step, what, out, r, d, wantOut, wantR, wantD)
			}
		case op < 87: // abandon a waiting or granted one
			ws := live(stateWaiting, stateGranted)
			if len(ws) == 0 {
				continue
			}
			c := ws[rng.IntN(len(ws))]
			what = fmt.Sprintf("abandon %d", c.c.id)
			if c.state == stateWaiting {
				m.remove(c)
			} else {
				m.release(c)
			}
			c.state = stateAbandoned
			m.stats.Abandoned++
			if !z.Abandon(c.c.w) {
				t.Fatalf("step %d (%s): false", step, what)
			}
		case op < 91: // new limits
			l := randLimits()
			what = fmt.Sprintf("limits %+v", l)
			m.limits = l
			m.grant()
			z.SetLimits(l)
		case op < 95: // new fair share: weights, fair_max, or off and on
			f := randFair()
			what = fmt.Sprintf("fair %+v", f)
			if m.fair.On() != f.On() {
				m.tactive = map[string]int{}
				m.counted = map[*mConn]bool{}
			}
			m.fair = f
			m.grant()
			z.SetFair(f)
		default: // pause or resume
			p := rng.IntN(3) == 0
			what = fmt.Sprintf("paused %v", p)
			m.paused = p
			m.grant()
			z.SetPaused(p)
		}
		check(step, what)
		conns = slices.DeleteFunc(conns, func(c *mConn) bool { return c.state == stateFreed || c.state == stateAbandoned })
	}
	// Wind down.
	z.SetPaused(false)
	m.paused = false
	m.grant()
	check(steps, "resume")
	for _, c := range live(stateWaiting) {
		z.Abandon(c.c.w)
	}
	for len(live(stateGranted, stateActive)) > 0 {
		for _, c := range live(stateGranted, stateActive) {
			if c.c.w.state == stateGranted {
				z.Poll(c.c.w, now)
			}
			z.Free(c.c.w)
			c.state = stateFreed
		}
	}
	mustCounts(t, z, 0, 0)
	s := z.Snapshot(now, 0)
	if s.Tenants != 0 {
		t.Errorf("%d tenants left at the end", s.Tenants)
	}
	total := s.Counters.Admitted + s.Counters.RejectedTotal() + s.Counters.Abandoned
	if total != uint64(seq) {
		t.Errorf("admitted+rejected+abandoned = %d, attempts %d", total, seq)
	}
}
