package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
)

// idleInfo is what the fleet costs Redis with no connection at all: the
// nodes' renewals and re-armed BLPOPs, for 3 fleet zones on 3 nodes.
type idleInfo struct {
	window   time.Duration
	redisCPU time.Duration
	cs       cmdStats
}

func (i idleInfo) cpuPerSec() time.Duration {
	return time.Duration(float64(i.redisCPU) / i.window.Seconds())
}

func measureIdle(e *env) (idleInfo, error) {
	w := 3 * time.Second
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

func (u usage) nodeCPU() time.Duration {
	var t time.Duration
	for _, d := range u.nodes {
		t += d
	}
	return t
}

// scripts is the EVALSHA, EVAL and BLPOP calls of the window.
func (u usage) roundTrips() int64 { return u.cs["evalsha"] + u.cs["eval"] + u.cs["blpop"] }

// ---- the limit-bound workload ----

type limitRun struct {
	fleet    bool
	round    int
	res      *loadResult
	u        usage
	peak     int64
	tput     float64 // completed per second in the window
	p50, p99 float64 // ms
	load     float64
	gaps     []int64 // backend close -> next accept, ns, sorted
}

type limitResult struct {
	runs []*limitRun
	load loadInfo
	prof *profileResult
}

// limitBound runs C clients against a zone of max L whose backend holds
// each connection H: the fleet zone with clients spread over the three
// nodes, and node A's local zone with every client on it, interleaved
// (the order alternates between rounds).
func limitBound(e *env, r *report) error {
	c := e.cfg
	res := &limitResult{load: c.waitLoad("limit-bound")}
	for round := range c.rounds {
		order := []bool{true, false}
		if round%2 == 1 {
			order = []bool{false, true}
		}
		for _, fleet := range order {
			if round > 0 || !fleet {
				// each run starts on a quiet machine, as far as it can
				_ = c.waitLoad(fmt.Sprintf("limit-bound round %d", round+1))
			}
			run, err := limitOnce(e, fleet, round, nil)
			if err != nil {
				return err
			}
			res.runs = append(res.runs, run)
		}
	}
	if c.profile {
		logf("limit-bound: an extra fleet run with CPU profiles (not in the tables)")
		prof := &profileResult{}
		if _, err := limitOnce(e, true, -1, prof); err != nil {
			return err
		}
		select {
		case <-prof.done:
			res.prof = prof
		case <-time.After(2 * time.Minute):
			res.prof = &profileResult{err: "the profile did not come within 2 min"}
		}
	}
	res.load.done()
	r.limit = res
	return nil
}

func limitOnce(e *env, fleet bool, round int, prof *profileResult) (*limitRun, error) {
	c := e.cfg
	e.backend.setHold(c.hold)
	var addrs []string
	if fleet {
		for _, n := range e.nodes {
			addrs = append(addrs, n.listen[zLimit])
		}
	} else {
		addrs = []string{e.nodes[0].listen[zLimitLocal]}
	}
	run := &limitRun{fleet: fleet, round: round, load: loadAvg1()}
	what := map[bool]string{true: "fleet zone over 3 nodes", false: "local zone on node A"}[fleet]
	logf("limit-bound round %d: %s, C=%d max=%d hold=%s (load %.2f)", round+1, what, c.clients, c.limit, c.hold, run.load)
	e.backend.resetPeak()
	start := time.Now()
	mStart := start.Add(c.warmup)
	mEnd := mStart.Add(c.window)
	hardStop := mEnd.Add(c.grace)
	var a, b sample
	var wg sync.WaitGroup
	wg.Add(1)
	zone := ""
	if fleet {
		zone = zLimit
	}
	e.backend.startRecording()
	go func() {
		defer wg.Done()
		time.Sleep(time.Until(mStart))
		a = takeSample(e, zone)
		if prof != nil {
			prof.take(e, c.window)
		}
		time.Sleep(time.Until(mEnd))
		b = takeSample(e, zone)
	}()
	run.res = runLoad(c.dialer, addrs, c.clients, mStart, mEnd, hardStop)
	wg.Wait()
	acc, cls := e.backend.stopRecording()
	base := e.backend.base
	run.gaps = handoffGaps(acc, cls, c.limit, int64(mStart.Sub(base)), int64(mEnd.Sub(base)))
	run.u = between(a, b)
	run.peak = e.backend.peak.Load()
	// wait (bounded) until the backend is empty again
	for deadline := time.Now().Add(10 * time.Second); e.backend.active.Load() > 0 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	run.tput = float64(run.res.completed) / c.window.Seconds()
	run.p50 = float64(pct(run.res.lat, 50)) / 1e6
	run.p99 = float64(pct(run.res.lat, 99)) / 1e6
	logf("  %.0f conn/s, p50 %.1f ms, p99 %.1f ms, peak %d, failed %d, Redis CPU %s, hand-off gap p50 %.3f ms",
		run.tput, run.p50, run.p99, run.peak, run.res.failed, run.u.redis, float64(pct(run.gaps, 50))/1e6)
	if run.res.errs > 0 {
		return nil, fmt.Errorf("limit-bound (%s): %d connections failed", what, run.res.errs)
	}
	if run.peak > int64(c.limit) {
		return nil, fmt.Errorf("limit-bound (%s): the backend saw %d connections at once, max is %d", what, run.peak, c.limit)
	}
	return run, nil
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

// ---- CPU profiles ----

type profileResult struct {
	nodeTop, err string
	done         chan struct{}
}

// take fetches node A's CPU profile over d (in the background of the run
// it is called in) and summarizes it with go tool pprof.
func (p *profileResult) take(e *env, d time.Duration) {
	file := filepath.Join(e.cfg.workDir, "nodeA-limit.pprof")
	secs := max(1, int(d.Seconds()))
	p.done = make(chan struct{})
	go func() {
		defer close(p.done)
		if err := e.nodes[0].fetch(fmt.Sprintf("/debug/pprof/profile?seconds=%d", secs), file); err != nil {
			p.err = err.Error()
			return
		}
		out, err := exec.Command("go", "tool", "pprof", "-top", "-nodecount=35", e.cfg.caddyBin, file).CombinedOutput()
		if err != nil {
			p.err = fmt.Sprintf("%v: %s", err, out)
			return
		}
		p.nodeTop = strings.TrimSpace(string(out))
	}()
}
