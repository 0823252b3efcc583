package main

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// rig drives hand-offs in a zone of max 1: one holder at the backend
// (gated: it is answered when the driver says so), one waiter queued on a
// chosen node; the holder is released and the time from its close at the
// backend to the waiter's accept at the backend is one sample. The waiter
// is then the holder of the next step.
type rig struct {
	e      *env
	zone   string
	holder *heldConn
	at     int // node index of the holder
	seq    int
	wg     sync.WaitGroup
	errs   atomic.Int64
	lastEr atomic.Value
}

const stepTimeout = 5 * time.Second

func newRig(e *env, zone string) *rig {
	e.backend.setGated()
	return &rig{e: e, zone: zone}
}

// client connects one client to node i's zone in the background; it
// reads its answer to EOF.
func (g *rig) client(i int) {
	g.seq++
	line := []byte(fmt.Sprintf("%s-%d\n", g.zone, g.seq))
	addr := g.e.nodes[i].listen[g.zone]
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		if _, err := oneConn(g.e.cfg.dialer, addr, line, time.Minute); err != nil {
			g.errs.Add(1)
			g.lastEr.Store(err.Error())
		}
	}()
}

// start makes a holder on node i.
func (g *rig) start(i int) error {
	g.client(i)
	select {
	case h := <-g.e.backend.gate:
		g.holder, g.at = h, i
		return nil
	case <-time.After(stepTimeout):
		return fmt.Errorf("zone %s: the first holder did not reach the backend", g.zone)
	}
}

// step queues a waiter on node i, releases the holder and returns the
// time from the holder's close at the backend to the waiter's accept.
func (g *rig) step(i int) (time.Duration, error) {
	g.client(i)
	deadline := time.Now().Add(stepTimeout)
	for {
		w, _, err := g.e.nodes[i].zoneCounts(g.zone)
		if err == nil && w == 1 {
			break
		}
		select {
		case h := <-g.e.backend.gate:
			return 0, fmt.Errorf("zone %s: a waiter reached the backend while the holder held the only slot (%s)", g.zone, h.line)
		default:
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("zone %s: the waiter on node %s was not queued within %s (waiting %d, %v)", g.zone, g.e.nodes[i].name, stepTimeout, w, err)
		}
		time.Sleep(500 * time.Microsecond)
	}
	time.Sleep(2 * time.Millisecond) // let the admin request's work settle
	close(g.holder.release)
	closed := <-g.holder.closed
	select {
	case h := <-g.e.backend.gate:
		g.holder, g.at = h, i
		d := h.accepted.Sub(closed)
		if d < 0 {
			return 0, fmt.Errorf("zone %s: the waiter reached the backend %s before the holder closed", g.zone, -d)
		}
		return d, nil
	case <-time.After(stepTimeout):
		return 0, fmt.Errorf("zone %s: the waiter on node %s was not handed on within %s of the holder's close", g.zone, g.e.nodes[i].name, stepTimeout)
	}
}

// finish releases the holder and waits (bounded) for every client.
func (g *rig) finish() error {
	if g.holder != nil {
		close(g.holder.release)
		<-g.holder.closed
		g.holder = nil
	}
	done := make(chan struct{})
	go func() { g.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		return fmt.Errorf("zone %s: clients still open 10 s after the end", g.zone)
	}
	if n := g.errs.Load(); n > 0 {
		return fmt.Errorf("zone %s: %d clients failed (last: %v)", g.zone, n, g.lastEr.Load())
	}
	return nil
}

// handoffResult holds the samples of each kind of hand-off, in µs.
type handoffResult struct {
	cross, same, local []int64 // ns
	load               loadInfo
	took               time.Duration
}

// handoffs measures hand-offs of three kinds, interleaved in blocks:
// cross-node (fleet zone, holder on A, waiter on B, or the reverse),
// same-node (fleet zone, holder and waiter on the same node: still
// through the store) and local (a zone with no store on node A).
func handoffs(e *env, r *report) error {
	c := e.cfg
	res := &handoffResult{load: c.waitLoad("hand-offs")}
	logf("hand-offs: %d samples of each kind", c.handoffs)
	start := time.Now()
	deadline := start.Add(10 * time.Minute)
	const block = 25
	for len(res.cross) < c.handoffs || len(res.same) < c.handoffs || len(res.local) < c.handoffs {
		if time.Now().After(deadline) {
			return fmt.Errorf("hand-offs: not done within 10 min")
		}
		if len(res.cross) < c.handoffs || len(res.same) < c.handoffs {
			g := newRig(e, zHandoff)
			if err := g.start(0); err != nil {
				return err
			}
			for k := 0; k < 2*block; k++ {
				cross := k%2 == 0
				to := g.at
				if cross {
					to = 1 - g.at // A <-> B
				}
				d, err := g.step(to)
				if err != nil {
					return err
				}
				if cross {
					res.cross = append(res.cross, int64(d))
				} else {
					res.same = append(res.same, int64(d))
				}
			}
			if err := g.finish(); err != nil {
				return err
			}
		}
		if len(res.local) < c.handoffs {
			g := newRig(e, zHandoffLocal)
			if err := g.start(0); err != nil {
				return err
			}
			for range block {
				d, err := g.step(0)
				if err != nil {
					return err
				}
				res.local = append(res.local, int64(d))
			}
			if err := g.finish(); err != nil {
				return err
			}
		}
	}
	res.took = time.Since(start)
	res.load.done()
	r.handoff = res
	logf("hand-offs: done in %s", res.took.Round(time.Millisecond))
	return nil
}
