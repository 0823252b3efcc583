package engine

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/l4-connlimit/connlimit/internal/testkit"
	"github.com/l4-connlimit/connlimit/store"
)

// The node side of a fleet zone against a store of the test's own, for
// the paths a whole process cannot be made to take on cue.

// fakeStore is a store.Store whose answers the test gives, recording what
// the node asks.
type fakeStore struct {
	mu       sync.Mutex
	take     func(store.Ticket) (Outcome, Reason, error)
	gives    []string
	leaves   []uint64
	regs     []store.NodeState
	grants   chan store.Ticket
	closed   chan struct{}
	once     sync.Once
	epoch    uint64
	renewErr error
	repair   bool // renewals that check say the store counts otherwise
}

func newFakeStore() *fakeStore {
	return &fakeStore{grants: make(chan store.Ticket, 16), closed: make(chan struct{}), epoch: 7}
}

func (s *fakeStore) NodeID() string                                  { return "fake" }
func (s *fakeStore) Deregister(context.Context) error                { return nil }
func (s *fakeStore) Lease() time.Duration                            { return 3 * time.Second }
func (s *fakeStore) Close() error                                    { s.once.Do(func() { close(s.closed) }); return nil }
func (s *fakeStore) SetLimits(context.Context, store.Settings) error { return nil }
func (s *fakeStore) SetPaused(context.Context, bool) error           { return nil }
func (s *fakeStore) Status(context.Context) (store.Status, error) {
	return store.Status{}, nil
}

func (s *fakeStore) Take(_ context.Context, t store.Ticket) (Outcome, Reason, error) {
	s.mu.Lock()
	f := s.take
	s.mu.Unlock()
	return f(t)
}

func (s *fakeStore) Give(_ context.Context, key string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.gives = append(s.gives, key)
	return nil
}

func (s *fakeStore) Leave(_ context.Context, t store.Ticket) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.leaves = append(s.leaves, t.ID)
	return true, nil
}

func (s *fakeStore) NextGrant(ctx context.Context) (store.Ticket, error) {
	select {
	case t := <-s.grants:
		return t, nil
	case <-ctx.Done():
		return store.Ticket{}, ctx.Err()
	case <-s.closed:
		return store.Ticket{}, store.ErrClosed
	}
}

func (s *fakeStore) Renew(_ context.Context, c store.NodeState) (store.State, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return store.State{Epoch: s.epoch, Limits: Limits{MaxConnections: 1}, NodeCount: 1, Repair: s.repair && c.Check}, s.renewErr
}

func (s *fakeStore) Register(_ context.Context, st store.NodeState) (store.State, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.renewErr != nil {
		return store.State{}, s.renewErr
	}
	s.regs = append(s.regs, st)
	return store.State{Epoch: s.epoch, Limits: Limits{MaxConnections: 1}, NodeCount: 1}, nil
}

func (s *fakeStore) counts() (gives, leaves, regs int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.gives), len(s.leaves), len(s.regs)
}

// fakeFleetZone is a zone joined to store s, registered.
func fakeFleetZone(t *testing.T, s *fakeStore, policy store.UnreachablePolicy) *Zone {
	t.Helper()
	z := NewZone("fake", Limits{MaxConnections: 1}, nil)
	err := z.setFleet(&Fleet{
		Open:        func(string) (store.Store, error) { return s, nil },
		Unreachable: policy,
		Differs:     func(*Fleet) string { return "" },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(z.leaveFleet)
	testkit.WaitFor(t, 5*time.Second, "the node to register", func() bool {
		z.mu.Lock()
		defer z.mu.Unlock()
		return z.fleet.joined()
	})
	return z
}

// A grant that reached its waiter, whose client then leaves before the
// waiter claimed it, goes back to the fleet: once.
func TestFleetNodeAbandonedGrantGoesBack(t *testing.T) {
	s := newFakeStore()
	s.take = func(store.Ticket) (Outcome, Reason, error) { return Queued, ReasonNone, nil }
	z := fakeFleetZone(t, s, store.UnreachablePolicy{})
	w, sig := &Waiter{Key: "k"}, NewSignal()
	if out, _ := z.Acquire(w, sig, time.Now()); out != Queued {
		t.Fatalf("Acquire = %v, want queued", out)
	}
	s.grants <- store.Ticket{ID: w.ticket, Key: "k", Epoch: s.epoch}
	<-sig // granted, not claimed
	if !z.Abandon(w) {
		t.Fatal("Abandon(granted) = false")
	}
	if gives, leaves, _ := s.counts(); gives != 1 || leaves != 0 {
		t.Fatalf("%d gives and %d leaves, want the grant given back once", gives, leaves)
	}
	if a, n := z.Counts(); a != 0 || n != 0 {
		t.Fatalf("counts %d/%d after the grant went back", a, n)
	}
}

// A grant for a ticket nobody here waits for (its waiter left), or made
// before the node's latest registration, is handled without a waiter: the
// first goes back, the second is dropped (the registration counted anew).
func TestFleetNodeGrantsWithoutAWaiter(t *testing.T) {
	s := newFakeStore()
	z := fakeFleetZone(t, s, store.UnreachablePolicy{})
	s.grants <- store.Ticket{ID: 999, Key: "gone", Epoch: s.epoch}
	s.grants <- store.Ticket{ID: 998, Key: "old", Epoch: s.epoch - 1}
	testkit.WaitFor(t, 5*time.Second, "the unknown grant to go back", func() bool { g, _, _ := s.counts(); return g == 1 })
	time.Sleep(50 * time.Millisecond)
	s.mu.Lock()
	gives := append([]string(nil), s.gives...)
	s.mu.Unlock()
	if len(gives) != 1 || gives[0] != "gone" {
		t.Fatalf("gave back %v, want only the current epoch's unknown grant", gives)
	}
	if a, n := z.Counts(); a != 0 || n != 0 {
		t.Fatalf("counts %d/%d", a, n)
	}
}

// A grant that comes while its Take is still on its way is kept for the
// waiter the Take then queues.
func TestFleetNodeGrantBeforeTakeAnswers(t *testing.T) {
	s := newFakeStore()
	z := fakeFleetZone(t, s, store.UnreachablePolicy{})
	s.take = func(t store.Ticket) (Outcome, Reason, error) {
		s.grants <- store.Ticket{ID: t.ID, Key: t.Key, Epoch: s.epoch}
		time.Sleep(100 * time.Millisecond) // the grant is handled meanwhile
		return Queued, ReasonNone, nil
	}
	w, sig := &Waiter{}, NewSignal()
	if out, _ := z.Acquire(w, sig, time.Now()); out != Queued {
		t.Fatalf("Acquire = %v, want queued", out)
	}
	if out, _ := z.Wait(w, sig, nil); out != Admitted {
		t.Fatalf("Wait = %v, want admitted by the early grant", out)
	}
	if gives, _, _ := s.counts(); gives != 0 {
		t.Fatalf("the early grant was given back (%d gives)", gives)
	}
	z.Free(w)
	if gives, _, _ := s.counts(); gives != 1 {
		t.Fatalf("%d gives after Free, want 1", gives)
	}
}

// While the store fails, a node waits out its lease before it admits on
// its own: a Take that fails leaves the connection waiting here, the
// renewals' failing makes the node hold what it holds (nothing here), and
// only once its lease has surely run out does it admit up to its share.
// It registers what it serves once the store answers again.
func TestFleetNodeUnreachableShareThenRegister(t *testing.T) {
	s := newFakeStore()
	z := fakeFleetZone(t, s, store.UnreachablePolicy{Share: 2})
	down := errors.New("store down")
	s.mu.Lock()
	s.take = func(store.Ticket) (Outcome, Reason, error) { return Rejected, ReasonNone, down }
	s.renewErr = down
	s.mu.Unlock()
	cut := time.Now()
	var held []*Waiter
	var sigs []Signal
	for range 2 {
		w, sig := &Waiter{}, NewSignal()
		if out, _ := z.Acquire(w, sig, time.Now()); out != Queued {
			t.Fatalf("Acquire while the store is down = %v, want queued: one failed Take does not fall back", out)
		}
		held, sigs = append(held, w), append(sigs, sig)
	}
	testkit.WaitFor(t, 5*time.Second, "the node to hold", func() bool { return z.FleetView().State == "holding" })
	for i, w := range held {
		out, _ := z.Wait(w, sigs[i], nil)
		if out != Admitted {
			t.Fatalf("waiter %d: %v, want admitted within the share once the lease ran out", i, out)
		}
	}
	// The last renewal that succeeded was sent at most a renewal (1 s)
	// before the cut, and the lease is 3 s.
	if d := time.Since(cut); d < 1900*time.Millisecond {
		t.Fatalf("admitted on the share %s after the cut, before the lease (3 s) can have run out", d)
	}
	if v := z.FleetView(); v.State != "unreachable" || v.Error == "" {
		t.Fatalf("fleet view while down: %+v", v)
	}
	w3 := &Waiter{}
	if out, _ := z.Acquire(w3, NewSignal(), time.Now()); out != Queued {
		t.Fatalf("third Acquire = %v, want queued beyond the share", out)
	}
	_, _, regs := s.counts()
	s.mu.Lock()
	s.renewErr = nil
	s.take = func(store.Ticket) (Outcome, Reason, error) { return Queued, ReasonNone, nil }
	s.mu.Unlock()
	testkit.WaitFor(t, 5*time.Second, "a registration after the store came back", func() bool { _, _, r := s.counts(); return r > regs })
	s.mu.Lock()
	st := s.regs[len(s.regs)-1]
	s.mu.Unlock()
	if st.Held[""] != 2 || len(st.Waiting) != 1 || st.Waiting[0].ID != w3.ticket {
		t.Fatalf("registered %+v, want 2 held and the third waiting", st)
	}
	z.Abandon(w3)
	for _, w := range held {
		z.Free(w)
	}
}

// A node cut off from its store keeps the slots the store counts for it
// until its lease has surely run out: a slot that one of its connections
// frees goes to its own next waiter at once, with no Give, and no
// arrival is admitted beyond them.
func TestFleetNodeHoldsItsSlotsUntilItsLeaseRunsOut(t *testing.T) {
	s := newFakeStore()
	z := fakeFleetZone(t, s, store.UnreachablePolicy{Share: 5})
	s.mu.Lock()
	s.take = func(store.Ticket) (Outcome, Reason, error) { return Admitted, ReasonNone, nil }
	s.mu.Unlock()
	holder := &Waiter{}
	if out, _ := z.Acquire(holder, NewSignal(), time.Now()); out != Admitted {
		t.Fatalf("holder: %v", out)
	}
	down := errors.New("store down")
	s.mu.Lock()
	s.take = func(store.Ticket) (Outcome, Reason, error) { return Rejected, ReasonNone, down }
	s.renewErr = down
	s.mu.Unlock()
	cut := time.Now()
	w, sig := &Waiter{}, NewSignal()
	if out, _ := z.Acquire(w, sig, time.Now()); out != Queued {
		t.Fatalf("a newcomer while the store is down: %v, want queued", out)
	}
	testkit.WaitFor(t, 5*time.Second, "the node to hold", func() bool { return z.FleetView().State == "holding" })
	gives, _, _ := s.counts()
	if !z.Free(holder) {
		t.Fatal("Free: false")
	}
	if out, _, _ := z.Poll(w, time.Now()); out != Admitted {
		t.Fatalf("the next waiter after the holder freed its slot: %v, want admitted on the held slot", out)
	}
	if g, _, _ := s.counts(); g != gives {
		t.Fatalf("%d gives while holding, want none", g-gives)
	}
	w2, sig2 := &Waiter{}, NewSignal()
	if out, _ := z.Acquire(w2, sig2, time.Now()); out != Queued {
		t.Fatalf("a newcomer beyond the held slot: %v, want queued", out)
	}
	if out, _ := z.Wait(w2, sig2, nil); out != Admitted {
		t.Fatalf("the second newcomer: %v, want admitted on the share once the lease ran out", out)
	}
	if d := time.Since(cut); d < 1900*time.Millisecond {
		t.Fatalf("admitted beyond the held slot %s after the cut: the lease (3 s) cannot have run out", d)
	}
	z.Free(w)
	z.Free(w2)
}

// A Register lists the node's waiters in the order they arrived, whatever
// the zone's order, so that those the store lost join the end of the
// fleet's line in the right order: under LIFO the newest is then
// admitted first. (Before, they were listed in LIFO's admission order,
// newest first, and the store's LIFO then admitted the oldest first.)
func TestFleetNodeRegistersWaitersInArrivalOrder(t *testing.T) {
	s := newFakeStore()
	z := fakeFleetZone(t, s, store.UnreachablePolicy{Refuse: true})
	z.SetLimits(Limits{MaxConnections: 1, Order: LIFO})
	s.mu.Lock()
	s.take = func(store.Ticket) (Outcome, Reason, error) { return Rejected, ReasonNone, errors.New("lost reply") }
	s.mu.Unlock()
	var ws []*Waiter
	for range 3 {
		w := &Waiter{}
		if out, _ := z.Acquire(w, NewSignal(), time.Now()); out != Queued {
			t.Fatalf("Acquire: %v, want queued here after a failed Take", out)
		}
		ws = append(ws, w)
	}
	_, _, regs := s.counts()
	testkit.WaitFor(t, 5*time.Second, "the Register that repairs", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.regs) > regs && len(s.regs[len(s.regs)-1].Waiting) == 3
	})
	s.mu.Lock()
	st := s.regs[len(s.regs)-1]
	s.mu.Unlock()
	for i, tk := range st.Waiting {
		if tk.ID != ws[i].ticket {
			t.Fatalf("registered waiters %+v, want tickets %d, %d, %d: the order they arrived", st.Waiting, ws[0].ticket, ws[1].ticket, ws[2].ticket)
		}
	}
	for _, w := range ws {
		z.Abandon(w)
	}
}

// A renewal whose epoch is not the node's (the store lost or replayed a
// registration), or that says the store counts other slots or tickets
// for the node, makes it register again at once.
func TestFleetNodeRepairsWhenTheRenewalDisagrees(t *testing.T) {
	s := newFakeStore()
	fakeFleetZone(t, s, store.UnreachablePolicy{})
	_, _, regs := s.counts()
	s.mu.Lock()
	s.epoch = 5 // the store answers an older epoch
	s.mu.Unlock()
	testkit.WaitFor(t, 5*time.Second, "a Register after the epoch went back", func() bool { _, _, r := s.counts(); return r > regs })
	_, _, regs = s.counts()
	time.Sleep(1500 * time.Millisecond) // a renewal or more that agree
	if _, _, r := s.counts(); r != regs {
		t.Fatalf("%d Registers while the renewals agreed", r-regs)
	}
	s.mu.Lock()
	s.repair = true // the store counts other slots for the node
	s.mu.Unlock()
	testkit.WaitFor(t, 5*time.Second, "a Register after a renewal's check disagreed", func() bool { _, _, r := s.counts(); return r > regs })
}

// A zone that no config uses any more takes its waiters out of the
// fleet's line at its next registration, serves them with the slots its
// own connections free, gives back the others, and deregisters once
// drained; a connection that still comes in, or a config that uses the
// zone again, makes it the fleet's again.
func TestFleetNodeDrainsWithoutAConfig(t *testing.T) {
	s := newFakeStore()
	s.take = func(store.Ticket) (Outcome, Reason, error) { return Admitted, ReasonNone, nil }
	z := fakeFleetZone(t, s, store.UnreachablePolicy{Refuse: true})
	a0, a1 := &Waiter{}, &Waiter{}
	for _, w := range []*Waiter{a0, a1} {
		if out, _ := z.Acquire(w, NewSignal(), time.Now()); out != Admitted {
			t.Fatalf("Acquire: %v, want admitted", out)
		}
	}
	s.mu.Lock()
	s.take = func(store.Ticket) (Outcome, Reason, error) { return Queued, ReasonNone, nil }
	s.mu.Unlock()
	w := &Waiter{}
	if out, _ := z.Acquire(w, NewSignal(), time.Now()); out != Queued {
		t.Fatalf("Acquire: %v, want queued", out)
	}
	waitReg := func(after int, what string, want func(store.NodeState) bool) {
		t.Helper()
		testkit.WaitFor(t, 5*time.Second, what, func() bool {
			s.mu.Lock()
			defer s.mu.Unlock()
			return len(s.regs) > after && want(s.regs[len(s.regs)-1])
		})
	}
	_, _, regs := s.counts()
	z.drainFleet()
	waitReg(regs, "a registration without the waiter's ticket", func(st store.NodeState) bool {
		return len(st.Waiting) == 0 && st.Held[""] == 2
	})
	z.Free(a0)
	if w.state != stateGranted {
		t.Fatalf("waiter %v after a slot freed here, want granted the node's own slot", w.state)
	}
	if gives, _, _ := s.counts(); gives != 0 {
		t.Fatalf("%d gives, want none: the slot went to the node's own waiter", gives)
	}
	z.Free(a1)
	if gives, _, _ := s.counts(); gives != 1 {
		t.Fatalf("%d gives, want 1: a slot nobody here waits for goes back", gives)
	}

	_, _, regs = s.counts()
	w2 := &Waiter{}
	if out, _ := z.Acquire(w2, NewSignal(), time.Now()); out != Queued {
		t.Fatalf("Acquire: %v, want queued", out)
	}
	waitReg(regs, "a registration with the late arrival's ticket", func(st store.NodeState) bool {
		return len(st.Waiting) == 1 && st.Waiting[0].ID == w2.ticket
	})

	z.drainFleet()
	z.Abandon(w2)
	z.Abandon(w)
	left := func() bool {
		z.mu.Lock()
		defer z.mu.Unlock()
		n, _ := z.fleet.(*fleetNode)
		return n != nil && n.left
	}
	testkit.WaitFor(t, 5*time.Second, "the drained node to deregister", left)
	_, _, regs = s.counts()
	spec := z.node().spec
	if err := z.setFleet(&spec); err != nil {
		t.Fatal(err)
	}
	waitReg(regs, "a registration once a config uses the zone again", func(store.NodeState) bool { return !left() })
}

// A fleet zone with a fair share asks the store by tenant: its Take, Give
// and Leave name the connection's tenant, and a registration counts its
// slots and waiters by tenant.
func TestFleetNodeFairShareByTenant(t *testing.T) {
	s := newFakeStore()
	var took []store.Ticket
	s.take = func(tk store.Ticket) (Outcome, Reason, error) {
		took = append(took, tk)
		if len(took) <= 2 {
			return Admitted, ReasonNone, nil
		}
		return Queued, ReasonNone, nil
	}
	z := fakeFleetZone(t, s, store.UnreachablePolicy{Refuse: true})
	z.SetFair(Fair{Tenant: "{t}", Weights: map[string]int{"h": 2}})
	h, l, q := &Waiter{Tenant: "h"}, &Waiter{Tenant: "l"}, &Waiter{Tenant: "l", Priority: 1}
	for _, w := range []*Waiter{h, l} {
		if out, _ := z.Acquire(w, NewSignal(), time.Now()); out != Admitted {
			t.Fatalf("Acquire: %v, want admitted", out)
		}
	}
	if out, _ := z.Acquire(q, NewSignal(), time.Now()); out != Queued {
		t.Fatalf("Acquire: %v, want queued", out)
	}
	s.mu.Lock()
	if len(took) != 3 || took[0].Key != "h" || took[1].Key != "l" || took[2].Key != "l" {
		t.Errorf("takes %+v, want keys h, l, l: the tenants", took)
	}
	regs := len(s.regs)
	s.mu.Unlock()
	z.mu.Lock()
	n := z.fleet.(*fleetNode)
	n.repair = true
	n.kickNow()
	z.mu.Unlock()
	testkit.WaitFor(t, 5*time.Second, "a registration by tenant", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		if len(s.regs) <= regs {
			return false
		}
		st := s.regs[len(s.regs)-1]
		return st.Held["h"] == 1 && st.Held["l"] == 1 && len(st.Waiting) == 1 && st.Waiting[0].Key == "l" &&
			st.Fair.On && st.Fair.Weights["h"] == 2
	})
	z.Free(h)
	z.Abandon(q)
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.gives) != 1 || s.gives[0] != "h" {
		t.Errorf("gives %q, want h", s.gives)
	}
	if len(s.leaves) != 1 {
		t.Errorf("leaves %v, want the queued waiter's", s.leaves)
	}
}
