// Package bench is twill's benchmark harness (`make bench`): it measures
// twilld's convergence and change latency against a real etcd, the CNI
// plugin against the reference plugins it delegates to, the datapath against
// the underlay it runs over, and twilld's idle cost, all in network
// namespaces it creates under a prefix of its own and always removes.
//
// Every figure is printed beside its target from issue 6 and beside a limit
// measured in the same run (iproute2's batch mode, bridge + host-local alone,
// host-to-host traffic), because absolute times on a shared machine drift
// while ratios to work done at the same moment hold up.
//
// How each figure is taken:
//
//   - Kernel state is followed through rtnetlink notifications
//     (kernelWatch), not by dumping tables in a loop, so measuring costs
//     twilld nothing and the time of the last entry is known to the
//     notification; the tables are dumped once afterwards to check the
//     count.
//   - twilld is forked on a thread inside the host namespace, so its start
//     time is its own, without `ip netns exec` in front.
//   - etcd is bin/tools/etcd in the underlay namespace with its metrics on a
//     port of their own (section 3 adds bin/tools/kube-apiserver beside it);
//     the harness talks to them (and to twilld's /metrics) with sockets made
//     inside the namespaces, so no traffic leaves them.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/twillnet/twill/internal/daemon/masq"
	"github.com/twillnet/twill/internal/tools/lab"
)

// Config is what the harness is told on its command line.
type Config struct {
	RepoRoot string
	BinDir   string // twilld, twillctl, twill
	Twilld   string // the twilld of figures 1, 2, 3 and 6 (default BinDir/twilld), for A/B runs
	ToolsDir string // etcd, kube-apiserver
	CNIDir   string // bridge, host-local, loopback, portmap
	Out      string // report.json
	Prefix   string // namespace name prefix
	Go       string // the go command, for the testing.B benchmarks
	Keep     bool   // keep the work folder (logs) after the run
	// PerfDir, when set, gets a system-wide `perf record` of the last
	// cold start at the largest size and of the first change series, with
	// a report of twilld's hottest symbols. Figures taken under perf are
	// slower than without.
	PerfDir string
	// TwilldEnv is added to twilld's environment (e.g. GODEBUG=gctrace=1
	// or GOGC=50 when looking into its memory).
	TwilldEnv []string

	Sections []string // of "1", "2", "3", "4", "5", "6", "go"

	Sizes          []int // peers for figure 1
	Runs           int   // cold starts per size
	DualStack      bool  // figure 1 also measures the largest size with dual-stack peers
	WireGuard      bool  // figures 1 and 5 also measure the wireguard backend
	ChangePeers    int   // peers present for figure 2
	ChangeSamples  int   // samples per kind of change
	MasqSamples    int   // change samples with --ip-masq per rules mode, and Ensure samples per mode and kind (0: skip)
	CNIPods        int
	CNIParallel    int
	CNIRounds      int
	KubeNodes      int // realistic peer Nodes for section 3
	KubeSamples    int // Nodes added (and removed) one by one in section 3
	SteadyPeers    int
	SteadyDuration time.Duration
	// SteadyMasq is the rules mode of twilld's --ip-masq in figure 6
	// (masq.ModeIPTables or ModeNFTables), "" to run it without --ip-masq.
	SteadyMasq   masq.Mode
	IperfSeconds int
	IperfRepeats int
	PingCount    int
	// ResyncWindow is how long figure 1 watches twilld at rest after the
	// last start at the largest size (vxlan, and wireguard), for its resync
	// passes and idle CPU (0: not).
	ResyncWindow time.Duration
	// KubeModes are the --kube-mode values section 3 measures, in order
	// ("annotations", "nodenetwork").
	KubeModes []string
	// KubeChurn is how long section 3 writes the peer Nodes' status as
	// kubelets do (KubeNodes per 5 minutes), and how long it watches twilld
	// without writes beside it, in each mode (0: not).
	KubeChurn time.Duration
}

// Harness runs the sections and collects the report.
type Harness struct {
	cfg    Config
	work   string
	log    io.Writer
	report *Report
	secs   map[string]*Section
}

// sectionTitles are the items of issue 6 the harness measures, in report order.
var sectionTitles = []struct{ id, title string }{
	{"1", "Convergence, etcd mode: cold start of twilld with N peer leases in etcd"},
	{"2", "Change latency with 5,000 peers: etcd write returned -> kernel matches"},
	{"3", "Kubernetes mode: twilld --kube-subnet-mgr with realistic Nodes in a real kube-apiserver, --kube-mode annotations and nodenetwork"},
	{"4", "CNI: twill -> bridge + host-local vs bridge + host-local alone, same config"},
	{"5", "Datapath, 2 lab hosts: pod to pod across hosts vs host to host on the underlay"},
	{"6", "Steady state: twilld idle with 1,000 peers"},
	{"go", "Go testing.B benchmarks of the hot paths"},
}

// Run measures every selected section and returns the report; a section
// that fails records its error and the others still run.
func Run(ctx context.Context, cfg Config, log io.Writer) (*Report, error) {
	if err := preflight(cfg); err != nil {
		return nil, err
	}
	h := &Harness{cfg: cfg, log: log, secs: map[string]*Section{}}
	h.report = &Report{Started: time.Now(), Command: strings.Join(os.Args, " "), Machine: describeMachine(), Quoted: flannelQuoted,
		Build: describeBuild(ctx, cfg)}
	for _, s := range sectionTitles {
		if slices.Contains(cfg.Sections, s.id) {
			sec := &Section{ID: s.id, Title: s.title}
			h.secs[s.id] = sec
			h.report.Sections = append(h.report.Sections, sec)
		}
	}
	if err := h.removeNamespaces(ctx, "left by an earlier run"); err != nil {
		return nil, err
	}
	defer h.removeNamespaces(context.Background(), "")
	work, err := os.MkdirTemp("", "twbench-")
	if err != nil {
		return nil, err
	}
	h.work = work
	if cfg.Keep {
		h.say("work folder (kept): %s", work)
	} else {
		defer os.RemoveAll(work)
	}

	if h.want("1") || h.want("2") || h.want("6") {
		h.runEtcdMode(ctx)
	}
	if h.want("3") {
		h.timed(ctx, "3", h.runKubeMode)
	}
	if h.want("4") {
		h.timed(ctx, "4", h.runCNI)
	}
	if h.want("5") {
		h.timed(ctx, "5", h.runDatapath)
	}
	if h.want("go") {
		h.timed(ctx, "go", h.runGoBench)
	}
	h.report.Finished = time.Now()
	h.report.Machine.LoadAvgEnd = loadAvg()
	for _, s := range h.report.Sections {
		for _, f := range s.Figures {
			f.finish()
		}
	}
	return h.report, ctx.Err()
}

func (h *Harness) want(id string) bool { return h.secs[id] != nil }

func (h *Harness) say(format string, args ...any) {
	fmt.Fprintf(h.log, "[%s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// timed runs one section, recording its duration, load and error.
func (h *Harness) timed(ctx context.Context, id string, f func(context.Context, *Section) error) {
	sec := h.secs[id]
	if sec == nil || ctx.Err() != nil {
		return
	}
	h.say("section %s: %s", id, sec.Title)
	sec.LoadAvg = loadAvg()
	start := time.Now()
	err := f(ctx, sec)
	sec.Seconds += time.Since(start).Seconds()
	if err != nil {
		sec.Error = err.Error()
		h.say("section %s failed: %v", id, err)
	}
}

func (h *Harness) add(sec *Section, f *Figure) *Figure {
	sec.Figures = append(sec.Figures, f)
	return f
}

func (h *Harness) note(sec *Section, format string, args ...any) {
	sec.Notes = append(sec.Notes, fmt.Sprintf(format, args...))
}

// removeNamespaces deletes every namespace under the harness's prefix.
func (h *Harness) removeNamespaces(ctx context.Context, why string) error {
	names, err := lab.ListNS(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, n := range names {
		if strings.HasPrefix(n, h.cfg.Prefix) {
			if why != "" {
				h.say("removing namespace %s (%s)", n, why)
			}
			if _, err := ipCmd(ctx, "netns", "del", n); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

func preflight(cfg Config) error {
	if os.Geteuid() != 0 {
		return errors.New("the benchmarks need root: they create network namespaces")
	}
	if cfg.Prefix == "" || strings.ContainsAny(cfg.Prefix, "/ ") {
		return fmt.Errorf("namespace prefix %q: want a plain non-empty name", cfg.Prefix)
	}
	var missing []string
	for _, f := range []string{
		filepath.Join(cfg.BinDir, "twilld"), filepath.Join(cfg.BinDir, "twillctl"), filepath.Join(cfg.BinDir, "twill"),
		filepath.Join(cfg.ToolsDir, "etcd"),
		filepath.Join(cfg.CNIDir, "bridge"), filepath.Join(cfg.CNIDir, "host-local"),
		filepath.Join(cfg.CNIDir, "loopback"), filepath.Join(cfg.CNIDir, "portmap"),
	} {
		if _, err := os.Stat(f); err != nil {
			missing = append(missing, f)
		}
	}
	if slices.Contains(cfg.Sections, "3") {
		if _, err := os.Stat(filepath.Join(cfg.ToolsDir, "kube-apiserver")); err != nil {
			missing = append(missing, filepath.Join(cfg.ToolsDir, "kube-apiserver")+" (section 3; `make tools`)")
		}
	}
	for _, p := range []string{"ip", "bridge", "ping", "iperf3"} {
		if _, err := exec.LookPath(p); err != nil {
			missing = append(missing, p+" (in PATH)")
		}
	}
	if cfg.WireGuard && (slices.Contains(cfg.Sections, "1") || slices.Contains(cfg.Sections, "5")) {
		// wg for the limit and the checks; wireguard-go for kernels
		// without WireGuard (twilld runs it too).
		for _, p := range []string{"wg", "wireguard-go"} {
			if _, err := exec.LookPath(p); err != nil {
				missing = append(missing, p+" (in PATH, for the wireguard rows of figures 1 and 5; or --wireguard=false)")
			}
		}
	}
	if cfg.Twilld != "" {
		if _, err := os.Stat(cfg.Twilld); err != nil {
			missing = append(missing, cfg.Twilld)
		}
	}
	if cfg.PerfDir != "" {
		if _, err := exec.LookPath("perf"); err != nil {
			missing = append(missing, "perf (in PATH, for --perf)")
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing: %s; run `make deps build cni-plugins bin/tools/etcd`", strings.Join(missing, ", "))
	}
	return nil
}

// twilld is the daemon binary of the etcd-mode figures.
func (h *Harness) twilld() string {
	if h.cfg.Twilld != "" {
		return h.cfg.Twilld
	}
	return filepath.Join(h.cfg.BinDir, "twilld")
}

// describeBuild records what was measured: the checkout's revision (with
// -dirty for uncommitted changes) and the binaries' sizes.
func describeBuild(ctx context.Context, cfg Config) Build {
	b := Build{}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(cctx, "git", "describe", "--always", "--dirty")
	cmd.Dir = cfg.RepoRoot
	if out, err := cmd.Output(); err == nil {
		b.Revision = strings.TrimSpace(string(out))
	}
	tw := cfg.Twilld
	if tw == "" {
		tw = filepath.Join(cfg.BinDir, "twilld")
	}
	b.Twilld = tw
	if fi, err := os.Stat(tw); err == nil {
		b.TwilldMiB = float64(fi.Size()) / (1 << 20)
	}
	if fi, err := os.Stat(filepath.Join(cfg.BinDir, "twill")); err == nil {
		b.PluginMiB = float64(fi.Size()) / (1 << 20)
	}
	return b
}

// seconds and millis convert durations to figure values.
func seconds(ds []time.Duration) []float64 {
	out := make([]float64, len(ds))
	for i, d := range ds {
		out[i] = d.Seconds()
	}
	return out
}

func millis(ds []time.Duration) []float64 {
	out := make([]float64, len(ds))
	for i, d := range ds {
		out[i] = float64(d) / float64(time.Millisecond)
	}
	return out
}
