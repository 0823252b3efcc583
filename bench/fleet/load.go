package main

import (
	"fmt"
	"os"
	"runtime"
	"slices"
	"time"
)

// idleInfo is what the fleet costs Redis with no connection at all: the
// nodes' renewals and re-armed BRPOPLPUSHes, for 3 fleet zones on 3 nodes.
type idleInfo struct {
	window   time.Duration
	redisCPU time.Duration
	cs       cmdStats
}

func (i idleInfo) cpuPerSec() time.Duration {
	return time.Duration(float64(i.redisCPU) / i.window.Seconds())
}

func measureIdle(e *env) (idleInfo, error) {
	w := 6 * time.Second
	if e.cfg.quick {
		w = 2 * time.Second
	}
	cs0, err := e.redis.commandStats()
	if err != nil {
		return idleInfo{}, err
	}
	cpu0, t0 := procCPU(e.redis.pid), time.Now()
	time.Sleep(w)
	cpu1, t1 := procCPU(e.redis.pid), time.Now()
	cs1, err := e.redis.commandStats()
	if err != nil {
		return idleInfo{}, err
	}
	d := cs1.sub(cs0)
	delete(d, "info")
	return idleInfo{window: t1.Sub(t0), redisCPU: cpu1 - cpu0, cs: d}, nil
}

// sample is the CPU of the processes and the machine at one moment.
type sample struct {
	at         time.Time
	redis      time.Duration
	nodes      []time.Duration
	self       time.Duration
	busy, tot  uint64
	cs         cmdStats
	served     int64
	backendErr int64
	hist       hist // the nodes' store_seconds of zone, summed
}

// takeSample samples CPU and counts; with zone, also the nodes' store
// round-trip histograms of that zone.
func takeSample(e *env, zone string) sample {
	s := sample{at: time.Now(), redis: procCPU(e.redis.pid), self: procCPU(os.Getpid())}
	for _, n := range e.nodes {
		s.nodes = append(s.nodes, procCPU(n.pid))
	}
	s.busy, s.tot = cpuBusy()
	s.cs, _ = e.redis.commandStats()
	s.served = e.backend.served.Load()
	s.backendErr = e.backend.bad.Load()
	if zone != "" {
		for _, n := range e.nodes {
			s.hist = s.hist.add(n.storeHist(zone))
		}
	}
	return s
}

// usage is what happened between two samples.
type usage struct {
	wall      time.Duration
	redis     time.Duration
	nodes     []time.Duration
	self      time.Duration
	machine   float64 // busy fraction of all cores
	cs        cmdStats
	served    int64
	backendEr int64
	hist      hist
}

func between(a, b sample) usage {
	u := usage{wall: b.at.Sub(a.at), redis: b.redis - a.redis, self: b.self - a.self,
		cs: b.cs.sub(a.cs), served: b.served - a.served, backendEr: b.backendErr - a.backendErr,
		hist: b.hist.sub(a.hist)}
	for i := range a.nodes {
		u.nodes = append(u.nodes, b.nodes[i]-a.nodes[i])
	}
	if b.tot > a.tot {
		u.machine = float64(b.busy-a.busy) / float64(b.tot-a.tot)
	}
	delete(u.cs, "info")
	return u
}

// others is the CPU (in cores) that processes other than this program,
// its nodes and its redis-server used: the machine's busy time minus
// theirs.
func (u usage) others() float64 {
	ours := float64(u.redis+u.nodeCPU()+u.self) / float64(u.wall)
	return max(0, u.machine*float64(runtime.NumCPU())-ours)
}

func (u usage) nodeCPU() time.Duration {
	var t time.Duration
	for _, d := range u.nodes {
		t += d
	}
	return t
}

// roundTrips is the FCALL and BRPOPLPUSH calls of the window.
func (u usage) roundTrips() int64 {
	return u.cs["fcall"] + u.cs["brpoplpush"]
}

// ---- added latency of a connection admitted at once ----

type latencyResult struct {
	fleet, local []int64 // connect -> first reply byte, ns, sorted
	load         loadInfo
}

// addedLatency runs connections one at a time through node A's fleet zone
// and its local zone (both never full; the backend answers at once),
// alternating, and measures connect -> first reply byte.
func addedLatency(e *env, r *report) error {
	c := e.cfg
	res := &latencyResult{load: c.waitLoad("added latency")}
	e.backend.setHold(0)
	a := e.nodes[0]
	logf("added latency: %d connections through each zone", c.latConns)
	line := []byte("lat\n")
	for i := range c.latConns + 50 {
		first := []string{zOpen, zOpenLocal}
		if i%2 == 1 {
			first = []string{zOpenLocal, zOpen}
		}
		for _, z := range first {
			d, err := oneConn(c.dialer, a.listen[z], line, 10*time.Second)
			if err != nil {
				return fmt.Errorf("zone %s: %v", z, err)
			}
			if i < 50 {
				continue // warm-up
			}
			if z == zOpen {
				res.fleet = append(res.fleet, int64(d))
			} else {
				res.local = append(res.local, int64(d))
			}
		}
	}
	slices.Sort(res.fleet)
	slices.Sort(res.local)
	res.load.done()
	r.latency = res
	return nil
}
