// Command e2e is the end-to-end benchmark of connection_limit: Caddy with
// connection_limit before proxy, against HAProxy's server queue, caddy-l4's
// own polling limit (upstream max_connections with try_duration) and plain
// caddy-l4 proxy, all on 127.0.0.1, with its own backend and load client.
//
// Run it from the repository root:
//
//	bash bench/run.sh            # full run (< 15 min)
//	bash bench/run.sh -quick     # short run (< 2 min)
//	go run ./bench/e2e -quick    # the same without the wrapper
//
// The report (Markdown) goes to stdout and, with -out, to a file: run.sh
// passes -out $REPORT (default /tmp/connlimit-e2e-report.md). With -json
// the results the charts are drawn from (bench/charts) go to a file too:
// run.sh writes them beside the report (the .md replaced by .json) and
// draws the charts (go run ./bench/charts/draw) into a directory beside
// it (the .md replaced by -charts/).
//
// See BENCHMARKS.md for what each figure means.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/l4-connlimit/connlimit/bench/internal/benchkit"
)

type config struct {
	quick       bool
	caddyBin    string
	haproxyBin  string
	rounds      int
	warmup      time.Duration
	duration    time.Duration
	grace       time.Duration
	scaleNs     []int
	scaleRounds int
	idleWindow  time.Duration
	tryDuration time.Duration
	tryInterval time.Duration
	profile     bool
	budget      time.Duration
	out         string
	jsonOut     string
	workDir     string
	profDir     string
	keep        bool
	sources     int
	only        string
	systems     []sysKind

	dialer    *benchkit.Dialer
	start     time.Time
	profCache map[string]float64 // profileSeconds
	setFlags  []string           // the flags given, for the charts' captions
}

func main() {
	c := &config{start: time.Now()}
	var scale string
	flag.BoolVar(&c.quick, "quick", false, "short run (< 2 min): 1 round of 2 s runs, 2 000 waiters")
	flag.StringVar(&c.caddyBin, "caddy", "", "Caddy binary with caddy-l4 and connection_limit (default: build ./cmd/caddy)")
	flag.StringVar(&c.haproxyBin, "haproxy", "haproxy", "HAProxy binary")
	flag.IntVar(&c.rounds, "rounds", 3, "rounds of the throughput runs (systems interleaved in each)")
	flag.DurationVar(&c.warmup, "warmup", time.Second, "warm-up of each throughput run (not measured)")
	flag.DurationVar(&c.duration, "duration", 6*time.Second, "measured window of each throughput run")
	flag.DurationVar(&c.grace, "grace", 2*time.Second, "time after the window for connections in flight")
	flag.StringVar(&scale, "scale", "10000,50000", "waiter counts of the scale runs (comma-separated; empty: none)")
	flag.IntVar(&c.scaleRounds, "scale-rounds", 2, "rounds of the scale runs")
	flag.DurationVar(&c.idleWindow, "idle-window", 3*time.Second, "how long CPU is measured while the waiters wait")
	flag.DurationVar(&c.tryDuration, "try-duration", 30*time.Second, "try_duration of the polling system")
	flag.DurationVar(&c.tryInterval, "try-interval", 250*time.Millisecond, "try_interval of the polling system")
	flag.BoolVar(&c.profile, "profile", true, "also take CPU and heap profiles of Caddy (extra runs, not in the tables)")
	flag.DurationVar(&c.budget, "budget", 14*time.Minute, "stop starting runs after this long")
	flag.StringVar(&c.out, "out", "", "also write the report to this file")
	flag.StringVar(&c.jsonOut, "json", "", "also write the results as JSON to this file, for the charts (go run ./bench/charts/draw)")
	flag.StringVar(&c.workDir, "workdir", "", "directory for configs, logs and profiles (default: a new temporary one)")
	flag.BoolVar(&c.keep, "keep", false, "keep the work directory")
	flag.IntVar(&c.sources, "sources", 8, "client source addresses 127.0.0.1..127.0.0.N")
	flag.StringVar(&c.only, "only", "", "run only these parts: comma-separated of tput, scale")
	var systems string
	flag.StringVar(&systems, "systems", "", "throughput runs: only these systems (comma-separated of connlimit, haproxy, l4-polling, l4-plain, l4-plain-L)")
	var wls string
	flag.StringVar(&wls, "workloads", "", "throughput runs: only these workloads (comma-separated of limit, handoff)")
	flag.Parse()
	set := map[string]bool{}
	flag.Visit(func(f *flag.Flag) {
		set[f.Name] = true
		switch f.Name {
		case "caddy", "haproxy", "out", "json", "workdir", "keep":
		case "quick", "profile":
			if f.Value.String() == "true" {
				c.setFlags = append(c.setFlags, "-"+f.Name)
			} else {
				c.setFlags = append(c.setFlags, "-"+f.Name+"="+f.Value.String())
			}
		default:
			c.setFlags = append(c.setFlags, "-"+f.Name+" "+f.Value.String())
		}
	})
	if c.quick {
		quick := map[string]func(){
			"rounds":       func() { c.rounds = 1 },
			"warmup":       func() { c.warmup = 500 * time.Millisecond },
			"duration":     func() { c.duration = 2 * time.Second },
			"grace":        func() { c.grace = time.Second },
			"scale":        func() { scale = "2000" },
			"scale-rounds": func() { c.scaleRounds = 1 },
			"idle-window":  func() { c.idleWindow = time.Second },
			"profile":      func() { c.profile = false },
			"budget":       func() { c.budget = 100 * time.Second },
		}
		for name, f := range quick {
			if !set[name] {
				f()
			}
		}
	}
	for _, s := range strings.Split(scale, ",") {
		if s = strings.TrimSpace(s); s != "" {
			n, err := strconv.Atoi(s)
			if err != nil || n < 1 {
				fatalf("bad -scale value %q", s)
			}
			c.scaleNs = append(c.scaleNs, n)
		}
	}
	c.dialer = benchkit.NewDialer(max(1, min(c.sources, 254)))
	c.systems = allSystems
	if systems != "" {
		c.systems = nil
		for _, s := range strings.Split(systems, ",") {
			found := false
			for _, k := range allSystems {
				if k.String() == strings.TrimSpace(s) {
					c.systems = append(c.systems, k)
					found = true
				}
			}
			if !found {
				fatalf("unknown system %q", s)
			}
		}
	}
	if wls != "" {
		var keep []workload
		for _, wl := range workloads {
			if strings.Contains(","+wls+",", ","+wl.key+",") {
				keep = append(keep, wl)
			}
		}
		workloads = keep
	}

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		s := <-sigs
		fmt.Fprintf(os.Stderr, "\ninterrupted (%v): killing proxies\n", s)
		killAll()
		os.Exit(130)
	}()
	// The whole program is bounded: a watchdog ends it if the runs stall.
	go func() {
		time.Sleep(c.budget + 4*time.Minute)
		fmt.Fprintln(os.Stderr, "watchdog: the benchmark overran its budget; killing proxies")
		killAll()
		os.Exit(3)
	}()
	defer killAll()

	if err := c.setup(); err != nil {
		killAll()
		fatalf("%v", err)
	}
	if !c.keep {
		defer os.RemoveAll(c.workDir)
	}
	rep := c.run()
	text := rep.markdown(c)
	fmt.Println(text)
	if c.out != "" {
		if err := os.WriteFile(c.out, []byte(text), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "writing report:", err)
		}
	}
	if c.jsonOut != "" {
		if err := rep.results(c).Write(c.jsonOut); err != nil {
			fmt.Fprintln(os.Stderr, "writing results:", err)
		}
	}
}

func fatalf(f string, a ...any) {
	fmt.Fprintf(os.Stderr, "e2e: "+f+"\n", a...)
	os.Exit(1)
}

func logf(f string, a ...any) {
	fmt.Fprintf(os.Stderr, "[%6.1fs] "+f+"\n", append([]any{time.Since(benchStart).Seconds()}, a...)...)
}

var benchStart = time.Now()

func runCmd(timeout time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}

// setup raises the open-file limit, prepares the work directory and finds
// or builds the binaries.
func (c *config) setup() error {
	need := uint64(16384)
	for _, n := range c.scaleNs {
		need = max(need, uint64(2*n+10000))
	}
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err == nil && rl.Cur < need {
		want := rl
		want.Cur = need
		if want.Max < need {
			want.Max = need
		}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err != nil {
			want.Cur, want.Max = rl.Max, rl.Max
			_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want)
		}
	}
	_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl)
	if rl.Cur < 4096 {
		return fmt.Errorf("RLIMIT_NOFILE is %d: raise it (ulimit -n 65536)", rl.Cur)
	}
	if c.workDir == "" {
		d, err := os.MkdirTemp("", "connlimit-e2e-")
		if err != nil {
			return err
		}
		c.workDir = d
	} else if err := os.MkdirAll(c.workDir, 0o755); err != nil {
		return err
	}
	c.profDir = filepath.Join(c.workDir, "profiles")
	if err := os.MkdirAll(c.profDir, 0o755); err != nil {
		return err
	}
	if c.caddyBin == "" {
		root, err := runCmd(time.Minute, "go", "list", "-m", "-f", "{{.Dir}}")
		if err != nil {
			return fmt.Errorf("finding the module root: %v: %s", err, root)
		}
		c.caddyBin = filepath.Join(c.workDir, "caddy")
		logf("building %s from ./cmd/caddy", c.caddyBin)
		cmd := exec.Command("go", "build", "-o", c.caddyBin, "./cmd/caddy")
		cmd.Dir = strings.TrimSpace(root)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("building Caddy: %v: %s", err, out)
		}
	}
	if _, err := exec.LookPath(c.caddyBin); err != nil {
		return fmt.Errorf("caddy binary: %v", err)
	}
	if p, err := exec.LookPath(c.haproxyBin); err != nil {
		return fmt.Errorf("haproxy binary: %v (apt-get install -y haproxy)", err)
	} else {
		c.haproxyBin = p
	}
	return nil
}

type report struct {
	tput    []tputResult
	scale   []scaleResult
	prof    []tputResult
	skipped []string
	machine [][2]string
	rlimit  uint64
	elapsed time.Duration
}

var workloads = []workload{
	{key: "limit", name: "limit-bound (C=500, L=50, H=20 ms)", clients: 500, limit: 50, hold: 20 * time.Millisecond},
	{key: "handoff", name: "handoff-bound (C=500, L=8, H=0)", clients: 500, limit: 8, hold: 0},
}

func (c *config) run() *report {
	rep := &report{}
	rep.machine = c.machineInfo()
	var rl syscall.Rlimit
	_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl)
	rep.rlimit = rl.Cur
	deadline := c.start.Add(c.budget)
	fits := func(est time.Duration, what string) bool {
		if time.Now().Add(est).After(deadline) {
			rep.skipped = append(rep.skipped, what)
			logf("skipping %s: out of time budget", what)
			return false
		}
		return true
	}
	runEst := c.warmup + c.duration + c.grace + 3*time.Second
	doTput := c.only == "" || strings.Contains(c.only, "tput")
	doScale := c.only == "" || strings.Contains(c.only, "scale")
	// Leave room for the scale runs: estimate them first.
	var scaleEst time.Duration
	if doScale {
		for _, n := range c.scaleNs {
			scaleEst += time.Duration(c.scaleRounds*2) * (12*time.Second + c.idleWindow + time.Duration(n)*400*time.Microsecond)
		}
	}
	if doTput {
		for round := 1; round <= c.rounds; round++ {
			for _, wl := range workloads {
				for _, k := range c.systems {
					what := fmt.Sprintf("round %d %s %s", round, wl.key, k)
					if !fits(runEst+scaleEst, what) {
						continue
					}
					r := c.runThroughput(k, wl, round, false)
					logf("%-28s %s", what, r.short())
					rep.tput = append(rep.tput, r)
				}
			}
		}
	}
	if doScale {
		for round := 1; round <= c.scaleRounds; round++ {
			done := map[[2]int]bool{}
			for _, req := range c.scaleNs {
				for _, k := range c.scaleSystems() {
					n := min(req, scaleCap(k, rep.rlimit))
					if done[[2]int{int(k), n}] {
						continue // capped to a size already run
					}
					done[[2]int{int(k), n}] = true
					what := fmt.Sprintf("round %d scale %d %s", round, n, k)
					est := 12*time.Second + c.idleWindow + time.Duration(n)*400*time.Microsecond
					if !fits(est, what) {
						continue
					}
					profile := c.profile && round == 1 && req == c.scaleNs[len(c.scaleNs)-1]
					r := c.runScale(k, n, round, profile)
					r.requested = req
					logf("%-28s %s", what, r.short())
					rep.scale = append(rep.scale, r)
				}
			}
		}
	}
	if c.profile && doTput {
		for _, wl := range workloads {
			for _, k := range c.wanted(sysConnlimit, sysConnlimitCW, sysPlainL) {
				what := fmt.Sprintf("profile %s %s", wl.key, k)
				if !fits(runEst+10*time.Second, what) {
					continue
				}
				r := c.runThroughput(k, wl, 0, true)
				logf("%-28s %s", what, r.short())
				rep.prof = append(rep.prof, r)
			}
		}
	}
	rep.elapsed = time.Since(c.start)
	return rep
}

// wanted returns those of ks that were asked for (-systems).
func (c *config) wanted(ks ...sysKind) []sysKind {
	var out []sysKind
	for _, k := range ks {
		if slices.Contains(c.systems, k) {
			out = append(out, k)
		}
	}
	return out
}

// scaleSystems are the systems of the scale runs: the connection_limit
// variants and HAProxy, of those asked for.
func (c *config) scaleSystems() []sysKind {
	return c.wanted(sysConnlimit, sysConnlimitCW, sysHAProxy)
}

// scaleCap is the most waiters a system can hold under the open-file
// limit: Caddy and this program need one descriptor per waiter; HAProxy
// reserves two per connection of its maxconn (client and server side) and
// refuses to start if the limit is lower.
func scaleCap(k sysKind, rlimit uint64) int {
	if k == sysHAProxy {
		return (int(rlimit)-200)/2/100*100 - 100
	}
	return (int(rlimit) - 1500) / 1000 * 1000
}

func (r tputResult) short() string {
	if r.err != nil {
		return "ERROR " + r.err.Error()
	}
	return fmt.Sprintf("%5d conn/s p50 %-8s p99 %-8s cpu %5.1fµs/conn gap p50 %-8s peak %d fail %d",
		int(r.rate), fmtDur(r.p50), fmtDur(r.p99), r.cpuPerConn, fmtDur(r.gapP50), r.peak, r.failed+r.timeouts)
}

func (r scaleResult) short() string {
	s := fmt.Sprintf("queued %d rss %.0f B/waiter idle cpu %s drain %.0f/s in order %d/%d",
		r.queued, r.perWaiter, r.idleCPU, r.drainRate, r.inOrder, r.opened)
	if r.err != nil {
		s += " ERROR " + r.err.Error()
	}
	return s
}

func (c *config) machineInfo() [][2]string {
	goVer, _ := runCmd(30*time.Second, "go", "version")
	hv, _ := runCmd(10*time.Second, c.haproxyBin, "-v")
	hv, _, _ = strings.Cut(hv, "\n")
	hvv, _ := runCmd(10*time.Second, c.haproxyBin, "-vv")
	threads := ""
	for _, l := range strings.Split(hvv, "\n") {
		if strings.Contains(l, "multi-threading support") {
			threads = strings.TrimSpace(l)
		}
	}
	cv, _ := runCmd(10*time.Second, c.caddyBin, "version")
	commit, _ := runCmd(10*time.Second, "git", "rev-parse", "--short", "HEAD")
	dirty, _ := runCmd(10*time.Second, "git", "status", "--porcelain", "--untracked-files=no")
	if n := len(strings.Fields(dirty)) / 2; n > 0 {
		commit = strings.TrimSpace(commit) + fmt.Sprintf(" (+%d modified files)", n)
	}
	return [][2]string{
		{"date", time.Now().UTC().Format("2006-01-02 15:04 MST")},
		{"nproc", strconv.Itoa(runtime.NumCPU())},
		{"CPU", cpuModel()},
		{"memory", memTotal()},
		{"kernel", kernelRelease()},
		{"Go", strings.TrimSpace(goVer)},
		{"HAProxy", strings.TrimSpace(hv) + " (" + threads + ")"},
		{"Caddy", strings.TrimSpace(cv) + " (caddy-l4 v0.1.2, from go.mod)"},
		{"connlimit commit", strings.TrimSpace(commit)},
		{"GOMAXPROCS (bench, Caddy)", strconv.Itoa(runtime.GOMAXPROCS(0))},
	}
}
