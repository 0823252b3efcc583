package charts

import (
	"bytes"
	"fmt"
	"image/color"
	"math"
	"slices"
	"strings"

	xfont "golang.org/x/image/font"
	"gonum.org/v1/plot"
	"gonum.org/v1/plot/font"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/text"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgsvg"
)

// system is how the charts show one of bench/e2e's systems: the same
// colour in every chart.
type system struct {
	key    string // bench/e2e's name
	label  string
	short  string // under a bar
	color  color.RGBA
	dashes []vg.Length
}

// systems, in the order the charts list them. The colours are the
// Okabe–Ito palette (told apart with the common colour-vision
// deficiencies), all dark enough to read on white.
var systems = []system{
	{key: "connlimit", label: "connection_limit (release return)", short: "connection_limit", color: rgb(0x0072B2)},
	{key: "connlimit-cw", label: "connection_limit (release close_write)", short: "… close_write", color: rgb(0x009E73)},
	{key: "haproxy", label: "HAProxy (server maxconn, queue)", short: "HAProxy", color: rgb(0xD55E00)},
	{key: "l4-polling", label: "caddy-l4 max_connections (polling)", short: "l4 polling", color: rgb(0xCC79A7)},
	{key: "l4-plain", label: "caddy-l4, no limit, C clients", short: "l4, no limit", color: rgb(0xE69F00), dashes: []vg.Length{vg.Points(5), vg.Points(2)}},
	{key: "l4-plain-L", label: "caddy-l4, no limit, L clients (floor)", short: "l4, no limit, L cl.", color: rgb(0x555555), dashes: []vg.Length{vg.Points(2), vg.Points(2)}},
}

func systemOf(key string) system {
	for _, s := range systems {
		if s.key == key {
			return s
		}
	}
	return system{key: key, label: key, short: key, color: rgb(0x000000)}
}

func rgb(v uint32) color.RGBA {
	return color.RGBA{R: uint8(v >> 16), G: uint8(v >> 8), B: uint8(v), A: 0xff}
}

// mix returns c moved towards to by f (0: c, 1: to).
func mix(c, to color.RGBA, f float64) color.RGBA {
	m := func(a, b uint8) uint8 { return uint8(math.Round(float64(a) + f*(float64(b)-float64(a)))) }
	return color.RGBA{R: m(c.R, to.R), G: m(c.G, to.G), B: m(c.B, to.B), A: 0xff}
}

var (
	white = rgb(0xffffff)
	black = rgb(0x000000)
	ink   = rgb(0x1f2328) // text: GitHub's light-theme foreground
	muted = rgb(0x59636e) // captions
	grid  = rgb(0xd8dee4)
)

const fontSize = 10

// fnt is the charts' font: Liberation Sans, metric-compatible with Arial,
// which the SVG names as a fallback.
func fnt(size float64, bold bool) font.Font {
	f := font.Font{Typeface: "Liberation", Variant: "Sans", Size: font.Length(size)}
	if bold {
		f.Weight = xfont.WeightBold
	}
	return f
}

func textStyle(size float64, bold bool, c color.Color) text.Style {
	return text.Style{Color: c, Font: fnt(size, bold), Handler: plot.DefaultTextHandler}
}

// newPlot is a plot with the charts' fonts, dark text and a light grid.
func newPlot(title, xLabel, yLabel string) *plot.Plot {
	p := plot.New()
	p.BackgroundColor = white
	p.Title.Text = title
	p.Title.TextStyle = textStyle(fontSize+1, true, ink)
	p.Title.TextStyle.XAlign = draw.XCenter
	p.Title.TextStyle.YAlign = draw.YTop
	p.Title.Padding = vg.Points(6)
	for _, a := range []*plot.Axis{&p.X, &p.Y} {
		a.Label.TextStyle = textStyle(fontSize, false, ink)
		a.Label.TextStyle.XAlign = draw.XCenter
		a.Label.TextStyle.YAlign = draw.YBottom
		a.LineStyle.Color = ink
		a.Tick.LineStyle.Color = ink
		a.Tick.Length = vg.Points(4)
		xa, ya := a.Tick.Label.XAlign, a.Tick.Label.YAlign
		a.Tick.Label = textStyle(fontSize-1, false, ink)
		a.Tick.Label.XAlign, a.Tick.Label.YAlign = xa, ya
	}
	p.X.Label.Text = xLabel
	p.Y.Label.Text = yLabel
	p.Legend.TextStyle = textStyle(fontSize-1, false, ink)
	return p
}

// gridLines adds light grid lines at the major ticks, behind the data
// (add it first).
func gridLines(p *plot.Plot, vertical, horizontal bool) {
	g := plotter.NewGrid()
	g.Vertical = draw.LineStyle{Color: grid, Width: vg.Points(0.5)}
	g.Horizontal = g.Vertical
	if !vertical {
		g.Vertical.Color = nil
	}
	if !horizontal {
		g.Horizontal.Color = nil
	}
	p.Add(g)
}

// legendEntry is one entry of a figure's legend row.
type legendEntry struct {
	label  string
	color  color.RGBA
	dashes []vg.Length
	box    bool        // a filled swatch instead of a line
	edge   color.Color // the box's outline, if any
}

func systemEntries(keys []string) []legendEntry {
	var out []legendEntry
	for _, k := range keys {
		s := systemOf(k)
		out = append(out, legendEntry{label: s.label, color: s.color, dashes: s.dashes})
	}
	return out
}

// figure is one SVG: a title, a legend row, panels side by side and a
// caption naming the run.
type figure struct {
	title   string
	legend  []legendEntry
	panels  []*plot.Plot
	stack   bool     // panels one above the other (default: side by side)
	caption []string // lines under the panels
	w, h    vg.Length
}

const margin = 12 // points

// svg draws the figure and returns the SVG document.
func (f *figure) svg() ([]byte, error) {
	w, h := f.w, f.h
	if w == 0 {
		w = 10 * vg.Inch
	}
	if h == 0 {
		h = 4.6 * vg.Inch
	}
	c := vgsvg.New(w, h)
	dc := draw.New(c)
	// Opaque background: the chart reads the same on light and dark pages.
	dc.FillPolygon(white, []vg.Point{{X: 0, Y: 0}, {X: w, Y: 0}, {X: w, Y: h}, {X: 0, Y: h}})

	top := h - margin
	ts := textStyle(fontSize+3, true, ink)
	ts.YAlign = draw.YTop
	dc.FillText(ts, vg.Point{X: margin, Y: top}, f.title)
	top -= ts.Font.Size + 8

	if len(f.legend) > 0 {
		top = drawLegend(dc, f.legend, margin, w-margin, top)
		top -= 4
	}

	bottom := vg.Length(margin)
	cs := textStyle(fontSize-1, false, muted)
	cs.YAlign = draw.YBottom
	lines := wrap(cs, f.caption, w-2*margin)
	lead := cs.Font.Size + 3
	for i, l := range lines { // top to bottom, so the document reads in order
		dc.FillText(cs, vg.Point{X: margin, Y: bottom + vg.Length(len(lines)-1-i)*lead}, l)
	}
	bottom += vg.Length(len(lines)) * lead
	bottom += 4

	if len(f.panels) > 0 {
		area := draw.Canvas{Canvas: c, Rectangle: vg.Rectangle{
			Min: vg.Point{X: margin / 2, Y: bottom},
			Max: vg.Point{X: w - margin, Y: top},
		}}
		grid := [][]*plot.Plot{f.panels}
		tiles := draw.Tiles{Rows: 1, Cols: len(f.panels), PadX: vg.Points(18)}
		if f.stack {
			grid = nil
			for _, p := range f.panels {
				grid = append(grid, []*plot.Plot{p})
			}
			tiles = draw.Tiles{Rows: len(f.panels), Cols: 1, PadY: vg.Points(10)}
		}
		cvs := plot.Align(grid, tiles, area)
		for i, row := range grid {
			for j, p := range row {
				p.Draw(cvs[i][j])
			}
		}
	}
	var buf bytes.Buffer
	if _, err := c.WriteTo(&buf); err != nil {
		return nil, err
	}
	// vgsvg names only the font's own family; Arial has the same metrics.
	out := strings.ReplaceAll(buf.String(), "font-family:Liberation Sans;", "font-family:'Liberation Sans',Arial,Helvetica,sans-serif;")
	return []byte(out), nil
}

// wrap breaks lines that are wider than width at spaces.
func wrap(ts text.Style, lines []string, width vg.Length) []string {
	var out []string
	for _, l := range lines {
		cur := ""
		for _, word := range strings.Split(l, " ") {
			next := word
			if cur != "" {
				next = cur + " " + word
			}
			if w, _, _ := ts.Handler.Box(next, ts.Font); w > width && cur != "" {
				out = append(out, cur)
				next = word
			}
			cur = next
		}
		out = append(out, cur)
	}
	return out
}

// drawLegend draws the entries in rows from (left, top) and returns the
// y below them.
func drawLegend(dc draw.Canvas, entries []legendEntry, left, right, top vg.Length) vg.Length {
	ts := textStyle(fontSize, false, ink)
	ts.YAlign = draw.YCenter
	const swatch, gap, pad = 22, 6, 16
	rowH := ts.Font.Size + 6
	x, y := left, top-rowH/2
	for _, e := range entries {
		tw, _, _ := ts.Handler.Box(e.label, ts.Font)
		wEntry := swatch + gap + tw
		if x > left && x+wEntry > right {
			x = left
			y -= rowH
		}
		if e.box {
			box := []vg.Point{{X: x + 4, Y: y - 5}, {X: x + swatch - 4, Y: y - 5}, {X: x + swatch - 4, Y: y + 5}, {X: x + 4, Y: y + 5}}
			dc.FillPolygon(e.color, box)
			if e.edge != nil {
				dc.StrokeLines(draw.LineStyle{Color: e.edge, Width: vg.Points(1.2)}, append(box, box[0]))
			}
		} else {
			dc.StrokeLine2(draw.LineStyle{Color: e.color, Width: vg.Points(2.5), Dashes: e.dashes}, x, y, x+swatch, y)
		}
		dc.FillText(ts, vg.Point{X: x + swatch + gap, Y: y}, e.label)
		x += wEntry + pad
	}
	return y - rowH/2
}

// caption is the lines under a chart: what it shows, then the run (and
// what disturbed it, as far as the results say).
func caption(res *Results, what ...string) []string {
	r := res.Run
	var out []string
	if len(what) > 0 { // one paragraph, wrapped to the chart's width
		out = append(out, strings.Join(what, " "))
	}
	out = append(out, fmt.Sprintf("Run: connlimit %s, %s, on %s.", orDash(r.Commit), orDash(r.Date), orDash(r.Machine)))
	if r.Command != "" || r.Settings != "" {
		out = append(out, strings.TrimSpace(fmt.Sprintf("Command: %s (%s).", orDash(r.Command), orDash(r.Settings))))
	}
	if d := disturbance(res); d != "" {
		out = append(out, d)
	}
	if r.Note != "" {
		out = append(out, r.Note)
	}
	return out
}

// disturbance says how busy other processes kept the machine during the
// throughput runs' windows (when they used a fifth of a core or more, at
// the median) and which runs were skipped for the time budget.
func disturbance(res *Results) string {
	var other []float64
	for _, t := range res.Tput {
		if t.OtherCores != nil && t.System != "l4-polling" { // polling's own retries count as "other"
			other = append(other, *t.OtherCores)
		}
	}
	var parts []string
	if len(other) > 0 && median(other) >= 0.2 {
		parts = append(parts, fmt.Sprintf("other processes used %.1f–%.1f cores (median %.1f) during the measured windows",
			slices.Min(other), slices.Max(other), median(other)))
	}
	var tput, scale, prof int
	for _, s := range res.Run.Skipped {
		switch {
		case strings.HasPrefix(s, "profile "):
			prof++
		case strings.Contains(s, " scale "):
			scale++
		default:
			tput++
		}
	}
	var sk []string
	for _, c := range []struct {
		n    int
		what string
	}{{tput, "throughput"}, {scale, "scale"}, {prof, "CPU-profile"}} {
		if c.n > 0 {
			sk = append(sk, fmt.Sprintf("%d %s", c.n, c.what))
		}
	}
	if len(sk) > 0 {
		parts = append(parts, strings.Join(sk, ", ")+" run(s) were skipped for the time budget")
	}
	if len(parts) == 0 {
		return ""
	}
	s := strings.Join(parts, "; ")
	return "Disturbed run: " + s + "."
}

func orDash(s string) string {
	if strings.TrimSpace(s) == "" {
		return "–"
	}
	return s
}
