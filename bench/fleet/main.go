// Command fleet benchmarks fleet zones: connection_limit zones shared by
// several Caddy processes through Redis. It starts its own redis-server
// (no persistence, on a free 127.0.0.1 port), builds ./cmd/caddy once,
// runs Caddy nodes as processes (each with its admin API and layer4
// routes connection_limit -> proxy to this program's backend), drives them
// with its own clients, and prints a Markdown report. Everything is on
// 127.0.0.1; every load loop is bounded in count and time; every process
// it starts is killed at the end, on error and on SIGINT/SIGTERM.
//
// Run it from the repository root:
//
//	go run ./bench/fleet -quick             # short run (< 2 min), for debugging
//	go run ./bench/fleet -report FILE       # full run
//	bash bench/fleet.sh [-quick]            # the same, built first, under timeout
//
// What each figure is and how it is measured is in the report itself and
// in BENCHMARKS.md ("Fleet zones (Redis)").
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/l4-connlimit/connlimit/bench/internal/benchkit"
)

type config struct {
	quick     bool
	caddyBin  string
	redisBin  string
	repo      string
	workDir   string
	keep      bool
	report    string
	release   string
	lease     time.Duration
	sources   int
	only      string
	loadMax   float64
	loadWait  time.Duration
	loadTotal time.Duration
	profile   bool

	rtConns      int           // round trips: connections admitted at once
	rtWaited     int           // round trips: connections that waited
	handoffs     int           // hand-off samples of each kind
	latConns     int           // added latency: connections of each kind
	clients      int           // limit-bound: C
	limit        int           // limit-bound: max
	hold         time.Duration // limit-bound: backend hold
	rounds       int           // limit-bound rounds (the kinds interleaved)
	limitFleet1  bool          // limit-bound: also the fleet zone with every client on node A
	warmup       time.Duration
	window       time.Duration
	grace        time.Duration
	capWorkers   int
	capWindow    time.Duration
	storeWorkers int

	start    time.Time
	loadUsed time.Duration
	dialer   *benchkit.Dialer
}

func main() {
	c := &config{start: time.Now()}
	flag.BoolVar(&c.quick, "quick", false, "short run (< 2 min): fewer samples, 1 round of 2 s, no load wait")
	flag.StringVar(&c.caddyBin, "caddy", "", "Caddy binary with connection_limit (default: build ./cmd/caddy into the work directory)")
	flag.StringVar(&c.redisBin, "redis-server", "redis-server", "redis-server binary")
	flag.StringVar(&c.repo, "repo", ".", "the repository's root (for ./cmd/caddy and store/redisstore/lua/*.lua)")
	flag.StringVar(&c.workDir, "workdir", "", "directory for configs, logs and profiles (default: a new temporary one)")
	flag.BoolVar(&c.keep, "keep", false, "keep the work directory")
	flag.StringVar(&c.report, "report", "", "also write the report to this file")
	flag.StringVar(&c.release, "release", "close_write", "the handlers' release option (return or close_write)")
	flag.DurationVar(&c.lease, "lease", 5*time.Second, "the store's lease (renewals every min(lease/3, 1s))")
	flag.IntVar(&c.sources, "sources", 8, "client source addresses 127.0.0.1..127.0.0.N")
	flag.StringVar(&c.only, "only", "", "run only these parts (comma-separated of rt, handoff, latency, limit, capacity, split)")
	flag.Float64Var(&c.loadMax, "load-max", 1.5, "before each measurement, wait until the 1-minute load is below this")
	flag.DurationVar(&c.loadWait, "load-wait", 10*time.Minute, "the longest wait for the load before one measurement")
	flag.DurationVar(&c.loadTotal, "load-total", 25*time.Minute, "the longest wait for the load over the whole run")
	flag.BoolVar(&c.profile, "profile", true, "limit-bound: one extra run of each kind with node A's CPU profiled (not in the tables)")
	flag.IntVar(&c.rtConns, "rt-conns", 1000, "round trips: connections admitted at once")
	flag.IntVar(&c.rtWaited, "rt-waited", 200, "round trips: connections that waited")
	flag.IntVar(&c.handoffs, "handoffs", 500, "hand-off samples of each kind")
	flag.IntVar(&c.latConns, "lat-conns", 2000, "added latency: connections through each zone")
	flag.IntVar(&c.clients, "clients", 500, "limit-bound: concurrent clients (C)")
	flag.IntVar(&c.limit, "limit", 50, "limit-bound: max_connections")
	flag.DurationVar(&c.hold, "hold", 20*time.Millisecond, "limit-bound: how long the backend holds each connection")
	flag.IntVar(&c.rounds, "rounds", 5, "limit-bound: rounds (fleet and local zone interleaved in each)")
	flag.BoolVar(&c.limitFleet1, "limit-fleet1", true, "limit-bound: also run the fleet zone with every client on node A (where the fleet's cost goes)")
	flag.DurationVar(&c.warmup, "warmup", time.Second, "limit-bound: warm-up of each run (not measured)")
	flag.DurationVar(&c.window, "window", 6*time.Second, "limit-bound: measured window of each run")
	flag.DurationVar(&c.grace, "grace", 2*time.Second, "limit-bound: time after the window for connections in flight")
	flag.IntVar(&c.capWorkers, "cap-workers", 24, "capacity: clients driving admitted-at-once connections through the nodes")
	flag.DurationVar(&c.capWindow, "cap-window", 5*time.Second, "capacity: measured window of each capacity run")
	flag.IntVar(&c.storeWorkers, "store-workers", 32, "capacity: goroutines driving take+give straight at the store")
	flag.Parse()
	set := map[string]bool{}
	flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if c.quick {
		quick := map[string]func(){
			"rt-conns":   func() { c.rtConns = 200 },
			"rt-waited":  func() { c.rtWaited = 50 },
			"handoffs":   func() { c.handoffs = 60 },
			"lat-conns":  func() { c.latConns = 300 },
			"rounds":     func() { c.rounds = 1 },
			"warmup":     func() { c.warmup = 500 * time.Millisecond },
			"window":     func() { c.window = 2 * time.Second },
			"grace":      func() { c.grace = time.Second },
			"cap-window": func() { c.capWindow = 2 * time.Second },
			"load-wait":  func() { c.loadWait = 0 },
			"profile":    func() { c.profile = false },
		}
		for name, f := range quick {
			if !set[name] {
				f()
			}
		}
	}
	if c.release != "return" && c.release != "close_write" {
		fatalf("-release must be return or close_write")
	}
	c.dialer = benchkit.NewDialer(max(1, min(c.sources, 254)))

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		s := <-sig
		fmt.Fprintf(os.Stderr, "\n%v: stopping\n", s)
		cleanup(c)
		os.Exit(130)
	}()

	if err := run(c); err != nil {
		cleanup(c)
		fatalf("%v", err)
	}
	cleanup(c)
}

var tmpDir string // the work directory this program made (removed at the end)

func cleanup(c *config) {
	killAll()
	if tmpDir != "" && !c.keep {
		_ = os.RemoveAll(tmpDir)
	}
}

func fatalf(format string, a ...any) {
	killAll()
	fmt.Fprintf(os.Stderr, "fleet bench: "+format+"\n", a...)
	os.Exit(1)
}

func logf(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "[%6.1fs] "+format+"\n", append([]any{time.Since(startTime).Seconds()}, a...)...)
}

var startTime = time.Now()

func (c *config) runs(part string) bool {
	return c.only == "" || strings.Contains(","+c.only+",", ","+part+",")
}

// waitLoad waits (bounded by -load-wait, and -load-total over the run)
// until the 1-minute load is below -load-max, and returns what it saw.
func (c *config) waitLoad(what string) loadInfo {
	li := loadInfo{Before: loadAvg1()}
	start := time.Now()
	limit := min(c.loadWait, c.loadTotal-c.loadUsed)
	for i := 0; li.Before >= c.loadMax && time.Since(start) < limit; i++ {
		if i%30 == 0 {
			logf("%s: 1-minute load %.2f >= %.2f, waiting (up to %s)", what, li.Before, c.loadMax, (limit - time.Since(start)).Round(time.Second))
		}
		time.Sleep(time.Second)
		li.Before = loadAvg1()
	}
	li.Waited = time.Since(start)
	c.loadUsed += li.Waited
	if li.Before >= c.loadMax {
		li.Over = true
		logf("%s: measuring under load %.2f (waited %s)", what, li.Before, li.Waited.Round(time.Second))
	}
	return li
}

type loadInfo struct {
	Before, After float64
	Waited        time.Duration
	Over          bool // still >= load-max when it started
}

func (l *loadInfo) done() { l.After = loadAvg1() }

func (l loadInfo) String() string {
	s := fmt.Sprintf("1-minute load %.2f at the start, %.2f at the end", l.Before, l.After)
	if l.Waited >= time.Second {
		s += fmt.Sprintf(" (waited %s)", l.Waited.Round(time.Second))
	}
	if l.Over {
		s += " (above the wanted maximum)"
	}
	return s
}

// env is what every measurement runs on.
type env struct {
	cfg     *config
	redis   *redisProc
	backend *backend
	nodes   []*node // A, B, C
}

// The zones every node serves, and those node A alone also serves with no
// store (the local comparisons, in the same process as a fleet zone).
const (
	zHandoff      = "handoff"       // fleet, max 1: hand-offs and a waiter's round trips
	zLimit        = "limit"         // fleet, max -limit: the limit-bound workload
	zOpen         = "open"          // fleet, never full: admitted at once
	zHandoffLocal = "handoff-local" // node A only, no store, max 1
	zLimitLocal   = "limit-local"   // node A only, no store, max -limit
	zOpenLocal    = "open-local"    // node A only, no store, never full
	openMax       = 1000000
)

func run(c *config) error {
	var err error
	if c.workDir == "" {
		c.workDir, err = os.MkdirTemp("", "connlimit-fleet-bench-")
		if err != nil {
			return err
		}
		tmpDir = c.workDir
	} else if err := os.MkdirAll(c.workDir, 0o755); err != nil {
		return err
	}
	if c.keep {
		logf("work directory: %s", c.workDir)
	}
	if _, err := exec.LookPath(c.redisBin); err != nil {
		return fmt.Errorf("redis-server not found (apt-get install -y redis-server): %v", err)
	}
	if c.caddyBin == "" {
		c.caddyBin = filepath.Join(c.workDir, "caddy")
		logf("building ./cmd/caddy")
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		cmd := exec.CommandContext(ctx, "go", "build", "-o", c.caddyBin, "./cmd/caddy")
		cmd.Dir = c.repo
		out, err := cmd.CombinedOutput()
		cancel()
		if err != nil {
			return fmt.Errorf("go build ./cmd/caddy: %v\n%s", err, out)
		}
	}
	e := &env{cfg: c}
	e.redis, err = startRedis(c.redisBin, c.workDir)
	if err != nil {
		return err
	}
	logf("redis-server %s on %s (pid %d)", e.redis.version(), e.redis.addr, e.redis.pid)
	e.backend, err = newBackend()
	if err != nil {
		return err
	}
	defer e.backend.close()
	fleetZones := []server{{zHandoff, 1, true}, {zLimit, c.limit, true}, {zOpen, openMax, true}}
	localZones := []server{{zHandoffLocal, 1, false}, {zLimitLocal, c.limit, false}, {zOpenLocal, openMax, false}}
	for i, name := range []string{"A", "B", "C"} {
		zones := fleetZones
		if i == 0 {
			zones = append(append([]server(nil), fleetZones...), localZones...)
		}
		n, err := startNode(c, name, zones, e.backend.addr(), e.redis.addr)
		if err != nil {
			return err
		}
		logf("node %s: pid %d, admin %s", name, n.pid, n.admin)
		e.nodes = append(e.nodes, n)
	}

	r := &report{cfg: c, env: e, started: time.Now()}
	// Warm-up: the library loaded (by the first call that finds it
	// missing), every node's pool dialled; then a renewal period, so that
	// the idle measurement sees only FCALLs.
	if err := warmUp(e); err != nil {
		return err
	}
	time.Sleep(min(c.lease/3, time.Second) + 200*time.Millisecond)
	r.idle, err = measureIdle(e)
	if err != nil {
		return err
	}
	steps := []struct {
		part string
		f    func(*env, *report) error
	}{
		{"rt", roundTrips},
		{"handoff", handoffs},
		{"latency", addedLatency},
		{"limit", limitBound},
		{"capacity", capacity},
		{"split", split},
	}
	for _, s := range steps {
		if !c.runs(s.part) {
			continue
		}
		if err := s.f(e, r); err != nil {
			return fmt.Errorf("%s: %v", s.part, err)
		}
	}
	for _, n := range e.nodes {
		if n.exited() {
			return fmt.Errorf("node %s exited: %s", n.name, logTail(n.log, 10))
		}
		r.storeErrors += n.storeErrors()
		r.logErrors += countErrorLines(n.log)
	}
	r.finished = time.Now()
	text := r.markdown()
	fmt.Print(text)
	if c.report != "" {
		if err := os.WriteFile(c.report, []byte(text), 0o644); err != nil {
			return err
		}
		logf("report written to %s", c.report)
	}
	return nil
}

func countErrorLines(path string) int {
	b, _ := os.ReadFile(path)
	n := 0
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, `"level":"error"`) {
			n++
		}
	}
	return n
}
