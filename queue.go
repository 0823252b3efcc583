package connlimit

import (
	"fmt"
	"strings"
)

// The waiting lists and the order of admission: within one key value, a
// list per priority, highest first; within a priority, oldest first (FIFO)
// or newest first (LIFO). The zone (zone.go) owns them and its lock guards
// them.

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

// level is the waiting list of one priority within one key: a doubly
// linked list, admitted from the head for FIFO and from the tail for LIFO.
type level struct {
	prio       int
	head, tail *Waiter
	n          int
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
