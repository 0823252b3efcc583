package main

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/l4-connlimit/connlimit/bench/internal/benchkit"

	"github.com/l4-connlimit/connlimit/bench/charts"
)

// workload is one throughput scenario.
type workload struct {
	key     string
	name    string
	clients int
	limit   int
	hold    time.Duration
}

// ideal is L/H in connections per second, NaN when H is 0.
func (w workload) ideal() float64 {
	if w.hold <= 0 {
		return math.NaN()
	}
	return float64(w.limit) / w.hold.Seconds()
}

// tputResult is one throughput run.
type tputResult struct {
	kind        sysKind
	wl          workload
	round       int
	clients     int
	busyBefore  float64 // machine busy fraction just before the run
	busyTop     string  // the busiest process then, if the machine was busy
	completed   int
	rate        float64 // conn/s over the window
	frac        float64 // rate / (L/H), NaN if undefined
	p50, p99    time.Duration
	maxLat      time.Duration
	failed      int // failed inside the window
	timeouts    int
	dialErrs    int
	bad         int
	cpuPerConn  float64 // µs of proxy CPU per completed connection
	cpuCores    float64 // proxy CPU over the window / wall time
	benchCPU    float64 // µs of this program's CPU (client + backend) per completed connection
	busyDuring  float64 // machine busy fraction over the window
	otherCores  float64 // CPU of other processes over the window (cores, approximate)
	gapN        int
	gapP50      time.Duration
	gapP99      time.Duration
	peak        int64 // backend peak concurrency over the whole run
	beAccepts   int   // backend accepts over the whole run
	threads     int
	logErrs     int
	logSample   string
	err         error
	profileNote string
	// For the charts (bench/charts): the distributions behind p50/p99.
	latQ, gapQ charts.Quantiles
}

func (c *config) runThroughput(kind sysKind, wl workload, round int, profile bool) (r tputResult) {
	r = tputResult{kind: kind, wl: wl, round: round, frac: math.NaN(), cpuPerConn: math.NaN()}
	r.clients = wl.clients
	if kind == sysPlainL {
		r.clients = wl.limit
	}
	runtime.GC()
	r.busyBefore, r.busyTop = waitIdle(15*time.Second, 0.10)
	base := time.Now()
	be, err := newBackend(base, wl.hold, false, 1<<16)
	if err != nil {
		r.err = err
		return r
	}
	defer be.close()
	tag := fmt.Sprintf("r%d-%s-%s", round, wl.key, kind)
	if profile {
		tag += "-profile"
	}
	p, err := startProxy(c, procSpec{
		kind: kind, limit: wl.limit, backend: be.addr(), maxConn: 4000,
		tryDuration: c.tryDuration, tryInterval: c.tryInterval,
	}, tag)
	if err != nil {
		r.err = err
		return r
	}
	defer p.stop()

	start := time.Now()
	mStart := start.Add(c.warmup)
	mEnd := mStart.Add(c.duration)
	hardStop := mEnd.Add(c.grace)
	var cpu0, cpu1, self0, self1 time.Duration
	var idle0, idle1, tot0, tot1 uint64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		time.Sleep(time.Until(mStart))
		cpu0, _ = benchkit.ProcCPU(p.pid)
		self0, _ = benchkit.ProcCPU(os.Getpid())
		idle0, tot0 = cpuTotals()
		if profile && p.adminAddr != "" {
			file := filepath.Join(c.profDir, fmt.Sprintf("cpu-%s-%s.pb.gz", wl.key, kind))
			url := fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", p.adminAddr, int(c.duration.Seconds()))
			if err := fetchTo(url, file); err != nil {
				r.profileNote = err.Error()
			} else {
				r.profileNote = file
			}
		}
		time.Sleep(time.Until(mStart.Add(c.duration / 2)))
		r.threads = procThreads(p.pid)
		time.Sleep(time.Until(mEnd))
		cpu1, _ = benchkit.ProcCPU(p.pid)
		self1, _ = benchkit.ProcCPU(os.Getpid())
		idle1, tot1 = cpuTotals()
	}()
	lr := runLoad(p.addr(), r.clients, c.dialer, mStart, mEnd, hardStop)
	wg.Wait()
	accepts, closes, _, _ := be.snapshot()
	r.logErrs, r.logSample = logErrors(p.logPath)

	r.completed = lr.completed
	r.rate = float64(lr.completed) / c.duration.Seconds()
	if !math.IsNaN(wl.ideal()) {
		r.frac = r.rate / wl.ideal()
	}
	r.latQ = charts.Summarise(lr.lat)
	r.p50 = time.Duration(pct(lr.lat, 50))
	r.p99 = time.Duration(pct(lr.lat, 99))
	if len(lr.lat) > 0 {
		r.maxLat = time.Duration(lr.lat[len(lr.lat)-1])
	}
	r.failed, r.timeouts, r.dialErrs, r.bad = lr.failed, lr.timeouts, lr.dialErrs, lr.bad
	r.cpuCores = (cpu1 - cpu0).Seconds() / c.duration.Seconds()
	r.benchCPU = math.NaN()
	if lr.completed > 0 {
		r.cpuPerConn = us(cpu1-cpu0) / float64(lr.completed)
		r.benchCPU = us(self1-self0) / float64(lr.completed)
	}
	if tot1 > tot0 {
		r.busyDuring = 1 - float64(idle1-idle0)/float64(tot1-tot0)
		r.otherCores = r.busyDuring*float64(runtime.NumCPU()) - r.cpuCores - (self1-self0).Seconds()/c.duration.Seconds()
	}
	if kind.limited() {
		gaps := benchkit.HandoffGaps(accepts, closes, wl.limit, int64(mStart.Sub(base)), int64(mEnd.Sub(base)))
		r.gapN = len(gaps)
		r.gapQ = charts.Summarise(gaps)
		r.gapP50 = time.Duration(pct(gaps, 50))
		r.gapP99 = time.Duration(pct(gaps, 99))
	}
	r.peak = be.peak.Load()
	r.beAccepts = len(accepts)
	return r
}

// scaleResult is one run of N waiters behind one holder (L=1).
type scaleResult struct {
	kind       sysKind
	n          int // waiters run
	requested  int // waiters asked for (more than n if the fd limit capped it)
	round      int
	busyBefore float64
	busyTop    string
	opened     int
	openTime   time.Duration
	queued     int // as the proxy reports it (admin API / stats socket)
	fdDelta    int
	rss0, rss1 int64 // KiB: holder only; with the waiters, settled
	rss2       int64 // KiB: after the idle window
	perWaiter  float64
	idleWindow time.Duration
	idleCPU    time.Duration // utime+stime delta over the idle window
	idleSched  time.Duration // schedstat delta (live threads) over it
	mem0, mem1 goMem         // Caddy only
	gor0, gor1 int
	stackGroup string
	drained    int           // waiters answered by the backend
	clientOK   int           // waiters that got their answer
	firstAdmit time.Duration // holder release to first waiter accepted
	drainTime  time.Duration // holder release to last waiter closed
	drainRate  float64       // waiters/s
	inOrder    int           // waiters at their FIFO position
	inversions int           // adjacent pairs out of order
	maxDisp    int
	orderHead  []int64
	zoneHead   []int64 // connlimit: the first waiters as the zone lists them
	zoneSame   int     // of those, how many match the backend's order
	// The handoff from waiter k to waiter k+1 during the drain, split at
	// the moment client k saw the end of its connection: medians.
	hoTotal   time.Duration // backend closed k -> backend accepted k+1
	hoClient  time.Duration // backend closed k -> client k saw EOF
	hoAfter   time.Duration // client k saw EOF -> backend accepted k+1
	hoBefore  float64       // share of handoffs where k+1 was accepted before client k saw EOF
	threads   int
	heapProf  string
	logErrs   int
	logSample string
	err       error
	// For the charts (bench/charts): VmRSS while the waiters connected,
	// and when the backend accepted each waiter, by arrival rank.
	opening []charts.RSSSample
	drain   charts.Drain
}

func (c *config) runScale(kind sysKind, n, round int, profile bool) (r scaleResult) {
	r = scaleResult{kind: kind, n: n, round: round, idleWindow: c.idleWindow}
	runtime.GC()
	r.busyBefore, r.busyTop = waitIdle(15*time.Second, 0.10)
	base := time.Now()
	be, err := newBackend(base, 0, true, n+2)
	if err != nil {
		r.err = err
		return r
	}
	defer be.close()
	var rl syscall.Rlimit
	_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl)
	// HAProxy wants 2 descriptors per maxconn (see scaleCap).
	spec := procSpec{kind: kind, limit: 1, backend: be.addr(), maxConn: min(n+1000, (int(rl.Cur)-100)/2)}
	if kind == sysHAProxy {
		spec.nbthread = 1 // see the report: 2.6 with 2 threads stalls at maxconn 1
	}
	tag := fmt.Sprintf("r%d-scale%d-%s", round, n, kind)
	p, err := startProxy(c, spec, tag)
	if err != nil {
		r.err = err
		return r
	}
	defer p.stop()
	connDeadline := time.Now().Add(3*time.Minute + time.Duration(n)*time.Millisecond)
	wc := &waiterClient{base: base, doneAt: make([]atomic.Int64, n+1)}
	defer wc.closeAll(10 * time.Second)

	if err := wc.open(c.dialer, p.addr(), 0, connDeadline); err != nil {
		r.err = fmt.Errorf("holder: %v", err)
		return r
	}
	select {
	case <-be.holderIn:
	case <-time.After(10 * time.Second):
		r.err = fmt.Errorf("holder did not reach the backend")
		return r
	}
	time.Sleep(500 * time.Millisecond)
	r.rss0, _ = procRSSKiB(p.pid)
	fd0 := procFDs(p.pid)
	if p.adminAddr != "" {
		r.mem0, _ = caddyMem(p.adminAddr)
		r.gor0, _ = caddyGoroutines(p.adminAddr)
	}

	t0 := time.Now()
	openDeadline := t0.Add(90 * time.Second)
	fails := 0
	sampleEvery := max(1, n/40) // VmRSS while they connect, for the charts
	for i := 1; i <= n && time.Now().Before(openDeadline); i++ {
		if err := wc.open(c.dialer, p.addr(), i, connDeadline); err != nil {
			fails++
			if fails > 100 {
				r.err = fmt.Errorf("opening waiters: %v (after %d)", err, r.opened)
				break
			}
			continue
		}
		r.opened++
		if r.opened%sampleEvery == 0 {
			if rss, err := procRSSKiB(p.pid); err == nil {
				r.opening = append(r.opening, charts.RSSSample{Waiters: r.opened, RSSKiB: rss})
			}
		}
	}
	r.openTime = time.Since(t0)
	if r.err != nil {
		return r
	}
	// Wait until the proxy has them all queued.
	waitUntil := time.Now().Add(60 * time.Second)
	for time.Now().Before(waitUntil) {
		if p.adminAddr != "" {
			_, r.queued, _ = connlimitWaiting(p.adminAddr)
		} else {
			r.queued, _, _ = haproxyQueue(p.statsSock)
		}
		if r.queued >= r.opened {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	r.fdDelta = procFDs(p.pid) - fd0
	if p.adminAddr != "" {
		r.zoneHead = zoneOrder(p.adminAddr, wc)
	}
	time.Sleep(time.Second)
	r.rss1, _ = procRSSKiB(p.pid)
	cpuA, _ := benchkit.ProcCPU(p.pid)
	schA, _ := procSchedNS(p.pid)
	time.Sleep(c.idleWindow)
	cpuB, _ := benchkit.ProcCPU(p.pid)
	schB, _ := procSchedNS(p.pid)
	r.idleCPU, r.idleSched = cpuB-cpuA, schB-schA
	r.rss2, _ = procRSSKiB(p.pid)
	r.threads = procThreads(p.pid)
	if r.opened > 0 {
		r.perWaiter = float64(r.rss1-r.rss0) * 1024 / float64(r.opened)
	}
	if p.adminAddr != "" {
		r.mem1, _ = caddyMem(p.adminAddr)
		r.gor1, r.stackGroup = caddyGoroutines(p.adminAddr)
		if profile {
			file := filepath.Join(c.profDir, fmt.Sprintf("heap-scale%d-%s.pb.gz", n, kind))
			if err := fetchTo("http://"+p.adminAddr+"/debug/pprof/heap?gc=1", file); err == nil {
				r.heapProf = file
			}
		}
	}

	// The holder leaves: the waiters drain one by one.
	rel := be.now()
	close(be.release)
	drainDeadline := time.Now().Add(60*time.Second + time.Duration(n)*time.Millisecond)
	for be.served.Load() < int64(r.opened)+1 && time.Now().Before(drainDeadline) {
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // let the last answers reach the clients
	accepts, _, order, lastClose := be.snapshot()
	r.drained = int(be.served.Load()) - 1
	r.clientOK = int(wc.ok.Load()) - 1
	if len(accepts) > 1 {
		r.firstAdmit = time.Duration(accepts[1] - rel)
	}
	r.drainTime = time.Duration(lastClose - rel)
	if r.drainTime > 0 {
		r.drainRate = float64(r.drained) / r.drainTime.Seconds()
	}
	// Order: the n-th connection the backend accepted after the holder
	// should carry index n.
	prev := int64(0)
	for j, idx := range order[min(1, len(order)):] {
		want := int64(j + 1)
		if idx == want {
			r.inOrder++
		}
		if j > 0 && idx < prev {
			r.inversions++
		}
		prev = idx
		r.maxDisp = max(r.maxDisp, int(absInt64(idx-want)))
	}
	if len(order) > 1 {
		r.orderHead = order[1:min(len(order), 13)]
	}
	r.handoffSplit(accepts, be.closeTimes(), order, wc)
	// Each waiter's admission by arrival rank (its client index), for the
	// drain chart.
	admitted := make([]int64, n+1)
	for i := range admitted {
		admitted[i] = -1
	}
	for j, idx := range order {
		if idx >= 1 && int(idx) <= n && j < len(accepts) {
			admitted[idx] = accepts[j] - rel
		}
	}
	r.drain = charts.NewDrain(admitted, 600)
	for j, idx := range r.zoneHead {
		if j+1 < len(order) && order[j+1] == idx {
			r.zoneSame++
		}
	}
	r.logErrs, r.logSample = logErrors(p.logPath)
	if r.drained < r.opened {
		r.err = fmt.Errorf("only %d of %d waiters drained", r.drained, r.opened)
	}
	return r
}

// handoffSplit splits each handoff of the drain at the moment the client
// of the connection that left saw its end.
func (r *scaleResult) handoffSplit(accepts, closeSeq, order []int64, wc *waiterClient) {
	var total, client, after []int64
	before := 0
	for k := 1; k+1 < len(accepts) && k < len(closeSeq) && k < len(order); k++ {
		idx := order[k]
		if idx < 0 || int(idx) >= len(wc.doneAt) || closeSeq[k] < 0 {
			continue
		}
		done := wc.doneAt[idx].Load()
		if done == 0 {
			continue
		}
		next := accepts[k+1]
		total = append(total, next-closeSeq[k])
		client = append(client, done-closeSeq[k])
		after = append(after, next-done)
		if next < done {
			before++
		}
	}
	for _, v := range [][]int64{total, client, after} {
		slices.Sort(v)
	}
	r.hoTotal = time.Duration(pct(total, 50))
	r.hoClient = time.Duration(pct(client, 50))
	r.hoAfter = time.Duration(pct(after, 50))
	if len(total) > 0 {
		r.hoBefore = float64(before) / float64(len(total))
	}
}

func absInt64(v int64) int64 {
	if v < 0 {
		return -v
	}
	return v
}

// profileSeconds is the CPU time a profile attributes to the samples the
// pprof options select (all samples without options).
func (c *config) profileSeconds(file string, opts ...string) float64 {
	key := strings.Join(append([]string{file}, opts...), "\x00")
	if v, ok := c.profCache[key]; ok {
		return v
	}
	v := c.profileSecondsUncached(file, opts...)
	if c.profCache == nil {
		c.profCache = map[string]float64{}
	}
	c.profCache[key] = v
	return v
}

func (c *config) profileSecondsUncached(file string, opts ...string) float64 {
	args := append([]string{"tool", "pprof", "-top", "-nodefraction=0", "-nodecount=1000000"}, opts...)
	out, err := runCmd(30*time.Second, "go", append(args, c.caddyBin, file)...)
	if err != nil {
		return math.NaN()
	}
	re := regexp.MustCompile(`accounting for ([0-9.]+)(m?s|)[, ]`)
	if len(opts) == 0 {
		re = regexp.MustCompile(`Total samples = ([0-9.]+)(m?s)`)
	}
	m := re.FindStringSubmatch(out)
	if m == nil {
		return math.NaN()
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		return math.NaN()
	}
	if m[2] == "ms" {
		v /= 1000
	}
	return v
}

// profileTop runs `go tool pprof -top` on a profile.
func (c *config) profileTop(file string, extra ...string) string {
	if file == "" {
		return ""
	}
	if _, err := os.Stat(file); err != nil {
		return ""
	}
	args := append([]string{"tool", "pprof", "-top", "-nodecount=25"}, extra...)
	args = append(args, c.caddyBin, file)
	out, err := runCmd(30*time.Second, "go", args...)
	if err != nil {
		return "pprof failed: " + err.Error()
	}
	return out
}
