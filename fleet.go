package connlimit

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// This file is the engine's view of a fleet zone: a zone whose count and
// waiting list are shared by several processes (nodes) through a store. It
// knows nothing of Caddy nor of any one store; fleet_redis.go implements it
// with Redis. Each node keeps its own waiters (their sockets stay with it);
// the store keeps the fleet's counts, the fleet-wide order of every node's
// waiters, and hands a freed slot to the node of the next waiter.

// Ticket names one waiting connection of this node in a fleet zone's
// waiting list.
type Ticket struct {
	// ID is unique within the node (monotonic), chosen by the node.
	ID uint64
	// Key is the connection's key value.
	Key string
	// Priority: within a key, higher priorities are admitted first.
	Priority int
	// Epoch is set on a grant (from NextGrant): the node's registration
	// epoch when the store granted it. A grant whose Epoch is not the
	// epoch of the node's latest Register (FleetState.Epoch) was made
	// before that Register, which re-queued its ticket: drop it (see
	// FleetStore.Register). Ignored by Take and Leave.
	Epoch uint64
}

// NodeState is what a node holds and who waits at it: sent when it
// (re-)registers or repairs.
type NodeState struct {
	// Held counts the slots the node holds, by key value: its admitted
	// connections, and every grant it has received from NextGrant and not
	// given back, handed on or not.
	Held map[string]int
	// Waiting lists the node's waiters in the order they should keep
	// among themselves (they go to the end of the fleet's line).
	Waiting []Ticket
	// Active and Waiters are the node's own totals, shown in Status.
	Active, Waiters int
	// Limits, if MaxConnections is not 0, become the fleet's limits if the
	// store has none (a new fleet, or a store that lost its data), in the
	// same step, so the node can admit at once. Limits already in force
	// are kept: SetLimits replaces them.
	Limits Limits
}

// FleetState is what a renewal (or a registration) learns.
type FleetState struct {
	// Lapsed: this node was not (or no longer) registered: it must
	// Register before admitting anybody new. Its held slots and tickets
	// in the store are gone (reaped by another node, or the store lost
	// its data).
	Lapsed bool
	// Limits are the fleet's limits in force; zero if none were ever set
	// (LimitsSet is then zero too).
	Limits Limits
	// LimitsSet is when they were set, by the store's clock; zero if never.
	LimitsSet time.Time
	// Paused: nobody is admitted or granted anywhere in the fleet.
	Paused bool
	// Active and Waiting are the fleet's totals.
	Active, Waiting int
	// NodeCount is how many nodes are registered (live, or dead and not
	// yet reaped).
	NodeCount int
	// Epoch is this node's registration epoch: it changes at every
	// Register. 0 when Lapsed.
	Epoch uint64
}

// NodeInfo is one node as the store sees it.
type NodeInfo struct {
	ID string
	// Active and Waiting as the node reported them at its last renewal.
	Active, Waiting int
	// Renewed is how long ago the node last renewed (or registered), by
	// the store's clock.
	Renewed time.Duration
	// Expires is how long until its lease runs out, by the store's clock;
	// negative once it has run out and the node was not yet reaped.
	Expires time.Duration
}

// FleetStatus is a fleet zone's state, for the admin API.
type FleetStatus struct {
	FleetState
	// Nodes registered in the store, by ID.
	Nodes []NodeInfo
}

// FleetStore is one zone's shared state in a store, as seen by one node.
// It is safe for concurrent use.
//
// Take, Give and Leave are not idempotent: they are sent once, never
// retried by the store. When one of them fails with an error whose
// Uncertain is true, the node cannot know whether it ran: it must repair
// with Register (at its next renewal, for example). Renew, Register,
// SetLimits, SetPaused and Status are idempotent and retried once on a
// connection error.
//
// A node's protocol: Register once (and again whenever a reply says
// Lapsed, or after an uncertain error); Renew every RenewEvery; Take for a
// new connection (Admitted: it holds a slot; Queued: wait for its grant);
// Give when a slot is freed; Leave when a waiter goes away or times out;
// a loop on NextGrant hands grants to the waiters.
type FleetStore interface {
	// NodeID is this node's id in the store.
	NodeID() string
	// Lease is how long the store keeps this node registered without a
	// renewal. Renew every RenewEvery(Lease()).
	Lease() time.Duration

	// Take admits t at once (Admitted: the node holds a slot of t.Key),
	// queues it in the fleet's waiting list (Queued: a grant for it will
	// come through NextGrant), or rejects it (Rejected, with the reason).
	// ErrLapsed: the node is not registered (Register first). ErrNoLimits:
	// the fleet has no limits yet (SetLimits, or Register with Limits).
	Take(ctx context.Context, t Ticket) (Outcome, Reason, error)
	// Give frees one slot of key held by this node and grants it to the
	// next waiter of that key in the fleet, if any. A node that holds no
	// slot of key in the store (it was reaped) gives nothing, without error.
	Give(ctx context.Context, key string) error
	// Leave takes t out of the waiting list. left is false if it was not
	// there: it was granted (its grant is in this node's list or on its
	// way: give it back with Give when it arrives), or the store no longer
	// knows it (the node was reaped or the store lost its data; Register
	// repairs).
	Leave(ctx context.Context, t Ticket) (left bool, err error)
	// NextGrant blocks until a grant for this node arrives (or ctx is
	// done): the returned Ticket was admitted fleet-wide and this node now
	// holds a slot of its key. A grant is never lost when ctx ends first:
	// the next call gets it. It returns an error when the store cannot be
	// read (then at most about once a second) or after Close.
	NextGrant(ctx context.Context) (Ticket, error)
	// Renew extends this node's lease, reports its counts (only Active and
	// Waiters of counts are used), reaps nodes whose lease ran out (their
	// slots go to the next waiters) and returns the fleet's state. If
	// Lapsed, nothing was renewed: Register.
	Renew(ctx context.Context, counts NodeState) (FleetState, error)
	// Register (re-)registers this node with its full state: its held
	// slots replace what the store had for it (the fleet's counts follow),
	// its old tickets are dropped and st.Waiting queued anew at the end of
	// the line, in their order; then free slots are granted (possibly to
	// its own tickets). Use it first, after Lapsed, after the store lost
	// its data, and to repair after an uncertain error.
	//
	// The caller must keep st consistent with the store's view: take st
	// when none of its Take, Give or Leave calls is in flight and start
	// none until Register returns; and from taking st until Register
	// returns, hold back the grants NextGrant delivers, then drop those
	// whose Epoch differs from the returned FleetState.Epoch (their
	// tickets were re-queued by this Register) and hand on the others.
	// Grants with an older Epoch that arrive later are dropped too.
	Register(ctx context.Context, st NodeState) (FleetState, error)
	// SetLimits sets the fleet's limits, with the store's time (the last
	// call wins: the caller decides which config is newest), and grants
	// at once what they free.
	SetLimits(ctx context.Context, l Limits) error
	// SetPaused pauses (no admission, no grant anywhere in the fleet) or
	// resumes the fleet; resuming grants every free slot at once.
	SetPaused(ctx context.Context, paused bool) error
	// Status returns the fleet's state and every registered node.
	Status(ctx context.Context) (FleetStatus, error)
	// Close releases the store's connections and ends NextGrant. The node
	// stays registered until its lease runs out (it is then reaped): a
	// process that keeps serving must not Close.
	Close() error
}

// RenewEvery is how often a node with lease should Renew: a third of the
// lease, at most a second, so that a crashed node is reaped by the others
// within lease + 1 s.
func RenewEvery(lease time.Duration) time.Duration {
	return min(lease/3, time.Second)
}

var (
	// ErrLapsed: this node is not registered in the store (its lease ran
	// out and it was reaped, or the store lost its data). Register first.
	ErrLapsed = errors.New("connlimit: this node's lease in the store lapsed")
	// ErrNoLimits: the store holds no limits for the zone yet.
	ErrNoLimits = errors.New("connlimit: the store holds no limits for the zone")
	// ErrStoreClosed is returned after Close.
	ErrStoreClosed = errors.New("connlimit: store closed")
)

// FleetError is an error of one store operation of a fleet zone.
type FleetError struct {
	Zone string
	// Op is the operation: take, give, leave, grant, renew, register,
	// set_limits, set_paused, status.
	Op  string
	Err error
	// Uncertain: the store may or may not have done the operation (the
	// connection failed or timed out after it was sent, or before: the
	// node cannot tell). After an uncertain take, give or leave the node
	// must Register to repair. False when the store answered with an
	// error (bad data, wrong type) or refused (ErrLapsed, ErrNoLimits).
	Uncertain bool
}

func (e *FleetError) Error() string {
	return fmt.Sprintf("connlimit: zone %q: store %s: %v", e.Zone, e.Op, e.Err)
}

func (e *FleetError) Unwrap() error { return e.Err }
