// Command draw writes the benchmark's SVG charts from the results that
// bench/e2e saved as JSON (-json; bash bench/run.sh passes it):
//
//	go run ./bench/charts/draw -in /tmp/connlimit-e2e-report.json -out /tmp/connlimit-e2e-report-charts
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/l4-connlimit/connlimit/bench/charts"
)

func main() {
	in := flag.String("in", "", "results JSON written by bench/e2e -json")
	out := flag.String("out", "", "directory for the SVG charts")
	note := flag.String("note", "", "a line added to every chart's caption, e.g. what disturbed the run")
	flag.Parse()
	if *in == "" || *out == "" || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "usage: draw -in results.json -out DIR")
		os.Exit(2)
	}
	r, err := charts.Load(*in)
	if err != nil {
		fmt.Fprintln(os.Stderr, "draw:", err)
		os.Exit(1)
	}
	if *note != "" {
		r.Run.Note = *note
	}
	files, err := charts.DrawAll(r, *out)
	for _, f := range files {
		fmt.Println(f)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "draw:", err)
		os.Exit(1)
	}
}
