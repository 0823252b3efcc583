package engine

import "github.com/l4-connlimit/connlimit/store"

// A zone's settings and what becomes of a connection are the store
// contract's types, so that a fleet zone speaks to its store without
// translating them.
type (
	Limits  = store.Limits
	Order   = store.Order
	Outcome = store.Outcome
	Reason  = store.Reason
)

// The values of Order, Outcome and Reason.
const (
	FIFO = store.FIFO
	LIFO = store.LIFO

	Admitted  = store.Admitted
	Queued    = store.Queued
	Rejected  = store.Rejected
	Abandoned = store.Abandoned

	ReasonNone        = store.ReasonNone
	ReasonQueueFull   = store.ReasonQueueFull
	ReasonWaitTimeout = store.ReasonWaitTimeout
	ReasonNoWaiting   = store.ReasonNoWaiting
)
