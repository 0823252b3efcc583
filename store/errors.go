package store

import (
	"errors"
	"fmt"
)

var (
	// ErrLapsed: this node is not registered in the store (its lease ran
	// out and it was reaped, or the store lost its data). Register first.
	ErrLapsed = errors.New("connlimit: this node's lease in the store lapsed")
	// ErrNoLimits: the store holds no limits for the zone yet.
	ErrNoLimits = errors.New("connlimit: the store holds no limits for the zone")
	// ErrClosed is returned after Close.
	ErrClosed = errors.New("connlimit: store closed")
)

// Error is an error of one store operation of a fleet zone.
type Error struct {
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

func (e *Error) Error() string {
	return fmt.Sprintf("connlimit: zone %q: store %s: %v", e.Zone, e.Op, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }
