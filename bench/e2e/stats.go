package main

import (
	"math"
	"slices"
	"time"
)

// pct is the nearest-rank percentile p (0..100) of sorted values.
func pct(sorted []int64, p float64) int64 {
	if len(sorted) == 0 {
		return -1
	}
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	i = max(0, min(i, len(sorted)-1))
	return sorted[i]
}

// median of the values that are not NaN; NaN if none.
func median(v []float64) float64 {
	var s []float64
	for _, x := range v {
		if !math.IsNaN(x) {
			s = append(s, x)
		}
	}
	if len(s) == 0 {
		return math.NaN()
	}
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func maxOf(v []float64) float64 {
	m := math.NaN()
	for _, x := range v {
		if !math.IsNaN(x) && (math.IsNaN(m) || x > m) {
			m = x
		}
	}
	return m
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
