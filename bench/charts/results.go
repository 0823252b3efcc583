// Package charts draws the end-to-end benchmark's results (bench/e2e) as
// SVG charts: latency and hand-off gap distributions, the drain of a long
// waiting list, memory per waiting connection and CPU per connection.
//
// bench/e2e writes a [Results] as JSON next to its report (-json); the
// command in ./draw reads it and writes the charts (bash bench/run.sh does
// both). Every chart is drawn on an opaque white background with dark
// text, so that it reads the same in light and dark page themes, and names
// its run (commit, date, machine) in its caption.
package charts

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"strings"
)

// Results is what one run of bench/e2e measured, as far as the charts need
// it.
type Results struct {
	Run       Run          `json:"run"`
	Workloads []Workload   `json:"workloads"`
	Tput      []TputRun    `json:"tput"`
	Scale     []ScaleRun   `json:"scale"`
	Profiles  []CPUProfile `json:"profiles"`
}

// Run says which run the results come from.
type Run struct {
	Commit   string `json:"commit"`   // connlimit commit, e.g. "5dc1b58"
	Date     string `json:"date"`     // e.g. "2026-12-01 09:00 UTC"
	Machine  string `json:"machine"`  // one line: CPU, kernel, Go, HAProxy
	Command  string `json:"command"`  // how to run it again, e.g. "bash bench/run.sh"
	Settings string `json:"settings"` // rounds, durations, waiter counts
	// Skipped lists the runs left out for the time budget, as the report
	// names them ("round 3 handoff haproxy", "profile limit connlimit").
	Skipped []string `json:"skipped,omitempty"`
	// Note, if set, is added to every chart's caption (draw -note), e.g.
	// what disturbed the run.
	Note string `json:"note,omitempty"`
}

// Workload is one throughput scenario.
type Workload struct {
	Key  string `json:"key"`  // "limit", "handoff"
	Name string `json:"name"` // "limit-bound (C=500, L=50, H=20 ms)"
}

// TputRun is one throughput run of one system.
type TputRun struct {
	System   string `json:"system"` // bench/e2e's name: connlimit, haproxy, ...
	Workload string `json:"workload"`
	Round    int    `json:"round"`
	// Completed is the number of connections answered inside the
	// measured window.
	Completed int `json:"completed"`
	// ProxyCPUus is the proxy process's CPU (utime+stime) over the
	// measured window per completed connection, in µs; nil if none
	// completed.
	ProxyCPUus *float64 `json:"proxy_cpu_us_per_conn"`
	// OtherCores is the CPU that other processes than the proxy and the
	// benchmark used over the measured window, in cores (approximate).
	OtherCores *float64 `json:"other_cores,omitempty"`
	// Latency is connect start to EOF of the connections completed in the
	// window.
	Latency Quantiles `json:"latency"`
	// Gap is the hand-off gap: a slot freed at the backend to the next
	// connection accepted there (limited systems only).
	Gap   Quantiles `json:"handoff_gap"`
	Error string    `json:"error,omitempty"`
}

// ScaleRun is one run of N waiters queued behind one holder (limit 1),
// then drained.
type ScaleRun struct {
	System    string `json:"system"`
	Waiters   int    `json:"waiters"`   // waiters run
	Requested int    `json:"requested"` // asked for (more if the fd limit capped it)
	Round     int    `json:"round"`
	Opened    int    `json:"opened"`
	// RSSPerWaiter is (VmRSS with every waiter queued and settled − VmRSS
	// with the holder only) ÷ waiters, in bytes: the report's figure.
	RSSPerWaiter float64 `json:"rss_per_waiter_bytes"`
	// RSSBaseKiB is VmRSS with the holder only; Opening samples VmRSS
	// while the waiters were being connected (not settled).
	RSSBaseKiB int64       `json:"rss_base_kib"`
	Opening    []RSSSample `json:"rss_while_opening"`
	// DrainRate is waiters per second from the holder's release to the
	// last waiter closed by the backend.
	DrainRate float64 `json:"drain_rate_per_s"`
	// Drain lists, for some waiters by arrival rank (the order their
	// clients connected, 1 = first), when the backend accepted them, in ns
	// after the holder was released. Every waiter of the first 100, then
	// one in every Step.
	Drain Drain  `json:"drain"`
	Error string `json:"error,omitempty"`
}

// RSSSample is the proxy's VmRSS once Waiters waiters had connected.
type RSSSample struct {
	Waiters int   `json:"waiters"`
	RSSKiB  int64 `json:"rss_kib"`
}

// Drain is the admission time of some waiters by arrival rank.
type Drain struct {
	Step       int     `json:"step"`
	Rank       []int   `json:"rank"`
	AdmittedNS []int64 `json:"admitted_ns"`
}

// DrainHead is how many of the first waiters a Drain keeps every one of.
const DrainHead = 100

// NewDrain picks, from admitted (indexed by arrival rank 1..n; a negative
// value: never admitted), every waiter of the first DrainHead and then
// about max more, evenly spaced.
func NewDrain(admitted []int64, max int) Drain {
	n := len(admitted) - 1
	d := Drain{Step: 1}
	if n < 1 {
		return d
	}
	if max > 0 && n > DrainHead+max {
		d.Step = (n - DrainHead + max - 1) / max
	}
	for k := 1; k <= n; k++ {
		if k > DrainHead && (k-DrainHead)%d.Step != 0 && k != n {
			continue
		}
		if admitted[k] < 0 {
			continue
		}
		d.Rank = append(d.Rank, k)
		d.AdmittedNS = append(d.AdmittedNS, admitted[k])
	}
	return d
}

// CPUProfile is where Caddy's CPU went in the CPU profile of one extra
// profile run, in µs per connection completed in it.
type CPUProfile struct {
	System    string  `json:"system"`
	Workload  string  `json:"workload"`
	Completed int     `json:"completed"`
	Total     float64 `json:"total_us_per_conn"`   // every sample
	Limiter   float64 `json:"limiter_us_per_conn"` // connection_limit's own code (its Handle minus the proxy)
	Proxy     float64 `json:"proxy_us_per_conn"`   // caddy-l4's proxy handler (dial, copy, close)
}

// Quantiles summarises a sample: NS[i] is its P[i]-quantile (nearest
// rank), in ns. N is the sample size.
type Quantiles struct {
	N  int       `json:"n"`
	P  []float64 `json:"p,omitempty"`
	NS []int64   `json:"ns,omitempty"`
}

// quantileGrid is the probabilities Summarise keeps: every 0.5 %, and the
// tail at 99.9 %, 99.99 % and the maximum.
var quantileGrid = func() []float64 {
	var g []float64
	for i := 0; i < 200; i++ {
		g = append(g, float64(i)/200)
	}
	return append(g, 0.995, 0.999, 0.9999, 1)
}()

// Summarise returns the quantiles of a sorted sample.
func Summarise(sorted []int64) Quantiles {
	q := Quantiles{N: len(sorted)}
	if len(sorted) == 0 {
		return q
	}
	for _, p := range quantileGrid {
		i := int(math.Ceil(p*float64(len(sorted)))) - 1
		i = max(0, min(i, len(sorted)-1))
		q.P = append(q.P, p)
		q.NS = append(q.NS, sorted[i])
	}
	return q
}

// cdf is the fraction of the sample at or below x ns, interpolated
// between the kept quantiles (linearly in log x).
func (q Quantiles) cdf(x float64) float64 {
	if q.N == 0 || len(q.NS) == 0 {
		return math.NaN()
	}
	last := len(q.NS) - 1
	if x < float64(q.NS[0]) {
		return 0
	}
	if x >= float64(q.NS[last]) {
		return 1
	}
	// The last i with NS[i] <= x; NS is non-decreasing.
	i := 0
	for i < last && float64(q.NS[i+1]) <= x {
		i++
	}
	a, b := float64(q.NS[i]), float64(q.NS[i+1])
	if a <= 0 {
		return q.P[i] // no log scale below 0: what is known to be ≤ x
	}
	if b <= a {
		return q.P[i+1]
	}
	f := math.Log(x/a) / math.Log(b/a)
	return q.P[i] + f*(q.P[i+1]-q.P[i])
}

// pooledCDF is the CDF of the union of the samples (each weighted by its
// size) at x ns.
func pooledCDF(qs []Quantiles, x float64) float64 {
	sum, n := 0.0, 0
	for _, q := range qs {
		if q.N == 0 {
			continue
		}
		sum += float64(q.N) * q.cdf(x)
		n += q.N
	}
	if n == 0 {
		return math.NaN()
	}
	return sum / float64(n)
}

// Load reads Results from a JSON file, gzipped if its name ends in .gz.
func Load(file string) (*Results, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	if strings.HasSuffix(file, ".gz") {
		zr, err := gzip.NewReader(bytes.NewReader(b))
		if err != nil {
			return nil, fmt.Errorf("%s: %v", file, err)
		}
		if b, err = io.ReadAll(zr); err != nil {
			return nil, fmt.Errorf("%s: %v", file, err)
		}
	}
	var r Results
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%s: %v", file, err)
	}
	return &r, nil
}

// Write writes r as JSON to file.
func (r *Results) Write(file string) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return os.WriteFile(file, append(b, '\n'), 0o644)
}

// Num returns a pointer to v, or nil if v is NaN or infinite (which JSON
// cannot carry).
func Num(v float64) *float64 {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return nil
	}
	return &v
}
