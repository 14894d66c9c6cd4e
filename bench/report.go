package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"text/tabwriter"
	"time"
)

// Report is everything one run of the harness measured. Its JSON form is
// bench/out/report.json.
type Report struct {
	Started  time.Time  `json:"started"`
	Finished time.Time  `json:"finished"`
	Command  string     `json:"command"`
	Machine  Machine    `json:"machine"`
	Build    Build      `json:"build"`
	Sections []*Section `json:"sections"`
	// Quoted are figures from elsewhere (flannel's, from issue 6), shown
	// for reference: they were not measured by this run.
	Quoted []Quoted `json:"quoted"`
}

// Machine describes where the figures were measured.
type Machine struct {
	CPU          string `json:"cpu"`
	Cores        int    `json:"cores"`
	Kernel       string `json:"kernel"`
	MemTotalMiB  int    `json:"memTotalMiB"`
	GoVersion    string `json:"goVersion"`
	LoadAvgStart string `json:"loadAvgStart"`
	LoadAvgEnd   string `json:"loadAvgEnd"`
}

// Build is what was measured.
type Build struct {
	Revision  string  `json:"revision"` // git describe --always --dirty
	Twilld    string  `json:"twilld"`
	TwilldMiB float64 `json:"twilldMiB"`
	PluginMiB float64 `json:"pluginMiB"` // the twill CNI plugin
}

// Section is one numbered item of issue 6.
type Section struct {
	ID      string    `json:"id"`
	Title   string    `json:"title"`
	Figures []*Figure `json:"figures"`
	Notes   []string  `json:"notes,omitempty"`
	Error   string    `json:"error,omitempty"`
	Seconds float64   `json:"seconds"`
	LoadAvg string    `json:"loadAvg"` // at the start of the section
}

// Figure is one measured quantity with its limit and target.
type Figure struct {
	Name  string   `json:"name"`
	Unit  string   `json:"unit"`
	Stats *Stats   `json:"stats,omitempty"` // repeated measurements
	Value *float64 `json:"value,omitempty"` // a single measurement
	// Limit is the same work done by the kernel's own tools, or by the
	// reference plugins alone, measured in the same run.
	Limit *Limit `json:"limit,omitempty"`
	// Ratio is our median over the limit's median.
	Ratio   *float64 `json:"ratio,omitempty"`
	Targets []Target `json:"targets,omitempty"`
	// Pass is set when the figure has targets: true when it meets them all.
	Pass *bool  `json:"pass,omitempty"`
	Note string `json:"note,omitempty"`
}

// Limit is the reference a figure is compared with.
type Limit struct {
	Name  string `json:"name"`
	Stats *Stats `json:"stats"`
}

// Target is the goal a figure is judged by: On (median, p99, max, value or
// ratio) Op (<= or >=) Value.
type Target struct {
	On    string  `json:"on"`
	Op    string  `json:"op"`
	Value float64 `json:"value"`
}

func (t Target) String() string {
	v := trimFloat(t.Value)
	if t.On == "ratio" {
		return fmt.Sprintf("ratio %s %sx", t.Op, v)
	}
	return fmt.Sprintf("%s %s %s", t.On, t.Op, v)
}

func (t Target) met(v float64) bool {
	switch t.Op {
	case ">=":
		return v >= t.Value
	case "<":
		return v < t.Value
	case ">":
		return v > t.Value
	default:
		return v <= t.Value
	}
}

// Quoted is a published figure shown beside ours, not measured here.
type Quoted struct {
	What   string `json:"what"`
	Value  string `json:"value"`
	Source string `json:"source"`
}

var flannelQuoted = []Quoted{
	{"flannel v0.28.9 etcd mode, cold start to 5,000 peers programmed", "6.6 s", "issue 6 (quoted, not measured here)"},
	{"iproute2 batch mode, the same 15,000 entries (issue's machine)", "0.67 s", "issue 6 (quoted, not measured here)"},
	{"flannel RSS", "60-66 MiB", "issue 6 (quoted, not measured here)"},
	{"flannel CNI ADD vs bridge + host-local alone", "1.30x", "issue 6 (quoted, not measured here)"},
}

// central is the figure's typical value: the median, or the single value.
func (f *Figure) central() (float64, bool) {
	switch {
	case f.Stats != nil:
		return f.Stats.Median, true
	case f.Value != nil:
		return *f.Value, true
	}
	return 0, false
}

// finish computes the ratio to the limit and judges the target.
func (f *Figure) finish() {
	if f.Limit != nil && f.Limit.Stats != nil && f.Ratio == nil {
		if c, ok := f.central(); ok && f.Limit.Stats.Median > 0 {
			r := c / f.Limit.Stats.Median
			f.Ratio = &r
		}
	}
	if len(f.Targets) == 0 {
		return
	}
	pass := true
	for _, t := range f.Targets {
		v, ok := f.quantity(t.On)
		if !ok || math.IsNaN(v) {
			return // not measured: neither pass nor miss
		}
		if !t.met(v) {
			pass = false
		}
	}
	f.Pass = &pass
}

// quantity is the value a target is judged on.
func (f *Figure) quantity(on string) (float64, bool) {
	switch on {
	case "median", "value":
		return f.central()
	case "p99":
		if f.Stats != nil {
			return f.Stats.P99, true
		}
	case "max":
		if f.Stats != nil {
			return f.Stats.Max, true
		}
		if f.Value != nil {
			return *f.Value, true
		}
	case "ratio":
		if f.Ratio != nil {
			return *f.Ratio, true
		}
	}
	return 0, false
}

func newValue(v float64) *float64 { return &v }

// Print writes the report as tables, one per section.
func (r *Report) Print(w io.Writer) {
	fmt.Fprintf(w, "\ntwill benchmark report — %s\n", r.Started.Format(time.RFC3339))
	fmt.Fprintf(w, "machine: %s, %d cores, kernel %s, %d MiB, %s; load average %s at start, %s at end\n",
		r.Machine.CPU, r.Machine.Cores, r.Machine.Kernel, r.Machine.MemTotalMiB, r.Machine.GoVersion, r.Machine.LoadAvgStart, r.Machine.LoadAvgEnd)
	fmt.Fprintf(w, "build: %s; twilld %.1f MiB (%s), CNI plugin twill %.1f MiB\n", r.Build.Revision, r.Build.TwilldMiB, r.Build.Twilld, r.Build.PluginMiB)
	fmt.Fprintf(w, "command: %s\n", r.Command)
	for _, s := range r.Sections {
		fmt.Fprintf(w, "\n== %s. %s (%.0f s, load average %s)\n", s.ID, s.Title, s.Seconds, s.LoadAvg)
		if len(s.Figures) > 0 {
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "FIGURE\tUNIT\tMEDIAN\tMIN\tMAX\tP99\tN\tLIMIT IN THIS RUN (median)\tRATIO\tTARGET\tRESULT")
			for _, f := range s.Figures {
				fmt.Fprintln(tw, f.row())
			}
			tw.Flush()
		}
		for _, n := range s.Notes {
			fmt.Fprintf(w, "  - %s\n", n)
		}
		if s.Error != "" {
			fmt.Fprintf(w, "  ERROR: %s\n", s.Error)
		}
	}
	var met, missed []string
	for _, s := range r.Sections {
		for _, f := range s.Figures {
			if f.Pass == nil {
				continue
			}
			line := fmt.Sprintf("%s. %s", s.ID, f.Name)
			if *f.Pass {
				met = append(met, line)
			} else {
				missed = append(missed, line)
			}
		}
	}
	fmt.Fprintf(w, "\nTargets: %d met, %d missed\n", len(met), len(missed))
	for _, m := range missed {
		fmt.Fprintf(w, "  MISS %s\n", m)
	}
	fmt.Fprintf(w, "\nReference points QUOTED from issue 6 (flannel, measured elsewhere; not measured by this run):\n")
	for _, q := range r.Quoted {
		fmt.Fprintf(w, "  - %s: %s\n", q.What, q.Value)
	}
}

func (f *Figure) row() string {
	cells := []string{f.Name, f.Unit}
	switch {
	case f.Stats != nil:
		s := f.Stats
		cells = append(cells, num(s.Median, f.Unit), num(s.Min, f.Unit), num(s.Max, f.Unit), num(s.P99, f.Unit), fmt.Sprint(s.N))
	case f.Value != nil:
		cells = append(cells, num(*f.Value, f.Unit), "", "", "", "1")
	default:
		cells = append(cells, "n/a", "", "", "", "0")
	}
	lim := ""
	if f.Limit != nil && f.Limit.Stats != nil {
		lim = fmt.Sprintf("%s: %s", f.Limit.Name, num(f.Limit.Stats.Median, f.Unit))
	}
	ratio := ""
	if f.Ratio != nil {
		ratio = fmt.Sprintf("%.3fx", *f.Ratio)
		if *f.Ratio >= 10 {
			ratio = fmt.Sprintf("%.0fx", *f.Ratio)
		}
	}
	res := ""
	if f.Pass != nil {
		res = "MISS"
		if *f.Pass {
			res = "ok"
		}
	}
	if f.Note != "" {
		res += " (" + f.Note + ")"
	}
	var targets []string
	for _, t := range f.Targets {
		targets = append(targets, t.String())
	}
	cells = append(cells, lim, ratio, strings.Join(targets, "; "), res)
	return strings.Join(cells, "\t")
}

func num(v float64, unit string) string {
	switch unit {
	case "s":
		return fmt.Sprintf("%.3f", v)
	case "ms":
		if v >= 100 {
			return fmt.Sprintf("%.0f", v)
		}
		return fmt.Sprintf("%.2f", v)
	case "count", "req/min", "B/op", "allocs/op":
		return fmt.Sprintf("%.0f", v)
	}
	return trimFloat(v)
}

func trimFloat(v float64) string {
	switch a := math.Abs(v); {
	case a == 0:
		return "0"
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	case a >= 0.1:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.3g", v)
	}
}

// WriteJSON writes the report to path, creating its folder.
func (r *Report) WriteJSON(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(data, '\n'), 0o644)
}

// describeMachine reads the CPU model, core count, kernel and memory.
func describeMachine() Machine {
	m := Machine{Cores: runtime.NumCPU(), GoVersion: runtime.Version(), LoadAvgStart: loadAvg()}
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(data))
	}
	if data, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			var kb int
			if n, _ := fmt.Sscanf(line, "MemTotal: %d kB", &kb); n == 1 {
				m.MemTotalMiB = kb / 1024
			}
		}
	}
	return m
}

// loadAvg is the 1-, 5- and 15-minute load average: other work on the
// machine skews absolute times, which is why every figure has a limit
// measured beside it.
func loadAvg() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}
