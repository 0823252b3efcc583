package store

import "time"

// Ticket names one waiting connection of a node in a zone's waiting list.
type Ticket struct {
	// ID is unique within the node (monotonic), chosen by the node.
	ID uint64
	// Key is the connection's key value.
	Key string
	// Priority: within a key, higher priorities are admitted first.
	Priority int
	// Epoch is set on a grant (from NextGrant): the node's registration
	// epoch when the store granted it. A grant whose Epoch is not the
	// epoch of the node's latest Register (State.Epoch) was made before
	// that Register, which re-queued its ticket: drop it (see
	// Store.Register). Ignored by Take and Leave.
	Epoch uint64
}

// NodeState is what a node holds and who waits at it: sent when it
// (re-)registers or repairs.
type NodeState struct {
	// Held counts the slots the node holds, by key value: its admitted
	// connections, and every grant it has received from NextGrant and not
	// given back, handed on or not.
	Held map[string]int
	// Waiting lists the node's waiters in the fleet's line, in the order
	// they arrived (oldest first, whatever the zone's order): those the
	// store lost join the end of the line in this order.
	Waiting []Ticket
	// Active and Waiters are the node's own totals, shown in Status.
	Active, Waiters int
	// Epoch is the node's epoch as it knows it (Renew): a store whose
	// epoch for the node differs lost or replayed a registration, and
	// says Repair.
	Epoch uint64
	// Check (Renew): HeldTotal and Tickets are exact, taken while none of
	// the node's Take, Give or Leave calls was in flight; the store
	// compares them with its own count for the node and says Repair if
	// they differ. HeldTotal counts the slots the node holds in the fleet
	// (every key value); Tickets its waiters in the fleet's line.
	Check              bool
	HeldTotal, Tickets int
	// Acks (Renew) are the grants the node took in from NextGrant since
	// its last renewal that succeeded: the store forgets them.
	Acks []Ticket
	// Gen (Register) is the generation of the store's state the node
	// knew ("" if none): a store that no longer has it lost its data, and
	// grants nothing until every live node has registered again
	// (State.Learning).
	Gen string
	// Limits, if MaxConnections is not 0, become the fleet's limits if the
	// store has none (a new fleet, or a store that lost its data), in the
	// same step, so the node can admit at once, with Config as the
	// config's limits under them and Paused as the fleet's pause: the
	// operator's word outlives a store that lost it. Limits already in
	// force are kept: SetLimits replaces them.
	Limits Limits
	Config Limits
	Paused bool
	// Fair (Register, with Limits) is the config's fair share, put in
	// force with them in a store that has none.
	Fair FairShare
}

// State is what a renewal (or a registration) learns of the fleet.
type State struct {
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
	// Gen names the generation of the store's state: it changes when the
	// store lost its data (restarted empty, flushed).
	Gen string
	// Learning: the store lost its data and is learning who holds what
	// from the nodes' registrations; it admits and grants nobody until a
	// lease has passed since.
	Learning bool
	// Repair (Renew): the store's count of this node's slots or tickets,
	// or its epoch, differs from the node's: Register.
	Repair bool
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

// Status is a fleet zone's state and every node the store knows, for the
// admin API.
type Status struct {
	State
	// Nodes registered in the store, by ID.
	Nodes []NodeInfo
}
