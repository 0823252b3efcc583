package engine

import (
	"fmt"
	"maps"
	"math/bits"
	"slices"
	"sort"
	"time"
)

// Fair share: one count (max_connections, max_waiting) shared by many
// tenants, where a slot that frees goes to the waiting tenant that holds
// the fewest slots for its weight. The zone (zone.go) owns the fairQueue
// of its default key and its lock guards it.
//
// Within each priority, every tenant that waits has its own list (FIFO or
// LIFO as the zone's order says), and a heap holds the lists of the
// eligible tenants (those below fair_max) keyed by (active ÷ weight, the
// arrival of the list's next waiter). A grant takes the top of the
// highest priority's heap: O(log tenants), and O(log tenants) again to
// fix the tenant's place when its active count changes.

// Fair is a zone's fair share among tenants; its zero value is off.
type Fair struct {
	// Tenant is the expression that names a connection's tenant (the
	// handler's fair_share). The engine does not read it: the handler
	// puts each connection's value in Waiter.Tenant. "" is off.
	Tenant string
	// Weights of tenants by value; every other tenant weighs 1.
	Weights map[string]int
	// Max is the most slots one tenant may hold at once; 0 is no cap.
	Max int
}

// On reports whether the zone shares its slots fairly.
func (f Fair) On() bool { return f.Tenant != "" }

// Validate reports the first setting of f that is out of range, naming
// the field as a config gives it.
func (f Fair) Validate() error {
	for _, t := range slices.Sorted(maps.Keys(f.Weights)) {
		if w := f.Weights[t]; w < 1 {
			return fmt.Errorf("weights: the weight of tenant %q must be at least 1, got %d", t, w)
		}
	}
	if f.Max < 0 {
		return fmt.Errorf("fair_max must be at least 1, got %d", f.Max)
	}
	if !f.On() {
		switch {
		case len(f.Weights) > 0:
			return fmt.Errorf("weights: needs fair_share, which names each connection's tenant")
		case f.Max > 0:
			return fmt.Errorf("fair_max: needs fair_share, which names each connection's tenant")
		}
	}
	return nil
}

// Differs names the first setting in which f and g differ, or "".
func (f Fair) Differs(g Fair) string {
	switch {
	case f.Tenant != g.Tenant:
		return fmt.Sprintf("fair_share %q and %q", f.Tenant, g.Tenant)
	case !maps.Equal(f.Weights, g.Weights):
		return fmt.Sprintf("weights %v and %v", f.Weights, g.Weights)
	case f.Max != g.Max:
		return fmt.Sprintf("fair_max %d and %d", f.Max, g.Max)
	}
	return ""
}

func (f Fair) weight(tenant string) int {
	if w, ok := f.Weights[tenant]; ok {
		return w
	}
	return 1
}

// tenant is the count and waiting lists of one tenant of a fair zone.
type tenant struct {
	name    string
	fq      *fairQueue // whose tenant it is: a zone that turned its fair share off and on again has a new one
	weight  int
	active  int
	waiting int
	levels  []*tenantLevel  // its non-empty lists, by priority, highest first
	level0  [1]*tenantLevel // levels' first array: most tenants wait at one priority
	// idle: it holds nothing and waits for nothing, and is kept a while
	// in case it comes back soon (in the idle list, oldest first)
	idle               bool
	idlePrev, idleNext *tenant
}

// tenantLevel is the waiting list of one tenant within one priority.
type tenantLevel struct {
	level
	t  *tenant
	pl *prioLevel
	hi int // its index in pl.heap; -1 when not there (its tenant is at fair_max)
}

// prioLevel is one priority of a fair zone.
type prioLevel struct {
	prio int
	heap []heapEntry // the eligible tenants' lists, the next to admit at the top
}

// heapEntry is a list in its priority's heap, with a copy of its key so
// that comparing two does not chase pointers: the tenant's active and
// weight, and the arrival of the list's next waiter, as a number that is
// smaller for the one the zone's order admits first.
type heapEntry struct {
	active, weight uint64
	seq            uint64
	tl             *tenantLevel
}

// fairQueue is the waiting lists and per-tenant counts of a zone with a
// fair share.
type fairQueue struct {
	cfg     Fair
	order   Order
	tenants map[string]*tenant // those that hold a slot or wait, and the idle ones
	prios   []*prioLevel       // highest first; empty ones are kept
	seq     uint64             // of the last waiter queued
	spareL  []*tenantLevel
	// The idle tenants, oldest first: a tenant whose last connection
	// ended often comes back at once, and finding it costs less than
	// forgetting it and making it again. At most maxIdle are kept.
	idleHead, idleTail *tenant
	idleN              int
	// For Jain's fairness index over active ÷ weight of the tenants that
	// wait: their number, and the sums of x and x².
	nWaiting int
	s1, s2   float64
}

func newFairQueue(f Fair, order Order) *fairQueue {
	return &fairQueue{cfg: f, order: order, tenants: make(map[string]*tenant)}
}

// maxIdle bounds the idle tenants a fair queue keeps.
const maxIdle = 256

// tenant returns the state of the named tenant, made if need be.
func (fq *fairQueue) tenant(name string) *tenant {
	if t, ok := fq.tenants[name]; ok {
		if t.idle {
			fq.unidle(t)
		}
		return t
	}
	var t *tenant
	if fq.idleN >= maxIdle {
		t = fq.idleHead // the oldest idle tenant is forgotten, and reused
		fq.unidle(t)
		delete(fq.tenants, t.name)
	} else {
		t = new(tenant)
	}
	levels := t.levels[:0]
	*t = tenant{name: name, fq: fq, weight: fq.cfg.weight(name)}
	if cap(levels) > 1 {
		t.levels = levels // a larger array it grew before
	} else {
		t.levels = t.level0[:0]
	}
	fq.tenants[name] = t
	return t
}

// tidy makes t idle if it holds nothing and waits for nothing.
func (fq *fairQueue) tidy(t *tenant) {
	if t.fq != fq || t.active != 0 || t.waiting != 0 || t.idle {
		return
	}
	if fq.idleN >= maxIdle {
		old := fq.idleHead
		fq.unidle(old)
		delete(fq.tenants, old.name)
	}
	t.idle = true
	t.idlePrev, t.idleNext = fq.idleTail, nil
	if fq.idleTail != nil {
		fq.idleTail.idleNext = t
	} else {
		fq.idleHead = t
	}
	fq.idleTail = t
	fq.idleN++
}

// unidle takes t out of the idle list.
func (fq *fairQueue) unidle(t *tenant) {
	if t.idlePrev != nil {
		t.idlePrev.idleNext = t.idleNext
	} else {
		fq.idleHead = t.idleNext
	}
	if t.idleNext != nil {
		t.idleNext.idlePrev = t.idlePrev
	} else {
		fq.idleTail = t.idlePrev
	}
	t.idle, t.idlePrev, t.idleNext = false, nil, nil
	fq.idleN--
}

// held is how many tenants hold a slot or wait.
func (fq *fairQueue) held() int { return len(fq.tenants) - fq.idleN }

// eligible: t may be granted a slot (it is below fair_max).
func (fq *fairQueue) eligible(t *tenant) bool {
	return fq.cfg.Max == 0 || t.active < fq.cfg.Max
}

// anyEligible: some waiter may be granted a slot.
func (fq *fairQueue) anyEligible() bool {
	for _, pl := range fq.prios {
		if len(pl.heap) > 0 {
			return true
		}
	}
	return false
}

// next is the waiter to admit next, or nil: in the highest priority that
// has an eligible waiter, the next waiter of the tenant with the smallest
// active ÷ weight.
func (fq *fairQueue) next() *Waiter {
	for _, pl := range fq.prios {
		if len(pl.heap) > 0 {
			return fq.first(pl.heap[0].tl)
		}
	}
	return nil
}

// first is the next waiter of tl in the zone's order.
func (fq *fairQueue) first(tl *tenantLevel) *Waiter {
	if fq.order == LIFO {
		return tl.tail
	}
	return tl.head
}

// ahead counts the waiters of t that would be admitted before a new
// waiter of priority prio: the place in line within its tenant.
func (t *tenant) ahead(prio int, order Order) int {
	n := 0
	for _, tl := range t.levels {
		if tl.prio > prio || (tl.prio == prio && order == FIFO) {
			n += tl.n
		}
	}
	return n
}

// prioLevel returns the zone's level of priority prio, made if need be.
func (fq *fairQueue) prioLevel(prio int) *prioLevel {
	i := 0
	for ; i < len(fq.prios); i++ {
		if fq.prios[i].prio == prio {
			return fq.prios[i]
		}
		if fq.prios[i].prio < prio {
			break
		}
	}
	pl := &prioLevel{prio: prio}
	fq.prios = slices.Insert(fq.prios, i, pl)
	return pl
}

// level returns t's list of priority prio, made if need be.
func (fq *fairQueue) level(t *tenant, prio int) *tenantLevel {
	i := 0
	for ; i < len(t.levels); i++ {
		if t.levels[i].prio == prio {
			return t.levels[i]
		}
		if t.levels[i].prio < prio {
			break
		}
	}
	var tl *tenantLevel
	if n := len(fq.spareL); n > 0 {
		tl = fq.spareL[n-1]
		fq.spareL = fq.spareL[:n-1]
	} else {
		tl = new(tenantLevel)
	}
	pl := fq.prioLevel(prio)
	*tl = tenantLevel{t: t, pl: pl, hi: -1}
	tl.prio = prio
	tl.tl = tl
	t.levels = slices.Insert(t.levels, i, tl)
	return tl
}

// dropLevel forgets the empty list tl.
func (fq *fairQueue) dropLevel(tl *tenantLevel) {
	pl, t := tl.pl, tl.t
	if tl.hi >= 0 {
		pl.heapRemove(tl.hi)
	}
	for i, l := range t.levels {
		if l == tl {
			t.levels = slices.Delete(t.levels, i, i+1)
			break
		}
	}
	*tl = tenantLevel{}
	if len(fq.spareL) < maxSpare {
		fq.spareL = append(fq.spareL, tl)
	}
}

// push queues w, whose tenant is w.tn, behind its tenant's waiters of
// its priority. The zone counts it waiting.
func (fq *fairQueue) push(w *Waiter) {
	fq.seq++
	w.seq = fq.seq
	t := w.tn
	tl := fq.level(t, w.Priority)
	tl.push(w)
	fq.waitingDelta(t, 1)
	switch {
	case !fq.eligible(t):
	case tl.hi < 0:
		tl.pl.heapPush(fq, tl)
	case fq.order == LIFO:
		tl.pl.rekey(fq, tl) // its next waiter is the newest: w
	}
}

// remove takes w out of its tenant's list (it was granted a slot, timed
// out or left).
func (fq *fairQueue) remove(w *Waiter) {
	tl := w.lvl.tl
	wasFirst := fq.first(tl) == w
	tl.remove(w)
	fq.waitingDelta(tl.t, -1)
	switch {
	case tl.n == 0:
		fq.dropLevel(tl)
	case wasFirst && tl.hi >= 0:
		tl.pl.rekey(fq, tl)
	}
}

// activeDelta changes t's count of slots by d, and its place in line.
func (fq *fairQueue) activeDelta(t *tenant, d int) {
	if t.waiting > 0 {
		fq.jainRemove(t)
	}
	t.active += d
	if t.waiting == 0 {
		return
	}
	fq.jainAdd(t)
	ok := fq.eligible(t)
	for _, tl := range t.levels {
		switch {
		case ok && tl.hi < 0:
			tl.pl.heapPush(fq, tl)
		case !ok && tl.hi >= 0:
			tl.pl.heapRemove(tl.hi)
		case ok:
			tl.pl.rekey(fq, tl)
		}
	}
}

// waitingDelta changes t's count of waiters by d (±1).
func (fq *fairQueue) waitingDelta(t *tenant, d int) {
	was := t.waiting
	t.waiting += d
	switch {
	case was == 0 && t.waiting > 0:
		fq.nWaiting++
		fq.jainAdd(t)
	case was > 0 && t.waiting == 0:
		fq.nWaiting--
		fq.jainRemove(t)
	}
}

func (fq *fairQueue) jainAdd(t *tenant) {
	x := float64(t.active) / float64(t.weight)
	fq.s1 += x
	fq.s2 += x * x
}

func (fq *fairQueue) jainRemove(t *tenant) {
	if fq.nWaiting == 0 {
		fq.s1, fq.s2 = 0, 0 // exactly: no rounding carried over
		return
	}
	x := float64(t.active) / float64(t.weight)
	fq.s1 -= x
	fq.s2 -= x * x
}

// index is Jain's fairness index over active ÷ weight of the tenants that
// wait, (Σx)² ÷ (n·Σx²): 1 when they hold equal shares for their weights,
// 1/n when one holds everything. 1 when no tenant waits or none holds a
// slot.
func (fq *fairQueue) index() float64 {
	if fq.nWaiting == 0 || fq.s2 <= 1e-12 {
		return 1
	}
	j := fq.s1 * fq.s1 / (float64(fq.nWaiting) * fq.s2)
	return min(max(j, 0), 1)
}

// setConfig puts new weights and fair_max in force, or a new order, for
// those who wait too.
func (fq *fairQueue) setConfig(f Fair, order Order) {
	fq.cfg, fq.order = f, order
	fq.nWaiting, fq.s1, fq.s2 = 0, 0, 0
	for _, t := range fq.tenants {
		t.weight = f.weight(t.name)
		if t.waiting > 0 {
			fq.nWaiting++
			fq.jainAdd(t)
		}
	}
	for _, pl := range fq.prios {
		for _, e := range pl.heap {
			e.tl.hi = -1
		}
		clear(pl.heap)
		pl.heap = pl.heap[:0]
	}
	for _, t := range fq.tenants {
		if !fq.eligible(t) {
			continue
		}
		for _, tl := range t.levels {
			tl.hi = len(tl.pl.heap)
			tl.pl.heap = append(tl.pl.heap, fq.entry(tl))
		}
	}
	for _, pl := range fq.prios {
		for i := (len(pl.heap) - 2) / arity; i >= 0 && len(pl.heap) > 1; i-- {
			pl.down(i)
		}
	}
}

// lists returns every tenant's list of priority pl.
func (fq *fairQueue) lists(pl *prioLevel) []*tenantLevel {
	var tls []*tenantLevel
	for _, t := range fq.tenants {
		for _, tl := range t.levels {
			if tl.pl == pl {
				tls = append(tls, tl)
			}
		}
	}
	return tls
}

// entry is tl's heap entry, with its key as it is now.
func (fq *fairQueue) entry(tl *tenantLevel) heapEntry {
	e := heapEntry{active: uint64(tl.t.active), weight: uint64(tl.t.weight), tl: tl}
	if fq.order == LIFO {
		e.seq = ^tl.tail.seq // the newest first
	} else {
		e.seq = tl.head.seq
	}
	return e
}

// heapLess: a's tenant is admitted before b's, both lists of one priority:
// the smaller active ÷ weight, exactly; on a tie, the next waiter that
// comes first in the zone's order.
func heapLess(a, b *heapEntry) bool {
	if a.weight == b.weight {
		if a.active != b.active {
			return a.active < b.active
		}
		return a.seq < b.seq
	}
	ah, al := bits.Mul64(a.active, b.weight)
	bh, bl := bits.Mul64(b.active, a.weight)
	if ah != bh {
		return ah < bh
	}
	if al != bl {
		return al < bl
	}
	return a.seq < b.seq
}

func (pl *prioLevel) heapPush(fq *fairQueue, tl *tenantLevel) {
	tl.hi = len(pl.heap)
	pl.heap = append(pl.heap, fq.entry(tl))
	pl.up(tl.hi)
}

// heapRemove takes the entry at i out of the heap: the hole it leaves
// sinks to a leaf along the smaller children, and the last entry fills it
// from there (it came from the bottom, so it seldom rises far).
func (pl *prioLevel) heapRemove(i int) {
	h := pl.heap
	h[i].tl.hi = -1
	last := len(h) - 1
	e := h[last]
	h[last] = heapEntry{}
	h = h[:last]
	pl.heap = h
	if i == last {
		return
	}
	for {
		c := arity*i + 1
		if c >= len(h) {
			break
		}
		for r, end := c+1, min(c+arity, len(h)); r < end; r++ {
			if heapLess(&h[r], &h[c]) {
				c = r
			}
		}
		h[i] = h[c]
		h[i].tl.hi = i
		i = c
	}
	h[i] = e
	e.tl.hi = i
	pl.up(i)
}

// rekey takes tl's key anew (its tenant's counts or its next waiter
// changed) and restores the heap.
func (pl *prioLevel) rekey(fq *fairQueue, tl *tenantLevel) {
	pl.heap[tl.hi] = fq.entry(tl)
	pl.fix(tl.hi)
}

// fix restores the heap after the key at i changed.
func (pl *prioLevel) fix(i int) {
	if !pl.down(i) {
		pl.up(i)
	}
}

// The heaps are 4-ary: half the levels of a binary heap, so a grant
// moves (and writes the index of) half as many lists, for a few more
// comparisons of entries that sit side by side in memory.
const arity = 4

func (pl *prioLevel) up(i int) {
	h := pl.heap
	e := h[i]
	for i > 0 {
		p := (i - 1) / arity
		if !heapLess(&e, &h[p]) {
			break
		}
		h[i] = h[p]
		h[i].tl.hi = i
		i = p
	}
	h[i] = e
	e.tl.hi = i
}

// down sinks the entry at i; it reports whether it moved.
func (pl *prioLevel) down(i0 int) bool {
	h := pl.heap
	e := h[i0]
	i := i0
	for {
		c := arity*i + 1
		if c >= len(h) {
			break
		}
		for r, end := c+1, min(c+arity, len(h)); r < end; r++ {
			if heapLess(&h[r], &h[c]) {
				c = r
			}
		}
		if !heapLess(&h[c], &e) {
			break
		}
		h[i] = h[c]
		h[i].tl.hi = i
		i = c
	}
	h[i] = e
	e.tl.hi = i
	return i > i0
}

// each calls f for every waiter, by priority (highest first) and within
// one in arrival order (the zone's), until f returns false.
func (fq *fairQueue) each(f func(*Waiter) bool) bool {
	before := func(a, b *Waiter) bool {
		if fq.order == LIFO {
			return a.seq > b.seq
		}
		return a.seq < b.seq
	}
	var cur []*Waiter // a heap of the lists' next waiters
	for _, pl := range fq.prios {
		cur = cur[:0]
		for _, tl := range fq.lists(pl) {
			cur = append(cur, fq.first(tl))
		}
		less := func(i, j int) bool { return before(cur[i], cur[j]) }
		sink := func(i int) {
			for {
				c := 2*i + 1
				if c >= len(cur) {
					return
				}
				if r := c + 1; r < len(cur) && less(r, c) {
					c = r
				}
				if !less(c, i) {
					return
				}
				cur[i], cur[c] = cur[c], cur[i]
				i = c
			}
		}
		for i := len(cur)/2 - 1; i >= 0; i-- {
			sink(i)
		}
		for len(cur) > 0 {
			w := cur[0]
			if !f(w) {
				return false
			}
			nx := w.next
			if fq.order == LIFO {
				nx = w.prev
			}
			if nx != nil {
				cur[0] = nx
			} else {
				last := len(cur) - 1
				cur[0] = cur[last]
				cur = cur[:last]
			}
			sink(0)
		}
	}
	return true
}

// oldest is when t's longest waiter started waiting (zero: none waits).
func (t *tenant) oldest() time.Time {
	var o time.Time
	for _, tl := range t.levels {
		if e := tl.head.enqueued; o.IsZero() || e.Before(o) {
			o = e
		}
	}
	return o
}

// TenantInfo describes one tenant of a zone with a fair share.
type TenantInfo struct {
	Tenant  string
	Weight  int
	Active  int
	Waiting int
	// OldestWait is how long its longest waiter has waited; 0 if none.
	OldestWait time.Duration
}

// tenantsByActive lists up to n tenants, those that hold the most slots
// first (then those that wait most, then by name).
func (fq *fairQueue) tenantsByActive(now time.Time, n int) []TenantInfo {
	all := make([]*tenant, 0, fq.held())
	for _, t := range fq.tenants {
		if !t.idle {
			all = append(all, t)
		}
	}
	sort.Slice(all, func(i, j int) bool {
		a, b := all[i], all[j]
		if a.active != b.active {
			return a.active > b.active
		}
		if a.waiting != b.waiting {
			return a.waiting > b.waiting
		}
		return a.name < b.name
	})
	if len(all) > n {
		all = all[:n]
	}
	out := make([]TenantInfo, len(all))
	for i, t := range all {
		out[i] = TenantInfo{Tenant: t.name, Weight: t.weight, Active: t.active, Waiting: t.waiting}
		if o := t.oldest(); !o.IsZero() {
			out[i].OldestWait = now.Sub(o)
		}
	}
	return out
}
