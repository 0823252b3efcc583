package main

import (
	"fmt"
	"runtime"
	"strconv"
	"strings"

	"github.com/l4-connlimit/connlimit/bench/charts"
)

// results is what the charts are drawn from (bench/charts): the run, and
// per run the distributions and samples behind the report's figures.
func (rep *report) results(c *config) *charts.Results {
	m := map[string]string{}
	for _, kv := range rep.machine {
		m[kv[0]] = kv[1]
	}
	res := &charts.Results{Run: charts.Run{
		Commit:   m["connlimit commit"],
		Date:     m["date"],
		Machine:  machineLine(m),
		Command:  strings.Join(append([]string{"bash bench/run.sh"}, c.setFlags...), " "),
		Settings: c.settingsLine(),
		Skipped:  rep.skipped,
	}}
	for _, wl := range workloads {
		res.Workloads = append(res.Workloads, charts.Workload{Key: wl.key, Name: wl.name})
	}
	for _, r := range rep.tput {
		t := charts.TputRun{
			System: r.kind.String(), Workload: r.wl.key, Round: r.round, Completed: r.completed,
			ProxyCPUus: charts.Num(r.cpuPerConn), OtherCores: charts.Num(r.otherCores), Latency: r.latQ, Gap: r.gapQ,
		}
		if r.err != nil {
			t.Error = r.err.Error()
			t.ProxyCPUus = nil
		}
		res.Tput = append(res.Tput, t)
	}
	for _, r := range rep.scale {
		s := charts.ScaleRun{
			System: r.kind.String(), Waiters: r.n, Requested: r.requested, Round: r.round, Opened: r.opened,
			RSSPerWaiter: r.perWaiter, RSSBaseKiB: r.rss0, Opening: r.opening, DrainRate: r.drainRate, Drain: r.drain,
		}
		if r.err != nil {
			s.Error = r.err.Error()
		}
		res.Scale = append(res.Scale, s)
	}
	for _, r := range rep.prof {
		if !strings.HasSuffix(r.profileNote, ".pb.gz") || r.completed == 0 || r.err != nil {
			continue
		}
		per := func(opts ...string) float64 {
			return c.profileSeconds(r.profileNote, opts...) * 1e6 / float64(r.completed)
		}
		p := charts.CPUProfile{System: r.kind.String(), Workload: r.wl.key, Completed: r.completed,
			Total: per(), Proxy: per(proxyArgs...)}
		if r.kind.isConnlimit() {
			p.Limiter = per(ownArgs...)
		}
		if charts.Num(p.Total) == nil || charts.Num(p.Proxy) == nil || charts.Num(p.Limiter) == nil {
			continue // pprof failed
		}
		res.Profiles = append(res.Profiles, p)
	}
	return res
}

// machineLine is the machine in one line, for the charts' captions.
func machineLine(m map[string]string) string {
	var parts []string
	cpu := m["CPU"]
	if n := m["nproc"]; n != "" {
		cpu = n + " × " + cpu
	}
	parts = append(parts, cpu)
	if f := strings.Fields(m["memory"]); len(f) == 2 && f[1] == "kB" {
		if kb, err := strconv.ParseFloat(f[0], 64); err == nil {
			parts = append(parts, fmt.Sprintf("%.0f GiB", kb/(1<<20)))
		}
	}
	if k := m["kernel"]; k != "" {
		parts = append(parts, "Linux "+k)
	}
	parts = append(parts, runtime.Version())
	if f := strings.Fields(m["HAProxy"]); len(f) >= 3 && f[0] == "HAProxy" {
		v, _, _ := strings.Cut(f[2], "-")
		parts = append(parts, "HAProxy "+v)
	}
	if f := strings.Fields(m["Caddy"]); len(f) > 0 {
		parts = append(parts, "Caddy "+f[0])
	}
	return strings.Join(parts, ", ")
}

// settingsLine is the run's shape in a few words.
func (c *config) settingsLine() string {
	var parts []string
	if c.only == "" || strings.Contains(c.only, "tput") {
		parts = append(parts, fmt.Sprintf("%s of %s measured runs", plural(c.rounds, "round"), c.duration))
	}
	if len(c.scaleNs) > 0 && (c.only == "" || strings.Contains(c.only, "scale")) {
		var ns []string
		for _, n := range c.scaleNs {
			ns = append(ns, thousandsSep(n))
		}
		parts = append(parts, fmt.Sprintf("scale runs of %s waiters, %s", strings.Join(ns, " and "), plural(c.scaleRounds, "round")))
	}
	if c.profile {
		parts = append(parts, "CPU profiles")
	}
	return strings.Join(parts, "; ")
}

func plural(n int, s string) string {
	if n == 1 {
		return "1 " + s
	}
	return fmt.Sprintf("%d %ss", n, s)
}

func thousandsSep(n int) string {
	s := strconv.Itoa(n)
	if n < 10000 {
		return s
	}
	var b strings.Builder
	for i, ch := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(' ')
		}
		b.WriteRune(ch)
	}
	return b.String()
}
