package charts

import (
	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// FairChart is what bench/fair draws: the waits of the light tenants,
// one CDF per system.
type FairChart struct {
	Title   string
	XLabel  string
	Lines   []FairLine
	Caption []string
}

// FairLine is one system's waits.
type FairLine struct {
	Key   string // fifo, fair, fair-w3 or haproxy: picks the colour
	Label string
	Waits Quantiles
}

// fairStyle is how each of bench/fair's systems is drawn: connection_limit
// in one line in the colour of connection_limit elsewhere, HAProxy in its
// own (dashed), fair_share in green, its weighted variant dashed.
func fairStyle(key string) (system, bool) {
	switch key {
	case "fifo":
		return systemOf("connlimit"), true
	case "haproxy": // dashed: in one FIFO line, it lies on connection_limit's
		st := systemOf("haproxy")
		st.dashes = []vg.Length{vg.Points(4), vg.Points(3)}
		return st, true
	case "fair":
		return system{color: rgb(0x009E73)}, true
	case "fair-w3":
		return system{color: rgb(0x009E73), dashes: []vg.Length{vg.Points(5), vg.Points(2)}}, true
	}
	return system{}, false
}

// FairWaits draws the CDFs of the light tenants' waits (log time axis).
func FairWaits(c FairChart) ([]byte, error) {
	p := newPlot("", c.XLabel, "fraction ≤ x")
	p.X.Scale = plot.LogScale{}
	p.X.Tick.Marker = logTicks{}
	p.X.AutoRescale = true
	p.Y.Min, p.Y.Max = 0, 1
	p.Y.Tick.Marker = fixedTicks(0, 0.25, 0.5, 0.75, 1)
	gridLines(p, true, true)
	var legend []legendEntry
	for _, l := range c.Lines {
		st, ok := fairStyle(l.Key)
		if !ok || l.Waits.N == 0 {
			continue
		}
		line, err := plotter.NewLine(cdfPoints([]Quantiles{l.Waits}, 200))
		if err != nil {
			return nil, err
		}
		line.LineStyle = draw.LineStyle{Color: st.color, Width: vg.Points(1.8), Dashes: st.dashes}
		p.Add(line)
		legend = append(legend, legendEntry{label: l.Label, color: st.color, dashes: st.dashes})
	}
	if len(legend) == 0 {
		return nil, ErrNoData
	}
	f := &figure{title: c.Title, legend: legend, panels: []*plot.Plot{p}, caption: c.Caption, w: 8 * vg.Inch, h: 4.8 * vg.Inch}
	return f.svg()
}
