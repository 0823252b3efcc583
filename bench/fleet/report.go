package main

import (
	"fmt"
	"math"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"time"
)

type report struct {
	cfg      *config
	env      *env
	started  time.Time
	finished time.Time

	idle     idleInfo
	rt       *rtResults
	handoff  *handoffResult
	latency  *latencyResult
	limit    *limitResult
	capacity *capacityResult
	split    *splitResult

	storeErrors, logErrors int

	// fleet3 ÷ local1 throughput in the rounds where other processes
	// took less than quietOthers cores in both runs (set by limitAggs)
	quietRatio []float64
}

// quietOthers: a run during which other processes took less CPU than
// this (cores) counts as quiet.
const quietOthers = 0.2

// pct is the nearest-rank percentile p (0..100) of sorted values.
func pct(sorted []int64, p float64) int64 {
	if len(sorted) == 0 {
		return -1
	}
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func sortedCopy(v []int64) []int64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func ms(ns int64) string   { return fmt.Sprintf("%.3f ms", float64(ns)/1e6) }
func dms(ns int64) string  { return fmt.Sprintf("%+.3f ms", float64(ns)/1e6) }
func usf(d float64) string { return fmt.Sprintf("%.1f µs", d) }

func met(ok bool) string {
	if ok {
		return "**met**"
	}
	return "**not met**"
}

func machine() string {
	model := "?"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "model name"); ok {
				model = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return fmt.Sprintf("%d × %s, kernel %s", runtime.NumCPU(), model, strings.TrimSpace(string(kernel)))
}

func gitCommit(repo string) string {
	out, err := exec.Command("git", "-C", repo, "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "?"
	}
	c := strings.TrimSpace(string(out))
	if st, err := exec.Command("git", "-C", repo, "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(strings.TrimSpace(string(st))) > 0 {
		c += " (with uncommitted changes)"
	}
	return c
}

func caddyVersion(bin string) string {
	out, err := exec.Command(bin, "version").Output()
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(out))
	if len(f) == 0 {
		return "?"
	}
	return f[0]
}

func (r *report) markdown() string {
	c := r.cfg
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	mode := "full"
	if c.quick {
		mode = "quick"
	}
	p("## Fleet zones (Redis): %s run\n\n", mode)
	p("* Run of %s UTC (%s), connlimit commit %s, %s, %s, Redis %s, Caddy %s.\n",
		r.started.UTC().Format("2006-01-02 15:04"), r.finished.Sub(r.started).Round(time.Second),
		gitCommit(c.repo), machine(), runtime.Version(), r.env.redis.version(), caddyVersion(c.caddyBin))
	p("* Command: `%s`.\n", strings.Join(os.Args, " "))
	p("* Set-up: one redis-server (`--save '' --appendonly no`, 127.0.0.1), three Caddy nodes A, B, C "+
		"(separate processes), each with the fleet zones `%s` (max 1), `%s` (max %d) and `%s` (never full) "+
		"on one Redis (`lease` %s: renewals every %s); node A also serves the local zones (no store) `%s`, "+
		"`%s`, `%s` with the same limits. Every route is `connection_limit` (`release %s`) → `proxy` "+
		"to this program's backend; clients, backend and nodes are on 127.0.0.1.\n",
		zHandoff, zLimit, c.limit, zOpen, c.lease, min(c.lease/3, time.Second), zHandoffLocal, zLimitLocal, zOpenLocal, c.release)
	p("* Idle fleet (3 zones × 3 nodes, no connection), over %.0f s: Redis CPU %.1f ms per second (`/proc` ticks of 10 ms); %s per second.\n",
		r.idle.window.Seconds(), float64(r.idle.cpuPerSec())/1e6, rates(r.idle.cs, r.idle.window))
	p("* Node store errors over the run: %d; error lines in the nodes' logs: %d.\n\n", r.storeErrors, r.logErrors)

	r.summary(p)
	if r.rt != nil {
		r.roundTrips(p)
	}
	if r.handoff != nil {
		r.handoffs(p)
	}
	if r.latency != nil {
		r.addedLatency(p)
	}
	if r.limit != nil {
		r.limitBound(p)
	}
	if r.capacity != nil || r.limit != nil {
		r.capacityText(p)
	}
	if r.split != nil {
		r.splitText(p)
	}
	return b.String()
}

func rates(cs cmdStats, w time.Duration) string {
	keys := make([]string, 0, len(cs))
	for k := range cs {
		if k == "fcall" || k == "brpoplpush" {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %.1f", strings.ToUpper(k), float64(cs[k])/w.Seconds()))
	}
	if len(parts) == 0 {
		return "no FCALL or BRPOPLPUSH"
	}
	return strings.Join(parts, ", ")
}

type printer func(format string, a ...any)

// summary is the targets of issue 11's "Numbers", each with this run's
// figure.
func (r *report) summary(p printer) {
	p("### Targets\n\n| figure | target | this run | |\n|---|---|---|---|\n")
	if rt := r.rt; rt != nil {
		p("| store round trips, connection admitted at once | ≤ 2 | %.2f | %s |\n", rt.open.perConn(), met(rt.open.perConn() <= 2.005))
		p("| store round trips, connection that waited | ≤ 3 | %.2f | %s |\n", rt.waited.perConn(), met(rt.waited.perConn() <= 3.005))
	}
	if h := r.handoff; h != nil {
		cross, same := pct(sortedCopy(h.cross), 50), pct(sortedCopy(h.same), 50)
		p("| cross-node hand-off p50 over same-node p50 (fleet zone) | ≤ 1 ms | %s − %s = %s (p99 %s) | %s |\n",
			ms(cross), ms(same), dms(cross-same), ms(pct(sortedCopy(h.cross), 99)), met(cross-same <= int64(time.Millisecond)))
	}
	if l := r.limit; l != nil && len(l.runs) > 0 {
		ratio, agg := r.limitAggs()
		f, lo := agg[fleet3], agg[local1]
		quiet := ""
		if len(r.quietRatio) > 0 {
			quiet = fmt.Sprintf("; quiet rounds %s", fmtList(r.quietRatio, "%.3f"))
		}
		p("| limit-bound throughput, fleet (3 nodes) ÷ local (1 node) | ≥ 0.95× | %.3f× (%.0f vs %.0f conn/s; rounds %s%s) | %s |\n",
			median(ratio), median(f.tput), median(lo.tput), fmtList(ratio, "%.3f"), quiet, met(median(ratio) >= 0.95))
		p("| limit-bound p99, fleet vs local | stated | %.1f vs %.1f ms | |\n", median(f.p99), median(lo.p99))
		p("| Redis CPU per connection, limit-bound | stated | %s | |\n", usf(median(f.redisPerConn)))
	}
	if lt := r.latency; lt != nil {
		p("| added latency, admitted at once (fleet − local, same node) | stated | p50 %s, p99 %s | |\n",
			dms(pct(lt.fleet, 50)-pct(lt.local, 50)), dms(pct(lt.fleet, 99)-pct(lt.local, 99)))
	}
	if cp := r.capacity; cp != nil {
		p("| one zone before Redis is the bottleneck (one core) | stated | %s | |\n", r.capacityHeadline())
	}
	p("\n")
}

// ---- round trips ----

func (r *report) roundTrips(p printer) {
	rt := r.rt
	p("### Store round trips per connection\n\n")
	p("Method: a window of connections of one kind, with `INFO commandstats` read before and after "+
		"(FCALL and BRPOPLPUSH are the commands nodes send; the commands functions run are counted there too) "+
		"and Redis' `MONITOR` feed over the same window, which names each FCALL's function "+
		"(`connlimit_<library hash>_take`...) and its zone (its key). A connection's "+
		"round trips are its zone's take, give and leave calls plus the BRPOPLPUSHes that delivered a grant "+
		"(= LPUSHes to the grant lists in the window, from commandstats). The nodes' own traffic (renewals "+
		"of every zone, BRPOPLPUSHes re-armed after their lease-long timeout) is shown apart, not counted. "+
		"Admitted at once: %d connections over 6 clients spread over A, B, C (zone `%s`). Waited: %d "+
		"connections each queued on the node that does not hold the zone's one slot (zone `%s`, "+
		"max 1), then handed the slot when the holder's backend connection closes; the first holder was "+
		"admitted before the window, and its give (in the window) is subtracted. %s.\n\n",
		rt.open.conns, zOpen, rt.waited.conns, zHandoff, rt.load)
	p("| connection | n | take | give | leave | BRPOPLPUSH with a grant | round trips per connection | target | renewals (apart) | BRPOPLPUSHes with no grant (apart) | commandstats FCALL | MONITOR FCALLs | commands functions ran per connection |\n")
	p("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, row := range []struct {
		name   string
		x      *rtResult
		target float64
	}{{"admitted at once", rt.open, 2}, {"waited", rt.waited, 3}} {
		z := row.x.mon[row.x.zone]
		renew, other, idle := row.x.own()
		inner := int64(0)
		for k, v := range row.x.cs {
			switch k {
			case "fcall", "brpoplpush", "echo", "ping", "monitor", "config|resetstat":
			default:
				inner += v
			}
		}
		renewS := fmt.Sprint(renew)
		if other > 0 {
			renewS += fmt.Sprintf(" (+%d register/status)", other)
		}
		p("| %s | %d | %d | %d | %d | %d | **%.2f** | ≤ %.0f: %s | %s in %.1f s | %d | %d | %d | %.1f |\n",
			row.name, row.x.conns, z["take"], z["give"], z["leave"], row.x.blpopOK, row.x.perConn(), row.target,
			met(row.x.perConn() <= row.target+0.005), renewS, row.x.window.Seconds(), idle,
			row.x.cs["fcall"], row.x.monScripts(), float64(inner)/float64(row.x.conns))
	}
	for _, x := range []*rtResult{rt.open, rt.waited} {
		if x.monErr != nil {
			p("\nMONITOR: %v\n", x.monErr)
		}
	}
	p("\n")
}

// ---- hand-offs ----

func (r *report) handoffs(p printer) {
	h := r.handoff
	p("### Hand-off: a slot freed on one node reaching a waiter\n\n")
	p("Method: a zone of max 1; the holder's connection is held at the backend; a waiter connects to the "+
		"chosen node and, once that node's admin API (`GET /connection_limit/`, which does not ask the "+
		"store) shows it waiting, plus 2 ms, the backend answers and closes the holder's connection. One "+
		"sample is the time from that close (taken just before `Close`) to the backend's `Accept` of the "+
		"waiter's connection: the node sees the close, frees the slot (`release %s`), the store grants it, "+
		"the waiter's node hands the waiter to `proxy`, which dials the backend. The waiter then holds the "+
		"slot for the next sample. Kinds interleaved in blocks of 25 (fleet: cross and same alternating; "+
		"then local). %s; took %s.\n\n", r.cfg.release, h.load, h.took.Round(time.Second))
	p("| hand-off | samples | p50 | p90 | p99 | max |\n|---|---|---|---|---|---|\n")
	for _, row := range []struct {
		name string
		v    []int64
	}{
		{"cross-node, fleet zone (freed on A → waiter on B, and B → A)", h.cross},
		{"same-node, fleet zone (holder and waiter on one node; still through Redis)", h.same},
		{"same-node, local zone (no store), node A", h.local},
	} {
		s := sortedCopy(row.v)
		p("| %s | %d | %s | %s | %s | %s |\n", row.name, len(s), ms(pct(s, 50)), ms(pct(s, 90)), ms(pct(s, 99)), ms(pct(s, 100)))
	}
	cross, same, local := pct(sortedCopy(h.cross), 50), pct(sortedCopy(h.same), 50), pct(sortedCopy(h.local), 50)
	p("\nCross-node p50 − same-node p50 (fleet): %s (target ≤ 1 ms: %s). Cross-node p50 − local-zone p50: %s "+
		"(what the store adds to a hand-off in all).\n\n", dms(cross-same), met(cross-same <= int64(time.Millisecond)), dms(cross-local))
}

// ---- added latency ----

func (r *report) addedLatency(p printer) {
	lt := r.latency
	p("### Added latency, connection admitted at once\n\n")
	p("Method: one client, one connection at a time, alternating between node A's fleet zone `%s` and its "+
		"local zone `%s` (both never full; the backend answers at once), %d of each after 50 of each as "+
		"warm-up; each sample is dial start → first reply byte. The fleet zone's connection waits for its "+
		"take (one round trip to Redis) before `proxy` dials; its give comes after the reply. %s.\n\n",
		zOpen, zOpenLocal, len(lt.fleet), lt.load)
	p("| zone | p50 | p90 | p99 |\n|---|---|---|---|\n")
	p("| fleet (Redis) | %s | %s | %s |\n", ms(pct(lt.fleet, 50)), ms(pct(lt.fleet, 90)), ms(pct(lt.fleet, 99)))
	p("| local | %s | %s | %s |\n", ms(pct(lt.local, 50)), ms(pct(lt.local, 90)), ms(pct(lt.local, 99)))
	p("| added by the store | %s | %s | %s |\n\n",
		dms(pct(lt.fleet, 50)-pct(lt.local, 50)), dms(pct(lt.fleet, 90)-pct(lt.local, 90)), dms(pct(lt.fleet, 99)-pct(lt.local, 99)))
}

// ---- limit-bound ----

type limitAgg struct {
	tput, p50, p99, redisPerConn, rtPerConn, nodeCPUPerConn, machine, gap50 []float64
}

// limitAggs returns the medians' inputs of each kind, and the ratios of
// fleet3 to local1 throughput per round.
func (r *report) limitAggs() (ratio []float64, agg map[limitKind]*limitAgg) {
	byRound := map[int]map[limitKind]*limitRun{}
	agg = map[limitKind]*limitAgg{}
	idle := r.idle.cpuPerSec()
	for _, run := range r.limit.runs {
		if byRound[run.round] == nil {
			byRound[run.round] = map[limitKind]*limitRun{}
		}
		byRound[run.round][run.kind] = run
		a := agg[run.kind]
		if a == nil {
			a = &limitAgg{}
			agg[run.kind] = a
		}
		a.tput = append(a.tput, run.tput)
		a.p50 = append(a.p50, run.p50)
		a.p99 = append(a.p99, run.p99)
		a.machine = append(a.machine, run.u.machine)
		a.gap50 = append(a.gap50, float64(pct(run.gaps, 50))/1e6)
		if n := float64(run.u.served); n > 0 {
			redis := run.u.redis - time.Duration(float64(idle)*run.u.wall.Seconds())
			a.redisPerConn = append(a.redisPerConn, float64(redis)/1e3/n)
			a.rtPerConn = append(a.rtPerConn, float64(run.u.roundTrips())/n)
			a.nodeCPUPerConn = append(a.nodeCPUPerConn, float64(run.u.nodeCPU())/1e3/n)
		}
	}
	for round := range r.cfg.rounds {
		f, lo := byRound[round][fleet3], byRound[round][local1]
		if f != nil && lo != nil && lo.tput > 0 {
			ratio = append(ratio, f.tput/lo.tput)
		}
	}
	r.quietRatio = nil
	for round := range r.cfg.rounds {
		f, lo := byRound[round][fleet3], byRound[round][local1]
		if f != nil && lo != nil && lo.tput > 0 && f.u.others() < quietOthers && lo.u.others() < quietOthers {
			r.quietRatio = append(r.quietRatio, f.tput/lo.tput)
		}
	}
	for _, k := range []limitKind{fleet3, local1, fleet1} {
		if agg[k] == nil {
			agg[k] = &limitAgg{}
		}
	}
	return ratio, agg
}

func fmtList(v []float64, format string) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = fmt.Sprintf(format, x)
	}
	return strings.Join(s, ", ")
}

func (r *report) limitBound(p printer) {
	c := r.cfg
	l := r.limit
	p("### Limit-bound workload (C=%d, max %d, backend holds %s)\n\n", c.clients, c.limit, c.hold)
	p("Method: %d clients in a closed loop (connect, send a line, read the reply to EOF, close), for a "+
		"%s warm-up, a %s measured window and up to %s of grace: **fleet, 3 nodes** = zone `%s` shared by "+
		"nodes A, B, C, client i on node i mod 3; **local, node A** = zone `%s` (no store) on node A alone, "+
		"every client on it (B and C idle)", c.clients, c.warmup, c.window, c.grace, zLimit, zLimitLocal)
	if c.limitFleet1 {
		p("; and, to tell the store's cost from that of three processes, **fleet, node A only** = zone `%s` "+
			"with every client on node A (B and C registered, idle)", zLimit)
	}
	p(". %d round(s), the kinds interleaved, their order rotating between rounds; before each run the "+
		"program waits (bounded) for the 1-minute load to fall below %.1f. Throughput counts connections "+
		"answered inside the window; latency is dial → EOF of those. Redis CPU per connection is the "+
		"`utime+stime` delta of redis-server (`/proc/<pid>/stat`) over the window, minus the idle fleet's "+
		"rate, divided by the connections the backend served in the window; round trips per connection are "+
		"the window's FCALL+BRPOPLPUSH calls (commandstats, renewals included) over the same count; Caddy "+
		"CPU per connection sums the three nodes' `utime+stime` likewise. The hand-off gap pairs the "+
		"backend's k-th close with its (k+max)-th accept (the slot that close freed, refilled), for closes "+
		"in the window. Store op: every store operation of the zone on the three nodes (take, give, "+
		"renew...), from their `store_seconds` histograms over the window (the upper bound of the bucket). "+
		"Grants queued: the zone's grants pushed to a node's list and not yet popped by its BRPOPLPUSH (each "+
		"node pops one grant per round trip), `LLEN` of every node's list summed, every 20 ms. "+
		"Machine busy: all cores, from `/proc/stat`; other processes: that busy time less this program's, "+
		"its nodes' and its Redis' (other engineers' work on the shared machine). The backend's peak concurrency is checked against max. "+
		"%s.\n\n", c.rounds, c.loadMax, l.load)
	p("| round | zone | conn/s | p50 | p99 | backend peak | failed | hand-off gap p50 / p99 | store op p50 / p99 (≤ bucket) | grants queued for their node's BRPOPLPUSH, mean / max | Redis CPU/conn | store round trips/conn | Caddy CPU/conn (3 nodes) | machine busy | other processes | load |\n")
	p("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	idle := r.idle.cpuPerSec()
	for _, run := range l.runs {
		n := float64(run.u.served)
		redis := run.u.redis - time.Duration(float64(idle)*run.u.wall.Seconds())
		storeOp, backlog := "—", "—"
		if run.kind.isFleet() {
			q50, _ := run.u.hist.quantile(0.5)
			q99, _ := run.u.hist.quantile(0.99)
			storeOp = fmt.Sprintf("%.2g / %.2g ms", q50*1e3, q99*1e3)
			backlog = fmt.Sprintf("%.1f / %d", meanOf(run.backlog), pct(run.backlog, 100))
		}
		p("| %d | %s | %.0f | %.1f ms | %.1f ms | %d | %d | %.2f / %.2f ms | %s | %s | %s | %.2f | %s | %.0f %% | %.2f cores | %.2f |\n",
			run.round+1, run.kind, run.tput, run.p50, run.p99, run.peak, run.res.failed,
			float64(pct(run.gaps, 50))/1e6, float64(pct(run.gaps, 99))/1e6, storeOp, backlog,
			usf(float64(redis)/1e3/n), float64(run.u.roundTrips())/n, usf(float64(run.u.nodeCPU())/1e3/n),
			100*run.u.machine, run.u.others(), run.load)
	}
	ratio, agg := r.limitAggs()
	f, lo, f1 := agg[fleet3], agg[local1], agg[fleet1]
	p("\nMedians: fleet (3 nodes) %.0f conn/s, p99 %.1f ms; local %.0f conn/s, p99 %.1f ms. Fleet ÷ local "+
		"throughput (per round: %s): median **%.3f×** (target ≥ 0.95×: %s). Redis CPU per connection (fleet, "+
		"3 nodes): **%s** (rounds: %s µs). Caddy CPU per connection, all nodes: fleet %s, local %s. Machine "+
		"busy: fleet %.0f %%, local %.0f %%.",
		median(f.tput), median(f.p99), median(lo.tput), median(lo.p99), fmtList(ratio, "%.3f"), median(ratio),
		met(median(ratio) >= 0.95), usf(median(f.redisPerConn)), fmtList(f.redisPerConn, "%.1f"),
		usf(median(f.nodeCPUPerConn)), usf(median(lo.nodeCPUPerConn)), 100*median(f.machine), 100*median(lo.machine))
	if len(r.quietRatio) > 0 {
		p(" In the %d round(s) where other processes took < %.1f cores during both runs: %s (median %.3f×).",
			len(r.quietRatio), quietOthers, fmtList(r.quietRatio, "%.3f"), median(r.quietRatio))
	}
	if len(f1.tput) > 0 {
		p(" Fleet zone with every client on node A: %.0f conn/s (%.3f× local), p99 %.1f ms, Caddy CPU per "+
			"connection %s, machine busy %.0f %%.", median(f1.tput), median(f1.tput)/median(lo.tput), median(f1.p99),
			usf(median(f1.nodeCPUPerConn)), 100*median(f1.machine))
	}
	p("\n\n")
	if len(l.profs) > 0 {
		r.profiles(p)
	}
}

// profiles shows where node A's CPU went in the profiled extra runs, per
// connection it admitted.
func (r *report) profiles(p printer) {
	l := r.limit
	p("#### Where node A's CPU goes (extra runs, one of each kind, node A profiled over the window)\n\n")
	p("Cumulative CPU of each part in node A's profile (`go tool pprof -top -cum`), divided by the " +
		"connections node A admitted in the zone meanwhile (its admin API's `admitted`).\n\n")
	p("| part |")
	for _, pr := range l.profs {
		p(" %s |", pr.kind)
	}
	p("\n|---|")
	for range l.profs {
		p("---|")
	}
	p("\n| connections node A admitted |")
	for _, pr := range l.profs {
		p(" %d |", pr.admitted)
	}
	p("\n| node A's CPU per connection (all of it) |")
	for _, pr := range l.profs {
		p(" %s |", perConn(pr.total, pr.admitted))
	}
	p("\n")
	for i, pp := range profParts {
		p("| %s |", strings.Replace(pp.name, "  ", "&nbsp;&nbsp;", 1))
		for _, pr := range l.profs {
			if i < len(pr.parts) {
				p(" %s |", perConn(pr.parts[i].cum, pr.admitted))
			} else {
				p(" — |")
			}
		}
		p("\n")
	}
	for _, pr := range l.profs {
		if pr.err != "" {
			p("\nProfile (%s) failed: %s\n", pr.kind, pr.err)
		}
	}
	p("\n")
	for _, pr := range l.profs {
		if pr.top != "" {
			p("<details><summary>node A, %s: go tool pprof -top</summary>\n\n```\n%s\n```\n</details>\n\n", pr.kind, pr.top)
		}
	}
}

func meanOf(v []int64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	var t float64
	for _, x := range v {
		t += float64(x)
	}
	return t / float64(len(v))
}

func perConn(d time.Duration, n uint64) string {
	if n == 0 {
		return "—"
	}
	return usf(float64(d) / 1e3 / float64(n))
}

// ---- capacity ----

func (r *report) capacityHeadline() string {
	cp := r.capacity
	idle := r.idle.cpuPerSec()
	perPair := float64(cp.store.redis-time.Duration(float64(idle)*cp.store.wall.Seconds())) / float64(cp.storePairs)
	return fmt.Sprintf("≈ %.0f admitted-at-once connections/s (%s of Redis CPU each, take + give straight at the store)",
		float64(time.Second)/perPair, usf(perPair/1e3))
}

func (r *report) capacityText(p printer) {
	p("### What one zone can take before Redis is the bottleneck\n\n")
	idle := r.idle.cpuPerSec()
	p("Every operation of a zone is a Lua function on the zone's keys, run by Redis' one command thread: a "+
		"zone's ceiling is one Redis core. Method: Redis CPU (`/proc/<pid>/stat` utime+stime delta, minus "+
		"the idle fleet's %.1f ms/s) per connection, and the ceiling 1 s ÷ that; and, where the load can "+
		"be driven high enough, Redis' CPU as a share of one core.", float64(idle)/1e6)
	if cp := r.capacity; cp != nil {
		p(" Through Caddy: %s. Straight at the store: %s.", cp.load, cp.storeLoad)
	}
	p("\n\n")
	p("| driven by | conn/s (or take+give pairs/s) | Redis CPU, share of one core | Redis CPU per connection | ceiling, one core (1 s ÷ CPU per conn) | other CPU |\n|---|---|---|---|---|---|\n")
	if cp := r.capacity; cp != nil {
		row := func(name string, u usage, n int64, other string) {
			redis := u.redis - time.Duration(float64(idle)*u.wall.Seconds())
			per := float64(redis) / float64(n)
			p("| %s | %.0f | %.0f %% | %s | %.0f /s | %s |\n", name, float64(n)/u.wall.Seconds(),
				100*float64(u.redis)/float64(u.wall), usf(per/1e3), float64(time.Second)/per, other)
		}
		row(fmt.Sprintf("%d clients through Caddy nodes A, B, C, admitted at once (zone `%s`)", r.cfg.capWorkers, zOpen),
			cp.caddy, int64(cp.caddyConn),
			fmt.Sprintf("Caddy %.2f cores, machine %.0f %% busy", float64(cp.caddy.nodeCPU())/float64(cp.caddy.wall), 100*cp.caddy.machine))
		row(fmt.Sprintf("%d goroutines, take + give straight at the store (its Go client, one zone)", r.cfg.storeWorkers),
			cp.store, cp.storePairs,
			fmt.Sprintf("this program %.2f cores, machine %.0f %% busy; %d errors", float64(cp.store.self)/float64(cp.store.wall), 100*cp.store.machine, cp.storeErrs))
	}
	if l := r.limit; l != nil {
		_, agg := r.limitAggs()
		if f := agg[fleet3]; len(f.redisPerConn) > 0 {
			per := median(f.redisPerConn)
			p("| limit-bound workload (fleet, C=%d, max %d; most connections wait: take, grant, give) | %.0f | — | %s | %.0f /s | — |\n",
				r.cfg.clients, r.cfg.limit, median(f.tput), usf(per), 1e6/per)
		}
	}
	cap := 0.0
	if r.capacity != nil && r.capacity.storePairs > 0 {
		cp := r.capacity
		cap = float64(cp.storePairs) / (float64(cp.store.redis-time.Duration(float64(idle)*cp.store.wall.Seconds())) / 1e9)
	}
	p("\nOn this 2-core machine the clients, the Caddy nodes and the backend share the cores with Redis, so " +
		"Redis cannot be driven to a full core through Caddy: the ceiling is derived from Redis' CPU per " +
		"connection, and measured most directly with the store's own client driving take + give (no Caddy).\n\n")
	p("**Scaling out (on paper, not measured).** A zone's keys share the hash tag `{<zone>}`, so one zone is " +
		"one Redis Cluster slot, served by one shard's command thread: a single zone cannot go past one " +
		"core's ceiling (")
	if cap > 0 {
		p("≈ %.0f admitted-at-once connections/s here", cap)
	} else {
		p("measured above")
	}
	p("), whatever the cluster's size; its functions must see all of the zone's keys atomically, so it cannot "+
		"be split. Separate zones are independent: with Z zones spread over S shards (CRC16 of the zone "+
		"name picks the slot; name zones so that they land on different shards, or move slots), the fleet's "+
		"total is about min(Z, S) × that ceiling, less only what a shard spends on the nodes' renewals "+
		"(one call per node per zone per %s) and idle BRPOPLPUSHes (one per node per zone per lease). Redis' I/O "+
		"threads do not help: the functions run on the command thread.\n\n", min(r.cfg.lease/3, time.Second))
}
