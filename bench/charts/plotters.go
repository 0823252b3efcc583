package charts

import (
	"image/color"
	"math"
	"strconv"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// logTicks marks a log axis at 1, 2 and 5 times the powers of ten, with
// minor ticks at the other integers times them. It reaches out to the
// first such values outside the data, so that with Axis.AutoRescale the
// axis starts and ends on a label. Within about a decade every integer
// multiple is labelled; over many decades only the powers of ten are.
type logTicks struct{}

func (logTicks) Ticks(lo, hi float64) []plot.Tick {
	if lo <= 0 || hi <= lo {
		return nil
	}
	lo, hi = round125(lo, false), round125(hi, true)
	labelled := func(m float64) bool { return m == 1 || m == 2 || m == 5 }
	switch decades := math.Log10(hi / lo); {
	case decades <= 1.01:
		labelled = func(float64) bool { return true }
	case decades > 3.5:
		labelled = func(m float64) bool { return m == 1 }
	}
	var ts []plot.Tick
	for e := math.Floor(math.Log10(lo)); e <= math.Ceil(math.Log10(hi)); e++ {
		base := math.Pow(10, e)
		for m := 1.0; m <= 9; m++ {
			v := m * base
			if v < lo*(1-1e-9) || v > hi*(1+1e-9) {
				continue
			}
			t := plot.Tick{Value: v}
			if labelled(m) {
				t.Label = strconv.FormatFloat(v, 'g', 6, 64)
			}
			ts = append(ts, t)
		}
	}
	return ts
}

// round125 rounds v (> 0) down (or up) to 1, 2 or 5 times a power of ten.
func round125(v float64, up bool) float64 {
	base := math.Pow(10, math.Floor(math.Log10(v)))
	if up {
		for _, m := range []float64{1, 2, 5} {
			if m*base >= v*(1-1e-9) {
				return m * base
			}
		}
		return 10 * base
	}
	for _, m := range []float64{5, 2} {
		if m*base <= v*(1+1e-9) {
			return m * base
		}
	}
	return base
}

// fixedTicks labels exactly the given values.
func fixedTicks(vs ...float64) plot.ConstantTicks {
	var ts plot.ConstantTicks
	for _, v := range vs {
		ts = append(ts, plot.Tick{Value: v, Label: strconv.FormatFloat(v, 'g', -1, 64)})
	}
	return ts
}

// niceTicks labels a linear axis at about five round values (1, 2 or 5
// times a power of ten apart), thousands separated by a space (10 000).
type niceTicks struct{}

func (niceTicks) Ticks(lo, hi float64) []plot.Tick {
	if !(hi > lo) {
		return nil
	}
	raw := (hi - lo) / 5
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	step := 10 * mag
	for _, m := range []float64{1, 2, 5} {
		if m*mag >= raw {
			step = m * mag
			break
		}
	}
	decimals := max(0, int(-math.Floor(math.Log10(step)+1e-9)))
	var ts []plot.Tick
	for i := math.Ceil(lo/step - 1e-9); i*step <= hi*(1+1e-9); i++ {
		v := i * step
		if math.Abs(v) < step*1e-9 {
			v = 0 // not -0
		}
		label := strconv.FormatFloat(v, 'f', decimals, 64)
		if decimals == 0 {
			label = thousandsOf(int(math.Round(v)))
		}
		ts = append(ts, plot.Tick{Value: v, Label: label})
		// One minor tick between two labelled ones.
		if (i+0.5)*step <= hi {
			ts = append(ts, plot.Tick{Value: (i + 0.5) * step})
		}
	}
	return ts
}

// stackedBar is one horizontal bar of segments stacked from 0, each
// labelled inside with its value when it is wide enough, with its total
// at its end. The y axis is nominal: the bar is centred on y.
type stackedBar struct {
	y       float64
	total   float64
	segs    []segment
	outline color.Color
}

type segment struct {
	v         float64
	fill, ink color.Color
	label     string
}

func (b *stackedBar) add(v float64, fill color.Color, label string, ink color.Color) {
	if v <= 0 {
		return
	}
	b.segs = append(b.segs, segment{v: v, fill: fill, ink: ink, label: label})
}

const barWidth = 0.62 // of the space between two bars

func (b *stackedBar) Plot(c draw.Canvas, p *plot.Plot) {
	trX, trY := p.Transforms(&c)
	y0, y1 := trY(b.y-barWidth/2), trY(b.y+barWidth/2)
	ts := textStyle(fontSize-1, false, ink)
	ts.XAlign, ts.YAlign = draw.XCenter, draw.YCenter
	x := 0.0
	for _, s := range b.segs {
		xa, xb := trX(x), trX(x+s.v)
		c.FillPolygon(s.fill, []vg.Point{{X: xa, Y: y0}, {X: xb, Y: y0}, {X: xb, Y: y1}, {X: xa, Y: y1}})
		c.StrokeLine2(draw.LineStyle{Color: white, Width: vg.Points(1)}, xb, y0, xb, y1)
		if w, _, _ := ts.Handler.Box(s.label, ts.Font); xb-xa >= w+4 {
			st := ts
			st.Color = s.ink
			c.FillText(st, vg.Point{X: (xa + xb) / 2, Y: (y0 + y1) / 2}, s.label)
		}
		x += s.v
	}
	if b.outline != nil {
		xa, xb := trX(0), trX(x)
		c.StrokeLines(draw.LineStyle{Color: b.outline, Width: vg.Points(1.2)},
			[]vg.Point{{X: xa, Y: y0}, {X: xb, Y: y0}, {X: xb, Y: y1}, {X: xa, Y: y1}})
	}
	tt := textStyle(fontSize, true, ink)
	tt.XAlign, tt.YAlign = draw.XLeft, draw.YCenter
	c.FillText(tt, vg.Point{X: trX(b.total) + 4, Y: (y0 + y1) / 2}, fmtUS(b.total)+" µs")
}

func (b *stackedBar) DataRange() (xmin, xmax, ymin, ymax float64) {
	return 0, b.total, b.y - 0.5, b.y + 0.5
}
