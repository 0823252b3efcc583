package engine

import (
	"fmt"
	"time"
)

// A waiter, how it is woken, and the waiting lists and order of
// admission: within one key value, a list per priority, highest first;
// within a priority, oldest first (FIFO) or newest first (LIFO). The zone
// (zone.go) owns them and its lock guards them.

// Waker wakes the goroutine of one waiting connection. A zone calls its
// methods with the zone's lock held, so they must not block or call into
// the zone; holding the lock orders them with every grant, so a wake-up is
// never lost.
type Waker interface {
	// Wake: a slot was granted to the waiter, or the settings that bound
	// its wait changed; the woken goroutine calls Zone.Poll to learn which.
	// It may be called more than once.
	Wake()
	// Arm: the waiter goes on waiting until deadline (zero: no deadline),
	// unless woken first. Called when the waiter is queued and whenever
	// Poll tells it to go on waiting.
	Arm(deadline time.Time)
}

// Signal is a Waker for a goroutine that waits on a channel.
type Signal chan struct{}

// NewSignal returns a Signal ready for use.
func NewSignal() Signal { return make(Signal, 1) }

// Wake implements Waker; wake-ups that are not yet received coalesce.
func (s Signal) Wake() {
	select {
	case s <- struct{}{}:
	default:
	}
}

// Arm implements Waker: a Signal's owner keeps its own timer from the
// deadline that Poll returns.
func (s Signal) Arm(time.Time) {}

type waiterState uint8

const (
	stateIdle      waiterState = iota // not in a zone
	stateWaiting                      // in a waiting list
	stateGranted                      // a slot was granted, not yet claimed by Poll
	stateActive                       // holds a slot, handed on
	stateFreed                        // slot given back, or never had one
	stateAbandoned                    // its client left before it was handed on
)

// Waiter is one connection's place in a zone. Its zero value is ready for
// use; set Key, Priority and Remote before Acquire. A Waiter is used for
// one connection only and is owned by that connection's goroutine.
type Waiter struct {
	// Key is the connection's key value: it counts and waits apart from
	// other key values. The empty key is one key of its own.
	Key string
	// Priority: within a key, higher priorities are admitted first.
	Priority int
	// Remote names the client in snapshots (optional).
	Remote fmt.Stringer
	// Tenant is the connection's tenant in a zone with a fair share
	// (SetFair): the zone's slots are shared fairly between tenants. The
	// empty tenant is one tenant of its own. Ignored by other zones.
	Tenant string

	ks         *keyState
	tn         *tenant // its tenant, in a zone with a fair share (fair.go)
	seq        uint64  // arrival order among a fair zone's waiters
	lvl        *level
	prev, next *Waiter
	waker      Waker
	enqueued   time.Time
	position   int
	state      waiterState
	ticket     uint64 // fleet zones: its id in the store's waiting list
	inFleet    bool   // the store's waiting list holds its ticket
	storeGrant bool   // its slot was granted by the store, not claimed yet
}

// Position is the waiter's place in line when it started waiting (1 is
// the next to be admitted; with a fair share, its place in its tenant's
// line), or 0 if it was admitted at once.
func (w *Waiter) Position() int { return w.position }

// Waited is how long the waiter has been (or was) in line by now; 0 if it
// never joined the waiting list.
func (w *Waiter) Waited(now time.Time) time.Duration {
	if w.enqueued.IsZero() {
		return 0
	}
	return now.Sub(w.enqueued)
}

// level is the waiting list of one priority within one key: a doubly
// linked list, admitted from the head for FIFO and from the tail for LIFO.
type level struct {
	prio       int
	head, tail *Waiter
	n          int
	tl         *tenantLevel // the tenant's list this is, in a fair zone; else nil
}

func (l *level) push(w *Waiter) {
	w.lvl = l
	w.prev, w.next = l.tail, nil
	if l.tail != nil {
		l.tail.next = w
	} else {
		l.head = w
	}
	l.tail = w
	l.n++
}

// pushNext puts w back where the next waiter is taken from: the head for
// FIFO, the tail for LIFO.
func (l *level) pushNext(w *Waiter, order Order) {
	if order == LIFO || l.head == nil {
		l.push(w)
		return
	}
	w.lvl = l
	w.prev, w.next = nil, l.head
	l.head.prev = w
	l.head = w
	l.n++
}

func (l *level) remove(w *Waiter) {
	if w.prev != nil {
		w.prev.next = w.next
	} else {
		l.head = w.next
	}
	if w.next != nil {
		w.next.prev = w.prev
	} else {
		l.tail = w.prev
	}
	w.prev, w.next, w.lvl = nil, nil, nil
	l.n--
}

// keyState is the count and waiting lists of one key value.
type keyState struct {
	key     string
	active  int
	waiting int
	asking  int      // fleet zones: connections whose Take is in flight
	held    int      // fleet zones: slots the store counts for this node, as far as it knows
	levels  []*level // by priority, highest first; empty levels are kept
}

func (ks *keyState) level(prio int) *level {
	i := 0
	for ; i < len(ks.levels); i++ {
		if ks.levels[i].prio == prio {
			return ks.levels[i]
		}
		if ks.levels[i].prio < prio {
			break
		}
	}
	l := &level{prio: prio}
	ks.levels = append(ks.levels, nil)
	copy(ks.levels[i+1:], ks.levels[i:])
	ks.levels[i] = l
	return l
}

// ahead counts the waiters that would be admitted before a new waiter of
// priority prio joining now.
func (ks *keyState) ahead(prio int, order Order) int {
	n := 0
	for _, l := range ks.levels {
		if l.prio > prio || (l.prio == prio && order == FIFO) {
			n += l.n
		}
	}
	return n
}

// next is the waiter to admit next, or nil.
func (ks *keyState) next(order Order) *Waiter {
	for _, l := range ks.levels {
		if l.n == 0 {
			continue
		}
		if order == LIFO {
			return l.tail
		}
		return l.head
	}
	return nil
}

// each calls f for every waiter in admission order until f returns false.
// (A zone with a fair share keeps the default key's waiters in its fair
// queue instead: see Zone.eachWaiter.)
func (ks *keyState) each(order Order, f func(*Waiter) bool) bool {
	for _, l := range ks.levels {
		if order == LIFO {
			for w := l.tail; w != nil; w = w.prev {
				if !f(w) {
					return false
				}
			}
			continue
		}
		for w := l.head; w != nil; w = w.next {
			if !f(w) {
				return false
			}
		}
	}
	return true
}
