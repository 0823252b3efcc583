package store

import (
	"context"
	"time"
)

// Namespace is the Caddy module namespace of fleet stores.
const Namespace = "layer4.connection_limit.stores"

// Module is a store backend: a Caddy module in Namespace, provisioned
// before use, that opens a zone's shared state.
type Module interface {
	// Open returns zone's shared state in the store as seen by the node
	// nodeID (DefaultNodeID() if empty). It does not connect: the store
	// need not be up.
	Open(zone, nodeID string) (Store, error)
	// Unreachable is what a node does with new arrivals while the store
	// cannot be reached.
	Unreachable() UnreachablePolicy
	// Lease is how long the store keeps a node registered without a
	// renewal.
	Lease() time.Duration
	// Differs names the first setting in which other differs from this
	// store ("" if none), so that every handler of a zone can be required
	// to give the same store. It never shows a setting's value.
	Differs(other Module) string
}

// Store is one zone's shared state in a store, as seen by one node. It is
// safe for concurrent use. The store keeps the fleet's counts and the
// fleet-wide order of every node's waiters, and hands a freed slot to the
// node of the next waiter; each node keeps its own waiters (their sockets
// stay with it).
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
type Store interface {
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
	// holds a slot of its key. Each grant is delivered exactly once: not
	// lost when ctx ends first (the next call gets it), nor when a reply
	// of the store is lost on the way (it is read again). It returns an
	// error when the store cannot be read (then at most about once a
	// second) or after Close.
	NextGrant(ctx context.Context) (Ticket, error)
	// Renew extends this node's lease, reports its counts (only Active and
	// Waiters of counts are used), reaps nodes whose lease ran out (their
	// slots go to the next waiters) and returns the fleet's state. If
	// Lapsed, nothing was renewed: Register.
	Renew(ctx context.Context, counts NodeState) (State, error)
	// Register (re-)registers this node with its full state: its held
	// slots replace what the store had for it (the fleet's counts follow);
	// the tickets of st.Waiting that the store still has keep their places
	// in line, those it lost join the end in their order (st.Waiting is in
	// arrival order, oldest first), and its tickets that st.Waiting does
	// not name leave; then free slots are granted (possibly to its own
	// tickets). Use it first, after Lapsed or Repair, after the store lost
	// its data, and to repair after an uncertain error. A store may take
	// several calls for many waiters, so that no one call holds it up long;
	// ctx bounds them all.
	//
	// The caller must keep st consistent with the store's view: take st
	// when none of its Take, Give or Leave calls is in flight and start
	// none until Register returns; and from taking st until Register
	// returns, hold back the grants NextGrant delivers, then drop those
	// whose Epoch differs from the returned State.Epoch (their tickets
	// were re-queued by this Register) and hand on the others. Grants with
	// an older Epoch that arrive later are dropped too.
	Register(ctx context.Context, st NodeState) (State, error)
	// SetLimits writes the fleet's limits, with the store's time: the last
	// call wins (the caller decides which word is newest), and what they
	// free is granted at once. A config's word (FromConfig) that the store
	// already has changes nothing, so that an override made at run time
	// outlives a node that (re)joins with the same config; a config with
	// other settings replaces the fleet's limits and ends any override.
	SetLimits(ctx context.Context, s Settings) error
	// SetPaused pauses (no admission, no grant anywhere in the fleet) or
	// resumes the fleet; resuming grants every free slot at once.
	SetPaused(ctx context.Context, paused bool) error
	// Status returns the fleet's state and every registered node.
	Status(ctx context.Context) (Status, error)
	// Deregister removes this node from the store at once: its tickets
	// leave the line, and whatever it still holds (slots, grants not yet
	// handed on) goes to the next waiters. A node calls it when it stops,
	// once its connections are closed, so that the fleet does not wait out
	// its lease.
	Deregister(ctx context.Context) error
	// Close releases the store's connections and ends NextGrant. The node
	// stays registered until its lease runs out (it is then reaped),
	// unless it deregistered: a process that keeps serving must not Close.
	Close() error
}

const (
	// DefaultLease is a node's lease in the store when none is set.
	DefaultLease = 5 * time.Second
	// MinLease is the shortest lease allowed.
	MinLease = time.Second
)

// RenewEvery is how often a node with lease should Renew: a third of the
// lease, at most a second, so that a crashed node is reaped by the others
// within lease + 1 s.
func RenewEvery(lease time.Duration) time.Duration {
	return min(lease/3, time.Second)
}
