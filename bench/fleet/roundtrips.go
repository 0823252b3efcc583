package main

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// rtResult is the store traffic of one round-trip measurement.
type rtResult struct {
	conns int // connections measured
	// extra are connections in the window that are not the measured kind
	// (the waited measurement's first holder, admitted before the window:
	// its give is in the window).
	extraGives int
	// From INFO commandstats over the window (every zone, and the
	// commands functions run too).
	cs cmdStats
	// From MONITOR over the same window: commands clients sent, per zone
	// and per function.
	mon     map[string]map[string]int64
	monErr  error
	window  time.Duration
	zone    string
	blpopOK int64 // BRPOPLPUSHes that delivered a grant: LPUSHes in the window
}

// perConn is the zone's round trips per measured connection: its calls
// of take, give and leave, and the BRPOPLPUSHes that delivered a grant; renewals and re-armed BRPOPLPUSHes are
// the nodes' own, shown apart.
func (r *rtResult) perConn() float64 {
	z := r.mon[r.zone]
	n := z["take"] + z["give"] + z["leave"] + r.blpopOK - int64(r.extraGives)
	return float64(n) / float64(r.conns)
}

// own is what the nodes sent of their own in the window, every zone:
// renewals, registrations, status, and BRPOPLPUSHes that delivered nothing.
func (r *rtResult) own() (renew, other, blpopIdle int64) {
	for _, z := range r.mon {
		renew += z["renew"]
		other += z["register"] + z["status"] + z["set_limits"] + z["set_paused"]
	}
	blpopIdle = r.cs["brpoplpush"] - r.blpopOK
	return
}

// monScripts is the number of FCALLs that MONITOR saw.
func (r *rtResult) monScripts() int64 {
	var n int64
	for _, z := range r.mon {
		for what, v := range z {
			if what != "brpoplpush" && what != "echo" && what != "ping" {
				n += v
			}
		}
	}
	return n
}

type rtResults struct {
	open, waited *rtResult
	load         loadInfo
}

// window runs f between two commandstats snapshots, with MONITOR on.
func window(e *env, zone string, f func() error) (*rtResult, error) {
	res := &rtResult{zone: zone}
	mon, err := startMonitor(e.redis.addr)
	if err != nil {
		return nil, err
	}
	cs0, err := e.redis.commandStats()
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	if err := f(); err != nil {
		_, _ = mon.stop(e.redis)
		return nil, err
	}
	time.Sleep(300 * time.Millisecond) // the last gives and grants land
	cs1, err := e.redis.commandStats()
	if err != nil {
		return nil, err
	}
	res.window = time.Since(t0)
	res.mon, res.monErr = mon.stop(e.redis)
	res.cs = cs1.sub(cs0)
	delete(res.cs, "info")
	delete(res.cs, "monitor")
	res.blpopOK = res.cs["lpush"]
	return res, nil
}

// roundTrips counts the store's round trips of a connection admitted at
// once (zone open, through nodes A, B and C) and of one that waited (zone
// handoff, max 1: each waiter queued on the node that does not hold the
// slot).
func roundTrips(e *env, r *report) error {
	c := e.cfg
	res := &rtResults{load: c.waitLoad("round trips")}
	if err := warmUp(e); err != nil {
		return err
	}

	logf("round trips: %d connections admitted at once", c.rtConns)
	var err error
	res.open, err = window(e, zOpen, func() error { return openConns(e, c.rtConns, 6) })
	if err != nil {
		return err
	}
	res.open.conns = c.rtConns

	logf("round trips: %d connections that waited", c.rtWaited)
	g := newRig(e, zHandoff)
	if err := g.start(0); err != nil {
		return err
	}
	res.waited, err = window(e, zHandoff, func() error {
		for range c.rtWaited {
			if _, err := g.step(1 - g.at); err != nil {
				return err
			}
		}
		return g.finish()
	})
	if err != nil {
		return err
	}
	res.waited.conns = c.rtWaited
	res.waited.extraGives = 1 // the first holder, admitted before the window
	res.load.done()
	r.rt = res
	return nil
}

// openConns runs n connections admitted at once (zone open) with the
// given number of clients, spread over the nodes; the backend answers at
// once.
func openConns(e *env, n, workers int) error {
	e.backend.setHold(0)
	var next atomic.Int64
	var failed atomic.Int64
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			addr := e.nodes[w%len(e.nodes)].listen[zOpen]
			for {
				i := next.Add(1)
				if i > int64(n) {
					return
				}
				if _, err := oneConn(e.cfg.dialer, addr, []byte(fmt.Sprintf("open-%d\n", i)), 30*time.Second); err != nil {
					failed.Add(1)
				}
			}
		}(w)
	}
	wg.Wait()
	if f := failed.Load(); f > 0 {
		return fmt.Errorf("%d of %d connections admitted at once failed", f, n)
	}
	return nil
}

// warmUp runs connections admitted at once through every node, and a few
// hand-offs between A and B: the library is then loaded and
// every node's connections to Redis are dialled.
func warmUp(e *env) error {
	if err := openConns(e, 60, 6); err != nil {
		return err
	}
	g := newRig(e, zHandoff)
	if err := g.start(0); err != nil {
		return err
	}
	for k := range 6 {
		if _, err := g.step(k % 2); err != nil {
			return err
		}
	}
	return g.finish()
}
