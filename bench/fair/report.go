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

	"github.com/l4-connlimit/connlimit/bench/charts"
)

// report is the runs, summed up per system, and the figures.
type report struct {
	Date, Commit, Machine, HAProxy string
	Settings, Command              string
	Tenants                        []string
	Runs                           []runResult
	Systems                        []summary
	Goals                          []goal
}

// summary is one system over its rounds.
type summary struct {
	Key, Label string
	Runs       int
	Errors     []string `json:",omitempty"`
	// Light tenants' waits, pooled over the rounds (ms), and H's.
	LightP50, LightP99, HeavyP50, HeavyP99 float64
	Held                                   []float64 // mean slots held per tenant, mean over rounds
	Share                                  []float64 // the fair share each tenant is compared with
	Backlogged                             []bool
	MaxDev                                 float64 // largest |held ÷ share − 1| over the backlogged tenants
	Jain                                   float64 // over the backlogged tenants, held ÷ weight
	JainAll                                float64 // over every tenant, held ÷ weight
	Rate                                   float64 // conn/s, median over rounds
	CPU                                    float64 // the proxy's µs per connection, median over rounds
	ZoneIndex                              float64 // the zone's fairness_index, mean of samples; -1: none
	Failed                                 int64
	LightWaits                             charts.Quantiles // for the chart
	lightWaits                             []int64
}

// goal is one figure of the issue, with its goal.
type goal struct {
	Figure, Goal, Value string
	Met                 bool
}

func summarise(c *config, runs []runResult) *report {
	commit, _ := exec.Command("git", "rev-parse", "--short", "HEAD").Output()
	hv, _ := exec.Command(c.haproxyBin, "-v").Output()
	hvs, _, _ := strings.Cut(string(hv), "\n")
	rep := &report{
		Date: time.Now().UTC().Format("2006-01-02 15:04 MST"), Commit: strings.TrimSpace(string(commit)),
		Machine: fmt.Sprintf("%d CPUs, %s", runtime.NumCPU(), cpuModel()), HAProxy: strings.TrimSpace(hvs),
		Settings: fmt.Sprintf("max %d, hold %s, H %d clients, %d light tenants × %d clients, %d round(s) of %s + %s warm-up",
			c.limit, c.hold, c.heavy, c.light, c.perL, c.rounds, c.duration, c.warmup),
		Command: command(c),
		Runs:    runs,
	}
	for _, t := range c.tenants(false) {
		rep.Tenants = append(rep.Tenants, t.name)
	}
	byKey := map[string]*summary{}
	for _, s := range systems {
		sum := &summary{Key: s.key, Label: s.label, ZoneIndex: -1}
		var heavy []int64
		var rates, idx, cpu []float64
		held := make([]float64, c.light+1)
		for _, r := range runs {
			if r.System != s.key {
				continue
			}
			if r.Err != "" {
				sum.Errors = append(sum.Errors, fmt.Sprintf("round %d: %s", r.Round, r.Err))
				if r.Held == nil {
					continue
				}
			}
			sum.Runs++
			sum.lightWaits = append(sum.lightWaits, lightWaits(r)...)
			heavy = append(heavy, r.Waits[0]...)
			rates = append(rates, r.Rate)
			cpu = append(cpu, r.CPU)
			sum.Failed += r.Failed
			for i, h := range r.Held {
				held[i] += h
			}
			if r.Index >= 0 {
				idx = append(idx, r.Index)
			}
		}
		if sum.Runs == 0 {
			continue
		}
		slices.Sort(sum.lightWaits)
		sum.LightWaits = charts.Summarise(sum.lightWaits)
		slices.Sort(heavy)
		for i := range held {
			held[i] /= float64(sum.Runs)
		}
		sum.Held = held
		sum.LightP50, sum.LightP99 = ms(quantile(sum.lightWaits, 0.5)), ms(quantile(sum.lightWaits, 0.99))
		sum.HeavyP50, sum.HeavyP99 = ms(quantile(heavy, 0.5)), ms(quantile(heavy, 0.99))
		sum.Rate = median(rates)
		sum.CPU = median(cpu)
		if len(idx) > 0 {
			sum.ZoneIndex = mean(idx)
		}
		byKey[s.key] = sum
		rep.Systems = append(rep.Systems, *sum)
	}
	// Jain's index over every tenant for all; the fair shares, and the
	// index over the backlogged tenants, for the fair_share runs.
	for i := range rep.Systems {
		s := &rep.Systems[i]
		ts := c.tenants(s.Key == "fair-w3")
		s.JainAll = jain(ts, s.Held, nil)
		if strings.HasPrefix(s.Key, "fair") {
			s.Share, s.Backlogged = fairShares(ts, s.Held, c.limit)
			s.Jain = jain(ts, s.Held, s.Backlogged)
			for j, b := range s.Backlogged {
				if b {
					s.MaxDev = math.Max(s.MaxDev, math.Abs(s.Held[j]/s.Share[j]-1))
				}
			}
		}
		byKey[s.Key] = s
	}
	tenantNames = rep.Tenants
	rep.Goals = goals(byKey, runs)
	return rep
}

// fairShares: a tenant is backlogged when it has more clients than its
// weighted share of the slots (max × w ÷ Σw). One that is not gets what
// it asks for: its share is what it held. The backlogged tenants share
// the rest by weight: the rest of the slots the backend saw held in all
// (the backend does not see a slot's first and last moments, spent in
// the proxy, so the sum is a little under max; it is the same cut for
// every connection, whatever its tenant).
func fairShares(ts []tenant, held []float64, limit int) ([]float64, []bool) {
	sumW := 0
	for _, t := range ts {
		sumW += t.weight
	}
	share := make([]float64, len(ts))
	back := make([]bool, len(ts))
	rest, bw := 0.0, 0
	for i, t := range ts {
		back[i] = float64(t.clients) > float64(limit*t.weight)/float64(sumW)
		if back[i] {
			bw += t.weight
			rest += held[i]
		} else {
			share[i] = held[i]
		}
	}
	for i, t := range ts {
		if back[i] {
			share[i] = rest * float64(t.weight) / float64(bw)
		}
	}
	return share, back
}

// jain is Jain's fairness index over held ÷ weight of the tenants in
// (nil: all).
func jain(ts []tenant, held []float64, in []bool) float64 {
	var s1, s2 float64
	n := 0
	for i, t := range ts {
		if in != nil && !in[i] {
			continue
		}
		x := held[i] / float64(t.weight)
		s1 += x
		s2 += x * x
		n++
	}
	if n == 0 || s2 == 0 {
		return 1 // none, or all hold nothing: equal
	}
	return s1 * s1 / (float64(n) * s2)
}

func goals(s map[string]*summary, runs []runResult) []goal {
	var gs []goal
	fifo := s["fifo"]
	for _, k := range []string{"fair", "fair-w3"} {
		f := s[k]
		if f == nil || fifo == nil {
			continue
		}
		r := f.LightP99 / fifo.LightP99
		gs = append(gs, goal{fmt.Sprintf("light tenants' p99 wait, %s ÷ fifo", k), "≤ 0.1×",
			fmt.Sprintf("%.3f× (%.1f ms ÷ %.1f ms)", r, f.LightP99, fifo.LightP99), r <= 0.1})
	}
	for _, k := range []string{"fair", "fair-w3"} {
		f := s[k]
		if f == nil || f.Share == nil {
			continue
		}
		var parts []string
		for i, b := range f.Backlogged {
			if b {
				parts = append(parts, fmt.Sprintf("%s %.2f of %.2f", tenantName(i), f.Held[i], f.Share[i]))
			}
		}
		note := ""
		if len(parts) == 1 {
			note = "; H alone is backlogged, so its share is what the light tenants leave"
		}
		gs = append(gs, goal{fmt.Sprintf("backlogged tenants' mean held slots vs fair share, %s", k), "within ±10 %",
			fmt.Sprintf("largest %.1f %% (%s%s)", 100*f.MaxDev, strings.Join(parts, ", "), note), f.MaxDev <= 0.10})
	}
	if f := s["fair-w3"]; f != nil && f.Share != nil {
		gs = append(gs, goal{"Jain's index over backlogged tenants (held ÷ weight), fair-w3", "≥ 0.95",
			fmt.Sprintf("%.3f (all five backlogged)", f.Jain), f.Jain >= 0.95})
	}
	if f := s["fair"]; f != nil && f.Share != nil {
		gs = append(gs, goal{"Jain's index over backlogged tenants (held ÷ weight), fair", "≥ 0.95",
			fmt.Sprintf("%.3f: H alone is backlogged (over all five %.3f: the light tenants hold what they ask for, not their equal share)", f.Jain, f.JainAll), f.Jain >= 0.95})
	}
	// Throughput: the ratio within each round, median over rounds.
	for _, k := range []string{"fair", "fair-w3"} {
		var ratios []float64
		for _, a := range runs {
			if a.System != k || a.Err != "" {
				continue
			}
			for _, b := range runs {
				if b.System == "fifo" && b.Round == a.Round && b.Err == "" && b.Rate > 0 {
					ratios = append(ratios, a.Rate/b.Rate)
				}
			}
		}
		if len(ratios) == 0 {
			continue
		}
		r := median(ratios)
		gs = append(gs, goal{fmt.Sprintf("total throughput, %s ÷ fifo", k), "≥ 0.98×",
			fmt.Sprintf("%.3f× (%.0f ÷ %.0f conn/s, median of %d rounds)", r, s[k].Rate, s["fifo"].Rate, len(ratios)), r >= 0.98})
	}
	return gs
}

var tenantNames []string

func tenantName(i int) string {
	if i < len(tenantNames) {
		return tenantNames[i]
	}
	return fmt.Sprint(i)
}

func (r *report) markdown(c *config) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# fair_share benchmark\n\n")
	fmt.Fprintf(&b, "%s, connlimit %s, %s; %s. Settings: %s. Command: `%s`.\n\n",
		r.Date, r.Commit, r.Machine, r.HAProxy, r.Settings, r.Command)
	b.WriteString("| figure | goal | value | met |\n|---|---|---|---|\n")
	for _, g := range r.Goals {
		met := "yes"
		if !g.Met {
			met = "**no**"
		}
		fmt.Fprintf(&b, "| %s | %s | %s | %s |\n", g.Figure, g.Goal, g.Value, met)
	}
	b.WriteString("\n| system | light p50 / p99 wait | H p50 / p99 wait | conn/s | proxy CPU µs/conn | light clients' time holding a slot | zone fairness_index | failed |\n|---|---|---|---|---|---|---|---|\n")
	for _, s := range r.Systems {
		zi := "–"
		if s.ZoneIndex >= 0 {
			zi = fmt.Sprintf("%.3f", s.ZoneIndex)
		}
		light := 0.0
		for _, h := range s.Held[1:] {
			light += h
		}
		fmt.Fprintf(&b, "| %s | %.1f / %.1f ms | %.1f / %.1f ms | %.0f | %.0f | %.0f %% | %s | %d |\n",
			s.Key, s.LightP50, s.LightP99, s.HeavyP50, s.HeavyP99, s.Rate, s.CPU, 100*light/float64(c.light*c.perL), zi, s.Failed)
	}
	b.WriteString("\nMean slots held (fair share in brackets; * backlogged):\n\n| system |")
	for _, t := range r.Tenants {
		fmt.Fprintf(&b, " %s |", t)
	}
	b.WriteString(" Jain (backlogged / all) |\n|---|")
	for range r.Tenants {
		b.WriteString("---|")
	}
	b.WriteString("---|\n")
	for _, s := range r.Systems {
		fmt.Fprintf(&b, "| %s |", s.Key)
		for i, h := range s.Held {
			if s.Share == nil {
				fmt.Fprintf(&b, " %.2f |", h)
				continue
			}
			star := ""
			if s.Backlogged[i] {
				star = "*"
			}
			fmt.Fprintf(&b, " %.2f (%.2f%s) |", h, s.Share[i], star)
		}
		if s.Share == nil {
			fmt.Fprintf(&b, " – / %.3f |\n", s.JainAll)
			continue
		}
		fmt.Fprintf(&b, " %.3f / %.3f |\n", s.Jain, s.JainAll)
	}
	for _, s := range r.Systems {
		for _, e := range s.Errors {
			fmt.Fprintf(&b, "\n%s: %s", s.Key, e)
		}
	}
	b.WriteString("\n")
	return b.String()
}

// chart is the light tenants' wait CDFs.
func (r *report) chart() charts.FairChart {
	ch := charts.FairChart{
		Title:  "fair_share: the light tenants' wait behind a heavy tenant",
		XLabel: "wait, client connects → backend has the connection (ms, log scale)",
		Caption: []string{
			"Fraction of the light tenants' connections that waited at most x, all rounds pooled. Settings: " + r.Settings + ".",
			fmt.Sprintf("Run: connlimit %s, %s, on %s; %s. Command: %s.", r.Commit, r.Date, r.Machine, r.HAProxy, r.Command),
		},
	}
	for _, s := range r.Systems {
		ch.Lines = append(ch.Lines, charts.FairLine{Key: s.Key, Label: s.Label, Waits: s.LightWaits})
	}
	return ch
}

func command(c *config) string { return strings.TrimSpace("bash bench/fair.sh " + c.args) }

func quantile(sorted []int64, p float64) int64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func ms(ns int64) float64 { return float64(ns) / 1e6 }

func fmtMS(ns int64) string { return fmt.Sprintf("%.1fms", ms(ns)) }

func mean(v []float64) float64 {
	s := 0.0
	for _, x := range v {
		s += x
	}
	return s / float64(len(v))
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "model name") {
			_, v, _ := strings.Cut(l, ":")
			return strings.TrimSpace(v)
		}
	}
	return runtime.GOARCH
}
