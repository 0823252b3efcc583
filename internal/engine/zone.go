package engine

import (
	"cmp"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/l4-connlimit/connlimit/store"
)

// A zone is one count and one set of waiting lists, shared by every handler
// that names it. The handler (the root package) drives a zone, and every
// method of Zone is safe for concurrent use.

// Observer receives every change of a zone's counts. It is called with the
// zone's lock held, so it must be quick and must not call into the zone.
// The handler's metrics are an Observer.
type Observer interface {
	// ActiveDelta is +1 when a slot is taken and -1 when it is freed.
	ActiveDelta(d int)
	// WaitingDelta is +1 when a connection joins a waiting list and -1
	// when it leaves it, for whatever reason.
	WaitingDelta(d int)
	// Admitted is called once for every connection handed on, with the
	// time it waited (0 for one admitted at once).
	Admitted(waited time.Duration)
	// Rejected is called once for every rejected connection.
	Rejected(r Reason)
	// Abandoned is called once for every waiter whose client went away.
	Abandoned()
	// LimitsChanged is called with the limits in force when the zone is
	// made and whenever they change, and whether an override is in force.
	LimitsChanged(l Limits, overridden bool)
	// OverrideEnded is called when new settings from a config end an
	// override (SetLimits).
	OverrideEnded()
	// Paused is called whenever the zone is paused or resumed, here or
	// by its fleet (a zone starts resumed).
	Paused(p bool)
}

// FairObserver is an Observer that is also told of a fair share's state
// (SetFair) whenever it changes: how many tenants wait, and Jain's
// fairness index over active ÷ weight of those tenants (1 when none
// waits). Like the Observer, it is called with the zone's lock held.
type FairObserver interface {
	FairChanged(tenantsWaiting int, index float64)
}

// Counters are the cumulative counts of a zone.
type Counters struct {
	Admitted  uint64
	Rejected  [len(store.Reasons) + 1]uint64
	Abandoned uint64
}

// RejectedTotal sums the rejections of every reason.
func (c Counters) RejectedTotal() uint64 {
	var n uint64
	for _, v := range c.Rejected {
		n += v
	}
	return n
}

// Zone is one count and one set of waiting lists (one per key value),
// shared by every handler that names it.
type Zone struct {
	name string
	obs  Observer
	fobs FairObserver // obs, if it is one

	// shared tells, without the lock, that fleet is set.
	shared atomic.Bool

	mu       sync.Mutex
	fleet    sharer // set while the zone is shared by a fleet
	limits   Limits // in force: config with override applied
	config   Limits
	override Override
	paused   bool
	def      keyState
	// fair, when set, holds the default key's waiters instead of its
	// levels: the zone shares its slots fairly between tenants (fair.go).
	// (Kept here, not in keyState, which stays one cache line.)
	fair    *fairQueue
	keys    map[string]*keyState // key values other than ""
	spare   []*keyState          // freed key states, for reuse
	active  int                  // over all keys
	waiting int                  // over all keys
	stats   Counters
	// the fair share's state as last told to fobs
	fairTold      bool
	fairWaiting   int
	fairIndexTold float64
}

// sharer is the fleet's side of a zone that several processes share
// (fleet_node.go): it decides admissions through the fleet's store, while
// the zone keeps this process's waiters and counts. The methods marked so
// are called with the zone's lock held.
type sharer interface {
	acquire(w *Waiter, wake Waker, now time.Time) (Outcome, Reason)
	free(w *Waiter) bool
	abandon(w *Waiter) bool
	// leave takes a waiter that timed out out of the fleet's line.
	leave(w *Waiter)
	// localSlots: how many slots of ks this process fills on its own
	// now. Lock held.
	localSlots(ks *keyState) int
	// forget: w left the zone's waiting list. Lock held.
	forget(w *Waiter)
	// claimable: w may take the slot granted to it now. Lock held.
	claimable(w *Waiter) bool
	// joined: the fleet's store decides admissions now. Lock held.
	joined() bool
	// pushLimits and pushPaused hand a change made here to the fleet.
	// Lock held.
	pushLimits(fromConfig bool)
	pushPaused(p bool)
}

// sharedBy is the zone's fleet side, or nil for a zone of its own.
func (z *Zone) sharedBy() sharer {
	if !z.shared.Load() {
		return nil
	}
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.fleet
}

// NewZone returns a zone with the given limits. obs may be nil.
func NewZone(name string, l Limits, obs Observer) *Zone {
	if obs == nil {
		obs = nopObserver{}
	}
	obs.LimitsChanged(l, false)
	fobs, _ := obs.(FairObserver)
	return &Zone{name: name, limits: l, config: l, obs: obs, fobs: fobs}
}

func (z *Zone) keyState(key string, create bool) *keyState {
	if key == "" {
		return &z.def
	}
	if ks, ok := z.keys[key]; ok {
		return ks
	}
	if !create {
		return nil
	}
	if z.keys == nil {
		z.keys = make(map[string]*keyState)
	}
	var ks *keyState
	if n := len(z.spare); n > 0 {
		ks = z.spare[n-1]
		z.spare = z.spare[:n-1]
	} else {
		ks = new(keyState)
	}
	ks.key = key
	z.keys[key] = ks
	return ks
}

// maxSpare bounds the freed key states kept for reuse.
const maxSpare = 64

// tidy frees ks if it holds nothing, so that memory does not grow with the
// number of distinct key values ever seen.
func (z *Zone) tidy(ks *keyState) {
	if ks == &z.def || ks.active != 0 || ks.waiting != 0 || ks.asking != 0 || ks.held != 0 {
		return
	}
	delete(z.keys, ks.key)
	ks.key = ""
	if len(z.spare) < maxSpare {
		z.spare = append(z.spare, ks)
	}
}

// Acquire takes a slot for w if one is free, or else puts w in its key's
// waiting list (wake is called when that changes), or rejects it.
func (z *Zone) Acquire(w *Waiter, wake Waker, now time.Time) (Outcome, Reason) {
	if z.shared.Load() { // a fleet zone: rare, and off the common path
		if f := z.sharedBy(); f != nil {
			return f.acquire(w, wake, now)
		}
	}
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.acquire(w, wake, now)
}

// acquire admits w if one of the slots this process may fill on its own
// is free, or queues or rejects it. Lock held.
func (z *Zone) acquire(w *Waiter, wake Waker, now time.Time) (Outcome, Reason) {
	if w.state != stateIdle {
		panic("connlimit: Waiter reused")
	}
	if z.fair != nil {
		return z.acquireFair(w, wake, now)
	}
	ks := z.keyState(w.Key, true)
	if !z.paused && ks.active < z.localSlots(ks) {
		z.admit(w, ks)
		return Admitted, ReasonNone
	}
	if r := z.full(ks); r != ReasonNone {
		z.reject(w, ks, r)
		return Rejected, r
	}
	z.enqueue(w, ks, wake, now)
	return Queued, ReasonNone
}

// acquireFair is acquire in a zone with a fair share: every connection
// counts in the default key, whatever its Key. An arrival is admitted at
// once while a slot is free, its tenant is below fair_max and no eligible
// waiter waits. Lock held.
func (z *Zone) acquireFair(w *Waiter, wake Waker, now time.Time) (Outcome, Reason) {
	ks := &z.def
	fq := z.fair
	w.tn = fq.tenant(w.Tenant)
	if !z.paused && ks.active < z.localSlots(ks) && fq.eligible(w.tn) && !fq.anyEligible() {
		z.admit(w, ks)
		return Admitted, ReasonNone
	}
	if r := z.full(ks); r != ReasonNone {
		z.reject(w, ks, r)
		return Rejected, r
	}
	z.enqueue(w, ks, wake, now)
	return Queued, ReasonNone
}

// admit gives w a slot of ks at once. Lock held.
func (z *Zone) admit(w *Waiter, ks *keyState) {
	w.ks = ks
	w.state = stateActive
	ks.active++
	z.active++
	if w.tn != nil {
		z.fair.activeDelta(w.tn, 1)
		z.fairChanged()
	}
	z.stats.Admitted++
	z.obs.ActiveDelta(1)
	z.obs.Admitted(0)
}

// full says why a newcomer of ks may not wait, or ReasonNone. Lock held.
func (z *Zone) full(ks *keyState) Reason {
	switch {
	case z.limits.MaxWaiting < 0:
		return ReasonNoWaiting
	case z.limits.MaxWaiting > 0 && ks.waiting >= z.limits.MaxWaiting:
		return ReasonQueueFull
	}
	return ReasonNone
}

// reject counts w rejected. Lock held.
func (z *Zone) reject(w *Waiter, ks *keyState, r Reason) {
	w.state = stateFreed
	z.stats.Rejected[r]++
	z.obs.Rejected(r)
	z.tidy(ks)
	z.tidyTenant(w)
}

// enqueue puts w in the waiting list of ks. Lock held.
func (z *Zone) enqueue(w *Waiter, ks *keyState, wake Waker, now time.Time) {
	w.ks = ks
	w.waker = wake
	w.enqueued = now
	w.state = stateWaiting
	if w.tn != nil {
		w.position = w.tn.ahead(w.Priority, z.limits.Order) + 1
		z.fair.push(w)
		z.fairChanged()
	} else {
		w.position = ks.ahead(w.Priority, z.limits.Order) + 1
		ks.level(w.Priority).push(w)
	}
	ks.waiting++
	z.waiting++
	z.obs.WaitingDelta(1)
	wake.Arm(z.deadline(w))
}

// localSlots is how many slots of ks this process may fill on its own:
// all of max_connections for a zone of its own; for a fleet zone none
// while the store decides, the slots the store counts for this node while
// it cannot reach the store within its lease, and its share after
// (fleet_node.go). Lock held.
func (z *Zone) localSlots(ks *keyState) int {
	if z.fleet != nil {
		return z.fleet.localSlots(ks)
	}
	return z.limits.MaxConnections
}

// deadline is when w times out; zero if never. Lock held.
func (z *Zone) deadline(w *Waiter) time.Time {
	if z.limits.WaitTimeout <= 0 {
		return time.Time{}
	}
	return w.enqueued.Add(z.limits.WaitTimeout)
}

// unlink takes w out of its waiting list. Lock held.
func (z *Zone) unlink(w *Waiter) {
	if w.lvl.tl != nil {
		z.fair.remove(w)
		z.fairChanged()
	} else {
		w.lvl.remove(w)
	}
	w.ks.waiting--
	z.waiting--
	z.obs.WaitingDelta(-1)
	if z.fleet != nil {
		z.fleet.forget(w)
	}
}

// Poll is called by a queued waiter's goroutine after its Waker fired or
// its deadline passed. It returns Admitted once a slot was granted (the
// waiter then holds it: call Free), Rejected with ReasonWaitTimeout once
// the wait timed out, Abandoned if it was abandoned meanwhile, or Queued with the deadline to wait until
// (zero: no deadline), after arming the Waker with it, while it must go
// on waiting.
func (z *Zone) Poll(w *Waiter, now time.Time) (Outcome, Reason, time.Time) {
	z.mu.Lock()
	f := z.fleet
	inFleet := f != nil && w.inFleet && f.joined()
	out, r, d := z.poll(w, now)
	z.mu.Unlock()
	if inFleet && r == ReasonWaitTimeout {
		f.leave(w) // out of the fleet's waiting list too
	}
	return out, r, d
}

// poll is Poll under the lock.
func (z *Zone) poll(w *Waiter, now time.Time) (Outcome, Reason, time.Time) {
	switch w.state {
	case stateGranted:
		if w.storeGrant && z.fleet != nil && !z.fleet.claimable(w) {
			z.ungrant(w) // the grant is void: w waits again, first in line
			z.grant(w.ks)
			if w.state == stateWaiting {
				w.waker.Arm(z.deadline(w))
				return Queued, ReasonNone, z.deadline(w)
			}
		}
		w.storeGrant = false
		w.state = stateActive
		z.stats.Admitted++
		z.obs.Admitted(now.Sub(w.enqueued))
		return Admitted, ReasonNone, time.Time{}
	case stateWaiting:
		d := z.deadline(w)
		if !d.IsZero() && !now.Before(d) {
			ks := w.ks
			z.unlink(w)
			w.state = stateFreed
			z.stats.Rejected[ReasonWaitTimeout]++
			z.obs.Rejected(ReasonWaitTimeout)
			z.tidy(ks)
			z.tidyTenant(w)
			return Rejected, ReasonWaitTimeout, time.Time{}
		}
		w.waker.Arm(d)
		return Queued, ReasonNone, d
	case stateActive:
		return Admitted, ReasonNone, time.Time{}
	case stateAbandoned:
		return Abandoned, ReasonNone, time.Time{}
	}
	return Rejected, ReasonNone, time.Time{}
}

// Wait blocks the goroutine of a waiter that was queued with Signal s as
// its Waker until it is admitted (it then holds the slot: call Free) or
// rejected (its wait timed out). If gone is closed first, the client left:
// the waiter is Abandoned. Wait keeps its own timer for the deadline that
// Poll returns.
func (z *Zone) Wait(w *Waiter, s Signal, gone <-chan struct{}) (Outcome, Reason) {
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		out, r, deadline := z.Poll(w, time.Now())
		if out != Queued {
			return out, r
		}
		var expired <-chan time.Time
		if !deadline.IsZero() {
			if timer == nil {
				timer = time.NewTimer(time.Until(deadline))
			} else {
				timer.Reset(time.Until(deadline))
			}
			expired = timer.C
		}
		select {
		case <-s:
		case <-expired:
		case <-gone:
			if z.Abandon(w) {
				return Abandoned, ReasonNone
			}
			gone = nil // admitted meanwhile: Poll says so
		}
	}
}

// Abandon is called when the client of w went away before it was handed
// on: w leaves the waiting list, or gives back the slot it was granted,
// and counts as abandoned. It reports false if w was not waiting (it is
// already active or done), in which case nothing changed.
func (z *Zone) Abandon(w *Waiter) bool {
	if z.shared.Load() { // a fleet zone: rare, and off the common path
		if f := z.sharedBy(); f != nil {
			return f.abandon(w)
		}
	}
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.abandon(w)
}

// abandon is Abandon under the lock.
func (z *Zone) abandon(w *Waiter) bool {
	ks := w.ks
	switch w.state {
	case stateWaiting:
		z.unlink(w)
	case stateGranted:
		z.freeSlot(w)
	default:
		return false
	}
	w.state = stateAbandoned
	z.stats.Abandoned++
	z.obs.Abandoned()
	z.tidy(ks)
	z.tidyTenant(w)
	return true
}

// Free gives back the slot of an admitted waiter and hands it to the next
// waiter. It reports false, changing nothing, if w holds no slot: a slot
// is freed exactly once.
func (z *Zone) Free(w *Waiter) bool {
	if z.shared.Load() { // a fleet zone: rare, and off the common path
		if f := z.sharedBy(); f != nil {
			return f.free(w)
		}
	}
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.free(w)
}

// free is Free under the lock.
func (z *Zone) free(w *Waiter) bool {
	if w.state != stateActive {
		return false
	}
	w.state = stateFreed
	ks := w.ks
	z.freeSlot(w)
	z.tidy(ks)
	z.tidyTenant(w)
	return true
}

// freeSlot gives back the slot w holds, and grants free slots to
// waiters. Lock held.
func (z *Zone) freeSlot(w *Waiter) {
	ks := w.ks
	ks.active--
	z.active--
	z.obs.ActiveDelta(-1)
	if t := w.tn; t != nil && t.fq == z.fair {
		z.fair.activeDelta(t, -1)
		z.fairChanged()
	}
	z.grant(ks)
}

// grant hands the free slots of ks this process may fill on its own to
// its waiters, in admission order. Lock held.
func (z *Zone) grant(ks *keyState) {
	if z.fair != nil && ks == &z.def {
		z.grantFair(ks)
		return
	}
	for !z.paused && ks.waiting > 0 && ks.active < z.localSlots(ks) {
		z.grantTo(ks.next(z.limits.Order))
	}
}

// grantFair is grant in a zone with a fair share: each free slot goes to
// the next waiter of the eligible tenant with the smallest active ÷
// weight, in the highest priority that has one. Lock held.
func (z *Zone) grantFair(ks *keyState) {
	for !z.paused && ks.active < z.localSlots(ks) {
		w := z.fair.next()
		if w == nil {
			return
		}
		z.grantTo(w)
	}
}

// grantTo gives the waiting w a slot and wakes it. Lock held.
func (z *Zone) grantTo(w *Waiter) {
	z.unlink(w)
	w.state = stateGranted
	w.ks.active++
	z.active++
	z.obs.ActiveDelta(1)
	if w.tn != nil {
		z.fair.activeDelta(w.tn, 1)
		z.fairChanged()
	}
	w.waker.Wake()
}

// ungrant takes back the slot granted to w and puts it back first in
// line. Lock held.
func (z *Zone) ungrant(w *Waiter) {
	ks := w.ks
	ks.active--
	z.active--
	z.obs.ActiveDelta(-1)
	w.state = stateWaiting
	ks.level(w.Priority).pushNext(w, z.limits.Order)
	ks.waiting++
	z.waiting++
	z.obs.WaitingDelta(1)
}

// tidyTenant forgets the tenant of w, in a zone with a fair share, if it
// holds nothing and waits for nothing. Lock held.
func (z *Zone) tidyTenant(w *Waiter) {
	if w.tn != nil && z.fair != nil {
		z.fair.tidy(w.tn)
	}
}

// fairChanged tells the FairObserver the fair share's state, if it
// changed. Lock held.
func (z *Zone) fairChanged() {
	if z.fobs == nil {
		return
	}
	n, j := 0, 1.0
	if fq := z.fair; fq != nil {
		n, j = fq.nWaiting, fq.index()
	}
	if z.fairTold && n == z.fairWaiting && j == z.fairIndexTold {
		return
	}
	z.fairTold, z.fairWaiting, z.fairIndexTold = true, n, j
	z.fobs.FairChanged(n, j)
}

// grantAll runs grant over every key with waiters. Lock held.
func (z *Zone) grantAll() {
	z.grant(&z.def)
	for _, ks := range z.keys {
		z.grant(ks)
	}
}

// wakeAll wakes every waiter, so that each re-reads its deadline. Lock held.
func (z *Zone) wakeAll() {
	f := func(w *Waiter) bool { w.waker.Wake(); return true }
	z.eachWaiter(f)
}

// eachWaiter calls f for every waiter, in admission order within each key
// value; with a fair share, the default key's in arrival order within
// each priority (which tenant is next depends on the slots they hold).
// Lock held.
func (z *Zone) eachWaiter(f func(*Waiter) bool) {
	if z.fair != nil {
		z.fair.each(f)
	} else {
		z.def.each(z.limits.Order, f)
	}
	for _, ks := range z.keys {
		ks.each(z.limits.Order, f)
	}
}

// SetLimits puts the settings a config gives in force for everyone,
// waiting or not. New settings (not the ones in force before) end an
// override; the same ones keep it. See apply for what a change does.
func (z *Zone) SetLimits(l Limits) {
	z.mu.Lock()
	defer z.mu.Unlock()
	if l == z.config {
		return
	}
	z.config = l
	if !z.override.IsZero() {
		z.override = Override{}
		z.obs.OverrideEnded()
	}
	z.apply(l, true)
}

// Override sets some of a zone's limits at run time, over those of the
// config; a nil field keeps the config's.
type Override struct {
	MaxConnections *int
	MaxWaiting     *int
	WaitTimeout    *time.Duration
}

// IsZero reports whether o overrides nothing.
func (o Override) IsZero() bool {
	return o.MaxConnections == nil && o.MaxWaiting == nil && o.WaitTimeout == nil
}

// on returns l with o's fields in place of its own.
func (o Override) on(l Limits) Limits {
	if o.MaxConnections != nil {
		l.MaxConnections = *o.MaxConnections
	}
	if o.MaxWaiting != nil {
		l.MaxWaiting = *o.MaxWaiting
	}
	if o.WaitTimeout != nil {
		l.WaitTimeout = *o.WaitTimeout
	}
	return l
}

// SetOverride overrides the fields that o sets, on top of any override
// already in force, and puts the result in force at once. It fails, and
// changes nothing, if the limits would be out of range.
func (z *Zone) SetOverride(o Override) error {
	z.mu.Lock()
	defer z.mu.Unlock()
	merged := z.override // copies of the values: the caller keeps its own
	if o.MaxConnections != nil {
		merged.MaxConnections = ptr(*o.MaxConnections)
	}
	if o.MaxWaiting != nil {
		merged.MaxWaiting = ptr(*o.MaxWaiting)
	}
	if o.WaitTimeout != nil {
		merged.WaitTimeout = ptr(*o.WaitTimeout)
	}
	l := merged.on(z.config)
	if err := l.Validate(); err != nil {
		return err
	}
	z.override = merged
	z.apply(l, false)
	return nil
}

func ptr[T any](v T) *T { return &v }

// ClearOverride puts the config's settings back in force; it reports
// whether there was an override.
func (z *Zone) ClearOverride() bool {
	z.mu.Lock()
	defer z.mu.Unlock()
	if z.override.IsZero() {
		return false
	}
	z.override = Override{}
	z.apply(z.config, false)
	return true
}

// apply puts l in force, for the fleet too when the zone is shared: more
// slots admit waiters at once; fewer slots cut
// nobody (new admissions wait until the count is below the new limit); a
// new wait_timeout counts from when each waiter started waiting; a smaller
// max_waiting rejects newcomers until the list is shorter, and rejects
// nobody already waiting. fromConfig: l is a config's, not an operator's
// override. Lock held.
func (z *Zone) apply(l Limits, fromConfig bool) {
	z.inForce(l)
	if z.fleet != nil {
		z.fleet.pushLimits(fromConfig) // the fleet's, for every node
	}
}

// settings are the zone's word on a fleet's limits. Lock held.
func (z *Zone) settings(fromConfig bool) *store.Settings {
	return &store.Settings{Limits: z.limits, Config: z.config, FromConfig: fromConfig, Fair: z.fairShare()}
}

// fairShare is the zone's fair share as the fleet's store takes it. Lock
// held.
func (z *Zone) fairShare() store.FairShare {
	if z.fair == nil {
		return store.FairShare{}
	}
	return store.FairShare{On: true, Weights: maps.Clone(z.fair.cfg.Weights), Max: z.fair.cfg.Max}
}

// inForce puts l in force here (see apply). Lock held.
func (z *Zone) inForce(l Limits) {
	old := z.limits
	z.limits = l
	z.obs.LimitsChanged(l, !z.override.IsZero())
	if fq := z.fair; fq != nil && l.Order != old.Order {
		fq.setConfig(fq.cfg, l.Order)
		z.fairChanged()
	}
	if l.WaitTimeout != old.WaitTimeout {
		z.wakeAll()
	}
	if l.MaxConnections > old.MaxConnections {
		z.grantAll()
	}
}

// SetPaused pauses or resumes admission, in the whole fleet when the zone
// is shared. While paused, nobody new is admitted: every new and waiting
// connection waits (bounds and timeouts still apply) and active ones are
// untouched. Resuming admits at once.
func (z *Zone) SetPaused(p bool) {
	z.mu.Lock()
	defer z.mu.Unlock()
	z.setPaused(p)
	if z.fleet != nil {
		z.fleet.pushPaused(p)
	}
}

// setPaused pauses or resumes admission here. Lock held.
func (z *Zone) setPaused(p bool) {
	z.paused = p
	z.obs.Paused(p)
	if !p {
		z.grantAll()
	}
}

// SetFair puts a fair share among tenants in force (f.On()), changes its
// weights and fair_max, or turns it off, for those who wait too. Turning
// it on puts the waiters there are in their tenant's lists (Waiter.Tenant:
// "" for those that came without one), in their order; turning it off puts
// every waiter back in one line per priority, in arrival order.
// Connections that hold a slot when it is turned on count in the zone but
// for no tenant. A fair share counts every connection in the default key,
// whatever its Key; the handler never gives both. On a fleet zone, the
// fleet's store shares the slots between tenants: the node
// registers again with its slots by tenant, and the config's fair share
// goes to the store. f must be valid (Fair.Validate).
func (z *Zone) SetFair(f Fair) {
	f.Weights = maps.Clone(f.Weights) // the caller keeps its own
	z.mu.Lock()
	defer z.mu.Unlock()
	ks := &z.def
	switch {
	case !f.On() && z.fair == nil:
		return
	case !f.On():
		z.fairOff(ks)
	case z.fair == nil:
		z.fairOn(ks, f)
	default:
		z.fair.setConfig(f, z.limits.Order)
	}
	z.fairChanged()
	z.grantAll() // a higher fair_max, or waiters that were not eligible
	if n, ok := z.fleet.(*fleetNode); ok {
		n.repair = true
		n.pushLimits(true)
	}
}

// fairOn moves the waiters of ks into a new fair queue. Lock held.
func (z *Zone) fairOn(ks *keyState, f Fair) {
	fq := newFairQueue(f, z.limits.Order)
	z.fair = fq
	for _, l := range ks.levels {
		for l.head != nil {
			w := l.head
			l.remove(w)
			w.tn = fq.tenant(w.Tenant)
			fq.push(w)
		}
	}
	ks.levels = nil
}

// fairOff moves the waiters of ks's fair queue back to the lists of ks,
// in arrival order within each priority. Lock held.
func (z *Zone) fairOff(ks *keyState) {
	fq := z.fair
	var ws []*Waiter
	for _, t := range fq.tenants {
		for _, tl := range t.levels {
			for w := tl.head; w != nil; w = w.next {
				ws = append(ws, w)
			}
		}
	}
	slices.SortFunc(ws, func(a, b *Waiter) int {
		if a.Priority != b.Priority {
			return cmp.Compare(b.Priority, a.Priority)
		}
		return cmp.Compare(a.seq, b.seq)
	})
	z.fair = nil
	for _, w := range ws {
		w.prev, w.next, w.lvl, w.tn = nil, nil, nil, nil
		ks.level(w.Priority).push(w)
	}
}

// WaiterInfo describes one waiter in a Snapshot.
type WaiterInfo struct {
	Remote   string
	Key      string
	Tenant   string // with a fair share
	Priority int
	Waited   time.Duration
}

// Snapshot is a zone's state at one moment.
type Snapshot struct {
	Name   string
	Limits Limits // in force
	// Config is what the config sets, and Override what is set over it
	// at run time (zero: nothing).
	Config     Limits
	Override   Override
	Paused     bool
	Active     int
	Waiting    int
	OldestWait time.Duration
	Counters   Counters
	// Keys is how many key values other than the empty one the zone
	// keeps state for: those that hold a slot or wait.
	Keys int
	// Waiters holds up to the number asked for, in admission order within
	// each key value (keys in no particular order); with a fair share, in
	// arrival order within each priority.
	Waiters []WaiterInfo
	// Fair is the fair share in force (zero: none). Then Tenants is how
	// many tenants hold a slot or wait, TenantsWaiting how many wait, and
	// FairIndex Jain's fairness index over active ÷ weight of those that
	// wait (1 when none does).
	Fair           Fair
	Tenants        int
	TenantsWaiting int
	FairIndex      float64
	// TenantList holds up to the number of tenants asked for, those that
	// hold the most slots first.
	TenantList []TenantInfo
}

// Snapshot returns the zone's counts and up to maxWaiters of its waiters.
func (z *Zone) Snapshot(now time.Time, maxWaiters int) Snapshot {
	return z.SnapshotTenants(now, maxWaiters, 0)
}

// SnapshotTenants is Snapshot, and with a fair share up to maxTenants of
// its tenants too.
func (z *Zone) SnapshotTenants(now time.Time, maxWaiters, maxTenants int) Snapshot {
	z.mu.Lock()
	defer z.mu.Unlock()
	s := Snapshot{
		Name:     z.name,
		Limits:   z.limits,
		Config:   z.config,
		Override: z.override,
		Paused:   z.paused,
		Active:   z.active,
		Waiting:  z.waiting,
		Counters: z.stats,
		Keys:     len(z.keys),
	}
	if fq := z.fair; fq != nil {
		s.Fair = fq.cfg
		s.Fair.Weights = maps.Clone(fq.cfg.Weights)
		s.Tenants = fq.held()
		s.TenantsWaiting = fq.nWaiting
		s.FairIndex = fq.index()
		if maxTenants > 0 {
			s.TenantList = fq.tenantsByActive(now, maxTenants)
		}
	}
	visit := func(w *Waiter) bool {
		if d := now.Sub(w.enqueued); d > s.OldestWait {
			s.OldestWait = d
		}
		if len(s.Waiters) < maxWaiters {
			wi := WaiterInfo{Key: w.Key, Priority: w.Priority, Waited: now.Sub(w.enqueued)}
			if w.tn != nil {
				wi.Tenant = w.Tenant
			}
			if w.Remote != nil {
				wi.Remote = w.Remote.String()
			}
			s.Waiters = append(s.Waiters, wi)
		}
		return true
	}
	z.eachWaiter(visit)
	return s
}

// Name is the zone's name; "" for a handler's private zone.
func (z *Zone) Name() string { return z.name }

// Counts returns the number of active and waiting connections.
func (z *Zone) Counts() (active, waiting int) {
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.active, z.waiting
}

type nopObserver struct{}

func (nopObserver) ActiveDelta(int)            {}
func (nopObserver) WaitingDelta(int)           {}
func (nopObserver) Admitted(time.Duration)     {}
func (nopObserver) Rejected(Reason)            {}
func (nopObserver) Abandoned()                 {}
func (nopObserver) LimitsChanged(Limits, bool) {}
func (nopObserver) OverrideEnded()             {}
func (nopObserver) Paused(bool)                {}
