// Command fair is the benchmark of fair_share (issue 18): one zone of
// max_connections 20 in front of a backend that holds each connection
// 20 ms, shared by a heavy tenant H (200 clients in a closed loop) and
// four light tenants L1–L4 (4 clients each), each tenant connecting from
// its own 127.0.0.x address. It compares connection_limit in one FIFO
// line (today), connection_limit with fair_share {l4.conn.remote_ip},
// the same with H of weight 3, and HAProxy (server maxconn 20 and its
// FIFO queue), interleaved in rounds, everything on 127.0.0.1.
//
// Run it from the repository root:
//
//	bash bench/fair.sh           # 4 rounds (about 4 minutes)
//	bash bench/fair.sh -quick    # 1 round of short runs (< 1 minute)
//	go run ./bench/fair -quick   # the same without the wrapper
//
// The report (Markdown) goes to stdout and, with -out, to a file; with
// -svg the light tenants' wait CDFs are drawn (bench/charts); with -json
// the results go to a file. See docs/bench/fair.md for what it measures.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/l4-connlimit/connlimit/bench/charts"
	"github.com/l4-connlimit/connlimit/bench/internal/benchkit"
)

type config struct {
	caddyBin, haproxyBin string
	rounds               int
	warmup, duration     time.Duration
	hold                 time.Duration
	limit                int
	heavy, light, perL   int
	budget               time.Duration
	out, svg, jsonOut    string
	pprofDir             string
	sampleIndex          bool
	workDir              string
	args                 string // the flags given, for the report
	start                time.Time
}

// system is one configuration under test.
type system struct {
	key, label string
	weighted   bool // H has weight 3 (fair_share only)
}

var systems = []system{
	{"fifo", "connection_limit, one FIFO line", false},
	{"fair", "connection_limit, fair_share", false},
	{"fair-w3", "connection_limit, fair_share, H weight 3", true},
	{"haproxy", "HAProxy, server maxconn + queue (FIFO)", false},
}

func main() {
	c := &config{start: time.Now()}
	quick := flag.Bool("quick", false, "1 round of 1 s warm-up + 4 s runs")
	flag.StringVar(&c.caddyBin, "caddy", "", "Caddy binary with caddy-l4 and connection_limit (default: build ./cmd/caddy)")
	flag.StringVar(&c.haproxyBin, "haproxy", "haproxy", "HAProxy binary")
	flag.IntVar(&c.rounds, "rounds", 4, "rounds (the systems interleaved in each)")
	flag.DurationVar(&c.warmup, "warmup", 2*time.Second, "warm-up of each run (not measured)")
	flag.DurationVar(&c.duration, "duration", 8*time.Second, "measured window of each run")
	flag.DurationVar(&c.hold, "hold", 20*time.Millisecond, "how long the backend holds each connection")
	flag.IntVar(&c.limit, "limit", 20, "max_connections (HAProxy: server maxconn)")
	flag.IntVar(&c.heavy, "heavy", 200, "clients of the heavy tenant H")
	flag.IntVar(&c.light, "light", 4, "light tenants")
	flag.IntVar(&c.perL, "light-clients", 4, "clients of each light tenant")
	flag.DurationVar(&c.budget, "budget", 7*time.Minute, "start no run after this long")
	flag.StringVar(&c.out, "out", "", "also write the report to this file")
	flag.StringVar(&c.svg, "svg", "", "draw the light tenants' wait CDFs into this SVG file")
	flag.StringVar(&c.jsonOut, "json", "", "write the results as JSON to this file")
	flag.BoolVar(&c.sampleIndex, "index", true, "sample the zone list of the admin API every 200 ms, for the zone's fairness_index (every Caddy run, so that all pay the same)")
	flag.StringVar(&c.pprofDir, "pprof", "", "save a CPU profile of Caddy over each run's window into this directory")
	only := flag.String("systems", "", "only these systems (comma-separated of fifo, fair, fair-w3, haproxy)")
	redraw := flag.String("redraw", "", "draw the chart (-svg) from the results (-json) of an earlier run, and run nothing")
	flag.Parse()
	if *redraw != "" {
		if err := drawFrom(*redraw, c.svg); err != nil {
			fatalf("%v", err)
		}
		return
	}
	if *only != "" {
		var keep []system
		for _, s := range systems {
			if strings.Contains(","+*only+",", ","+s.key+",") {
				keep = append(keep, s)
			}
		}
		if len(keep) == 0 {
			fatalf("no system in -systems %q", *only)
		}
		systems = keep
	}
	var given []string
	flag.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "caddy", "haproxy", "out", "svg", "json", "pprof":
		case "quick":
			given = append(given, "-quick")
		default:
			given = append(given, "-"+f.Name+" "+f.Value.String())
		}
	})
	c.args = strings.Join(given, " ")
	if *quick {
		set := map[string]bool{}
		flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
		if !set["rounds"] {
			c.rounds = 1
		}
		if !set["warmup"] {
			c.warmup = time.Second
		}
		if !set["duration"] {
			c.duration = 4 * time.Second
		}
	}
	if c.light < 1 || c.light > 200 || c.heavy < 1 || c.limit < 1 {
		fatalf("bad tenants or limit")
	}

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		<-sigs
		killAll()
		os.Exit(130)
	}()
	go func() { // bounded whatever happens
		time.Sleep(c.budget + 2*time.Minute)
		fmt.Fprintln(os.Stderr, "fair: watchdog: over budget, stopping")
		killAll()
		os.Exit(3)
	}()
	defer killAll()
	if err := c.setup(); err != nil {
		fatalf("%v", err)
	}
	defer os.RemoveAll(c.workDir)

	var runs []runResult
	est := c.warmup + c.duration + 4*time.Second
	for round := 1; round <= c.rounds; round++ {
		for _, s := range systems {
			if time.Since(c.start)+est > c.budget {
				logf("skipping round %d %s: out of time budget", round, s.key)
				continue
			}
			r := c.run(s, round)
			logf("round %d %-8s %s", round, s.key, r.short())
			runs = append(runs, r)
		}
	}
	rep := summarise(c, runs)
	text := rep.markdown(c)
	fmt.Print(text)
	if c.out != "" {
		if err := os.WriteFile(c.out, []byte(text), 0o644); err != nil {
			fatalf("writing the report: %v", err)
		}
	}
	if c.jsonOut != "" {
		b, _ := json.MarshalIndent(rep, "", " ")
		if err := os.WriteFile(c.jsonOut, append(b, '\n'), 0o644); err != nil {
			fatalf("writing the results: %v", err)
		}
	}
	if c.svg != "" {
		if err := draw(rep, c.svg); err != nil {
			fatalf("%v", err)
		}
	}
}

// draw writes the chart of rep's light tenants' waits to file.
func draw(rep *report, file string) error {
	b, err := charts.FairWaits(rep.chart())
	if err == nil {
		err = os.WriteFile(file, b, 0o644)
	}
	if err != nil {
		return fmt.Errorf("drawing %s: %v", file, err)
	}
	return nil
}

// drawFrom draws the chart from the results an earlier run wrote (-json).
func drawFrom(results, file string) error {
	if file == "" {
		return fmt.Errorf("-redraw needs -svg")
	}
	b, err := os.ReadFile(results)
	if err != nil {
		return err
	}
	var rep report
	if err := json.Unmarshal(b, &rep); err != nil {
		return fmt.Errorf("%s: %v", results, err)
	}
	return draw(&rep, file)
}

func fatalf(f string, a ...any) {
	killAll()
	fmt.Fprintf(os.Stderr, "fair: "+f+"\n", a...)
	os.Exit(1)
}

func logf(f string, a ...any) {
	fmt.Fprintf(os.Stderr, "[%6.1fs] "+f+"\n", append([]any{time.Since(startedAt).Seconds()}, a...)...)
}

var startedAt = time.Now()

func (c *config) setup() error {
	d, err := os.MkdirTemp("", "connlimit-fair-")
	if err != nil {
		return err
	}
	c.workDir = d
	if c.caddyBin == "" {
		c.caddyBin = filepath.Join(d, "caddy")
		logf("building %s from ./cmd/caddy", c.caddyBin)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		if out, err := exec.CommandContext(ctx, "go", "build", "-o", c.caddyBin, "./cmd/caddy").CombinedOutput(); err != nil {
			return fmt.Errorf("building Caddy (run from the repository root): %v: %s", err, out)
		}
	}
	p, err := exec.LookPath(c.haproxyBin)
	if err != nil {
		return fmt.Errorf("haproxy binary: %v (apt-get install -y haproxy)", err)
	}
	c.haproxyBin = p
	return nil
}

// tenants are H (127.0.0.2) and L1… (127.0.0.3…).
func (c *config) tenants(weighted bool) []tenant {
	ts := []tenant{{name: "H", ip: net.IPv4(127, 0, 0, 2), clients: c.heavy, weight: 1}}
	if weighted {
		ts[0].weight = 3
	}
	for i := range c.light {
		ts = append(ts, tenant{name: fmt.Sprintf("L%d", i+1), ip: net.IPv4(127, 0, 0, byte(3+i)), clients: c.perL, weight: 1})
	}
	return ts
}

// runResult is one run of one system.
type runResult struct {
	System  string
	Round   int
	Held    []float64 // mean slots held per tenant
	Done    []int     // connections done per tenant in the window
	Waits   [][]int64 `json:"-"` // per tenant, sorted, ns
	Peak    int
	Rate    float64 // connections per second, all tenants
	Failed  int64
	Index   float64 // the zone's fairness_index, mean of samples (fair_share runs); -1: none
	CPU     float64 // the proxy's CPU time in the window per connection done, µs
	Busy    float64 // the machine's busy share before the run
	Err     string  `json:",omitempty"`
	tenants []tenant
}

func (r runResult) short() string {
	if r.Err != "" {
		return "ERROR " + r.Err
	}
	var held []string
	for i, h := range r.Held {
		held = append(held, fmt.Sprintf("%s %.2f", r.tenants[i].name, h))
	}
	lw := lightWaits(r)
	return fmt.Sprintf("%6.0f conn/s, proxy %3.0f µs/conn, light wait p50 %s p90 %s p99 %s p99.9 %s, held %s, peak %d, failed %d, busy before %.0f %%",
		r.Rate, r.CPU, fmtMS(quantile(lw, 0.5)), fmtMS(quantile(lw, 0.9)), fmtMS(quantile(lw, 0.99)), fmtMS(quantile(lw, 0.999)),
		strings.Join(held, " "), r.Peak, r.Failed, 100*r.Busy)
}

func lightWaits(r runResult) []int64 {
	var w []int64
	for i := 1; i < len(r.Waits); i++ {
		w = append(w, r.Waits[i]...)
	}
	slices.Sort(w)
	return w
}

// run runs one system once.
func (c *config) run(s system, round int) (r runResult) {
	ts := c.tenants(s.weighted)
	r = runResult{System: s.key, Round: round, tenants: ts}
	r.Busy = waitQuiet(10*time.Second, 0.15)
	base := time.Now()
	be, err := newBackend(base, c.hold, len(ts))
	if err != nil {
		r.Err = err.Error()
		return r
	}
	defer be.close()
	p, err := c.startProxy(s, be.addr(), fmt.Sprintf("r%d-%s", round, s.key), ts)
	if err != nil {
		r.Err = err.Error()
		return r
	}
	defer p.stop()
	mStart := time.Now().Add(c.warmup)
	mEnd := mStart.Add(c.duration)
	be.window(int64(mStart.Sub(base)), int64(mEnd.Sub(base)))
	var idx []float64
	var wg sync.WaitGroup
	if c.sampleIndex && p.admin != "" {
		wg.Add(1)
		go func() { // the zone's own fairness_index, every 200 ms in the window
			defer wg.Done()
			time.Sleep(time.Until(mStart))
			for time.Now().Before(mEnd) {
				var v struct {
					Zones []struct {
						Zone string
						Fair *struct {
							Index float64 `json:"fairness_index"`
						} `json:"fair"`
					} `json:"zones"`
				}
				if b, err := benchkit.Get(httpc, "http://"+p.admin+"/connection_limit/"); err == nil && json.Unmarshal(b, &v) == nil {
					for _, z := range v.Zones {
						if z.Zone == "bench" && z.Fair != nil {
							idx = append(idx, z.Fair.Index)
						}
					}
				}
				time.Sleep(200 * time.Millisecond)
			}
		}()
	}
	if c.pprofDir != "" && p.admin != "" {
		wg.Add(1)
		go func() { // Caddy's CPU profile over the window
			defer wg.Done()
			time.Sleep(time.Until(mStart))
			secs := max(1, int(c.duration.Seconds())-1)
			url := fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", p.admin, secs)
			b, err := benchkit.Get(&http.Client{Timeout: c.duration + 30*time.Second}, url)
			if err == nil {
				err = os.WriteFile(filepath.Join(c.pprofDir, fmt.Sprintf("r%d-%s.pprof", round, s.key)), b, 0o644)
			}
			if err != nil {
				logf("profile of round %d %s: %v", round, s.key, err)
			}
		}()
	}
	var cpu0, cpu1 time.Duration
	wg.Add(1)
	go func() { // the proxy's CPU time over the window
		defer wg.Done()
		time.Sleep(time.Until(mStart))
		cpu0, _ = benchkit.ProcCPU(p.cmd.Process.Pid)
		time.Sleep(time.Until(mEnd))
		cpu1, _ = benchkit.ProcCPU(p.cmd.Process.Pid)
	}()
	st := runClients(p.addr, base, ts, mEnd, mEnd.Add(10*time.Second))
	wg.Wait()
	held, waits, done, peak := be.result()
	r.Held, r.Waits, r.Done, r.Peak = held, waits, done, peak
	total := 0
	for _, d := range done {
		total += d
	}
	r.Rate = float64(total) / c.duration.Seconds()
	if total > 0 {
		r.CPU = float64((cpu1 - cpu0).Microseconds()) / float64(total)
	}
	r.Failed = st.failed.Load() + st.timeouts.Load() + be.bad.Load()
	r.Index = -1
	if len(idx) > 0 {
		r.Index = mean(idx)
	}
	if r.Peak > c.limit {
		r.Err = fmt.Sprintf("the backend saw %d at once, over the limit %d", r.Peak, c.limit)
	}
	return r
}

// waitQuiet waits (at most maxWait) until less than maxBusy of the CPUs
// are busy over 200 ms, and returns the last busy share.
func waitQuiet(maxWait time.Duration, maxBusy float64) float64 {
	deadline := time.Now().Add(maxWait)
	for {
		i0, t0 := benchkit.CPUTotals()
		time.Sleep(200 * time.Millisecond)
		i1, t1 := benchkit.CPUTotals()
		busy := 1.0
		if t1 > t0 {
			busy = 1 - float64(i1-i0)/float64(t1-t0)
		}
		if busy < maxBusy || time.Now().After(deadline) {
			return busy
		}
	}
}

// proc is a running proxy.
type proc struct {
	cmd    *exec.Cmd
	addr   string
	admin  string
	exited chan struct{}
}

var (
	liveMu sync.Mutex
	live   = map[*proc]bool{}
	httpc  = &http.Client{Timeout: 5 * time.Second}
)

func killAll() {
	liveMu.Lock()
	defer liveMu.Unlock()
	for p := range live {
		_ = p.cmd.Process.Kill()
	}
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func (c *config) startProxy(s system, backend, tag string, ts []tenant) (*proc, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	p := &proc{addr: fmt.Sprintf("127.0.0.1:%d", port), exited: make(chan struct{})}
	var file string
	if s.key == "haproxy" {
		file = filepath.Join(c.workDir, tag+".cfg")
		cfg := benchkit.HAProxyTCP{Listen: p.addr, Server: backend, MaxConn: 2000, ServerMaxConn: c.limit}.Config()
		if err := os.WriteFile(file, []byte(cfg), 0o644); err != nil {
			return nil, err
		}
		p.cmd = exec.Command(c.haproxyBin, "-f", file, "-db")
	} else {
		ap, err := freePort()
		if err != nil {
			return nil, err
		}
		p.admin = fmt.Sprintf("127.0.0.1:%d", ap)
		limit := map[string]any{"handler": "connection_limit", "max_connections": c.limit, "zone": "bench"}
		if strings.HasPrefix(s.key, "fair") {
			limit["fair_share"] = "{l4.conn.remote_ip}"
		}
		if s.weighted {
			limit["weights"] = map[string]int{ts[0].ip.String(): ts[0].weight}
		}
		cfg := map[string]any{
			"admin":   map[string]any{"listen": p.admin, "config": map[string]any{"persist": false}},
			"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"level": "ERROR"}}},
			"apps": map[string]any{"layer4": map[string]any{"servers": map[string]any{"bench": map[string]any{
				"listen": []string{p.addr},
				"routes": []any{map[string]any{"handle": []any{limit,
					map[string]any{"handler": "proxy", "upstreams": []any{map[string]any{"dial": []string{backend}}}}}}},
			}}}},
		}
		b, _ := json.MarshalIndent(cfg, "", "  ")
		file = filepath.Join(c.workDir, tag+".json")
		if err := os.WriteFile(file, b, 0o644); err != nil {
			return nil, err
		}
		p.cmd = exec.Command(c.caddyBin, "run", "--config", file)
		p.cmd.Env = append(os.Environ(), "XDG_CONFIG_HOME="+filepath.Join(c.workDir, "xdg"), "XDG_DATA_HOME="+filepath.Join(c.workDir, "xdg"))
	}
	logFile, err := os.Create(filepath.Join(c.workDir, tag+".log"))
	if err != nil {
		return nil, err
	}
	p.cmd.Stdout, p.cmd.Stderr = logFile, logFile
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		logFile.Close()
		return nil, err
	}
	liveMu.Lock()
	live[p] = true
	liveMu.Unlock()
	go func() { _ = p.cmd.Wait(); logFile.Close(); close(p.exited) }()
	deadline := time.Now().Add(15 * time.Second)
	for !benchkit.Listening(port) {
		select {
		case <-p.exited:
			b, _ := os.ReadFile(logFile.Name())
			return nil, fmt.Errorf("%s exited at start: %s", s.key, strings.TrimSpace(string(b)))
		default:
		}
		if time.Now().After(deadline) {
			p.stop()
			return nil, fmt.Errorf("%s did not listen within 15 s", s.key)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return p, nil
}

func (p *proc) stop() {
	_ = p.cmd.Process.Kill()
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
	}
	liveMu.Lock()
	delete(live, p)
	liveMu.Unlock()
}
