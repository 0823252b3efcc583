package connlimit

import (
	"net"
	"sync"
	"time"
)

// When Caddy exits (a SIGTERM, `caddy stop`, a rolling deploy), a fleet
// zone's connections would end only with the process: too late to give
// their slots and places in line back to the fleet, which would then wait
// out the node's lease. So the handler of a fleet zone keeps its stream
// connections, and closes them when it is cleaned up while Caddy exits:
// each gives back its slot, or leaves the line, as any connection that
// ends; then the drained zone deregisters (internal/engine leaveFleet).
// A slot goes back only once its connection has ended (for a proxy, once
// the backend closed too; most do when the client has): the fleet never
// counts more than its bound on the way. A connection that does not end
// within exitDrain keeps its slot in the store until the node's lease runs
// out, as when a node crashes.

// exitDrain bounds how long an exiting handler waits for its closed
// connections to give back their slots.
const exitDrain = 2 * time.Second

// liveConns are the stream connections a fleet zone's handler is handling,
// from arrival until Handle returns.
type liveConns struct {
	mu      sync.Mutex
	m       map[net.Conn]struct{}
	wg      sync.WaitGroup
	closing bool
}

// add tracks c; false if the handler is closing its connections, in which
// case c was closed.
func (l *liveConns) add(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closing {
		_ = c.Close()
		return false
	}
	if l.m == nil {
		l.m = make(map[net.Conn]struct{})
	}
	l.m[c] = struct{}{}
	l.wg.Add(1)
	return true
}

// done stops tracking c, once its Handle returns.
func (l *liveConns) done(c net.Conn) {
	l.mu.Lock()
	delete(l.m, c)
	l.mu.Unlock()
	l.wg.Done()
}

// closeAll closes every tracked connection and waits, up to within, until
// their handlers have returned. It returns how many it closed and whether
// they all returned in time.
func (l *liveConns) closeAll(within time.Duration) (int, bool) {
	l.mu.Lock()
	l.closing = true
	n := len(l.m)
	for c := range l.m {
		_ = c.Close()
	}
	l.mu.Unlock()
	done := make(chan struct{})
	go func() { l.wg.Wait(); close(done) }()
	t := time.NewTimer(within)
	defer t.Stop()
	select {
	case <-done:
		return n, true
	case <-t.C:
		return n, false
	}
}
