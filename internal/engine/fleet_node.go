package engine

import (
	"context"
	"errors"
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
	// fleetUnreachable: the store did not answer; the node admits up to
	// its share on its own, and registers anew once it answers.
	fleetUnreachable
)

func (m fleetMode) String() string {
	switch m {
	case fleetJoined:
		return "registered"
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
	mode      fleetMode
	epoch     uint64              // of the latest Register
	lastID    uint64              // tickets' ids
	waiting   map[uint64]*Waiter  // this node's waiters by ticket id
	asking    map[uint64]struct{} // tickets whose Take is in flight
	early     map[uint64]struct{} // grants that came while their Take was in flight
	repair    bool                // the store may count wrongly for this node: Register
	rejoin    time.Time           // when it last found it must register again
	state     store.State         // as last learned
	learned   time.Time           // when
	lastErr   error
	limits    *Limits // to write to the store: newest wins
	paused    *bool   // likewise
	nodesSeen int
}

// joinFleet links z to its fleet and starts the node's loops. The store
// is not reached here: the loop registers at once, and until then nobody
// new is admitted.
func (z *Zone) joinFleet(spec Fleet) error {
	st, err := spec.Open(z.name)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	n := &fleetNode{
		z: z, store: st, spec: spec,
		kick: make(chan struct{}, 1), ctx: ctx, cancel: cancel,
		waiting: map[uint64]*Waiter{}, asking: map[uint64]struct{}{}, early: map[uint64]struct{}{},
	}
	z.mu.Lock()
	// This node's config is the newest word on the fleet's limits.
	l := z.limits
	n.limits = &l
	// Waiters already here (a zone that was alone) join the fleet's line
	// at the first Register.
	visit := func(w *Waiter) bool { n.lastID++; w.ticket = n.lastID; n.waiting[w.ticket] = w; return true }
	z.def.each(z.limits.Order, visit)
	for _, ks := range z.keys {
		ks.each(z.limits.Order, visit)
	}
	z.fleet = n
	z.shared.Store(true)
	z.mu.Unlock()
	n.loops.Add(2)
	go n.renewals()
	go n.grants()
	return nil
}

// setFleet shares z through fleet's store, or counts it here alone (nil).
// The same store as now changes nothing; another one replaces it.
func (z *Zone) setFleet(fleet *Fleet) error {
	n := z.node()
	switch {
	case n == nil && fleet == nil:
		return nil
	case n != nil && fleet != nil && n.spec.Differs(fleet) == "":
		return nil
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

// leaveFleet unlinks z from its fleet: its loops end and the store is
// closed. The node's registration lapses with its lease, and the others
// take over its slots then. The zone counts alone from here on.
func (z *Zone) leaveFleet() {
	n := z.node()
	if n == nil {
		return
	}
	n.cancel()
	_ = n.store.Close()
	n.loops.Wait()
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

// joined implements sharer.
func (n *fleetNode) joined() bool { return n.mode == fleetJoined }

// localSlots is how many slots per key value the node fills on its own:
// none while the store decides or the node is registering, its share
// while the store is unreachable. Zone lock held.
func (n *fleetNode) localSlots() int {
	if n.mode != fleetUnreachable {
		return 0
	}
	return n.spec.Unreachable.Admits(n.z.limits.MaxConnections, n.nodesSeen)
}

// acquire is Zone.Acquire for a fleet zone: one Take, unless the store
// cannot be asked now.
func (n *fleetNode) acquire(w *Waiter, wake Waker, now time.Time) (Outcome, Reason) {
	z := n.z
	n.gate.RLock()
	defer n.gate.RUnlock()
	z.mu.Lock()
	defer z.mu.Unlock()
	if z.fleet != sharer(n) { // left the fleet meanwhile
		return z.acquire(w, wake, now)
	}
	n.lastID++
	w.ticket = n.lastID
	if n.mode != fleetJoined {
		return n.acquireHere(w, wake, now)
	}
	if w.state != stateIdle {
		panic("connlimit: Waiter reused")
	}
	ks := z.keyState(w.Key, true)
	ks.asking++
	n.asking[w.ticket] = struct{}{}
	z.mu.Unlock()
	out, r, err := n.take(store.Ticket{ID: w.ticket, Key: w.Key, Priority: w.Priority})
	z.mu.Lock()
	ks.asking--
	delete(n.asking, w.ticket)
	_, granted := n.early[w.ticket]
	delete(n.early, w.ticket)
	if err != nil {
		n.failed(err)
		return n.acquireHere(w, wake, now)
	}
	switch out {
	case Admitted:
		z.admit(w, ks)
	case Rejected:
		z.reject(w, ks, r)
	default:
		z.enqueue(w, ks, wake, now)
		w.inFleet = true
		n.waiting[w.ticket] = w
		if granted {
			z.grantTo(w)
		}
	}
	return out, r
}

// acquireHere decides on this node alone (its share, or nobody while it
// registers). The waiter joins the fleet's line at the next Register.
// Zone lock held.
func (n *fleetNode) acquireHere(w *Waiter, wake Waker, now time.Time) (Outcome, Reason) {
	out, r := n.z.acquire(w, wake, now)
	if out == Queued {
		n.waiting[w.ticket] = w
	}
	if out == Admitted {
		n.repair = true // admitted on its own: the store learns it at Register
	}
	return out, r
}

// free is Zone.Free for a fleet zone.
func (n *fleetNode) free(w *Waiter) bool {
	z := n.z
	n.gate.RLock()
	defer n.gate.RUnlock()
	z.mu.Lock()
	if !z.free(w) {
		z.mu.Unlock()
		return false
	}
	give := n.mode == fleetJoined
	if !give {
		n.repair = true
	}
	z.mu.Unlock()
	if give {
		n.give(w.Key)
	}
	return true
}

// abandon is Zone.Abandon for a fleet zone: a waiter leaves the fleet's
// line; a grant not yet claimed goes back to the fleet.
func (n *fleetNode) abandon(w *Waiter) bool {
	z := n.z
	n.gate.RLock()
	defer n.gate.RUnlock()
	z.mu.Lock()
	state, inFleet := w.state, w.inFleet
	if !z.abandon(w) {
		z.mu.Unlock()
		return false
	}
	joined := n.mode == fleetJoined
	if !joined {
		n.repair = true
	}
	z.mu.Unlock()
	switch {
	case !joined:
	case state == stateWaiting && inFleet:
		n.leaveLocked(w)
	case state == stateGranted:
		n.give(w.Key)
	}
	return true
}

// leave takes a waiter that timed out out of the fleet's line.
func (n *fleetNode) leave(w *Waiter) {
	n.gate.RLock()
	defer n.gate.RUnlock()
	n.leaveLocked(w)
}

// leaveLocked: gate held. If the ticket was granted meanwhile, its grant
// is on its way, and grant gives it back.
func (n *fleetNode) leaveLocked(w *Waiter) {
	err := n.call("leave", func(ctx context.Context) error {
		_, err := n.store.Leave(ctx, store.Ticket{ID: w.ticket, Key: w.Key, Priority: w.Priority})
		return err
	})
	if err != nil {
		n.z.mu.Lock()
		n.failed(err)
		n.z.mu.Unlock()
	}
}

func (n *fleetNode) take(t store.Ticket) (out Outcome, r Reason, err error) {
	err = n.call("take", func(ctx context.Context) (err error) {
		out, r, err = n.store.Take(ctx, t)
		return err
	})
	return out, r, err
}

// give frees a slot of key in the store. Gate held.
func (n *fleetNode) give(key string) {
	err := n.call("give", func(ctx context.Context) error { return n.store.Give(ctx, key) })
	if err != nil {
		n.z.mu.Lock()
		n.failed(err)
		n.z.mu.Unlock()
	}
}

// failed notes a store error: the node registers anew once the store
// answers (the error may have left its count wrong), and until then it
// is on its own. Zone lock held.
func (n *fleetNode) failed(err error) {
	n.lastErr = err
	n.repair = true
	if errors.Is(err, store.ErrLapsed) || errors.Is(err, store.ErrNoLimits) || n.outlived() {
		n.mode, n.rejoin = fleetJoining, time.Now()
	} else if n.mode == fleetJoined {
		n.mode = fleetUnreachable
		n.z.grantAll() // its share admits waiters at once
	}
	select {
	case n.kick <- struct{}{}:
	default:
	}
}

// call runs one store operation, bounded by storeTimeout, and tells the
// observer how it went.
func (n *fleetNode) call(op string, f func(ctx context.Context) error) error {
	start := time.Now()
	ctx, cancel := context.WithTimeout(n.ctx, storeTimeout)
	err := f(ctx)
	cancel()
	n.observe(op, start, err)
	return err
}

// outlived: the node is registered, but it last heard from the store
// longer than a lease ago: its renewals did not run (the process was
// stopped, or starved), so its lease ran out and the others may have
// taken over its slots. An error now, often a deadline that passed while
// it was stopped, does not tell that the store is unreachable: the node
// admits nobody new until it has registered again, and falls back on its
// share only if that fails too. Zone lock held.
func (n *fleetNode) outlived() bool {
	return n.mode == fleetJoined && !n.learned.IsZero() && time.Since(n.learned) > n.store.Lease()
}

func (n *fleetNode) observe(op string, start time.Time, err error) {
	if fo, ok := n.z.obs.(FleetObserver); ok {
		fo.StoreOp(op, time.Since(start), err)
	}
}

// pushLimits has the fleet take l as its limits (newest wins), at once.
// Zone lock held.
func (n *fleetNode) pushLimits(l Limits) {
	n.limits = &l
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
		z.mu.Unlock()
		return
	}
	z.mu.Unlock()
	n.give(t.Key)
}

// renewals renews the lease every RenewEvery, and at once when kicked:
// it writes what this node changed (limits, pause), registers when the
// store lost the node or its count may be wrong, and learns the fleet's
// limits, pause and totals.
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
		t.Reset(every)
	}
}

func (n *fleetNode) sync() {
	z := n.z
	started := time.Now()
	z.mu.Lock()
	limits, paused := n.limits, n.paused
	register := n.mode != fleetJoined || n.repair
	counts := store.NodeState{Active: z.active, Waiters: z.waiting}
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
		register = register || st.Lapsed
	}
	if err == nil && register {
		st, err = n.register()
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
		case n.mode == fleetJoined || !errors.Is(err, store.ErrLapsed):
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

func (n *fleetNode) reached(st store.State, err error) {
	if fo, ok := n.z.obs.(FleetObserver); ok {
		fo.StoreReached(st, err)
	}
}

// write sends the limits and pause this node changed; they stay to be
// sent while the store does not take them.
func (n *fleetNode) write(limits *Limits, paused *bool) error {
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
// and granted but not yet claimed) and its waiters in their order, which
// join the end of the fleet's line. No Take, Give or Leave is in flight
// meanwhile (gate), and grants wait for it; those made before it are
// dropped by their epoch.
func (n *fleetNode) register() (store.State, error) {
	z := n.z
	n.gate.Lock()
	defer n.gate.Unlock()
	z.mu.Lock()
	st := store.NodeState{Held: map[string]int{}, Active: z.active, Waiters: z.waiting, Limits: z.limits}
	var tickets []*Waiter
	visit := func(w *Waiter) bool {
		st.Waiting = append(st.Waiting, store.Ticket{ID: w.ticket, Key: w.Key, Priority: w.Priority})
		tickets = append(tickets, w)
		return true
	}
	each := func(ks *keyState) {
		if ks.active > 0 {
			st.Held[ks.key] = ks.active
		}
		ks.each(z.limits.Order, visit)
	}
	each(&z.def)
	for _, ks := range z.keys {
		each(ks)
	}
	z.mu.Unlock()

	var fs store.State
	err := n.call("register", func(ctx context.Context) (err error) {
		fs, err = n.store.Register(ctx, st)
		return err
	})
	if err != nil {
		return fs, err
	}
	z.mu.Lock()
	defer z.mu.Unlock()
	n.mode = fleetJoined
	n.epoch = fs.Epoch
	n.repair = false
	clear(n.early)
	for _, w := range tickets {
		if w.state == stateWaiting {
			w.inFleet = true
		}
	}
	return fs, nil
}

// learn takes in what the store says of the fleet. Zone lock held.
func (n *fleetNode) learn(st store.State) {
	n.state, n.learned, n.lastErr = st, time.Now(), nil
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
