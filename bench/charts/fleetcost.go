package charts

import (
	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// FleetCostChart is Redis' CPU per connection of a fleet zone, before and
// after a change, for connections admitted at once and connections that
// waited (bench/fleet's figures), each against its goal.
type FleetCostChart struct {
	Title   string
	Panels  []FleetCostPanel
	Caption []string
}

// FleetCostPanel is one kind of connection: a bar per build, and the goal.
type FleetCostPanel struct {
	Name string
	Bars []FleetCostBar
	Goal float64 // µs; 0: none
}

// FleetCostBar is one build's Redis CPU per connection (µs).
type FleetCostBar struct {
	Label string
	US    float64
	After bool // drawn in connection_limit's colour; before in grey
}

// FleetCost draws one panel per kind of connection, its goal as a dashed
// line.
func FleetCost(c FleetCostChart) ([]byte, error) {
	var panels []*plot.Plot
	top := 0.0
	for _, pn := range c.Panels {
		for _, b := range pn.Bars {
			top = max(top, b.US, pn.Goal)
		}
	}
	if top == 0 {
		return nil, ErrNoData
	}
	after, before := systemOf("connlimit").color, rgb(0x9aa4ae)
	for _, pn := range c.Panels {
		p := newPlot(pn.Name, "Redis CPU per connection (µs)", "")
		gridLines(p, true, false)
		p.X.Tick.Marker = niceTicks{}
		p.X.Min, p.X.Max = 0, top*1.18
		var names []string
		for i, b := range pn.Bars {
			sb := &stackedBar{y: float64(len(pn.Bars) - 1 - i), total: b.US}
			fill := before
			if b.After {
				fill = after
			}
			sb.add(b.US, fill, "", white)
			p.Add(sb)
			names = append(names, b.Label)
		}
		for i, j := 0, len(names)-1; i < j; i, j = i+1, j-1 {
			names[i], names[j] = names[j], names[i]
		}
		p.NominalY(names...)
		if pn.Goal > 0 {
			g, err := plotter.NewLine(plotter.XYs{{X: pn.Goal, Y: -0.5}, {X: pn.Goal, Y: float64(len(pn.Bars)) - 0.5}})
			if err != nil {
				return nil, err
			}
			g.LineStyle = draw.LineStyle{Color: rgb(0x009E73), Width: vg.Points(1.6), Dashes: []vg.Length{vg.Points(5), vg.Points(3)}}
			p.Add(g)
		}
		panels = append(panels, p)
	}
	legend := []legendEntry{
		{label: "before", color: before, box: true},
		{label: "after", color: after, box: true},
		{label: "goal", color: rgb(0x009E73), dashes: []vg.Length{vg.Points(5), vg.Points(3)}},
	}
	f := &figure{title: c.Title, legend: legend, panels: panels, stack: true, caption: c.Caption, w: 8 * vg.Inch, h: 4.4 * vg.Inch}
	return f.svg()
}
