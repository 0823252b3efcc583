package store

import (
	"fmt"
	"strings"
	"time"
)

// Limits are the settings of a zone that every connection of it shares;
// in a fleet, the store holds them for every node.
type Limits struct {
	// MaxConnections is the number of slots (per key value); at least 1.
	MaxConnections int
	// MaxWaiting bounds the waiting list (per key value): 0 means no bound,
	// -1 means nobody waits.
	MaxWaiting int
	// WaitTimeout rejects a waiter after this long; 0 means no timeout.
	WaitTimeout time.Duration
	// Order among waiters of equal priority.
	Order Order
}

// Validate reports the first field of l that is out of range.
func (l Limits) Validate() error {
	if l.MaxConnections < 1 {
		return fmt.Errorf("max_connections must be at least 1, got %d", l.MaxConnections)
	}
	if l.MaxWaiting < -1 {
		return fmt.Errorf("max_waiting must be -1 (nobody waits), 0 (no bound) or positive, got %d", l.MaxWaiting)
	}
	if l.WaitTimeout < 0 {
		return fmt.Errorf("wait_timeout must not be negative, got %s", l.WaitTimeout)
	}
	if l.Order != FIFO && l.Order != LIFO {
		return fmt.Errorf("order must be fifo or lifo, got %d", l.Order)
	}
	return nil
}

// Settings are a node's word on the fleet's limits.
type Settings struct {
	// Limits are those to put in force: the config's, or an operator's
	// override over them.
	Limits Limits
	// Config are the limits the node's config gives.
	Config Limits
	// FromConfig: Limits are the config's (a node joins, or a config load
	// changed them), not an operator's override.
	FromConfig bool
	// Fair is the config's fair share; only a config's word (FromConfig)
	// changes the store's.
	Fair FairShare
}

// FairShare is a fleet zone's fair share between tenants (the handlers'
// fair_share, weights and fair_max); its zero value is off. With it on,
// the key values of Ticket.Key, Give and NodeState.Held name tenants:
// max_connections and max_waiting count the zone as a whole, and a slot
// that frees goes to the waiting tenant below Max with the fewest slots
// for its weight (a higher priority first; on a tie, the tenant whose
// next waiter comes first in the zone's order).
type FairShare struct {
	On bool
	// Weights of tenants by value; every other tenant weighs 1.
	Weights map[string]int `json:",omitempty"`
	// Max is the most slots one tenant may hold at once; 0 is no cap.
	Max int
}

// Order is the order in which waiters of equal priority are admitted.
type Order uint8

const (
	// FIFO admits the waiter that has waited longest first.
	FIFO Order = iota
	// LIFO admits the newest waiter first.
	LIFO
)

func (o Order) String() string {
	if o == LIFO {
		return "lifo"
	}
	return "fifo"
}

// ParseOrder reads an order as a config gives it: "fifo" or "lifo" in any
// case; "" is the default, FIFO.
func ParseOrder(s string) (Order, error) {
	switch strings.ToLower(s) {
	case "", "fifo":
		return FIFO, nil
	case "lifo":
		return LIFO, nil
	}
	return FIFO, fmt.Errorf("must be fifo or lifo, got '%s'", s)
}

// Outcome is what became of a connection that asked for a slot.
type Outcome uint8

const (
	// Admitted: it holds a slot; it gives it back when done.
	Admitted Outcome = iota
	// Queued: it waits in line for a grant.
	Queued
	// Rejected: it holds nothing; the Reason says why.
	Rejected
	// Abandoned: its client left while it waited; it holds nothing.
	Abandoned
)

// Reason says why a connection was rejected.
type Reason uint8

const (
	// ReasonNone: not rejected.
	ReasonNone Reason = iota
	// ReasonQueueFull: the waiting list was at max_waiting.
	ReasonQueueFull
	// ReasonWaitTimeout: the connection waited wait_timeout without a slot.
	ReasonWaitTimeout
	// ReasonNoWaiting: max_waiting is -1 and every slot was taken.
	ReasonNoWaiting
)

// Reasons lists the rejection reasons, in the order of their values.
var Reasons = [...]Reason{ReasonQueueFull, ReasonWaitTimeout, ReasonNoWaiting}

func (r Reason) String() string {
	switch r {
	case ReasonQueueFull:
		return "queue_full"
	case ReasonWaitTimeout:
		return "wait_timeout"
	case ReasonNoWaiting:
		return "no_waiting"
	}
	return "none"
}
