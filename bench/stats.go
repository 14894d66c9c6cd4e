package bench

import (
	"math"
	"slices"
)

// Stats summarises repeated measurements of one figure.
type Stats struct {
	N      int     `json:"n"`
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	P99    float64 `json:"p99"`
	Mean   float64 `json:"mean"`
}

// Summarize computes the statistics of xs; nil for no samples. The p99 is the
// nearest-rank percentile, so with fewer than 100 samples it is the maximum.
func Summarize(xs []float64) *Stats {
	if len(xs) == 0 {
		return nil
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	var sum float64
	for _, x := range s {
		sum += x
	}
	med := s[n/2]
	if n%2 == 0 {
		med = (s[n/2-1] + s[n/2]) / 2
	}
	rank := int(math.Ceil(0.99*float64(n))) - 1
	return &Stats{N: n, Median: med, Min: s[0], Max: s[n-1], P99: s[max(rank, 0)], Mean: sum / float64(n)}
}
