package engine

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/l4-connlimit/connlimit/store"
)

// This process's side of a fleet zone: the zone's connections wait here,
// in the zone's own lists, unread and watched as in any zone, while the
// store (package store) counts the fleet's slots and orders its waiting lists.
// A connection asks the store once (Take); a waiter's grant comes pushed
// through the store (NextGrant); a freed slot goes back in one call
// (Give). A loop renews the node's lease, learns the fleet's limits and
// pause, and registers the node anew whenever the store lost it.
//
// While the store cannot be reached the zone admits on its own, up to the
// policy's share (store.UnreachablePolicy); while the node is registered nowhere
// (its lease lapsed) it admits nobody new until it has registered what it
// serves and who waits here.

// Fleet is how a zone joins a fleet.
type Fleet struct {
	// Open opens the zone's shared state in the store, without I/O.
	Open func(zone string) (store.Store, error)
	// Unreachable is what to do while the store cannot be reached.
	Unreachable store.UnreachablePolicy
	// Differs names the first store setting in which other differs from
	// this one ("" if none), without its value: handlers of one config
	// must give the same store, and a config that gives another moves the
	// zone to it.
	Differs func(other *Fleet) string
	// Store is what Differs compares: the store's configuration.
	Store any
}

// FleetObserver is told of a fleet zone's store. The zone's Observer may
// implement it (the metrics do); it is not called with the zone's lock.
type FleetObserver interface {
	// StoreOp: one round trip to the store, and its error.
	StoreOp(op string, took time.Duration, err error)
	// StoreReached: the node's view of the store after each renewal or
	// registration; err is why it failed (nil: reachable, st is fresh).
	StoreReached(st store.State, err error)
}

type fleetMode uint8

const (
	// fleetJoining: not registered in the store (new, or its lease
	// lapsed): nobody new is admitted until Register.
	fleetJoining fleetMode = iota
	// fleetJoined: the store decides every admission.
	fleetJoined
	// fleetHolding: the renewals fail, but the node's lease surely runs
	// still: it keeps the slots the store counts for it (keyState.held)
	// and hands them to its own waiters, and registers anew once the
	// store answers.
	fleetHolding
	// fleetUnreachable: the renewals fail and the node's lease has run
	// out: it admits up to its share on its own, and registers anew once
	// the store answers.
	fleetUnreachable
)

func (m fleetMode) String() string {
	switch m {
	case fleetJoined:
		return "registered"
	case fleetHolding:
		return "holding"
	case fleetUnreachable:
		return "unreachable"
	}
	return "registering"
}

// storeTimeout bounds one store operation, so that an unreachable store
// costs a connection at most this long once: the node then falls back.
const storeTimeout = 2 * time.Second

// fleetNode is the link of a zone to its fleet. Store calls that change
// what the store counts for this node (Take, Give, Leave) hold gate for
// reading; Register holds it for writing, so that the state it sends is
// not changed under it by a call in flight. The lock order is gate, then
// the zone's lock.
type fleetNode struct {
	z      *Zone
	store  store.Store
	spec   Fleet
	gate   sync.RWMutex
	kick   chan struct{} // renew (and register) now
	ctx    context.Context
	cancel context.CancelFunc
	loops  sync.WaitGroup

	// Under the zone's lock:
	mode    fleetMode
	epoch   uint64              // of the latest Register
	lastID  uint64              // tickets' ids
	waiting map[uint64]*Waiter  // this node's waiters by ticket id
	asking  map[uint64]struct{} // tickets whose Take is in flight
	early   map[uint64]struct{} // grants that came while their Take was in flight
	repair  bool                // the store may count wrongly for this node: Register
	rejoin  time.Time           // when it last found it must register again
	state   store.State         // as last learned
	learned time.Time           // when
	lastErr error
	// leaseUntil: until then the store surely keeps this node registered:
	// the send time of its last renewal (or registration) that succeeded,
	// plus the lease, by this process's monotonic clock. leaseOver: from
	// then on the store has surely let the lease run out: the time its
	// answer came, plus the lease and a hundredth of it for the clocks'
	// drift. A node that holds admits beyond its slots only after that.
	leaseUntil time.Time
	leaseOver  time.Time
	gen        string          // the store's generation, as last learned
	acks       []store.Ticket  // grants taken in since the last renewal
	inFlight   int             // Take, Give and Leave calls under way
	opGen      uint64          // counts those calls: a renewal's check is exact only if none ran
	limits     *store.Settings // to write to the store: newest wins
	paused     *bool           // likewise
	nodesSeen  int
	// draining: no config uses the zone any more (drainFleet). Its
	// waiters leave the fleet's line, so that they hold up no other
	// node's; they get the slots its own connections free, and every
	// other slot it frees goes back.
	draining bool
	left     bool // drained, it deregistered: it renews no more
}

// joinFleet links z to its fleet and starts the node's loops. The store
// is not reached here: the loop registers at once, and until then nobody
// new is admitted.
func (z *Zone) joinFleet(spec Fleet) error {
	st, err := spec.Open(z.name)
	if err != nil {
		return err
	}
	n := newFleetNode(z, st, spec)
	z.mu.Lock()
	// This node's config is the newest word on the fleet's limits, unless
	// the fleet has the same config already (an override stays).
	n.limits = z.settings(z.override.IsZero())
	// Waiters already here (a zone that was alone) join the fleet's line
	// at the first Register, in the order they arrived.
	var ws []*Waiter
	visit := func(w *Waiter) bool { ws = append(ws, w); return true }
	z.def.each(z.limits.Order, visit)
	for _, ks := range z.keys {
		ks.each(z.limits.Order, visit)
	}
	slices.SortStableFunc(ws, func(a, b *Waiter) int { return a.enqueued.Compare(b.enqueued) })
	for _, w := range ws {
		n.lastID++
		w.ticket = n.lastID
		n.waiting[w.ticket] = w
	}
	z.fleet = n
	z.shared.Store(true)
	z.mu.Unlock()
	n.start()
	return nil
}

func newFleetNode(z *Zone, st store.Store, spec Fleet) *fleetNode {
	ctx, cancel := context.WithCancel(context.Background())
	return &fleetNode{
		z: z, store: st, spec: spec,
		kick: make(chan struct{}, 1), ctx: ctx, cancel: cancel,
		waiting: map[uint64]*Waiter{}, asking: map[uint64]struct{}{}, early: map[uint64]struct{}{},
	}
}

func (n *fleetNode) start() {
	n.loops.Add(2)
	go n.renewals()
	go n.grants()
}

// moveFleet moves z from old's store to spec's (a reload changed a store
// setting: the lease, local_share, a password) without the zone ever
// counting alone on the way, which would admit up to max_connections
// here: the new node starts registering, admitting nobody new until its
// store decides, with the slots the zone holds and its waiters, whose
// tickets keep their ids (and, in the same store, their places).
func (z *Zone) moveFleet(old *fleetNode, spec Fleet) error {
	st, err := spec.Open(z.name)
	if err != nil {
		return err
	}
	old.cancel()
	old.loops.Wait()
	old.gate.Lock() // no store call of a connection is in flight
	defer old.gate.Unlock()
	_ = old.store.Close()
	n := newFleetNode(z, st, spec)
	z.mu.Lock()
	n.limits = z.settings(z.override.IsZero())
	n.lastID = old.lastID
	for id, w := range old.waiting {
		w.inFleet = false
		n.waiting[id] = w
	}
	old.mode = fleetJoining // late calls go to the new node (sharedBy)
	n.repair = true
	z.fleet = n
	z.mu.Unlock()
	n.start()
	return nil
}

// setFleet shares z through fleet's store, or counts it here alone (nil).
// The same store as now changes nothing; another one replaces it
// (moveFleet).
func (z *Zone) setFleet(fleet *Fleet) error {
	n := z.node()
	switch {
	case n == nil && fleet == nil:
		return nil
	case n != nil && fleet != nil && n.spec.Differs(fleet) == "":
		n.undrain()
		return nil
	case n != nil && fleet != nil:
		return z.moveFleet(n, *fleet)
	}
	z.leaveFleet()
	if fleet == nil {
		return nil
	}
	return z.joinFleet(*fleet)
}

// node is the zone's fleet node, or nil.
func (z *Zone) node() *fleetNode {
	n, _ := z.sharedBy().(*fleetNode)
	return n
}

// drainFleet is called when no config uses z any more, but it still has
// connections: the node takes its waiters' tickets out of the fleet's
// line at once (at the registration it kicks), and serves them with the
// slots its own connections free. The zone leaves the fleet once drained
// (Registry.sweep), or undrains if a config uses it again.
func (z *Zone) drainFleet() {
	n := z.node()
	if n == nil {
		return
	}
	z.mu.Lock()
	defer z.mu.Unlock()
	if !n.draining {
		n.draining, n.repair = true, true
		n.kickNow()
	}
}

// undrain puts the node's waiters back in the fleet's line: a config uses
// the zone again.
func (n *fleetNode) undrain() {
	n.z.mu.Lock()
	defer n.z.mu.Unlock()
	n.undrainLocked()
}

// undrainLocked is undrain with the zone's lock held: a node that had left
// registers again. Zone lock held.
func (n *fleetNode) undrainLocked() {
	if n.draining {
		if n.left {
			n.mode = fleetJoining
		}
		n.draining, n.left, n.repair = false, false, true
		n.kickNow()
	}
}

// leaveFleet unlinks z from its fleet: its loops end and the store is
// closed. A zone that holds nothing (it drained: its config is gone, or
// Caddy stops) deregisters first, so that the others do not wait out its
// lease; otherwise its registration lapses with its lease, and the others
// take over its slots then. The zone counts alone from here on.
func (z *Zone) leaveFleet() {
	n := z.node()
	if n == nil {
		return
	}
	n.cancel()
	n.loops.Wait()
	if a, w := z.Counts(); a == 0 && w == 0 {
		// n.ctx is done: the call gets a context of its own.
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
		err := n.store.Deregister(ctx)
		cancel()
		n.observe("deregister", start, err)
	}
	_ = n.store.Close()
	n.gate.Lock() // no store call of a connection is in flight
	defer n.gate.Unlock()
	z.mu.Lock()
	defer z.mu.Unlock()
	z.fleet = nil
	z.shared.Store(false)
	for _, w := range n.waiting {
		w.inFleet = false
	}
	z.grantAll()
}

// forget implements sharer.
func (n *fleetNode) forget(w *Waiter) { delete(n.waiting, w.ticket) }

// claimable implements sharer. A slot granted by the store is the node's
// only while its lease runs: a node that wakes from a stall past its lease
// (a grant taken in before, its waiter not yet run) has lost it, to a
// waiter elsewhere; its waiter waits again, and the Register that follows
// puts it back in the fleet's line. Slots granted here on the node's own
// (holding, its share) are its own. Lock held.
func (n *fleetNode) claimable(w *Waiter) bool {
	w.storeGrant = false
	switch {
	case n.mode == fleetHolding, n.mode == fleetJoined && !n.outlived():
		return true
	case n.mode == fleetJoined:
		n.mode, n.rejoin = fleetJoining, time.Now()
	}
	w.ks.held--
	n.waiting[w.ticket] = w
	w.inFleet = false
	n.repair = true
	n.kickNow()
	return false
}

// joined implements sharer.
func (n *fleetNode) joined() bool { return n.mode == fleetJoined }

// localSlots is how many slots of ks the node fills on its own: none
// while the store decides or the node is registering; while it holds, the
// slots the store counts for it; its share once its lease ran out. Zone
// lock held.
func (n *fleetNode) localSlots(ks *keyState) int {
	switch {
	case n.mode == fleetHolding, n.mode == fleetJoined && n.draining:
		return ks.held
	case n.mode == fleetUnreachable:
		return n.spec.Unreachable.Admits(n.z.limits.MaxConnections, n.nodesSeen)
	}
	return 0
}

// begin and end bracket a Take, Give or Leave call. Zone lock held.
func (n *fleetNode) begin() { n.inFlight++; n.opGen++ }
func (n *fleetNode) end()   { n.inFlight-- }

// acquire is Zone.Acquire for a fleet zone: one Take, unless the store
// cannot be asked now.
func (n *fleetNode) acquire(w *Waiter, wake Waker, now time.Time) (Outcome, Reason) {
	z := n.z
	n.gate.RLock()
	z.mu.Lock()
	if z.fleet != sharer(n) { // left the fleet, or moved to another store, meanwhile
		z.mu.Unlock()
		n.gate.RUnlock()
		return z.Acquire(w, wake, now)
	}
	defer n.gate.RUnlock()
	defer z.mu.Unlock()
	n.lastID++
	w.ticket = n.lastID
	// A connection that came in after its config went (a rare race): the
	// zone is the fleet's again, until the registry sweeps it.
	n.undrainLocked()
	if n.mode != fleetJoined {
		return n.acquireHere(w, wake, now)
	}
	if w.state != stateIdle {
		panic("connlimit: Waiter reused")
	}
	ks := z.keyState(w.Key, true)
	if z.fair != nil {
		ks, w.tn = &z.def, z.fair.tenant(w.Tenant)
	}
	ks.asking++
	n.asking[w.ticket] = struct{}{}
	n.begin()
	key := z.storeKey(w)
	z.mu.Unlock()
	out, r, err := n.take(store.Ticket{ID: w.ticket, Key: key, Priority: w.Priority})
	z.mu.Lock()
	n.end()
	if w.tn != nil && w.tn.fq != z.fair { // the fair share changed meanwhile
		w.tn = nil
		if z.fair != nil {
			w.tn = z.fair.tenant(w.Tenant)
		}
	}
	ks.asking--
	delete(n.asking, w.ticket)
	_, granted := n.early[w.ticket]
	delete(n.early, w.ticket)
	if err != nil {
		// It waits here, and joins the fleet's line at the Register that
		// repairs whatever the failed call did.
		n.failed(err)
		return n.acquireHere(w, wake, now)
	}
	switch out {
	case Admitted:
		z.admit(w, ks)
		ks.held++
	case Rejected:
		z.reject(w, ks, r)
	default:
		z.enqueue(w, ks, wake, now)
		w.inFleet = true
		n.waiting[w.ticket] = w
		if granted {
			z.grantTo(w)
			w.storeGrant = true
			ks.held++
		}
	}
	return out, r
}

// acquireHere decides on this node alone (the slots it holds, its share,
// or nobody while it registers). A waiter joins the fleet's line at the
// next Register, which also tells the store what was admitted here.
// Zone lock held.
func (n *fleetNode) acquireHere(w *Waiter, wake Waker, now time.Time) (Outcome, Reason) {
	out, r := n.z.acquire(w, wake, now)
	if out == Queued {
		n.waiting[w.ticket] = w
	}
	if out != Rejected {
		n.repair = true
	}
	return out, r
}

// free is Zone.Free for a fleet zone.
func (n *fleetNode) free(w *Waiter) bool {
	z := n.z
	n.gate.RLock()
	defer n.gate.RUnlock()
	z.mu.Lock()
	if z.fleet != sharer(n) { // left the fleet, or moved to another store, meanwhile
		z.mu.Unlock()
		return z.Free(w)
	}
	ks, key := w.ks, z.storeKey(w)
	if !z.free(w) {
		z.mu.Unlock()
		return false
	}
	give := n.giveBack(ks)
	n.drained()
	z.mu.Unlock()
	if give {
		n.give(key)
	}
	return true
}

// storeKey is the key value the fleet's store counts w under: its tenant
// in a zone with a fair share (the store shares the zone's slots between
// tenants fleet-wide), else its key value. Zone lock held.
func (z *Zone) storeKey(w *Waiter) string {
	if w.tn != nil && w.tn.fq == z.fair { // a tenant of the fair share in force
		return w.tn.name
	}
	return w.Key
}

// drained kicks the renewals, which deregister a draining node that has
// no connection left. Zone lock held.
func (n *fleetNode) drained() {
	if n.draining && n.z.active == 0 && n.z.waiting == 0 {
		n.kickNow()
	}
}

// giveBack decides what becomes of a slot of ks freed here: registered,
// the node gives it back to the fleet (true); holding, it keeps it, and
// the zone has handed it to its own next waiter if one waits; otherwise
// the store learns at the next Register. Zone lock held.
func (n *fleetNode) giveBack(ks *keyState) bool {
	switch n.mode {
	case fleetJoined:
		if n.draining && ks.active >= ks.held {
			return false // the zone handed it to a waiter of its own
		}
		ks.held--
		n.z.tidy(ks)
		n.begin()
		return true
	case fleetUnreachable, fleetJoining:
		n.repair = true
	}
	return false
}

// abandon is Zone.Abandon for a fleet zone: a waiter leaves the fleet's
// line; a grant not yet claimed goes back to the fleet.
func (n *fleetNode) abandon(w *Waiter) bool {
	z := n.z
	n.gate.RLock()
	defer n.gate.RUnlock()
	z.mu.Lock()
	if z.fleet != sharer(n) { // left the fleet, or moved to another store, meanwhile
		z.mu.Unlock()
		return z.Abandon(w)
	}
	state, inFleet, ks, key := w.state, w.inFleet, w.ks, z.storeKey(w)
	if !z.abandon(w) {
		z.mu.Unlock()
		return false
	}
	var leave, give bool
	switch {
	case state == stateGranted:
		give = n.giveBack(ks)
	case n.mode != fleetJoined:
		n.repair = true
	case inFleet:
		leave = true
		n.begin()
	}
	n.drained()
	z.mu.Unlock()
	switch {
	case leave:
		n.leaveLocked(w, key)
	case give:
		n.give(key)
	}
	return true
}

// leave takes a waiter that timed out out of the fleet's line.
func (n *fleetNode) leave(w *Waiter) {
	n.gate.RLock()
	defer n.gate.RUnlock()
	n.z.mu.Lock()
	n.begin()
	key := n.z.storeKey(w)
	n.z.mu.Unlock()
	n.leaveLocked(w, key)
}

// leaveLocked: gate held, and begin called. If the ticket was granted
// meanwhile, its grant is on its way, and grant gives it back.
func (n *fleetNode) leaveLocked(w *Waiter, key string) {
	err := n.call("leave", func(ctx context.Context) error {
		_, err := n.store.Leave(ctx, store.Ticket{ID: w.ticket, Key: key, Priority: w.Priority})
		return err
	})
	n.z.mu.Lock()
	n.end()
	if err != nil {
		n.failed(err)
	}
	n.z.mu.Unlock()
}

func (n *fleetNode) take(t store.Ticket) (out Outcome, r Reason, err error) {
	err = n.call("take", func(ctx context.Context) (err error) {
		out, r, err = n.store.Take(ctx, t)
		return err
	})
	return out, r, err
}

// give frees a slot of key in the store. Gate held, and begin called.
// Whether or not a failed Give ran, the node no longer counts the slot:
// the store counts at least as many for it, which keeps the bound, and
// the Register that follows corrects it.
func (n *fleetNode) give(key string) {
	err := n.call("give", func(ctx context.Context) error { return n.store.Give(ctx, key) })
	n.z.mu.Lock()
	n.end()
	if err != nil {
		n.failed(err)
	}
	n.z.mu.Unlock()
}

// failed notes an error of one Take, Give or Leave: the node registers
// anew at once, to repair what the call may have left wrong. One call's
// error says little of the store: only the renewals decide that it cannot
// be reached (sync). Lapsed, the node admits nobody new until it has
// registered, unless its lease surely runs still (the store lost its
// data): then it holds. Zone lock held.
func (n *fleetNode) failed(err error) {
	n.lastErr = err
	n.repair = true
	switch {
	case errors.Is(err, store.ErrLapsed) && n.mode == fleetJoined && time.Now().Before(n.leaseUntil):
		n.hold()
	case errors.Is(err, store.ErrLapsed) || errors.Is(err, store.ErrNoLimits) || n.outlived():
		n.mode, n.rejoin = fleetJoining, time.Now()
	}
	n.kickNow()
}

// hold: the node keeps the slots the store counts for it and hands them
// to its own waiters, until its lease runs out. Zone lock held.
func (n *fleetNode) hold() {
	n.mode = fleetHolding
	n.repair = true
	n.z.grantAll()
}

// call runs one store operation, bounded by storeTimeout, and tells the
// observer how it went.
func (n *fleetNode) call(op string, f func(ctx context.Context) error) error {
	return n.callWithin(op, storeTimeout, f)
}

// callWithin is call with a timeout of its own: a registration of many
// waiters takes several calls (store.Store.Register).
func (n *fleetNode) callWithin(op string, timeout time.Duration, f func(ctx context.Context) error) error {
	start := time.Now()
	ctx, cancel := context.WithTimeout(n.ctx, timeout)
	err := f(ctx)
	cancel()
	n.observe(op, start, err)
	return err
}

// outlived: the node is registered, but its lease has run out by its own
// clock: its renewals did not run (the process was
// stopped, or starved), so its lease ran out and the others may have
// taken over its slots. An error now, often a deadline that passed while
// it was stopped, does not tell that the store is unreachable: the node
// admits nobody new until it has registered again, and falls back on its
// share only if that fails too. Zone lock held.
func (n *fleetNode) outlived() bool {
	return n.mode == fleetJoined && !n.leaseUntil.IsZero() && time.Now().After(n.leaseUntil)
}

func (n *fleetNode) observe(op string, start time.Time, err error) {
	if fo, ok := n.z.obs.(FleetObserver); ok {
		fo.StoreOp(op, time.Since(start), err)
	}
}

// pushLimits has the fleet take the zone's limits (newest wins), at once:
// a config's, or an operator's override. Zone lock held.
func (n *fleetNode) pushLimits(fromConfig bool) {
	n.limits = n.z.settings(fromConfig)
	n.kickNow()
}

// pushPaused pauses or resumes the fleet, at once. Zone lock held.
func (n *fleetNode) pushPaused(p bool) {
	n.paused = &p
	n.kickNow()
}

func (n *fleetNode) kickNow() {
	select {
	case n.kick <- struct{}{}:
	default:
	}
}

// grants hands the grants the store pushes to this node's waiters.
func (n *fleetNode) grants() {
	defer n.loops.Done()
	for {
		t, err := n.store.NextGrant(n.ctx)
		if n.ctx.Err() != nil || errors.Is(err, store.ErrClosed) {
			return
		}
		if err != nil {
			continue // the store says so at most about once a second
		}
		n.grant(t)
	}
}

// grant gives the slot of one grant to its waiter, or back to the fleet
// when nobody here takes it (the waiter left, or was admitted on its own).
func (n *fleetNode) grant(t store.Ticket) {
	z := n.z
	n.gate.RLock()
	defer n.gate.RUnlock()
	z.mu.Lock()
	n.acks = append(n.acks, t) // the store forgets it at the next renewal
	if t.Epoch != n.epoch {
		z.mu.Unlock() // made before the latest Register, which counted it anew
		return
	}
	if _, ok := n.asking[t.ID]; ok {
		n.early[t.ID] = struct{}{} // its Take's answer is on its way
		z.mu.Unlock()
		return
	}
	if w := n.waiting[t.ID]; w != nil && w.state == stateWaiting {
		z.grantTo(w)
		w.storeGrant = true
		w.ks.held++
		z.mu.Unlock()
		return
	}
	n.begin()
	z.mu.Unlock()
	n.give(t.Key)
}

// renewals renews the lease every RenewEvery, and at once when kicked:
// it writes what this node changed (limits, pause), registers when the
// store lost the node or its count may be wrong, and learns the fleet's
// limits, pause and totals. While the node holds, it also wakes when its
// lease runs out.
func (n *fleetNode) renewals() {
	defer n.loops.Done()
	every := store.RenewEvery(n.store.Lease())
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-t.C:
		case <-n.kick:
			t.Stop()
		}
		n.sync()
		n.z.mu.Lock()
		next := every
		if n.mode == fleetHolding {
			next = min(next, max(time.Until(n.leaseOver), 0))
		}
		n.z.mu.Unlock()
		t.Reset(next)
	}
}

func (n *fleetNode) sync() {
	z := n.z
	started := time.Now()
	z.mu.Lock()
	if n.mode == fleetHolding && !started.Before(n.leaseOver) {
		n.mode = fleetUnreachable // the lease ran out: the policy's share
		z.grantAll()
	}
	if n.draining && z.active == 0 && z.waiting == 0 && n.mode == fleetJoined && n.inFlight == 0 {
		// drained: the others need not wait for its lease to run out
		left := n.left
		z.mu.Unlock()
		if !left {
			err := n.call("deregister", func(ctx context.Context) error { return n.store.Deregister(ctx) })
			z.mu.Lock()
			n.left = err == nil && n.draining
			z.mu.Unlock()
		}
		return
	}
	limits, paused := n.limits, n.paused
	register := n.mode != fleetJoined || n.repair
	counts := n.counts()
	opGen := n.opGen
	z.mu.Unlock()

	// Renew first, even to register: Register holds the gate, which
	// holds up every arrival, so it is sent only once the store answers.
	err := n.write(limits, paused)
	var st store.State
	if err == nil {
		err = n.call("renew", func(ctx context.Context) (err error) {
			st, err = n.store.Renew(ctx, counts)
			return err
		})
	}
	z.mu.Lock()
	if err != nil {
		n.acks = append(counts.Acks, n.acks...) // acknowledged at the next renewal
	} else {
		if !st.Lapsed {
			n.leased(started)
		}
		// The store lost the node, replayed an older registration, or
		// counts other slots or tickets for it than it holds (a reply
		// lost, a failover that lost writes, a garbled count): repair.
		register = register || st.Lapsed || st.Epoch != n.epoch ||
			st.Repair && counts.Check && n.opGen == opGen
	}
	z.mu.Unlock()
	if err == nil && register {
		var regStarted time.Time
		regStarted, st, err = n.register()
		if err == nil {
			z.mu.Lock()
			n.leased(regStarted)
			z.mu.Unlock()
		}
	}
	if n.ctx.Err() != nil {
		return // the zone is leaving the fleet (leaveFleet): its store is closing, not unreachable
	}
	z.mu.Lock()
	if err != nil {
		n.lastErr = err
		switch {
		case n.outlived():
			n.mode, n.rejoin = fleetJoining, time.Now()
			n.kickNow()
		case n.mode == fleetJoining && started.Before(n.rejoin):
			// Sent before the node knew it must register again (a stall
			// ran its deadline out): it says nothing of the store.
			n.kickNow()
			z.mu.Unlock()
			return
		case n.mode == fleetJoined && time.Now().Before(n.leaseUntil):
			n.hold() // its lease runs still: it keeps what it holds, no more
		case n.mode == fleetHolding && time.Now().Before(n.leaseOver):
			// it holds on until the store has surely let its lease run out
		case n.mode == fleetJoined || n.mode == fleetHolding || !errors.Is(err, store.ErrLapsed):
			n.mode = fleetUnreachable
		}
		n.z.grantAll()
		z.mu.Unlock()
		n.reached(st, err)
		return
	}
	n.learn(st)
	z.mu.Unlock()
	n.reached(st, nil)
}

// leased notes a renewal or registration sent at sent that the store
// answered now. Zone lock held.
func (n *fleetNode) leased(sent time.Time) {
	lease := n.store.Lease()
	n.leaseUntil = sent.Add(lease)
	n.leaseOver = time.Now().Add(lease + lease/100)
}

// counts is what a renewal reports: the node's totals and epoch, the
// grants it took in, and, if no Take, Give or Leave is under way, the
// slots and tickets the store should count for it. Zone lock held.
func (n *fleetNode) counts() store.NodeState {
	z := n.z
	c := store.NodeState{Active: z.active, Waiters: z.waiting, Epoch: n.epoch, Acks: n.acks}
	n.acks = nil
	if n.mode != fleetJoined || n.inFlight > 0 || n.repair {
		return c
	}
	c.Check = true
	each := func(ks *keyState) { c.HeldTotal += ks.held }
	each(&z.def)
	for _, ks := range z.keys {
		each(ks)
	}
	for _, w := range n.waiting {
		if w.inFleet && w.state == stateWaiting {
			c.Tickets++
		}
	}
	return c
}

func (n *fleetNode) reached(st store.State, err error) {
	if fo, ok := n.z.obs.(FleetObserver); ok {
		fo.StoreReached(st, err)
	}
}

// write sends the limits and pause this node changed; they stay to be
// sent while the store does not take them.
func (n *fleetNode) write(limits *store.Settings, paused *bool) error {
	if limits != nil {
		err := n.call("set_limits", func(ctx context.Context) error { return n.store.SetLimits(ctx, *limits) })
		if err != nil {
			return err
		}
		n.z.mu.Lock()
		if n.limits == limits {
			n.limits = nil
		}
		n.z.mu.Unlock()
	}
	if paused != nil {
		err := n.call("set_paused", func(ctx context.Context) error { return n.store.SetPaused(ctx, *paused) })
		if err != nil {
			return err
		}
		n.z.mu.Lock()
		if n.paused == paused {
			n.paused = nil
		}
		n.z.mu.Unlock()
	}
	return nil
}

// register sends the node's whole state: the slots it holds (admitted,
// and granted but not yet claimed) and its waiters in the order they
// arrived: those the store still has keep their places, the others join
// the end of the fleet's line. No Take, Give or Leave is in flight
// meanwhile (gate), and grants wait for it; those made before it are
// dropped by their epoch. It returns when it sent the registration.
func (n *fleetNode) register() (time.Time, store.State, error) {
	z := n.z
	n.gate.Lock()
	defer n.gate.Unlock()
	z.mu.Lock()
	st := store.NodeState{Held: map[string]int{}, Active: z.active, Waiters: z.waiting,
		Limits: z.limits, Config: z.config, Paused: z.paused, Gen: n.gen, Fair: z.fairShare()}
	draining := n.draining
	var tickets []*Waiter
	visit := func(w *Waiter) bool {
		tickets = append(tickets, w)
		return true
	}
	each := func(ks *keyState) {
		if fq := z.fair; fq != nil && ks == &z.def {
			// by tenant, as the store counts them (storeKey); those
			// admitted before the fair share began count under ""
			rest := ks.active
			for _, t := range fq.tenants {
				if t.active > 0 {
					st.Held[t.name] += t.active
					rest -= t.active
				}
			}
			if rest > 0 {
				st.Held[ks.key] += rest
			}
			if !draining {
				fq.each(visit)
			}
			return
		}
		if ks.active > 0 {
			st.Held[ks.key] = ks.active
		}
		if !draining {
			ks.each(z.limits.Order, visit)
		}
	}
	each(&z.def)
	for _, ks := range z.keys {
		each(ks)
	}
	// Ticket ids grow with arrivals: in their order, tickets re-queued at
	// the end keep the zone's order (FIFO or LIFO) among themselves.
	slices.SortFunc(tickets, func(a, b *Waiter) int { return cmp.Compare(a.ticket, b.ticket) })
	for _, w := range tickets {
		st.Waiting = append(st.Waiting, store.Ticket{ID: w.ticket, Key: z.storeKey(w), Priority: w.Priority})
	}
	z.mu.Unlock()

	var fs store.State
	started := time.Now()
	err := n.callWithin("register", storeTimeout*time.Duration(1+len(st.Waiting)/1000), func(ctx context.Context) (err error) {
		fs, err = n.store.Register(ctx, st)
		return err
	})
	if err != nil {
		return started, fs, err
	}
	z.mu.Lock()
	defer z.mu.Unlock()
	n.mode = fleetJoined
	n.epoch = fs.Epoch
	// undrained meanwhile: the tickets go in at the next one
	n.repair = draining != n.draining
	n.acks = nil // the store dropped its grants lists
	clear(n.early)
	z.def.held = z.def.active
	for _, ks := range z.keys {
		ks.held = ks.active
		z.tidy(ks)
	}
	for _, w := range n.waiting {
		w.inFleet = false // those it did not name left the fleet's line
	}
	for _, w := range tickets {
		if w.state == stateWaiting {
			w.inFleet = true
		}
	}
	return started, fs, nil
}

// learn takes in what the store says of the fleet. Zone lock held.
func (n *fleetNode) learn(st store.State) {
	n.state, n.learned, n.lastErr = st, time.Now(), nil
	n.gen = st.Gen
	n.nodesSeen = st.NodeCount
	if n.limits == nil && st.Limits.MaxConnections > 0 && st.Limits != n.z.limits {
		n.z.inForce(st.Limits)
	}
	if n.paused == nil && st.Paused != n.z.paused {
		n.z.setPaused(st.Paused)
	}
}

// FleetView is a fleet zone as this node sees it.
type FleetView struct {
	Node  string
	State string // registered, registering or unreachable
	// Error is the store's last error since it was last reached.
	Error       string
	Unreachable store.UnreachablePolicy
	// Fleet is the fleet as last learned, and when (zero: never).
	Fleet   store.State
	Learned time.Time
}

// FleetView is this node's view of the fleet; nil for a zone of its own.
func (z *Zone) FleetView() *FleetView {
	z.mu.Lock()
	defer z.mu.Unlock()
	n, _ := z.fleet.(*fleetNode)
	if n == nil {
		return nil
	}
	return n.describe()
}

// describe is the node's view. Zone lock held.
func (n *fleetNode) describe() *FleetView {
	v := &FleetView{Node: n.store.NodeID(), State: n.mode.String(), Unreachable: n.spec.Unreachable, Fleet: n.state, Learned: n.learned}
	if n.lastErr != nil {
		v.Error = n.lastErr.Error()
	}
	return v
}

// FleetStatus asks the store for the fleet and every node it knows; ok is
// false for a zone of its own.
func (z *Zone) FleetStatus(ctx context.Context) (st store.Status, ok bool, err error) {
	n := z.node()
	if n == nil {
		return st, false, nil
	}
	ctx, cancel := context.WithTimeout(ctx, storeTimeout)
	defer cancel()
	start := time.Now()
	st, err = n.store.Status(ctx)
	n.observe("status", start, err)
	return st, true, err
}

// Interface guard
var _ sharer = (*fleetNode)(nil)
