// Command fleetcost draws BENCHMARKS.md's chart of Redis' CPU per
// connection of a fleet zone, before and after, from the figures of two
// bench/fleet reports (its "Redis CPU per connection" lines):
//
//	go run ./bench/charts/fleetcost -once 44,15 -waited 90,30 -goals 15,35 -out docs/bench/fleet-cost.svg
package main

import (
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/l4-connlimit/connlimit/bench/charts"
)

func main() {
	once := flag.String("once", "", "µs per connection admitted at once: before,after")
	waited := flag.String("waited", "", "µs per connection that waited: before,after")
	goals := flag.String("goals", "15,35", "the goals, at once and waited (µs)")
	before := flag.String("before", "before", "the before build's label")
	after := flag.String("after", "after", "the after build's label")
	note := flag.String("note", "", "a caption line: the run, the command")
	out := flag.String("out", "", "the SVG file to write")
	flag.Parse()
	pair := func(name, v string) [2]float64 {
		var r [2]float64
		f := strings.Split(v, ",")
		if len(f) != 2 {
			fail(fmt.Errorf("-%s: want two numbers a,b, got %q", name, v))
		}
		for i, s := range f {
			n, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
			if err != nil || n < 0 {
				fail(fmt.Errorf("-%s: %q is not a number of µs", name, s))
			}
			r[i] = n
		}
		return r
	}
	if *out == "" || flag.NArg() > 0 {
		fail(fmt.Errorf("usage: fleetcost -once B,A -waited B,A [-goals O,W] -out FILE.svg"))
	}
	o, w, g := pair("once", *once), pair("waited", *waited), pair("goals", *goals)
	panel := func(name string, v [2]float64, goal float64) charts.FleetCostPanel {
		return charts.FleetCostPanel{Name: name, Goal: goal, Bars: []charts.FleetCostBar{
			{Label: *before, US: v[0]}, {Label: *after, US: v[1], After: true}}}
	}
	c := charts.FleetCostChart{
		Title: "Fleet zone: Redis CPU per connection, through Caddy",
		Panels: []charts.FleetCostPanel{
			panel("admitted at once", o, g[0]),
			panel("waited (limit-bound)", w, g[1]),
		},
		Caption: []string{"Bar: redis-server's CPU (utime+stime) over a window ÷ the connections served in it, less the idle fleet's (bench/fleet): " +
			"at once, its capacity run through Caddy (24 clients, zone open); waited, the limit-bound run's median of 5 rounds (C=500, max 50)."},
	}
	if *note != "" {
		c.Caption = append(c.Caption, *note)
	}
	b, err := charts.FleetCost(c)
	if err != nil {
		fail(err)
	}
	if err := os.WriteFile(*out, b, 0o644); err != nil {
		fail(err)
	}
	fmt.Println(*out)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "fleetcost:", err)
	os.Exit(2)
}
