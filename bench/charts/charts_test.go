package charts

import (
	"bytes"
	"compress/gzip"
	"encoding/xml"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// fixture is a small, fixed result set: two workloads, every system, two
// rounds, one scale size and profiles of the Caddy systems.
func fixture() *Results {
	rng := rand.New(rand.NewPCG(1, 2))
	sample := func(n int, median float64) Quantiles {
		v := make([]int64, n)
		for i := range v {
			v[i] = int64(median * math.Exp(rng.NormFloat64()*0.4))
		}
		slices.Sort(v)
		return Summarise(v)
	}
	r := &Results{
		Run: Run{Commit: "abc1234", Date: "2026-12-01 09:00 UTC", Machine: "2× Test CPU, Linux 6.1, go1.26.8, HAProxy 2.6.12",
			Command: "bash bench/run.sh -quick", Settings: "1 round of 2 s runs; 2 000 waiters"},
		Workloads: []Workload{{Key: "limit", Name: "limit-bound (C=500, L=50, H=20 ms)"}, {Key: "handoff", Name: "handoff-bound (C=500, L=8, H=0)"}},
	}
	for round := 1; round <= 2; round++ {
		for _, wl := range r.Workloads {
			for i, s := range systems {
				t := TputRun{System: s.key, Workload: wl.Key, Round: round, ProxyCPUus: Num(250 + 20*float64(i))}
				if s.key == "l4-polling" { // admits nobody after its first L
					t.ProxyCPUus = nil
					r.Tput = append(r.Tput, t)
					continue
				}
				t.Completed = 400
				t.Latency = sample(400, 2e7*float64(i+1))
				if limiting(s.key) {
					t.Gap = sample(300, 2e6+1e5*float64(i))
				}
				r.Tput = append(r.Tput, t)
			}
		}
	}
	for i, key := range scaleSystems {
		n := 2000
		admitted := make([]int64, n+1)
		for k := 1; k <= n; k++ {
			admitted[k] = int64(k)*400_000*int64(i+1) + rng.Int64N(300_000)
		}
		s := ScaleRun{System: key, Waiters: n, Requested: n, Round: 1, Opened: n, RSSPerWaiter: 7300 - 300*float64(i),
			RSSBaseKiB: 40_000, DrainRate: 2500 / float64(i+1), Drain: NewDrain(admitted, 200)}
		for w := 100; w <= n; w += 100 {
			s.Opening = append(s.Opening, RSSSample{Waiters: w, RSSKiB: 40_000 + int64(w)*int64(7+i%2)})
		}
		r.Scale = append(r.Scale, s)
	}
	for _, wl := range r.Workloads {
		r.Profiles = append(r.Profiles,
			CPUProfile{System: "connlimit", Workload: wl.Key, Completed: 1000, Total: 400, Limiter: 22, Proxy: 250},
			CPUProfile{System: "connlimit-cw", Workload: wl.Key, Completed: 1000, Total: 390, Limiter: 21, Proxy: 245},
			CPUProfile{System: "l4-plain-L", Workload: wl.Key, Completed: 1000, Total: 330, Proxy: 220})
	}
	return r
}

// svgDoc is what a test reads from an SVG: whether it parses, its texts
// and the colours it strokes and fills.
type svgDoc struct {
	texts   []string
	strokes map[string]int
	fills   map[string]int
}

func parseSVG(t *testing.T, b []byte) svgDoc {
	t.Helper()
	d := svgDoc{strokes: map[string]int{}, fills: map[string]int{}}
	dec := xml.NewDecoder(bytes.NewReader(b))
	root := ""
	inText := false
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("SVG is not well-formed XML: %v", err)
		}
		switch e := tok.(type) {
		case xml.StartElement:
			if root == "" {
				root = e.Name.Local
			}
			inText = e.Name.Local == "text"
			for _, a := range e.Attr {
				if a.Name.Local != "style" {
					continue
				}
				for _, kv := range strings.Split(a.Value, ";") {
					k, v, _ := strings.Cut(kv, ":")
					switch k {
					case "stroke":
						d.strokes[strings.ToLower(v)]++
					case "fill":
						d.fills[strings.ToLower(v)]++
					}
				}
			}
		case xml.CharData:
			if inText {
				d.texts = append(d.texts, string(e))
			}
		case xml.EndElement:
			inText = false
		}
	}
	if root != "svg" {
		t.Fatalf("root element %q, want svg", root)
	}
	return d
}

// hasText reports whether s is in one text element, or runs on over the
// next ones (a caption wrapped at spaces).
func (d svgDoc) hasText(s string) bool {
	return strings.Contains(strings.Join(d.texts, " "), s)
}

func hex(s system) string {
	return fmt.Sprintf("#%02x%02x%02x", s.color.R, s.color.G, s.color.B)
}

func TestCharts(t *testing.T) {
	r := fixture()
	all := []string{"connlimit", "connlimit-cw", "haproxy", "l4-plain", "l4-plain-L"}
	cases := []struct {
		chart   func(*Results) ([]byte, error)
		title   string
		series  []string // systems drawn as lines or markers, in their colour
		absent  []string // systems that must not appear in the legend
		filled  bool     // the series are filled (bars, markers) rather than stroked
		extra   []string // other texts
		maxSize int
	}{
		{Latency, "Latency", all, []string{"l4-polling"}, false, []string{"limit-bound (C=500, L=50, H=20 ms)", "handoff-bound", "latency, connect → EOF (ms, log scale)", "Not shown, no sample in any window: caddy-l4 max_connections (polling)"}, 150 << 10},
		{HandoffGap, "Hand-off gap", []string{"connlimit", "connlimit-cw", "haproxy"}, []string{"l4-plain", "l4-plain-L"}, false, []string{"(ms, log scale)", "caddy-l4 max_connections (polling)"}, 150 << 10},
		{DrainChart, "The drain", scaleSystems, []string{"l4-plain"}, false, []string{"arrival rank", "admitted after the holder left (s)", "The first 100 waiters", "2 000 waiters"}, 150 << 10},
		{Memory, "Memory per waiting connection", scaleSystems, []string{"l4-plain"}, true, []string{"proxy RSS per waiting connection (KiB)", "target: ≤ 8 KiB per waiter"}, 100 << 10},
		{CPU, "CPU per connection", all, []string{"l4-polling"}, true, []string{"proxy process CPU per connection (µs)", "caddy-l4 proxy handler", "connection_limit's own code", "rest (GC, scheduler", "not split (no CPU profile)", "250 µs"}, 100 << 10},
	}
	for _, tc := range cases {
		t.Run(tc.title, func(t *testing.T) {
			b, err := tc.chart(r)
			if err != nil {
				t.Fatal(err)
			}
			if len(b) > tc.maxSize {
				t.Errorf("SVG is %d bytes, want at most %d", len(b), tc.maxSize)
			}
			d := parseSVG(t, b)
			if d.fills["#ffffff"] == 0 {
				t.Error("no opaque white background")
			}
			for _, want := range append([]string{tc.title, "Run: connlimit abc1234, 2026-12-01 09:00 UTC, on 2× Test CPU", "bash bench/run.sh -quick"}, tc.extra...) {
				if !d.hasText(want) {
					t.Errorf("no text %q in the chart; texts: %q", want, d.texts)
				}
			}
			for _, key := range tc.series {
				s := systemOf(key)
				if !d.hasText(s.label) {
					t.Errorf("legend lacks %q", s.label)
				}
				n := d.strokes[hex(s)]
				if tc.filled {
					n += d.fills[hex(s)]
				}
				if n < 2 { // the legend swatch and at least one series
					t.Errorf("series of %s (%s) not drawn: %d elements in its colour", key, hex(s), n)
				}
			}
			for _, key := range tc.absent {
				if slices.Contains(d.texts, systemOf(key).label) {
					t.Errorf("legend shows %q, which has no series here", systemOf(key).label)
				}
			}
		})
	}
}

// -out keeps the fixture's charts, to look at them:
//
//	go test ./bench/charts -run DrawAll -out /tmp/fixture-charts
var outDir = flag.String("out", "", "also write the fixture's charts and results.json into this directory")

func TestDrawAll(t *testing.T) {
	dir := t.TempDir()
	if *outDir != "" {
		dir = *outDir
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	r := fixture()
	// Through JSON, as bench/run.sh does it.
	f := filepath.Join(dir, "results.json")
	if err := r.Write(f); err != nil {
		t.Fatal(err)
	}
	r2, err := Load(f)
	if err != nil {
		t.Fatal(err)
	}
	// And gzipped, as docs/bench keeps the results it was drawn from.
	b, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	var zb bytes.Buffer
	zw := gzip.NewWriter(&zb)
	_, _ = zw.Write(b)
	_ = zw.Close()
	if err := os.WriteFile(f+".gz", zb.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	if r3, err := Load(f + ".gz"); err != nil || r3.Run.Commit != r2.Run.Commit || len(r3.Tput) != len(r.Tput) {
		t.Fatalf("loading the gzipped results: %v", err)
	}
	files, err := DrawAll(r2, filepath.Join(dir, "charts"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != len(All) {
		t.Fatalf("wrote %d charts, want %d: %v", len(files), len(All), files)
	}
	total := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		parseSVG(t, b)
		total += len(b)
	}
	if total > 400<<10 {
		t.Errorf("charts total %d bytes, want a few hundred KiB at most", total)
	}

	// A run without scale runs or profiles still draws what it can.
	r2.Scale, r2.Profiles = nil, nil
	files, err = DrawAll(r2, filepath.Join(dir, "tput-only"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range files {
		names = append(names, filepath.Base(f))
	}
	if want := []string{"latency.svg", "handoff-gap.svg", "cpu.svg"}; !slices.Equal(names, want) {
		t.Errorf("tput-only run drew %v, want %v", names, want)
	}
	if _, err := DrainChart(r2); !errors.Is(err, ErrNoData) {
		t.Errorf("DrainChart without scale runs: %v, want ErrNoData", err)
	}
	b, err = CPU(r2)
	if err != nil {
		t.Fatal(err)
	}
	if d := parseSVG(t, b); !d.hasText("No bar is split: this run took no CPU profiles (-profile=false") || d.hasText("connection_limit's own code") {
		t.Error("CPU chart without profiles should say no bar is split and show no limiter segment")
	}
}

func TestSummariseAndCDF(t *testing.T) {
	v := make([]int64, 1000)
	for i := range v {
		v[i] = int64(i+1) * 1000 // 1 µs .. 1 ms, uniform
	}
	q := Summarise(v)
	if q.N != 1000 || q.NS[0] != 1000 || q.NS[len(q.NS)-1] != 1_000_000 {
		t.Fatalf("Summarise: n %d, min %d, max %d", q.N, q.NS[0], q.NS[len(q.NS)-1])
	}
	for _, c := range []struct{ x, want float64 }{{500, 0}, {250_000, 0.25}, {500_000, 0.5}, {990_000, 0.99}, {2e6, 1}} {
		if got := q.cdf(c.x); math.Abs(got-c.want) > 0.006 {
			t.Errorf("cdf(%v) = %v, want %v", c.x, got, c.want)
		}
	}
	// Pooled with a sample of everything at 2 ms, three times as large.
	w := slices.Repeat([]int64{2_000_000}, 3000)
	if got := pooledCDF([]Quantiles{q, Summarise(w)}, 1_500_000); math.Abs(got-0.25) > 1e-9 {
		t.Errorf("pooled cdf = %v, want 0.25", got)
	}
	if got := Summarise(nil); got.N != 0 || len(got.NS) != 0 {
		t.Errorf("Summarise(nil) = %+v", got)
	}
}

func TestNewDrain(t *testing.T) {
	admitted := make([]int64, 1001)
	for k := range admitted {
		admitted[k] = int64(k)
	}
	admitted[7] = -1 // never admitted
	d := NewDrain(admitted, 90)
	if d.Step != 10 {
		t.Errorf("step %d, want 10", d.Step)
	}
	if d.Rank[0] != 1 || slices.Contains(d.Rank, 7) || d.Rank[len(d.Rank)-1] != 1000 {
		t.Errorf("ranks %v", d.Rank)
	}
	if n := len(d.Rank); n != 99+90 {
		t.Errorf("%d waiters kept, want %d", n, 99+90)
	}
	for i, k := range d.Rank {
		if d.AdmittedNS[i] != int64(k) {
			t.Fatalf("rank %d admitted %d", k, d.AdmittedNS[i])
		}
	}
	if d := NewDrain(admitted[:51], 90); d.Step != 1 || len(d.Rank) != 49 {
		t.Errorf("small drain: step %d, %d kept", d.Step, len(d.Rank))
	}
}

func TestLogTicks(t *testing.T) {
	labels := func(lo, hi float64) (out []string) {
		for _, tk := range (logTicks{}).Ticks(lo, hi) {
			if tk.Label != "" {
				out = append(out, tk.Label)
			}
		}
		return out
	}
	for _, c := range []struct {
		lo, hi float64
		want   string
	}{
		{214, 431, "200 300 400 500"},
		{1.3, 180, "1 2 5 10 20 50 100 200"},
		{0.04, 900, "0.1 1 10 100 1000"}, // 0.02 .. 1000: many decades
		{0.3, 40, "0.2 0.5 1 2 5 10 20 50"},
		{0.004, 90000, "0.01 0.1 1 10 100 1000 10000 100000"},
	} {
		if got := strings.Join(labels(c.lo, c.hi), " "); got != c.want {
			t.Errorf("logTicks(%v, %v) labels %q, want %q", c.lo, c.hi, got, c.want)
		}
	}
}

func TestGapsNotPositive(t *testing.T) {
	r := fixture()
	v := make([]int64, 1000)
	for i := range v {
		v[i] = int64(i-99) * 1000 // 100 of 1000 ≤ 0
	}
	for i, tr := range r.Tput {
		if tr.System == "haproxy" {
			r.Tput[i].Gap = Summarise(v)
		}
	}
	b, err := HandoffGap(r)
	if err != nil {
		t.Fatal(err)
	}
	d := parseSVG(t, b)
	if !d.hasText("HAProxy (server maxconn, queue), limit: 10.0 %") || d.hasText("connection_limit (release return), limit:") {
		t.Errorf("caption should give HAProxy's share of gaps ≤ 0 (10 %%) and no other: %q", d.texts)
	}
}

func TestCaptionWraps(t *testing.T) {
	r := fixture()
	r.Run.Command = "bash bench/run.sh" + strings.Repeat(" -systems connlimit,l4-plain-L", 12)
	b, err := Memory(r)
	if err != nil {
		t.Fatal(err)
	}
	d := parseSVG(t, b)
	const maxChars = 190 // a 10-inch line of 9-point text holds about this many
	for _, s := range d.texts {
		if len([]rune(s)) > maxChars {
			t.Errorf("caption line not wrapped (%d characters): %q", len([]rune(s)), s)
		}
	}
	if !d.hasText("Command: bash bench/run.sh -systems") {
		t.Error("no command in the caption")
	}
}

func TestCaptionSaysWhatDisturbedTheRun(t *testing.T) {
	r := fixture()
	b, err := Latency(r)
	if err != nil {
		t.Fatal(err)
	}
	if parseSVG(t, b).hasText("Disturbed run") {
		t.Error("an undisturbed run's caption says it was disturbed")
	}
	for i := range r.Tput {
		r.Tput[i].OtherCores = Num(0.5 + 0.1*float64(i%5))
	}
	r.Run.Skipped = []string{"round 3 handoff haproxy", "round 3 handoff l4-plain", "round 1 scale 2000 haproxy", "profile limit connlimit"}
	r.Run.Note = "A note from draw -note."
	r.Profiles = nil
	for _, chart := range []func(*Results) ([]byte, error){Latency, CPU} {
		b, err := chart(r)
		if err != nil {
			t.Fatal(err)
		}
		d := parseSVG(t, b)
		for _, want := range []string{
			"Disturbed run: other processes used 0.5–0.9 cores (median 0.7) during the measured windows;",
			"2 throughput, 1 scale, 1 CPU-profile run(s) were skipped for the time budget.",
			"A note from draw -note.",
		} {
			if !d.hasText(want) {
				t.Errorf("caption lacks %q: %q", want, d.texts)
			}
		}
	}
	b, err = CPU(r)
	if err != nil {
		t.Fatal(err)
	}
	if !parseSVG(t, b).hasText("No bar is split: this run's CPU-profile runs were skipped for the time budget.") {
		t.Error("CPU chart should say its profile runs were skipped")
	}
}

// bench/fair's chart: one CDF per system, in its colour, the weighted
// variant dashed; a system without samples is left out.
func TestFairWaits(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	sample := func(median float64) Quantiles {
		v := make([]int64, 500)
		for i := range v {
			v[i] = int64(median * math.Exp(rng.NormFloat64()*0.5))
		}
		slices.Sort(v)
		return Summarise(v)
	}
	c := FairChart{Title: "fair_share: waits", XLabel: "wait (ms, log scale)", Caption: []string{"Run: connlimit abc1234."},
		Lines: []FairLine{
			{Key: "fifo", Label: "one FIFO line", Waits: sample(230e6)},
			{Key: "fair", Label: "fair_share", Waits: sample(3e6)},
			{Key: "fair-w3", Label: "fair_share, H weight 3", Waits: sample(8e6)},
			{Key: "haproxy", Label: "HAProxy", Waits: sample(225e6)},
			{Key: "nonesuch", Label: "unknown", Waits: sample(1e6)},
		}}
	b, err := FairWaits(c)
	if err != nil {
		t.Fatal(err)
	}
	d := parseSVG(t, b)
	for _, want := range []string{"fair_share: waits", "wait (ms, log scale)", "one FIFO line", "fair_share, H weight 3", "HAProxy", "Run: connlimit abc1234."} {
		if !d.hasText(want) {
			t.Errorf("no text %q; texts: %q", want, d.texts)
		}
	}
	if d.hasText("unknown") {
		t.Error("a line of an unknown system is drawn")
	}
	for _, key := range []string{"fifo", "haproxy"} {
		if n := d.strokes[hex(systemOf(map[string]string{"fifo": "connlimit", "haproxy": "haproxy"}[key]))]; n < 2 {
			t.Errorf("%s: %d elements in its colour", key, n)
		}
	}
	if n := d.strokes["#009e73"]; n < 4 {
		t.Errorf("fair_share lines: %d elements in green, want 4 (two swatches, two lines)", n)
	}
	if _, err := FairWaits(FairChart{Lines: []FairLine{{Key: "fifo"}}}); !errors.Is(err, ErrNoData) {
		t.Errorf("no samples: %v, want ErrNoData", err)
	}
}

func TestFleetCost(t *testing.T) {
	c := FleetCostChart{Title: "Fleet zone: Redis CPU per connection", Caption: []string{"Run: connlimit abc1234."},
		Panels: []FleetCostPanel{
			{Name: "admitted at once", Goal: 15, Bars: []FleetCostBar{{Label: "before", US: 76.1}, {Label: "after", US: 43.6, After: true}}},
			{Name: "waited", Goal: 35, Bars: []FleetCostBar{{Label: "before", US: 156.5}, {Label: "after", US: 113.4, After: true}}},
		}}
	b, err := FleetCost(c)
	if err != nil {
		t.Fatal(err)
	}
	d := parseSVG(t, b)
	for _, want := range []string{"Fleet zone: Redis CPU per connection", "admitted at once", "waited", "76 µs", "44 µs", "113 µs", "goal", "Run: connlimit abc1234."} {
		if !d.hasText(want) {
			t.Errorf("no text %q; texts: %q", want, d.texts)
		}
	}
	if _, err := FleetCost(FleetCostChart{}); !errors.Is(err, ErrNoData) {
		t.Errorf("no bars: %v, want ErrNoData", err)
	}
}
