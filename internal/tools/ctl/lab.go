package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/twillnet/twill/internal/tools/embedetcd"
	"github.com/twillnet/twill/internal/tools/kubelab"
	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/internal/tools/testenv"
	"github.com/twillnet/twill/subnet"
)

const defaultLabDir = "/tmp/twill-lab"

func labFlags(fs *flag.FlagSet) *string {
	return fs.String("dir", defaultLabDir, "the lab's folder: state, logs, etcd data")
}

func labUpFlags(fs *flag.FlagSet) *lab.Options {
	o := &lab.Options{}
	self, _ := os.Executable()
	binDir := filepath.Dir(self)
	fs.IntVar(&o.Hosts, "hosts", 3, "number of hosts")
	fs.IntVar(&o.PodsPerHost, "pods-per-host", 2, "pods on each host")
	fs.StringVar(&o.Backend, "backend", "vxlan", "vxlan, host-gw, alloc or wireguard (each host's twilld and wireguard-go in a mount namespace of its own, with its own /run/wireguard)")
	fs.StringVar(&o.Prefix, "prefix", "twill-", "namespace name prefix")
	fs.StringVar(&o.BinDir, "bin-dir", binDir, "folder with twilld, twillctl and the twill CNI plugin")
	fs.StringVar(&o.CNIBinDir, "cni-bin-dir", filepath.Join(binDir, "cni"), "folder with the reference CNI plugins")
	fs.BoolVar(&o.IPMasq, "ip-masq", true, "run twilld with --ip-masq")
	fs.Func("backend-options", `options added to the network config's Backend object, as JSON, e.g. '{"Mode":"auto"}' for --backend wireguard`, func(s string) error {
		return json.Unmarshal([]byte(s), &o.BackendOptions)
	})
	fs.BoolVar(&o.NFTables, "nftables", false, `write the masquerade rules with nftables ("EnableNFTables": true in the network config) instead of iptables`)
	fs.StringVar(&o.Datastore, "datastore", "etcd", "etcd, or kube: a real kube-apiserver, the DaemonSet manifest's RBAC, twilld --kube-subnet-mgr")
	fs.StringVar(&o.KubeMode, "kube-mode", "nodenetwork", "with --datastore kube: twilld's --kube-mode, nodenetwork (NodeNetwork records; the lab runs kube-controller-manager's garbage collector, built by `make tools` beside kube-apiserver) or annotations (Node annotations, as flannel)")
	fs.StringVar(&o.KubeAPIServer, "kube-apiserver", filepath.Join(binDir, "tools", "kube-apiserver"), "the kube-apiserver binary, for --datastore kube (`make tools` builds it)")
	fs.Func("network", "pod network (default 10.244.0.0/16)", func(s string) error {
		p, err := netip.ParsePrefix(s)
		o.Network = p
		return err
	})
	o.Network = netip.MustParsePrefix("10.244.0.0/16")
	fs.StringVar(&o.IPFamily, "ip-family", "ipv4", "pod network family: ipv4, ipv6 or dual")
	fs.BoolVar(&o.FromFlannel, "from-flannel", false, "lab run: make the last host a flannel node (etcd mode, flannel's prefix), show it works beside twill, then switch it to twilld while its pod is pinged every 50 ms")
	fs.Func("ipv6-network", "IPv6 pod network, with --ip-family ipv6 or dual (default "+lab.DefaultIPv6Network.String()+")", func(s string) error {
		p, err := netip.ParsePrefix(s)
		o.IPv6Network = p
		return err
	})
	return o
}

// kubeletFlags are the lab flags `lab run --kubelet` takes: the cluster runs
// deploy/kube-twill.yaml as shipped, so the network is the manifest's.
var kubeletFlags = map[string]bool{"kubelet": true, "hosts": true, "prefix": true, "dir": true, "bin-dir": true}

// newLab parses the flags of `lab up` and `lab run`; kubelet is whether
// `lab run --kubelet` was asked for.
func newLab(name string, args []string, out, errOut io.Writer) (l *lab.Lab, kubelet bool, err error) {
	fs := newFlagSet(name, errOut)
	dir := labFlags(fs)
	o := labUpFlags(fs)
	if name == "lab run" {
		fs.BoolVar(&kubelet, "kubelet", false, "instead of running twilld by hand: a Kubernetes cluster of real kubelets and containerds (one node per host; `make tools` and `make image` build what it needs), deploy/kube-twill.yaml applied as shipped, and workload pods that reach each other; of the other flags it takes --hosts (default 2 with --kubelet), --prefix, --dir and --bin-dir")
	}
	if err := parseNoArgs(fs, args); err != nil {
		return nil, false, err
	}
	o.Dir = *dir
	if kubelet {
		var others []string
		hostsSet := false
		fs.Visit(func(f *flag.Flag) {
			hostsSet = hostsSet || f.Name == "hosts"
			if !kubeletFlags[f.Name] {
				others = append(others, "--"+f.Name)
			}
		})
		if len(others) > 0 {
			return nil, false, fmt.Errorf("--kubelet runs the manifest's network (vxlan, IPv4, the Kubernetes datastore); it does not take %s", strings.Join(others, ", "))
		}
		if !hostsSet {
			o.Hosts = 2
		}
	}
	if o.FromFlannel {
		if o.Datastore != "etcd" || o.Backend != "vxlan" || o.IPFamily != "ipv4" || name != "lab run" {
			return nil, false, errors.New("--from-flannel is for `lab run` with the etcd datastore, the vxlan backend and IPv4")
		}
		o.EtcdPrefix = lab.FlannelPrefix
	}
	return lab.New(*o, out, logger(errOut)), kubelet, nil
}

func labUp(ctx context.Context, args []string, out, errOut io.Writer) error {
	l, _, err := newLab("lab up", args, out, errOut)
	if err != nil {
		return err
	}
	if err := l.Up(ctx); err != nil {
		return fmt.Errorf("lab up: %w\n(logs in %s; `twillctl lab down --dir %s` removes what was made)", err, l.Dir, l.Dir)
	}
	fmt.Fprintf(out, "lab is up; `twillctl lab status --dir %s` shows it\n", l.Dir)
	return nil
}

// loadLab parses the flags of a command that works on a lab `lab up` made
// (--dir, and what add defines) and loads the lab's state.
func loadLab(name string, args []string, out, errOut io.Writer, add func(*flag.FlagSet)) (*lab.Lab, error) {
	fs := newFlagSet(name, errOut)
	dir := labFlags(fs)
	if add != nil {
		add(fs)
	}
	if err := parseNoArgs(fs, args); err != nil {
		return nil, err
	}
	return lab.Load(*dir, out, logger(errOut))
}

func labStatus(ctx context.Context, args []string, out, errOut io.Writer) error {
	l, err := loadLab("lab status", args, out, errOut, nil)
	if err != nil {
		return err
	}
	return l.Status(ctx, out)
}

func labCheck(ctx context.Context, args []string, out, errOut io.Writer) error {
	l, err := loadLab("lab check", args, out, errOut, nil)
	if err != nil {
		return err
	}
	return check(ctx, l, out)
}

// check prints the connectivity matrix of each family the lab's pods have
// and fails if any pair failed in any family.
func check(ctx context.Context, l *lab.Lab, out io.Writer) error {
	var errs []error
	for _, v6 := range l.Families() {
		fam := subnet.FamilyName(v6)
		fmt.Fprintf(out, "\n%s connectivity: every pod pings every other pod\n", fam)
		m := l.Check(ctx, v6)
		m.Print(out)
		total := len(m.Pods) * (len(m.Pods) - 1)
		if f := m.Failures(); f > 0 {
			fmt.Fprintf(out, "\nFAIL: %d of %d pairs cannot reach each other over %s\n", f, total, fam)
			errs = append(errs, fmt.Errorf("%d of %d pod pairs failed over %s", f, total, fam))
			continue
		}
		fmt.Fprintf(out, "\nPASS: all %d pod pairs reach each other over %s\n", total, fam)
	}
	return errors.Join(errs...)
}

func labDown(ctx context.Context, args []string, out, errOut io.Writer) error {
	var keep *bool
	l, err := loadLab("lab down", args, out, errOut, func(fs *flag.FlagSet) {
		keep = fs.Bool("keep-logs", false, "keep the lab's folder (logs, etcd data)")
	})
	if err != nil {
		return err
	}
	if err := l.Down(ctx, !*keep); err != nil {
		return err
	}
	fmt.Fprintln(out, "lab removed")
	return nil
}

// labRun is up, status, check and down; the exit code says whether every pod
// reached every other. On failure the logs are kept.
func labRun(ctx context.Context, args []string, out, errOut io.Writer) (err error) {
	l, kubelet, err := newLab("lab run", args, out, errOut)
	if err != nil {
		return err
	}
	if kubelet {
		return labRunKubelet(ctx, l, out)
	}
	start := time.Now()
	defer func() {
		// Tear down even when ctx was cancelled (Ctrl-C).
		dctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		keep := err != nil
		if derr := l.Down(dctx, !keep); derr != nil {
			err = errors.Join(err, fmt.Errorf("lab down: %w", derr))
		}
		if keep {
			fmt.Fprintf(out, "logs kept in %s\n", l.Dir)
		} else {
			fmt.Fprintf(out, "lab removed (%s in all)\n", time.Since(start).Round(100*time.Millisecond))
		}
	}()
	if err := l.Up(ctx); err != nil {
		return fmt.Errorf("lab up: %w", err)
	}
	if l.FromFlannel {
		return fromFlannel(ctx, l, out)
	}
	fmt.Fprintln(out)
	if err := l.Status(ctx, out); err != nil {
		return err
	}
	return check(ctx, l, out)
}

// fromFlannel is `lab run --from-flannel`: the migration of one node from
// flannel to twill, as a user would do it, with pings across it.
func fromFlannel(ctx context.Context, l *lab.Lab, out io.Writer) error {
	n := l.Hosts
	fmt.Fprintf(out, "\nmaking h%d a flannel node: twilld stopped, flannel.1 with flanneld's settings and entries, its lease in flannel's JSON at %s\n", n, lab.FlannelPrefix)
	mac, err := l.MakeFlannelNode(ctx, n)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "h%d is a flannel node: flannel.1 has VTEP MAC %s\n", n, mac)
	// Let the twill nodes see h%d's flannel lease.
	time.Sleep(2 * time.Second)
	if err := l.Status(ctx, out); err != nil {
		return err
	}
	if err := check(ctx, l, out); err != nil {
		return fmt.Errorf("twill and flannel nodes side by side: %w", err)
	}
	fmt.Fprintf(out, "\nswitching h%d to twilld (same prefix, same interface) while pods ping across it every 50 ms\n", n)
	runs, err := l.MigrateFromFlannel(ctx, n)
	if err != nil {
		return err
	}
	lost := 0
	for _, r := range runs {
		fmt.Fprintf(out, "  %s\n", r)
		lost += r.Sent - r.Received
	}
	fmt.Fprintln(out)
	if err := l.Status(ctx, out); err != nil {
		return err
	}
	if err := check(ctx, l, out); err != nil {
		return err
	}
	if lost > 0 {
		return fmt.Errorf("%d pings lost during the switch", lost)
	}
	fmt.Fprintf(out, "\nPASS: h%d moved from flannel to twill; no ping lost\n", n)
	return nil
}

// labEtcd serves the lab's etcd, embedded in twillctl, until stopped. `lab
// up` starts it inside the underlay namespace.
func labEtcd(ctx context.Context, args []string, out, errOut io.Writer) error {
	fs := newFlagSet("lab etcd", errOut)
	dataDir := fs.String("data-dir", "", "etcd data folder")
	listen := fs.String("listen", "", "HOST:PORT for clients")
	if err := parseNoArgs(fs, args); err != nil {
		return err
	}
	host, port, err := net.SplitHostPort(*listen)
	if err != nil {
		return fmt.Errorf("lab etcd: --listen: %w", err)
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		return fmt.Errorf("lab etcd: --listen: bad port %q", port)
	}
	srv, err := embedetcd.Start(ctx, embedetcd.Options{Dir: *dataDir, ClientHost: host, ClientPort: p, LogLevel: "warn"})
	if err != nil {
		return err
	}
	fmt.Fprintf(errOut, "etcd serving at %s\n", srv.Endpoint)
	select {
	case <-ctx.Done():
	case err = <-srv.Err():
	}
	srv.Close()
	return err
}

// labRunKubelet is `lab run --kubelet`: kubelab's guided run, with the
// harness the kubelet tests use, in a session that undoes everything at the
// end and keeps the programs' logs (under --dir) when something failed.
func labRunKubelet(ctx context.Context, l *lab.Lab, out io.Writer) error {
	if os.Geteuid() != 0 {
		return errors.New("the lab needs root: it creates network and mount namespaces")
	}
	topo := l.Topology()
	if exists, err := topo.Exists(ctx); err != nil {
		return err
	} else if exists {
		return fmt.Errorf("a lab with namespace prefix %q already exists: run `twillctl lab down` first", l.Prefix)
	}
	if err := os.MkdirAll(l.Dir, 0o755); err != nil {
		return err
	}
	dir, err := os.MkdirTemp(l.Dir, "kubelet-")
	if err != nil {
		return err
	}
	s := &testenv.Session{BinDir: l.BinDir, Dir: dir, Out: out}
	err = s.Run(ctx, func(tb testenv.TB) { kubelab.Guided(tb, topo) })
	if err != nil {
		fmt.Fprintf(out, "logs kept in %s\n", dir)
		return fmt.Errorf("lab run --kubelet failed:\n%w", err)
	}
	os.Remove(dir)
	os.Remove(l.Dir) // if it holds nothing else
	fmt.Fprintln(out, "lab removed")
	return nil
}
