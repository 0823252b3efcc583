package main

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"time"
)

func fmtDur(d time.Duration) string {
	switch {
	case d < 0:
		return "–"
	case d < time.Millisecond:
		return fmt.Sprintf("%.0fµs", us(d))
	case d < time.Second:
		return fmt.Sprintf("%.1fms", float64(d)/float64(time.Millisecond))
	}
	return fmt.Sprintf("%.2fs", d.Seconds())
}

func fmtSigned(d time.Duration) string {
	if d < 0 {
		return "−" + fmtDur(-d)
	}
	return fmtDur(d)
}

func fmtF(v float64, prec int) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "–"
	}
	return fmt.Sprintf("%.*f", prec, v)
}

func durs(rs []tputResult, f func(tputResult) time.Duration) []float64 {
	var v []float64
	for _, r := range rs {
		d := f(r)
		if r.err != nil || d < 0 {
			v = append(v, math.NaN())
			continue
		}
		v = append(v, float64(d))
	}
	return v
}

func floats(rs []tputResult, f func(tputResult) float64) []float64 {
	var v []float64
	for _, r := range rs {
		if r.err != nil {
			v = append(v, math.NaN())
			continue
		}
		v = append(v, f(r))
	}
	return v
}

func medDur(v []float64) string {
	m := median(v)
	if math.IsNaN(m) {
		return "–"
	}
	return fmtDur(time.Duration(m))
}

func (rep *report) runs(wl string, k sysKind) []tputResult {
	var out []tputResult
	for _, r := range rep.tput {
		if r.wl.key == wl && r.kind == k {
			out = append(out, r)
		}
	}
	return out
}

func (rep *report) byRound(wl string, k sysKind, round int) (tputResult, bool) {
	for _, r := range rep.tput {
		if r.wl.key == wl && r.kind == k && r.round == round && r.err == nil {
			return r, true
		}
	}
	return tputResult{}, false
}

// ratios returns, per round, f(a)/f(b) of systems a and b in workload wl.
func (rep *report) ratios(wl string, a, b sysKind, f func(tputResult) float64) []float64 {
	var v []float64
	for _, r := range rep.tput {
		if r.wl.key != wl || r.kind != a || r.err != nil {
			continue
		}
		o, ok := rep.byRound(wl, b, r.round)
		if !ok || f(o) == 0 {
			continue
		}
		v = append(v, f(r)/f(o))
	}
	return v
}

func (rep *report) diffs(wl string, a, b sysKind, f func(tputResult) float64) []float64 {
	var v []float64
	for _, r := range rep.tput {
		if r.wl.key != wl || r.kind != a || r.err != nil {
			continue
		}
		if o, ok := rep.byRound(wl, b, r.round); ok {
			v = append(v, f(r)-f(o))
		}
	}
	return v
}

func (rep *report) scaleRuns(n int, k sysKind) []scaleResult {
	var out []scaleResult
	for _, r := range rep.scale {
		if r.requested == n && r.kind == k {
			out = append(out, r)
		}
	}
	return out
}

func sfloats(rs []scaleResult, f func(scaleResult) float64) []float64 {
	var v []float64
	for _, r := range rs {
		if r.err != nil && r.opened == 0 {
			continue
		}
		v = append(v, f(r))
	}
	return v
}

func verdict(ok bool) string {
	if ok {
		return "**met**"
	}
	return "**NOT met**"
}

func (rep *report) markdown(c *config) string {
	var b strings.Builder
	w := func(f string, a ...any) { fmt.Fprintf(&b, f, a...) }
	w("## Run\n\n")
	w("Command: `%s` (from the repository root), elapsed %s.\n\n", strings.Join(os.Args, " "), rep.elapsed.Round(time.Second))
	w("| | |\n|---|---|\n")
	for _, kv := range rep.machine {
		w("| %s | %s |\n", kv[0], kv[1])
	}
	w("| RLIMIT_NOFILE | %d |\n\n", rep.rlimit)
	w("Settings: %d round(s), each run %s warm-up + %s measured (+ up to %s for connections in flight), systems interleaved within each round, machine idle (<10%% busy over 200 ms) checked before each run. Client source addresses 127.0.0.1–127.0.0.%d. Polling system: try_duration %s, try_interval %s. Each run starts a fresh proxy process.\n\n",
		c.rounds, c.warmup, c.duration, c.grace, c.dialer.Sources(), c.tryDuration, c.tryInterval)

	for _, wl := range workloads {
		w("### Throughput, %s\n\n", wl.name)
		w("Medians across rounds (peak: max across rounds; failed: sum). L/H = %s conn/s.\n\n", fmtF(wl.ideal(), 0))
		w("| system | clients | conn/s | × L/H | p50 | p99 | max | proxy CPU µs/conn | proxy CPU (cores) | client+backend CPU µs/conn | machine busy | other processes (cores) | handoff gap p50 | gap p99 | backend peak (L=%d) | failed/cut | proxy threads |\n", wl.limit)
		w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
		for _, k := range allSystems {
			rs := rep.runs(wl.key, k)
			if len(rs) == 0 {
				continue
			}
			fail, threads := 0, 0
			peak := []float64{}
			for _, r := range rs {
				fail += r.failed + r.timeouts
				threads = max(threads, r.threads)
				peak = append(peak, float64(r.peak))
			}
			gap50, gap99 := "–", "–"
			if k.limited() {
				gap50 = medDur(durs(rs, func(r tputResult) time.Duration {
					if r.gapN == 0 {
						return -1
					}
					return r.gapP50
				}))
				gap99 = medDur(durs(rs, func(r tputResult) time.Duration {
					if r.gapN == 0 {
						return -1
					}
					return r.gapP99
				}))
			}
			w("| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s%% | %s | %s | %s | %s | %d | %d |\n",
				k.label(), rs[0].clients,
				fmtF(median(floats(rs, func(r tputResult) float64 { return r.rate })), 0),
				fmtF(median(floats(rs, func(r tputResult) float64 { return r.frac })), 3),
				medDur(durs(rs, func(r tputResult) time.Duration { return pctOrNone(r, r.p50) })),
				medDur(durs(rs, func(r tputResult) time.Duration { return pctOrNone(r, r.p99) })),
				medDur(durs(rs, func(r tputResult) time.Duration { return pctOrNone(r, r.maxLat) })),
				fmtF(median(floats(rs, func(r tputResult) float64 { return r.cpuPerConn })), 1),
				fmtF(median(floats(rs, func(r tputResult) float64 { return r.cpuCores })), 2),
				fmtF(median(floats(rs, func(r tputResult) float64 { return r.benchCPU })), 1),
				fmtF(100*median(floats(rs, func(r tputResult) float64 { return r.busyDuring })), 0),
				fmtF(median(floats(rs, func(r tputResult) float64 { return r.otherCores })), 2),
				gap50, gap99, fmtF(maxOf(peak), 0), fail, threads)
		}
		for _, v := range limiters {
			if len(rep.runs(wl.key, v)) == 0 {
				continue
			}
			w("\nPer round, %s against the others:\n\n", v.label())
			w("| round | conn/s ÷ HAProxy | p99 ÷ HAProxy | gap p50 ÷ HAProxy | CPU µs/conn − plain-L | CPU µs/conn − HAProxy |\n|---|---|---|---|---|---|\n")
			for round := 1; round <= c.rounds; round++ {
				a, ok1 := rep.byRound(wl.key, v, round)
				h, ok2 := rep.byRound(wl.key, sysHAProxy, round)
				pl, ok3 := rep.byRound(wl.key, sysPlainL, round)
				if !ok1 {
					continue
				}
				cells := []string{"–", "–", "–", "–", "–"}
				if ok2 {
					cells[0] = fmtF(a.rate/h.rate, 3)
					cells[1] = fmtF(float64(a.p99)/float64(h.p99), 3)
					if h.gapP50 > 0 {
						cells[2] = fmtF(float64(a.gapP50)/float64(h.gapP50), 3)
					}
					cells[4] = fmtF(a.cpuPerConn-h.cpuPerConn, 1)
				}
				if ok3 {
					cells[3] = fmtF(a.cpuPerConn-pl.cpuPerConn, 1)
				}
				w("| %d | %s |\n", round, strings.Join(cells, " | "))
			}
		}
		w("\n")
	}

	if len(rep.scale) > 0 {
		w("### Waiting connections behind one holder (L=1)\n\n")
		w("RSS/waiter = (VmRSS with the waiters queued and settled − VmRSS with the holder only) ÷ waiters. Idle CPU: utime+stime (and schedstat of live threads) over %s while all wait. Drain: from the backend releasing the holder to the backend closing the last waiter. Order: the k-th connection the backend accepted after the holder carries client index k. HAProxy runs with nbthread 1 here. Medians across rounds.\n\n", c.idleWindow)
		w("| system | waiters | rounds | queued (proxy's count) | RSS/waiter | RSS before → after | Go stack/waiter | Go heap in use/waiter | goroutines/waiter | idle CPU (stat / schedstat) | first admitted after | drain | drain rate | in FIFO order | adjacent inversions | max displacement |\n")
		w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
		for _, n := range c.scaleNs {
			for _, k := range []sysKind{sysConnlimit, sysConnlimitCW, sysHAProxy} {
				rs := rep.scaleRuns(n, k)
				if len(rs) == 0 {
					continue
				}
				last := rs[len(rs)-1]
				stack, heap, gor := "–", "–", "–"
				if k.isCaddy() {
					stack = fmtF(median(sfloats(rs, func(r scaleResult) float64 {
						return (float64(r.mem1.StackInuse) - float64(r.mem0.StackInuse)) / float64(r.opened)
					})), 0) + " B"
					heap = fmtF(median(sfloats(rs, func(r scaleResult) float64 {
						return (float64(r.mem1.HeapInuse) - float64(r.mem0.HeapInuse)) / float64(r.opened)
					})), 0) + " B"
					gor = fmtF(median(sfloats(rs, func(r scaleResult) float64 {
						return float64(r.gor1-r.gor0) / float64(r.opened)
					})), 2)
				}
				inOrder, inv, disp := 0, 0, 0
				for _, r := range rs {
					inOrder += r.inOrder
					inv += r.inversions
					disp = max(disp, r.maxDisp)
				}
				opened := 0
				for _, r := range rs {
					opened += r.opened
				}
				nrun := fmt.Sprint(last.n)
				if last.n != n {
					nrun = fmt.Sprintf("%d (asked %d; fd limit)", last.n, n)
				}
				w("| %s | %s | %d | %d | %s B | %s → %s MiB | %s | %s | %s | %s / %s | %s | %s | %s/s | %d of %d | %d | %d |\n",
					k, nrun, len(rs), last.queued,
					fmtF(median(sfloats(rs, func(r scaleResult) float64 { return r.perWaiter })), 0),
					fmtF(float64(last.rss0)/1024, 1), fmtF(float64(last.rss1)/1024, 1),
					stack, heap, gor,
					fmtDur(time.Duration(median(sfloats(rs, func(r scaleResult) float64 { return float64(r.idleCPU) })))),
					fmtDur(time.Duration(median(sfloats(rs, func(r scaleResult) float64 { return float64(r.idleSched) })))),
					fmtDur(time.Duration(median(sfloats(rs, func(r scaleResult) float64 { return float64(r.firstAdmit) })))),
					fmtDur(time.Duration(median(sfloats(rs, func(r scaleResult) float64 { return float64(r.drainTime) })))),
					fmtF(median(sfloats(rs, func(r scaleResult) float64 { return r.drainRate })), 0),
					inOrder, opened, inv, disp)
			}
		}
		w("\nWhere a drain handoff's time goes (medians): from the backend closing waiter k to it accepting waiter k+1, split at the moment client k read the end of its connection. A limiter that frees the slot when the backend side closes can admit k+1 before client k is done; one that frees it when the whole proxied connection ends (connection_limit holds its slot until caddy-l4's proxy handler returns, which waits for the client to close) cannot.\n\n")
		w("| system | waiters | round | backend close → next accept | backend close → client saw EOF | client saw EOF → next accept | next accepted before client saw EOF |\n|---|---|---|---|---|---|---|\n")
		for _, r := range rep.scale {
			if r.hoTotal <= 0 {
				continue
			}
			w("| %s | %d | %d | %s | %s | %s | %.0f%% |\n", r.kind, r.n, r.round, fmtDur(r.hoTotal), fmtDur(r.hoClient), fmtSigned(r.hoAfter), r.hoBefore*100)
		}
		w("\n")
	}

	rep.targets(c, w)

	w("### Every run\n\n")
	w("| round | workload | system | clients | busy before | other processes during (cores) | conn/s | p50 | p99 | CPU µs/conn | gap p50 | gap p99 | gap samples | peak | backend accepts | failed | cut at stop | dial errors | log errors | threads |\n")
	w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range append(append([]tputResult{}, rep.tput...), rep.prof...) {
		if r.err != nil {
			w("| %d | %s | %s | error: %s |\n", r.round, r.wl.key, r.kind, r.err)
			continue
		}
		round := fmt.Sprint(r.round)
		if r.round == 0 {
			round = "profile"
		}
		w("| %s | %s | %s | %d | %s | %.2f | %.0f | %s | %s | %s | %s | %s | %d | %d | %d | %d | %d | %d | %d | %d |\n",
			round, r.wl.key, r.kind, r.clients, busyCell(r.busyBefore, r.busyTop), r.otherCores, r.rate, fmtDur(pctOrNone(r, r.p50)), fmtDur(pctOrNone(r, r.p99)),
			fmtF(r.cpuPerConn, 1), gapOrNone(r, r.gapP50), gapOrNone(r, r.gapP99), r.gapN, r.peak, r.beAccepts,
			r.failed, r.timeouts, r.dialErrs, r.logErrs, r.threads)
	}
	if len(rep.scale) > 0 {
		w("\n| round | waiters | system | busy before | opened in | queued | fd Δ | RSS KiB before/settled/after idle | idle CPU stat/schedstat | Go HeapInuse Δ | Go StackInuse Δ | goroutines before/after | drained | client answers | first admitted | drain | rate/s | in order | first indices admitted | zone's first waiters (same as admitted) | log errors | error |\n")
		w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
		for _, r := range rep.scale {
			e := ""
			if r.err != nil {
				e = r.err.Error()
			}
			zone := "–"
			if len(r.zoneHead) > 0 {
				zone = fmt.Sprintf("%v… (%d of %d)", r.zoneHead[:min(12, len(r.zoneHead))], r.zoneSame, len(r.zoneHead))
			}
			w("| %d | %d | %s | %s | %s | %d | %d | %d / %d / %d | %s / %s | %.1f MiB | %.1f MiB | %d / %d | %d | %d | %s | %s | %.0f | %d/%d | %v | %s | %d | %s |\n",
				r.round, r.n, r.kind, busyCell(r.busyBefore, r.busyTop), fmtDur(r.openTime), r.queued, r.fdDelta, r.rss0, r.rss1, r.rss2,
				fmtDur(r.idleCPU), fmtDur(r.idleSched),
				(float64(r.mem1.HeapInuse)-float64(r.mem0.HeapInuse))/(1<<20), (float64(r.mem1.StackInuse)-float64(r.mem0.StackInuse))/(1<<20),
				r.gor0, r.gor1, r.drained, r.clientOK, fmtDur(r.firstAdmit), fmtDur(r.drainTime), r.drainRate, r.inOrder, r.opened,
				r.orderHead, zone, r.logErrs, e)
		}
	}
	for _, r := range append(append([]tputResult{}, rep.tput...), rep.prof...) {
		if r.logSample != "" && (r.kind == sysPolling || r.logErrs > 0) {
			w("\nFirst error logged by %s (%s, round %d, %d error lines): `%s`\n", r.kind, r.wl.key, r.round, r.logErrs, clip(r.logSample, 300))
			break
		}
	}
	if len(rep.skipped) > 0 {
		w("\nSkipped (time budget): %s\n", strings.Join(rep.skipped, "; "))
	}

	if len(rep.prof) > 0 || hasHeap(rep) {
		w("\n### Profiles (extra runs, not in the tables above)\n\n")
		for _, r := range rep.prof {
			if r.profileNote == "" || !strings.HasSuffix(r.profileNote, ".pb.gz") {
				w("%s %s: no profile (%s)\n\n", r.wl.key, r.kind, r.profileNote)
				continue
			}
			w("CPU profile of Caddy, %s, %s (%.0f conn/s, %s µs/conn), `go tool pprof -top`:\n\n```\n%s```\n\n",
				r.wl.key, r.kind, r.rate, fmtF(r.cpuPerConn, 1), clipLines(c.profileTop(r.profileNote), 38))
			if r.kind.isConnlimit() {
				w("Same, only connection_limit's own code (`-cum -focus=%s -ignore=%s`: its Handle minus the proxy it calls):\n\n```\n%s```\n\n",
					focusOwn, ignoreProxy, clipLines(c.profileTop(r.profileNote, "-cum", "-focus="+focusOwn, "-ignore="+ignoreProxy), 40))
			}
		}
		rep.profileBreakdown(c, w)
		for _, r := range rep.scale {
			if r.heapProf == "" {
				continue
			}
			w("Heap in use of Caddy with %d waiters (`go tool pprof -top -sample_index=inuse_space`):\n\n```\n%s```\n\n",
				r.n, clipLines(c.profileTop(r.heapProf, "-sample_index=inuse_space"), 30))
			if r.stackGroup != "" {
				w("Largest goroutine group (the waiters), from /debug/pprof/goroutine?debug=1:\n\n```\n%s\n```\n\n", clipLines(r.stackGroup, 30))
			}
		}
		if c.keep {
			w("Profiles kept in %s.\n\n", filepath.Clean(c.profDir))
		}
	}
	return b.String()
}

func busyCell(busy float64, top string) string {
	if top == "" {
		return fmt.Sprintf("%.0f%%", busy*100)
	}
	return fmt.Sprintf("%.0f%% (%s)", busy*100, top)
}

// Regexps for pprof (function names; the package path is spelled out so
// that a binary path containing "connlimit" does not match).
const (
	focusOwn    = `l4-connlimit/connlimit\.`
	ignoreProxy = `l4proxy\.`
)

// pprof options of two parts of Caddy's CPU: connection_limit's own code
// and caddy-l4's proxy handler (in the report and the charts).
var (
	ownArgs   = []string{"-focus=" + focusOwn, "-ignore=" + ignoreProxy}
	proxyArgs = []string{`-focus=l4proxy\.`}
)

// profileBreakdown turns the CPU profiles into µs per connection by where
// the time goes, connection_limit against plain caddy-l4 driven by L
// clients.
func (rep *report) profileBreakdown(c *config, w func(string, ...any)) {
	cats := []struct {
		name string
		args []string
	}{
		{"all of Caddy", nil},
		{"connection_limit's own code (its Handle minus the proxy)", ownArgs},
		{"… of which watching the waiting socket (ppoll)", []string{`-focus=connlimit\.(peerGone|socketGone|socketUntouched)`}},
		{"caddy-l4 proxy handler (dial, copy, close)", proxyArgs},
		{"Go GC (background mark, assists, sweep)", []string{`-focus=runtime\.(gcBgMarkWorker|gcAssistAlloc|bgsweep)`}},
		{"… of which scanning goroutine stacks", []string{`-focus=runtime\.scanstack`}},
		{"Go scheduler (schedule, findRunnable)", []string{`-focus=runtime\.(schedule|findRunnable)$`}},
		{"goroutine stack growth", []string{`-focus=runtime\.newstack`}},
		{"all system calls (flat)", []string{`-focus=internal/runtime/syscall/linux\.Syscall6`}},
	}
	type col struct {
		r    tputResult
		vals []float64
	}
	var cols []col
	for _, wl := range workloads {
		for _, k := range []sysKind{sysConnlimit, sysConnlimitCW, sysPlainL} {
			for _, r := range rep.prof {
				if r.wl.key != wl.key || r.kind != k || !strings.HasSuffix(r.profileNote, ".pb.gz") || r.completed == 0 {
					continue
				}
				cl := col{r: r}
				for _, ct := range cats {
					cl.vals = append(cl.vals, c.profileSeconds(r.profileNote, ct.args...)*1e6/float64(r.completed))
				}
				cols = append(cols, cl)
			}
		}
	}
	if len(cols) == 0 {
		return
	}
	w("Where Caddy's CPU goes, in µs per connection (CPU profile samples over the measured window ÷ connections completed in it; 10 ms samples, so small entries are rough):\n\n| |")
	for _, cl := range cols {
		w(" %s %s |", cl.r.wl.key, cl.r.kind)
	}
	w("\n|---|")
	for range cols {
		w("---|")
	}
	w("\n")
	for i, ct := range cats {
		w("| %s |", ct.name)
		for _, cl := range cols {
			w(" %s |", fmtF(cl.vals[i], 1))
		}
		w("\n")
	}
	w("\n")
}

func hasHeap(rep *report) bool {
	for _, r := range rep.scale {
		if r.heapProf != "" {
			return true
		}
	}
	return false
}

func pctOrNone(r tputResult, d time.Duration) time.Duration {
	if r.completed == 0 {
		return -1
	}
	return d
}

func gapOrNone(r tputResult, d time.Duration) string {
	if r.gapN == 0 {
		return "–"
	}
	return fmtDur(d)
}

func clip(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

func clipLines(s string, n int) string {
	lines := strings.SplitAfter(s, "\n")
	if len(lines) > n {
		lines = append(lines[:n], "…\n")
	}
	out := strings.Join(lines, "")
	if !strings.HasSuffix(out, "\n") {
		out += "\n"
	}
	return out
}

// targets states, from this run's numbers, which targets are met.
func (rep *report) targets(c *config, w func(string, ...any)) {
	w("### Targets (from this run)\n\n")
	rate := func(r tputResult) float64 { return r.rate }
	p99 := func(r tputResult) float64 { return float64(r.p99) }
	gap := func(r tputResult) float64 { return float64(r.gapP50) }
	cpu := func(r tputResult) float64 { return r.cpuPerConn }

	for _, v := range limiters {
		name := v.label()
		if len(rep.runs("limit", v)) > 0 {
			tr := median(rep.ratios("limit", v, sysHAProxy, rate))
			pr := median(rep.ratios("limit", v, sysHAProxy, p99))
			w("- %s. Limit-bound, throughput and p99 at least as good as HAProxy's: throughput ratio %s (per round %s), p99 ratio %s (per round %s) → %s\n",
				name, fmtF(tr, 3), fmtList(rep.ratios("limit", v, sysHAProxy, rate)), fmtF(pr, 3),
				fmtList(rep.ratios("limit", v, sysHAProxy, p99)), verdict(tr >= 1 && pr <= 1))
		}
		if len(rep.runs("handoff", v)) > 0 {
			gr := median(rep.ratios("handoff", v, sysHAProxy, gap))
			tr := median(rep.ratios("handoff", v, sysHAProxy, rate))
			w("- %s. Handoff-bound, gap p50 no worse than HAProxy's and throughput ≥ 0.9× HAProxy's: gap p50 %s vs %s (ratio %s, per round %s), throughput ratio %s (per round %s) → %s\n",
				name, medDur(durs(rep.runs("handoff", v), func(r tputResult) time.Duration { return r.gapP50 })),
				medDur(durs(rep.runs("handoff", sysHAProxy), func(r tputResult) time.Duration { return r.gapP50 })),
				fmtF(gr, 3), fmtList(rep.ratios("handoff", v, sysHAProxy, gap)),
				fmtF(tr, 3), fmtList(rep.ratios("handoff", v, sysHAProxy, rate)), verdict(gr <= 1 && tr >= 0.9))
		}
		for _, wl := range workloads {
			d := rep.diffs(wl.key, v, sysPlainL, cpu)
			if len(d) == 0 {
				continue
			}
			m := median(d)
			w("- %s. Limiter CPU ≤ 10 µs/conn above plain caddy-l4 driven by L clients, %s: %s µs/conn (connection_limit %s, plain-L %s; per round %s) → %s\n",
				name, wl.key, fmtF(m, 1),
				fmtF(median(floats(rep.runs(wl.key, v), cpu)), 1),
				fmtF(median(floats(rep.runs(wl.key, sysPlainL), cpu)), 1), fmtList(d), verdict(m <= 10))
		}
		for _, n := range c.scaleNs {
			cr, hr := rep.scaleRuns(n, v), rep.scaleRuns(n, sysHAProxy)
			if len(cr) == 0 {
				continue
			}
			hnote := ""
			if len(hr) == 0 { // capped to a size already run: use HAProxy's largest
				for _, r := range rep.scale {
					if r.kind == sysHAProxy && (len(hr) == 0 || r.n > hr[0].n) {
						hr = []scaleResult{r}
					}
				}
				if len(hr) > 0 {
					n := hr[0].n
					hr = rep.scaleRuns(hr[0].requested, sysHAProxy)
					hnote = fmt.Sprintf("; HAProxy: its %d-waiter runs, it cannot hold more under this fd limit", n)
				}
			}
			m := median(sfloats(cr, func(r scaleResult) float64 { return r.perWaiter }))
			hm := median(sfloats(hr, func(r scaleResult) float64 { return r.perWaiter }))
			w("- %s. Memory per waiting connection ≤ 8 KiB RSS on the Caddy process, %d waiters: %s B = %s KiB (HAProxy %s KiB%s) → %s\n",
				name, cr[0].n, fmtF(m, 0), fmtF(m/1024, 2), fmtF(hm/1024, 2), hnote, verdict(m <= 8192))
			dr := median(sfloats(cr, func(r scaleResult) float64 { return r.drainRate }))
			hd := median(sfloats(hr, func(r scaleResult) float64 { return r.drainRate }))
			allInOrder := true
			inOrder, opened, zoneSame, zoneN := 0, 0, 0, 0
			for _, r := range cr {
				allInOrder = allInOrder && r.inOrder == r.opened && r.err == nil
				inOrder += r.inOrder
				opened += r.opened
				zoneSame += r.zoneSame
				zoneN += len(r.zoneHead)
			}
			w("- %s. Drain after the holder leaves (L=1) at least as fast as HAProxy, in order, %d waiters: %s/s vs HAProxy %s/s (ratio %s%s); admitted in client (TCP accept) order: %d of %d; admitted in the zone's queue order: %d of the first %d checked → %s\n",
				name, cr[0].n, fmtF(dr, 0), fmtF(hd, 0), fmtF(dr/hd, 3), hnote, inOrder, opened, zoneSame, zoneN, verdict(dr >= hd && allInOrder))
		}
	}
	if pr := rep.runs("limit", sysPolling); len(pr) > 0 {
		ours := median(durs(rep.runs("limit", sysConnlimit), func(r tputResult) time.Duration { return r.gapP50 }))
		var gaps []float64
		acc, cut, done := 0, 0, 0
		for _, r := range append(pr, rep.runs("handoff", sysPolling)...) {
			if r.gapN > 0 {
				gaps = append(gaps, float64(r.gapP50))
			}
			acc = max(acc, r.beAccepts)
			cut += r.timeouts
			done += r.completed
		}
		if len(gaps) == 0 {
			w("- Against caddy-l4's polling (≥ 100× shorter wait after a slot frees, FIFO instead of chance): the polling system never admitted a connection after its first L: at most %d backend connections per run, %d connections completed inside the measured windows, %d cut at the end of the runs while still polling. A slot freed by a finished connection is never reused (see BENCHMARKS.md: the upstream's connection count is never decremented in caddy-l4 v0.1.2), so its wait after a slot frees is unbounded (until try_duration, then the client is dropped) against %s for connection_limit. **Not measurable as intended**: there is no working poller to compare with (order: the poller admitted nobody to order).\n",
				acc, done, cut, medDur([]float64{ours}))
		} else {
			pm := median(gaps)
			w("- Against caddy-l4's polling: wait after a slot frees %s vs %s (%.0f×) → %s\n",
				medDur([]float64{ours}), fmtDur(time.Duration(pm)), pm/ours, verdict(pm/ours >= 100))
		}
	}
	w("\n")
}

func fmtList(v []float64) string {
	var s []string
	for _, x := range v {
		s = append(s, fmtF(x, 3))
	}
	return "[" + strings.Join(s, ", ") + "]"
}
