// twillbench is twill's benchmark harness: `make bench` runs it as root. It
// prints a report and writes it as JSON (bench/out/report.json by default).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/twillnet/twill/bench"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "twillbench:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("twillbench", flag.ContinueOnError)
	c := bench.Config{}
	var sections, sizes string
	quick := fs.Bool("quick", false, "a short run for trying the harness: fewer sizes, runs, samples and seconds (overrides those flags)")
	fs.StringVar(&c.RepoRoot, "repo", ".", "the twill checkout (for bin/ and the Go benchmarks)")
	fs.StringVar(&c.Out, "out", "bench/out/report.json", "where to write the JSON report")
	fs.StringVar(&c.Prefix, "prefix", "twbench-", "name prefix of every network namespace the harness makes")
	fs.StringVar(&c.Go, "go", "go", "the go command, for the testing.B benchmarks")
	fs.StringVar(&c.Twilld, "twilld", "", "twilld binary for figures 1, 2, 3 and 6 (default: bin/twilld), to compare builds")
	fs.StringVar(&c.PerfDir, "perf", "", "folder for perf recordings of a 5,000-peer cold start and change series (slows those figures)")
	fs.BoolVar(&c.Keep, "keep", false, "keep the work folder (daemon logs, etcd data) after the run")
	fs.Func("twilld-env", "NAME=VALUE added to twilld's environment, e.g. GODEBUG=gctrace=1 (repeatable)", func(s string) error {
		if !strings.Contains(s, "=") {
			return fmt.Errorf("%q is not NAME=VALUE", s)
		}
		c.TwilldEnv = append(c.TwilldEnv, s)
		return nil
	})
	fs.StringVar(&sections, "sections", "1,2,3,4,5,6,go", "sections to run: 1 convergence, 2 change latency, 3 Kubernetes mode, 4 CNI, 5 datapath, 6 steady state, go testing.B")
	fs.StringVar(&sizes, "sizes", "100,1000,5000", "peer counts for the convergence figure")
	fs.IntVar(&c.Runs, "runs", 7, "cold starts per size (and batch-limit runs)")
	fs.BoolVar(&c.DualStack, "dual-stack", true, "convergence figure: the largest size again with dual-stack peers (6 entries per peer)")
	fs.BoolVar(&c.WireGuard, "wireguard", true, "convergence figure: the largest size again with the wireguard backend; datapath figure: a second lab with it (needs wg, and wireguard-go where the kernel has no WireGuard)")
	fs.DurationVar(&c.ResyncWindow, "resync-window", 30*time.Second, "convergence figure: watch twilld at rest this long after the last start at the largest size (vxlan, wireguard) for its resync passes and idle CPU (0: skip)")
	fs.IntVar(&c.ChangePeers, "change-peers", 5000, "peers present while measuring change latency")
	fs.IntVar(&c.ChangeSamples, "change-samples", 50, "samples per kind of change")
	fs.IntVar(&c.MasqSamples, "masq-samples", 20, "change latency figure: samples with --ip-masq in each rules mode (iptables, nftables), and of each kind of rules check (0: skip)")
	fs.IntVar(&c.KubeNodes, "kube-nodes", 5000, "realistic peer Nodes in the kube-apiserver for the Kubernetes-mode figures")
	fs.IntVar(&c.KubeSamples, "kube-samples", 20, "Nodes added and removed one by one in the Kubernetes-mode figures (0: skip)")
	kubeModes := fs.String("kube-modes", "annotations,nodenetwork", "Kubernetes-mode figures: twilld's --kube-mode values to measure, in order")
	fs.DurationVar(&c.KubeChurn, "kube-churn", 60*time.Second, "Kubernetes-mode figures: write the peer Nodes' status as kubelets do (--kube-nodes per 5 min) for this long, and watch twilld as long without writes, in each mode (0: skip)")
	fs.IntVar(&c.CNIPods, "cni-pods", 100, "pods per CNI phase")
	fs.IntVar(&c.CNIParallel, "cni-parallel", 10, "concurrent CNI operations in the parallel phases")
	fs.IntVar(&c.CNIRounds, "cni-rounds", 4, "rounds of the CNI comparison (sides alternate)")
	fs.IntVar(&c.SteadyPeers, "steady-peers", 1000, "peers for the steady-state figure")
	fs.DurationVar(&c.SteadyDuration, "steady", 60*time.Second, "steady-state window")
	steadyMasq := fs.String("steady-masq", "nftables", "steady-state figure: twilld with --ip-masq in this rules mode (iptables or nftables), or off")
	fs.IntVar(&c.IperfSeconds, "iperf-time", 5, "seconds per iperf3 run")
	fs.IntVar(&c.IperfRepeats, "iperf-repeats", 5, "iperf3 runs per case")
	fs.IntVar(&c.PingCount, "ping-count", 200, "echo requests per RTT figure")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	if *quick {
		sizes = "100,1000"
		c.Runs, c.ChangePeers, c.ChangeSamples, c.MasqSamples = 2, 1000, 10, 5
		c.KubeNodes, c.KubeSamples, c.KubeChurn = 500, 5, 20*time.Second
		c.CNIPods, c.CNIRounds, c.SteadyDuration = 20, 1, 10*time.Second
		c.IperfSeconds, c.IperfRepeats, c.PingCount = 2, 1, 50
		c.ResyncWindow = 12 * time.Second
	}
	for _, s := range strings.Split(sizes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 || n > 65000 {
			return fmt.Errorf("--sizes: %q is not a peer count (1 to 65000)", s)
		}
		c.Sizes = append(c.Sizes, n)
	}
	if c.KubeNodes < 1 || c.KubeNodes > 65000 || c.KubeSamples < 0 || c.KubeSamples > 65000 {
		return fmt.Errorf("--kube-nodes %d, --kube-samples %d: want 1 to 65000 Nodes and 0 to 65000 samples", c.KubeNodes, c.KubeSamples)
	}
	for _, m := range strings.Split(*kubeModes, ",") {
		switch m = strings.TrimSpace(m); m {
		case "annotations", "nodenetwork":
			c.KubeModes = append(c.KubeModes, m)
		default:
			return fmt.Errorf("--kube-modes: %q is not annotations or nodenetwork", m)
		}
	}
	if c.KubeChurn < 0 {
		return fmt.Errorf("--kube-churn %s: want 0 or more", c.KubeChurn)
	}
	steady, err := bench.ParseRulesMode(*steadyMasq)
	if err != nil {
		return fmt.Errorf("--steady-masq: %w", err)
	}
	c.SteadyMasq = steady
	c.Sections = strings.Split(sections, ",")
	root, err := filepath.Abs(c.RepoRoot)
	if err != nil {
		return err
	}
	c.RepoRoot = root
	c.BinDir = filepath.Join(root, "bin")
	if c.Twilld != "" {
		if c.Twilld, err = filepath.Abs(c.Twilld); err != nil {
			return err
		}
	}
	if c.PerfDir != "" {
		if c.PerfDir, err = filepath.Abs(c.PerfDir); err != nil {
			return err
		}
	}
	c.ToolsDir = filepath.Join(root, "bin", "tools")
	c.CNIDir = filepath.Join(root, "bin", "cni")
	if !filepath.IsAbs(c.Out) {
		c.Out = filepath.Join(root, c.Out)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	report, err := bench.Run(ctx, c, os.Stderr)
	if report != nil {
		report.Print(os.Stdout)
		if werr := report.WriteJSON(c.Out); werr != nil {
			return errors.Join(err, werr)
		}
		fmt.Printf("\nreport written to %s\n", c.Out)
	}
	return err
}
