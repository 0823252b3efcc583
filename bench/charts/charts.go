package charts

import (
	"errors"
	"fmt"
	"image/color"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// Chart is one of the charts: the file it is written to and how it is
// drawn.
type Chart struct {
	File string
	What string
	Draw func(*Results) ([]byte, error)
}

// All is every chart, in the order BENCHMARKS.md shows them.
var All = []Chart{
	{"latency.svg", "latency distribution (CDF) per system, for each workload", Latency},
	{"handoff-gap.svg", "hand-off gap distribution (CDF) per limiting system, for each workload", HandoffGap},
	{"drain.svg", "the drain at limit 1: each waiter's admission time against its arrival rank", DrainChart},
	{"memory.svg", "memory per waiting connection against the number of waiters", Memory},
	{"cpu.svg", "CPU per connection, by where it goes", CPU},
}

// ErrNoData means the results hold nothing for a chart (e.g. a run with
// -only tput has no scale runs).
var ErrNoData = errors.New("no data for this chart")

// DrawAll writes every chart that the results have data for into dir and
// returns the files written.
func DrawAll(r *Results, dir string) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	var files []string
	var errs []error
	for _, c := range All {
		b, err := c.Draw(r)
		if errors.Is(err, ErrNoData) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", c.File, err))
			continue
		}
		f := filepath.Join(dir, c.File)
		if err := os.WriteFile(f, b, 0o644); err != nil {
			errs = append(errs, err)
			continue
		}
		files = append(files, f)
	}
	return files, errors.Join(errs...)
}

// Latency is the CDF of connect-to-EOF latency, one line per system, one
// panel per workload, log time axis.
func Latency(r *Results) ([]byte, error) {
	return cdfFigure(r, cdfSpec{
		title:  "Latency: how it is spread",
		xLabel: "latency, connect → EOF (ms, log scale)",
		sample: func(t TputRun) Quantiles { return t.Latency },
		what: []string{
			"Fraction of connections completed within a latency, per system: every connection completed in the measured windows, all rounds pooled.",
			"C = clients, L = limit, H = backend hold. \"no limit, L clients\" is the floor: the proxy alone, nobody waiting.",
		},
	})
}

// HandoffGap is the CDF of the hand-off gap (a slot freed at the backend
// to the next connection accepted there) of the limiting systems.
func HandoffGap(r *Results) ([]byte, error) {
	return cdfFigure(r, cdfSpec{
		title:   "Hand-off gap: a freed slot to the next connection at the backend",
		xLabel:  "gap, backend closes one → accepts the next (ms, log scale)",
		sample:  func(t TputRun) Quantiles { return t.Gap },
		limited: true,
		what: []string{
			"Fraction of hand-offs within a gap, per limiting system: with L connections at the backend, the k-th close frees the slot the (k+L)-th accept fills;",
			"closes inside the measured windows, all rounds pooled.",
		},
		nonPositive: "gaps ≤ 0 (the next accepted before the close was recorded, counted at the left edge)",
	})
}

type cdfSpec struct {
	title, xLabel string
	sample        func(TputRun) Quantiles
	limited       bool
	what          []string
	nonPositive   string // what samples ≤ 0 are, if they can occur
}

func cdfFigure(r *Results, s cdfSpec) ([]byte, error) {
	var panels []*plot.Plot
	var shown []string
	var missing, nonPos []string
	for _, wl := range r.Workloads {
		p := newPlot(wl.Name, s.xLabel, "fraction ≤ x")
		p.X.Scale = plot.LogScale{}
		p.X.Tick.Marker = logTicks{}
		p.X.AutoRescale = true
		p.Y.Min, p.Y.Max = 0, 1
		p.Y.Tick.Marker = fixedTicks(0, 0.25, 0.5, 0.75, 1)
		gridLines(p, true, true)
		lines := 0
		for _, sys := range systems {
			if s.limited && !limiting(sys.key) {
				continue
			}
			runs := 0
			var qs []Quantiles
			for _, t := range r.Tput {
				if t.Workload != wl.Key || t.System != sys.key {
					continue
				}
				runs++
				if q := s.sample(t); q.N > 0 {
					qs = append(qs, q)
				}
			}
			if runs > 0 && len(qs) == 0 {
				missing = appendOnce(missing, sys.label)
			}
			if len(qs) == 0 {
				continue
			}
			if f := pooledCDF(qs, 0.5); f > 0 { // below 1 ns: ≤ 0
				nonPos = append(nonPos, fmt.Sprintf("%s, %s: %.1f %%", sys.label, wl.Key, 100*f))
			}
			l, err := plotter.NewLine(cdfPoints(qs, 160))
			if err != nil {
				return nil, err
			}
			l.LineStyle = draw.LineStyle{Color: sys.color, Width: vg.Points(1.8), Dashes: sys.dashes}
			p.Add(l)
			shown = appendOnce(shown, sys.key)
			lines++
		}
		if lines > 0 {
			panels = append(panels, p)
		}
	}
	if len(panels) == 0 {
		return nil, ErrNoData
	}
	what := s.what
	if len(nonPos) > 0 {
		what = append(slices.Clone(what), "Share of "+s.nonPositive+": "+strings.Join(nonPos, "; ")+".")
	}
	if len(missing) > 0 {
		what = append(slices.Clone(what), "Not shown, no sample in any window: "+strings.Join(missing, "; ")+".")
	}
	f := &figure{title: s.title, legend: systemEntries(sortSystems(shown)), panels: panels, caption: caption(r, what...)}
	return f.svg()
}

// cdfPoints is the pooled CDF of qs on n log-spaced points, x in ms.
func cdfPoints(qs []Quantiles, n int) plotter.XYs {
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, q := range qs {
		for _, v := range q.NS {
			if v > 0 {
				lo = math.Min(lo, float64(v))
				hi = math.Max(hi, float64(v))
			}
		}
	}
	if math.IsInf(lo, 0) {
		return nil
	}
	if hi <= lo {
		hi = lo * 1.01
	}
	pts := make(plotter.XYs, 0, n)
	for i := range n {
		x := lo * math.Pow(hi/lo, float64(i)/float64(n-1))
		pts = append(pts, plotter.XY{X: x / 1e6, Y: pooledCDF(qs, x)})
	}
	return pts
}

func limiting(key string) bool {
	return key == "connlimit" || key == "connlimit-cw" || key == "haproxy" || key == "l4-polling"
}

// scaleSystems are the systems of the scale runs.
var scaleSystems = []string{"connlimit", "connlimit-cw", "haproxy"}

// DrainChart shows, for the largest scale run of each system, when each
// waiter was admitted after the holder left, against its arrival rank:
// the slope is the drain rate, points off the trend are out of order.
func DrainChart(r *Results) ([]byte, error) {
	all := newPlot("Every waiter", "arrival rank (order the waiters connected)", "admitted after the holder left (s)")
	head := newPlot(fmt.Sprintf("The first %d waiters", DrainHead), "arrival rank", "admitted after the holder left (ms)")
	for _, p := range []*plot.Plot{all, head} {
		gridLines(p, true, true)
		p.X.Tick.Marker, p.Y.Tick.Marker = niceTicks{}, niceTicks{}
		p.X.Min, p.Y.Min = 0, 0
	}
	var legend []legendEntry
	for _, key := range scaleSystems {
		sr, ok := largestScale(r, key)
		if !ok {
			continue
		}
		sys := systemOf(key)
		var full, first plotter.XYs
		for i, k := range sr.Drain.Rank {
			ns := float64(sr.Drain.AdmittedNS[i])
			full = append(full, plotter.XY{X: float64(k), Y: ns / 1e9})
			if k <= DrainHead {
				first = append(first, plotter.XY{X: float64(k), Y: ns / 1e6})
			}
		}
		l, err := plotter.NewLine(full)
		if err != nil {
			return nil, err
		}
		l.LineStyle = draw.LineStyle{Color: sys.color, Width: vg.Points(1.6), Dashes: sys.dashes}
		all.Add(l)
		if len(first) > 0 {
			hl, err := plotter.NewLine(first)
			if err != nil {
				return nil, err
			}
			hl.LineStyle = draw.LineStyle{Color: mix(sys.color, white, 0.5), Width: vg.Points(0.7)}
			sc, err := plotter.NewScatter(first)
			if err != nil {
				return nil, err
			}
			sc.GlyphStyle = draw.GlyphStyle{Color: sys.color, Radius: vg.Points(1.8), Shape: draw.CircleGlyph{}}
			head.Add(hl, sc)
		}
		n := thousandsOf(sr.Waiters) + " waiters"
		if sr.Requested > sr.Waiters {
			n += " (fd limit)"
		}
		e := systemEntries([]string{key})[0]
		e.label = fmt.Sprintf("%s: %s, %s/s", e.label, n, thousandsOf(int(math.Round(sr.DrainRate))))
		legend = append(legend, e)
	}
	if len(legend) == 0 {
		return nil, ErrNoData
	}
	what := []string{
		"Limit 1: a holder keeps the slot while N waiters connect one after the other, then leaves. Each waiter's admission (the backend accepting it) against the order",
		"its client connected: the slope is the drain rate (in the legend), points off the trend were admitted out of arrival order. Largest run of each system;",
		fmt.Sprintf("left: one waiter in %d after the first %d; right: each of the first %d.", drainStep(r), DrainHead, DrainHead),
	}
	f := &figure{title: "The drain: admission time against arrival order", legend: legend, panels: []*plot.Plot{all, head}, caption: caption(r, what...)}
	return f.svg()
}

func drainStep(r *Results) int {
	step := 1
	for _, key := range scaleSystems {
		if sr, ok := largestScale(r, key); ok {
			step = max(step, sr.Drain.Step)
		}
	}
	return step
}

// largestScale is the system's run with the most waiters that has a
// drain, the earliest round of those.
func largestScale(r *Results, key string) (ScaleRun, bool) {
	var best ScaleRun
	ok := false
	for _, s := range r.Scale {
		if s.System != key || len(s.Drain.Rank) == 0 {
			continue
		}
		if !ok || s.Waiters > best.Waiters || (s.Waiters == best.Waiters && s.Round < best.Round) {
			best, ok = s, true
		}
	}
	return best, ok
}

// Memory is RSS per waiting connection against the number of waiters:
// lines sampled while the waiters connected, markers once all were queued
// and settled (the report's figure).
func Memory(r *Results) ([]byte, error) {
	p := newPlot("", "waiting connections", "proxy RSS per waiting connection (KiB)")
	gridLines(p, true, true)
	p.X.Tick.Marker, p.Y.Tick.Marker = niceTicks{}, niceTicks{}
	p.X.Min, p.Y.Min = 0, 0
	var shown []string
	maxN := 0
	for _, key := range scaleSystems {
		sys := systemOf(key)
		found := false
		for _, s := range r.Scale {
			if s.System != key || s.Opened == 0 {
				continue
			}
			var pts plotter.XYs
			for _, o := range s.Opening {
				if o.Waiters*10 < s.Waiters || o.Waiters == 0 {
					continue // a few waiters: the page-sized steps of RSS dominate
				}
				pts = append(pts, plotter.XY{X: float64(o.Waiters), Y: float64(o.RSSKiB-s.RSSBaseKiB) / float64(o.Waiters)})
			}
			if len(pts) > 1 {
				l, err := plotter.NewLine(pts)
				if err != nil {
					return nil, err
				}
				l.LineStyle = draw.LineStyle{Color: mix(sys.color, white, 0.35), Width: vg.Points(1), Dashes: sys.dashes}
				p.Add(l)
			}
			sc, err := plotter.NewScatter(plotter.XYs{{X: float64(s.Opened), Y: s.RSSPerWaiter / 1024}})
			if err != nil {
				return nil, err
			}
			sc.GlyphStyle = draw.GlyphStyle{Color: sys.color, Radius: vg.Points(4), Shape: draw.CircleGlyph{}}
			if key == "connlimit-cw" { // a ring around the other variant's dot at the same N
				sc.GlyphStyle = draw.GlyphStyle{Color: sys.color, Radius: vg.Points(6.5), Shape: draw.RingGlyph{}}
			}
			p.Add(sc)
			maxN = max(maxN, s.Waiters)
			found = true
		}
		if found {
			shown = append(shown, key)
		}
	}
	if len(shown) == 0 {
		return nil, ErrNoData
	}
	target, err := plotter.NewLine(plotter.XYs{{X: 0, Y: 8}, {X: float64(maxN) * 1.02, Y: 8}})
	if err != nil {
		return nil, err
	}
	target.LineStyle = draw.LineStyle{Color: muted, Width: vg.Points(1), Dashes: []vg.Length{vg.Points(4), vg.Points(3)}}
	lbl, err := plotter.NewLabels(plotter.XYLabels{XYs: plotter.XYs{{X: 0, Y: 8}}, Labels: []string{"target: ≤ 8 KiB per waiter"}})
	if err != nil {
		return nil, err
	}
	lbl.TextStyle[0] = textStyle(fontSize-1, false, muted)
	lbl.TextStyle[0].YAlign = draw.YBottom
	lbl.Offset = vg.Point{X: vg.Points(4), Y: vg.Points(3)}
	p.Add(target, lbl)
	p.Y.Max = math.Max(p.Y.Max*1.1, 9.5)
	what := []string{
		"Limit 1, one holder, N waiters connected one after the other and left waiting. Markers (a ring for close_write): (VmRSS with all N queued and settled − VmRSS with the holder only) ÷ N,",
		"each run and round (the report's figure). Thin lines: the same ratio sampled while the waiters were still connecting (not settled; from N/10 on).",
	}
	f := &figure{title: "Memory per waiting connection", legend: systemEntries(shown), panels: []*plot.Plot{p}, caption: caption(r, what...)}
	return f.svg()
}

// segment shades of the CPU chart: a system's colour itself for the
// proxy, darker for the limiter, lighter for the rest, pale and outlined
// for a bar that is not split.
func shadeProxy(c color.RGBA) color.RGBA   { return c }
func shadeLimiter(c color.RGBA) color.RGBA { return mix(c, black, 0.55) }
func shadeRest(c color.RGBA) color.RGBA    { return mix(c, white, 0.6) }
func shadeWhole(c color.RGBA) color.RGBA   { return mix(c, white, 0.85) }

// CPU is the proxy's CPU per connection for each system and workload,
// split by where it goes where a CPU profile says so.
func CPU(r *Results) ([]byte, error) {
	var panels []*plot.Plot
	split, whole := false, false
	for _, wl := range r.Workloads {
		p := newPlot(wl.Name, "proxy process CPU per connection (µs)", "")
		gridLines(p, true, false)
		p.X.Tick.Marker = niceTicks{}
		p.X.Min = 0
		var bars []*stackedBar
		var names []string
		top := 0.0
		for _, sys := range systems {
			var v []float64
			for _, t := range r.Tput {
				if t.Workload == wl.Key && t.System == sys.key && t.ProxyCPUus != nil && t.Completed > 0 {
					v = append(v, *t.ProxyCPUus)
				}
			}
			if len(v) == 0 || sys.key == "l4-polling" {
				continue // polling completes (almost) nothing: no per-connection figure
			}
			total := median(v)
			b := &stackedBar{total: total}
			if pr, ok := profileOf(r, sys.key, wl.Key); ok && pr.Total > 0 {
				split = true
				proxy := total * pr.Proxy / pr.Total
				lim := total * pr.Limiter / pr.Total
				b.add(proxy, shadeProxy(sys.color), fmtUS(proxy), white)
				b.add(lim, shadeLimiter(sys.color), fmtUS(lim), white)
				b.add(total-proxy-lim, shadeRest(sys.color), fmtUS(total-proxy-lim), ink)
			} else {
				whole = true
				b.add(total, shadeWhole(sys.color), "not split", ink)
				b.outline = sys.color
			}
			bars = append(bars, b)
			names = append(names, sys.label)
			top = math.Max(top, total)
		}
		if len(bars) == 0 {
			continue
		}
		// The first system on top.
		slices.Reverse(names)
		for i, b := range bars {
			b.y = float64(len(bars) - 1 - i)
			p.Add(b)
		}
		p.NominalY(names...)
		p.X.Max = top * 1.14
		panels = append(panels, p)
	}
	if len(panels) == 0 {
		return nil, ErrNoData
	}
	// The systems are named beside their bars; the legend tells the parts.
	var legend []legendEntry
	what := []string{
		"Bar: utime+stime of the proxy process over the measured window ÷ connections completed in it, median of the rounds (the total at its end).",
	}
	grey := rgb(0x6e7781)
	if split {
		legend = append(legend,
			legendEntry{label: "caddy-l4 proxy handler", color: shadeProxy(grey), box: true},
			legendEntry{label: "connection_limit's own code", color: shadeLimiter(grey), box: true},
			legendEntry{label: "rest (GC, scheduler, listener, runtime)", color: shadeRest(grey), box: true})
		what = append(what, "Caddy's bars are split in the proportions of the CPU profile of an extra profile run (µs in each part): caddy-l4's proxy handler (dial, copy, close),",
			"connection_limit's own code (its Handle minus the proxy) and the rest of the process.")
	} else {
		what = append(what, "No bar is split: "+whyNoProfiles(r.Run)+".")
	}
	if whole {
		legend = append(legend, legendEntry{label: "not split (no CPU profile)", color: shadeWhole(grey), edge: grey, box: true})
	}
	f := &figure{title: "CPU per connection, and where it goes", legend: legend, panels: panels, stack: true, caption: caption(r, what...), h: 6.2 * vg.Inch}
	return f.svg()
}

// whyNoProfiles says why a run has no CPU profiles.
func whyNoProfiles(r Run) string {
	for _, s := range r.Skipped {
		if strings.HasPrefix(s, "profile ") {
			return "this run's CPU-profile runs were skipped for the time budget"
		}
	}
	if strings.Contains(r.Settings, "CPU profiles") {
		return "this run's CPU-profile runs did not run or failed"
	}
	return "this run took no CPU profiles (-profile=false, as -quick does)"
}

func profileOf(r *Results, system, workload string) (CPUProfile, bool) {
	for _, p := range r.Profiles {
		if p.System == system && p.Workload == workload {
			return p, true
		}
	}
	return CPUProfile{}, false
}

func fmtUS(v float64) string { return strconv.FormatFloat(v, 'f', 0, 64) }

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func appendOnce(s []string, v string) []string {
	if slices.Contains(s, v) {
		return s
	}
	return append(s, v)
}

// sortSystems orders system keys as systems lists them.
func sortSystems(keys []string) []string {
	var out []string
	for _, s := range systems {
		if slices.Contains(keys, s.key) {
			out = append(out, s.key)
		}
	}
	return out
}

func thousandsOf(n int) string {
	s := strconv.Itoa(n)
	if n < 10000 {
		return s
	}
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteRune(' ')
		}
		b.WriteRune(c)
	}
	return b.String()
}
