package main

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/l4-connlimit/connlimit/store"
	"github.com/l4-connlimit/connlimit/store/redisstore"
)

// capacityResult is how much one zone asks of Redis, two ways.
type capacityResult struct {
	// Through Caddy: admitted-at-once connections through nodes A, B, C
	// as fast as the clients go.
	caddy     usage
	caddyConn int
	// Straight at the store: take + give pairs from many goroutines of
	// this program, with the store's own client (what a node sends).
	store      usage
	storePairs int64
	storeErrs  int64
	load       loadInfo // through Caddy
	storeLoad  loadInfo // straight at the store
}

func capacity(e *env, r *report) error {
	c := e.cfg
	res := &capacityResult{load: c.waitLoad("capacity")}
	e.backend.setHold(0)

	logf("capacity: %d clients, admitted at once, through nodes A, B, C for %s", c.capWorkers, c.capWindow)
	var addrs []string
	for _, n := range e.nodes {
		addrs = append(addrs, n.listen[zOpen])
	}
	start := time.Now()
	mStart := start.Add(500 * time.Millisecond)
	mEnd := mStart.Add(c.capWindow)
	var a, b sample
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		time.Sleep(time.Until(mStart))
		a = takeSample(e, "")
		time.Sleep(time.Until(mEnd))
		b = takeSample(e, "")
	}()
	lr := runLoad(c.dialer, addrs, c.capWorkers, mStart, mEnd, mEnd.Add(5*time.Second))
	wg.Wait()
	if lr.errs > 0 {
		return fmt.Errorf("capacity through Caddy: %d connections failed", lr.errs)
	}
	res.caddy, res.caddyConn = between(a, b), lr.completed
	logf("  %d conn in %s, Redis CPU %s", lr.completed, c.capWindow, res.caddy.redis)

	res.load.done()
	res.storeLoad = c.waitLoad("capacity, straight at the store")
	logf("capacity: %d goroutines, take + give straight at the store, for %s", c.storeWorkers, c.capWindow)
	st, err := redisstore.New(redisstore.Options{Address: e.redis.addr, Lease: c.lease}, "capacity", "bench-direct")
	if err != nil {
		return err
	}
	defer st.Close()
	ctx, cancel := context.WithTimeout(context.Background(), c.capWindow+time.Minute)
	defer cancel()
	if _, err := st.Register(ctx, store.NodeState{Limits: store.Limits{MaxConnections: 1 << 30}}); err != nil {
		return err
	}
	stopRenew := make(chan struct{})
	renewDone := make(chan struct{})
	go func() {
		defer close(renewDone)
		t := time.NewTicker(store.RenewEvery(st.Lease()))
		defer t.Stop()
		for {
			select {
			case <-stopRenew:
				return
			case <-t.C:
				_, _ = st.Renew(ctx, store.NodeState{})
			}
		}
	}()
	var ids atomic.Uint64
	pair := func() error {
		out, _, err := st.Take(ctx, store.Ticket{ID: ids.Add(1)})
		if err != nil {
			return err
		}
		if out != store.Admitted {
			return fmt.Errorf("take: %v", out)
		}
		return st.Give(ctx, "")
	}
	for range 100 { // warm-up: library loaded, pool dialled
		if err := pair(); err != nil {
			return err
		}
	}
	start = time.Now()
	mStart = start.Add(500 * time.Millisecond)
	mEnd = mStart.Add(c.capWindow)
	var inWindow, errs atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		time.Sleep(time.Until(mStart))
		a = takeSample(e, "")
		time.Sleep(time.Until(mEnd))
		b = takeSample(e, "")
	}()
	for range c.storeWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				now := time.Now()
				if !now.Before(mEnd) {
					return
				}
				if err := pair(); err != nil {
					errs.Add(1)
					continue
				}
				if t := time.Now(); !t.Before(mStart) && t.Before(mEnd) {
					inWindow.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	close(stopRenew)
	<-renewDone
	res.store, res.storePairs, res.storeErrs = between(a, b), inWindow.Load(), errs.Load()
	logf("  %d pairs in %s, Redis CPU %s, errors %d", res.storePairs, c.capWindow, res.store.redis, res.storeErrs)
	res.storeLoad.done()
	r.capacity = res
	return nil
}
