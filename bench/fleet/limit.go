package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/l4-connlimit/connlimit/bench/internal/benchkit"

	"github.com/redis/go-redis/v9"
)

// The limit-bound workload: C clients in a closed loop against a zone of
// max L whose backend holds each connection H.

type limitKind int

const (
	fleet3 limitKind = iota // the fleet zone, clients spread over A, B, C
	local1                  // node A's local zone, every client on A
	fleet1                  // the fleet zone, every client on A (diagnostic)
)

func (k limitKind) String() string {
	return [...]string{"fleet, 3 nodes", "local, node A", "fleet, node A only"}[k]
}

func (k limitKind) isFleet() bool { return k != local1 }

type limitRun struct {
	kind     limitKind
	round    int
	res      *loadResult
	u        usage
	peak     int64
	tput     float64 // completed per second in the window
	p50, p99 float64 // ms
	load     float64
	gaps     []int64 // backend close -> next accept, ns, sorted
	// backlog: grants waiting in Redis for their node's BRPOPLPUSH, summed
	// over the nodes, sampled every 20 ms in the window (fleet kinds)
	backlog []int64
}

type limitResult struct {
	kinds []limitKind
	runs  []*limitRun
	load  loadInfo
	profs []*profileResult
}

// limitBound runs the kinds interleaved, rotating their order between
// rounds, each run after waiting for a quiet machine; then, with
// -profile, one extra run of each kind with node A profiled.
func limitBound(e *env, r *report) error {
	c := e.cfg
	res := &limitResult{load: c.waitLoad("limit-bound"), kinds: []limitKind{fleet3, local1}}
	if c.limitFleet1 {
		res.kinds = append(res.kinds, fleet1)
	}
	for round := range c.rounds {
		for i := range res.kinds {
			k := res.kinds[(i+round)%len(res.kinds)]
			if round > 0 || i > 0 {
				_ = c.waitLoad(fmt.Sprintf("limit-bound round %d", round+1))
			}
			run, err := limitOnce(e, k, round, nil)
			if err != nil {
				return err
			}
			res.runs = append(res.runs, run)
		}
	}
	if c.profile {
		for _, k := range res.kinds {
			_ = c.waitLoad("limit-bound, profiled")
			logf("limit-bound: an extra run (%s) with node A profiled (not in the tables)", k)
			prof := &profileResult{kind: k}
			if _, err := limitOnce(e, k, -1, prof); err != nil {
				return err
			}
			select {
			case <-prof.done:
			case <-time.After(2 * time.Minute):
				prof = &profileResult{kind: k, err: "the profile did not come within 2 min"}
			}
			res.profs = append(res.profs, prof)
		}
	}
	res.load.done()
	r.limit = res
	return nil
}

func limitOnce(e *env, kind limitKind, round int, prof *profileResult) (*limitRun, error) {
	c := e.cfg
	e.backend.setHold(c.hold)
	var addrs []string
	zone := zLimit
	switch kind {
	case fleet3:
		for _, n := range e.nodes {
			addrs = append(addrs, n.listen[zLimit])
		}
	case fleet1:
		addrs = []string{e.nodes[0].listen[zLimit]}
	case local1:
		zone = zLimitLocal
		addrs = []string{e.nodes[0].listen[zLimitLocal]}
	}
	run := &limitRun{kind: kind, round: round, load: loadAvg1()}
	logf("limit-bound round %d: %s, C=%d max=%d hold=%s (load %.2f)", round+1, kind, c.clients, c.limit, c.hold, run.load)
	e.backend.resetPeak()
	start := time.Now()
	mStart := start.Add(c.warmup)
	mEnd := mStart.Add(c.window)
	hardStop := mEnd.Add(c.grace)
	var a, b sample
	var wg sync.WaitGroup
	wg.Add(1)
	histZone := ""
	if kind.isFleet() {
		histZone = zLimit
	}
	e.backend.startRecording()
	go func() {
		defer wg.Done()
		time.Sleep(time.Until(mStart))
		a = takeSample(e, histZone)
		if prof != nil {
			prof.take(e, zone, c.window)
		}
		time.Sleep(time.Until(mEnd))
		b = takeSample(e, histZone)
	}()
	if kind.isFleet() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			run.backlog = grantBacklog(e, zLimit, mStart, mEnd)
		}()
	}
	run.res = runLoad(c.dialer, addrs, c.clients, mStart, mEnd, hardStop)
	wg.Wait()
	acc, cls := e.backend.stopRecording()
	base := e.backend.base
	run.gaps = benchkit.HandoffGaps(acc, cls, c.limit, int64(mStart.Sub(base)), int64(mEnd.Sub(base)))
	run.u = between(a, b)
	run.peak = e.backend.peak.Load()
	// wait (bounded) until the backend is empty again
	for deadline := time.Now().Add(10 * time.Second); e.backend.active.Load() > 0 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	run.tput = float64(run.res.completed) / c.window.Seconds()
	run.p50 = float64(pct(run.res.lat, 50)) / 1e6
	run.p99 = float64(pct(run.res.lat, 99)) / 1e6
	logf("  %.0f conn/s, p50 %.1f ms, p99 %.1f ms, peak %d, failed %d, Redis CPU %s, hand-off gap p50 %.3f ms, machine %.0f %% busy",
		run.tput, run.p50, run.p99, run.peak, run.res.failed, run.u.redis, float64(pct(run.gaps, 50))/1e6, 100*run.u.machine)
	if run.res.errs > 0 {
		return nil, fmt.Errorf("limit-bound (%s): %d connections failed", kind, run.res.errs)
	}
	if run.peak > int64(c.limit) {
		return nil, fmt.Errorf("limit-bound (%s): the backend saw %d connections at once, max is %d", kind, run.peak, c.limit)
	}
	return run, nil
}

// ---- CPU profiles ----

type profileResult struct {
	kind     limitKind
	err      string
	total    time.Duration // CPU samples of node A over the profile
	admitted uint64        // connections node A admitted meanwhile
	parts    []profPart
	top      string
	done     chan struct{}
}

type profPart struct {
	name string
	cum  time.Duration
}

// profParts are the frames whose cumulative CPU the report shows: each a
// part of a connection's path, or of the node's own work.
var profParts = []struct{ name, fn string }{
	{"a connection's whole handler (caddy-l4 server)", "github.com/mholt/caddy-l4/layer4.(*Server).handle"},
	{"  of which proxy (dial, copy)", "github.com/mholt/caddy-l4/modules/l4proxy.(*Handler).Handle"},
	{"  of which take, give, leave (the store's functions)", "github.com/l4-connlimit/connlimit/store/redisstore.(*redisFleet).run"},
	{"take, give, leave sent together (pipelines)", "github.com/l4-connlimit/connlimit/store/redisstore.(*redisFleet).pipeline"},
	{"grants: the BRPOPLPUSH loop", "github.com/l4-connlimit/connlimit/store/redisstore.(*redisFleet).pump"},
	{"grants: handing them to waiters", "github.com/l4-connlimit/connlimit/internal/engine.(*fleetNode).grants"},
	{"renewals", "github.com/l4-connlimit/connlimit/internal/engine.(*fleetNode).renewals"},
	{"Go scheduler looking for work (idle, wake-ups)", "runtime.findRunnable"},
	{"Go GC (background marking)", "runtime.gcBgMarkWorker"},
}

// take fetches node A's CPU profile over d, in the background of the run,
// and reads the parts and the top of it with go tool pprof.
func (p *profileResult) take(e *env, zone string, d time.Duration) {
	file := filepath.Join(e.cfg.workDir, fmt.Sprintf("nodeA-limit-%d.pprof", p.kind))
	secs := max(1, int(d.Seconds()))
	p.done = make(chan struct{})
	a := e.nodes[0]
	go func() {
		defer close(p.done)
		_, adm0, _ := a.zoneCounts(zone)
		if err := a.fetch(fmt.Sprintf("/debug/pprof/profile?seconds=%d", secs), file); err != nil {
			p.err = err.Error()
			return
		}
		_, adm1, _ := a.zoneCounts(zone)
		p.admitted = adm1 - adm0
		out, err := exec.Command("go", "tool", "pprof", "-top", "-cum", "-nodecount=100000", e.cfg.caddyBin, file).CombinedOutput()
		if err != nil {
			p.err = fmt.Sprintf("%v: %s", err, out)
			return
		}
		p.parse(string(out))
		out, err = exec.Command("go", "tool", "pprof", "-top", "-nodecount=25", e.cfg.caddyBin, file).CombinedOutput()
		if err == nil {
			p.top = strings.TrimSpace(string(out))
		}
	}()
}

// parse reads the total and the cumulative time of profParts from pprof
// -top -cum output.
func (p *profileResult) parse(out string) {
	cum := map[string]time.Duration{}
	for _, l := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), "Duration:"); ok {
			// "Duration: 6s, Total samples = 1.18s (19.66%)"
			if _, t, ok := strings.Cut(v, "Total samples = "); ok {
				t, _, _ = strings.Cut(t, " ")
				p.total = parseDur(t)
			}
			continue
		}
		f := strings.Fields(l)
		if len(f) < 6 {
			continue
		}
		cum[strings.Join(f[5:], " ")] = parseDur(f[3])
	}
	for _, pp := range profParts {
		p.parts = append(p.parts, profPart{name: pp.name, cum: cum[pp.fn]})
	}
}

func parseDur(s string) time.Duration {
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0
	}
	return d
}

// zoneCounts is the zone's waiting count and admitted total on this node,
// from GET /connection_limit/ (this node's counts; unlike GET
// /connection_limit/<zone> it does not ask the store).
func (n *node) zoneCounts(zone string) (waiting int, admitted uint64, err error) {
	b, err := n.get("/connection_limit/")
	if err != nil {
		return -1, 0, err
	}
	var v struct {
		Zones []struct {
			Zone     string `json:"zone"`
			Waiting  int    `json:"waiting"`
			Admitted uint64 `json:"admitted"`
		} `json:"zones"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return -1, 0, err
	}
	for _, z := range v.Zones {
		if z.Zone == zone {
			return z.Waiting, z.Admitted, nil
		}
	}
	return -1, 0, fmt.Errorf("node %s has no zone %s", n.name, zone)
}

// grantBacklog samples, every 20 ms from start to end, how many grants of
// zone wait in the nodes' grant lists for their BRPOPLPUSH (LLEN, pipelined),
// and returns the samples, sorted.
func grantBacklog(e *env, zone string, start, end time.Time) []int64 {
	var keys []string
	for _, n := range e.nodes {
		if id := n.ids[zone]; id != "" {
			keys = append(keys, "connlimit:{"+zone+"}:grants:"+id)
		}
	}
	time.Sleep(time.Until(start))
	var out []int64
	for t := time.Now(); t.Before(end); t = time.Now() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		pipe := e.redis.c.Pipeline()
		cmds := make([]*redis.IntCmd, len(keys))
		for i, k := range keys {
			cmds[i] = pipe.LLen(ctx, k)
		}
		_, err := pipe.Exec(ctx)
		cancel()
		if err == nil {
			var sum int64
			for _, c := range cmds {
				sum += c.Val()
			}
			out = append(out, sum)
		}
		time.Sleep(20 * time.Millisecond)
	}
	slices.Sort(out)
	return out
}
