package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/twillnet/twill/backend/vxlan"
	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/subnet"
)

// etcdMode is the set-up of the etcd-mode figures (1, 2 and 6): the lab's
// topology with one host, the real etcd serving in the underlay namespace with
// fake peer leases in it, and one twilld in the host namespace.
type etcdMode struct {
	benchHost
	etcd  *etcdServer
	peers int  // fake peers now in etcd
	dual  bool // the network and its peers are dual-stack
	// backend is the network's backend and the fake peers' ("": vxlan,
	// or subnet.BackendWireGuard), see setNetwork.
	backend string
	// nftables is the network config's EnableNFTables (nil: the key is
	// left out), see setRulesMode.
	nftables *bool
}

// benchHost is the one host of the etcd- and Kubernetes-mode set-ups: the
// lab's topology with one host, a work folder, and the twilld under test.
type benchHost struct {
	h      *Harness
	topo   lab.Topology
	dir    string
	twilld *Proc
	// ipMasq says that twilld was started with --ip-masq, so the host may
	// hold its rules.
	ipMasq bool
}

func newBenchHost(h *Harness, name string) benchHost {
	return benchHost{h: h, topo: lab.Topology{Prefix: h.cfg.Prefix, Hosts: 1}, dir: filepath.Join(h.work, name)}
}

func (b *benchHost) hostNS() string  { return b.topo.HostNS(1) }
func (b *benchHost) envFile() string { return filepath.Join(b.dir, "h1", "subnet.env") }

// wgKeyFile is twilld's --wireguard-key-file: in the work folder, not the
// machine's /run/twill.
func (b *benchHost) wgKeyFile() string { return filepath.Join(b.dir, "h1", "wireguard.key") }

// start starts twilld in the host namespace with the flags of its datastore
// (mode) and extra.
func (b *benchHost) start(mode []string, extra ...string) error {
	args := append(append(mode,
		"--node-name", benchNode,
		"--subnet-file", b.envFile(),
		"--http-addr", "127.0.0.1:9867",
	), extra...)
	p, err := startInNSEnv(b.hostNS(), filepath.Join(b.dir, "h1", "twilld.log"), b.h.cfg.TwilldEnv, b.h.twilld(), args...)
	b.twilld = p
	b.ipMasq = b.ipMasq || slices.Contains(extra, "--ip-masq")
	return err
}

// resetHost stops twilld and returns the host to a fresh machine's state:
// no device, no twill routes, no env file, no masquerade rules.
func (b *benchHost) resetHost(ctx context.Context) []error {
	var errs []error
	if err := b.twilld.Stop(); err != nil {
		errs = append(errs, err)
	}
	b.twilld = nil
	if b.ipMasq {
		// twilld leaves its rules when it stops; the next one would
		// otherwise remove those of the other mode beside its first pass.
		if err := removeRules(ctx, b.hostNS()); err != nil {
			errs = append(errs, err)
		} else {
			b.ipMasq = false
		}
	}
	// The devices are absent after a failed start, and the IPv6 one
	// unless the network was dual-stack: an error here is fine.
	for _, v6 := range []bool{false, true} {
		ipCmd(ctx, "-n", b.hostNS(), "link", "del", vxlan.DeviceName(subnet.DefaultVNI, v6))
	}
	// A WireGuard device left by the wireguard backend: deleting it ends
	// its wireguard-go, which then removes its control socket. The next
	// wireguard-go of that name cannot start before it has.
	for _, dev := range []string{wgDevice, wgDeviceV6} {
		if _, err := ipCmd(ctx, "-n", b.hostNS(), "link", "del", dev); err == nil {
			if err := waitWGSocketGone(ctx, dev); err != nil {
				errs = append(errs, err)
			}
		}
	}
	// A fresh machine has no key yet (the default key file is under /run).
	if err := os.Remove(b.wgKeyFile()); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	for _, family := range []string{"-4", "-6"} {
		if _, err := ipCmd(ctx, "-n", b.hostNS(), family, "route", "flush", "proto", "116"); err != nil {
			errs = append(errs, err)
		}
	}
	if err := os.Remove(b.envFile()); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return errs
}

const benchNode = "bench-h1"

func newEtcdMode(ctx context.Context, h *Harness) (*etcdMode, error) {
	e := &etcdMode{benchHost: newBenchHost(h, "etcd-mode")}
	if err := os.MkdirAll(filepath.Join(e.dir, "h1"), 0o755); err != nil {
		return nil, err
	}
	if err := e.topo.Up(ctx); err != nil {
		e.topo.Down(context.Background())
		return nil, err
	}
	var err error
	if e.etcd, err = startEtcd(ctx, filepath.Join(h.cfg.ToolsDir, "etcd"), e.topo.UnderlayNS(), e.dir); err != nil {
		e.topo.Down(context.Background())
		return nil, err
	}
	if err := e.etcd.setConfig(ctx, false, nil, ""); err != nil {
		e.close()
		return nil, err
	}
	return e, nil
}

func (e *etcdMode) close() {
	e.twilld.Stop()
	if e.etcd != nil {
		e.etcd.close()
	}
	e.topo.Down(context.Background())
}

// setPeers makes etcd hold exactly n fake peers (0..n-1 of series 0) of the
// network's families.
func (e *etcdMode) setPeers(ctx context.Context, n int) error {
	var err error
	switch {
	case n > e.peers:
		err = e.etcd.putPeers(ctx, e.peers, n, e.dual, e.backend)
	case n < e.peers:
		err = e.etcd.deletePeers(ctx, n, e.peers, e.dual)
	}
	if err == nil {
		e.peers = n
	}
	return err
}

// setDualStack makes the network dual-stack (or IPv4 only again) with n
// peers of its families: an IPv4 lease and a dual-stack one have different
// keys, so the peers are written again.
func (e *etcdMode) setDualStack(ctx context.Context, dual bool, n int) error {
	return e.setNetwork(ctx, dual, e.backend, n)
}

// setNetwork gives the network the families (dual-stack or IPv4 only) and
// the backend ("" for vxlan, or subnet.BackendWireGuard), with n peers of
// those families and that backend: their keys or values change, so the
// peers are written again.
func (e *etcdMode) setNetwork(ctx context.Context, dual bool, backend string, n int) error {
	if dual == e.dual && backend == e.backend {
		return e.setPeers(ctx, n)
	}
	if err := e.setPeers(ctx, 0); err != nil {
		return err
	}
	if err := e.etcd.setConfig(ctx, dual, e.nftables, backend); err != nil {
		return fmt.Errorf("network config (dual-stack %t, backend %q): %w", dual, backend, err)
	}
	e.dual, e.backend = dual, backend
	return e.setPeers(ctx, n)
}

// startTwilld starts twilld in the host namespace.
func (e *etcdMode) startTwilld(extra ...string) error {
	if e.backend == subnet.BackendWireGuard {
		extra = append([]string{"--wireguard-key-file", e.wgKeyFile()}, extra...)
	}
	return e.start([]string{"--etcd-endpoints", e.etcd.url}, extra...)
}

// reset stops twilld and returns the host to a fresh machine's state: no
// device, no twill routes, no lease of its own in etcd, no env file. The fake
// peers stay.
func (e *etcdMode) reset(ctx context.Context) error {
	errs := e.resetHost(ctx)
	leases, _, err := e.etcd.reg.Leases(ctx)
	if err != nil {
		errs = append(errs, err)
	}
	for _, l := range leases {
		if l.Attrs.NodeName == benchNode {
			if err := e.etcd.reg.DeleteLease(ctx, l.Subnet); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// coldStart is one measured start of twilld with n peers in etcd. twilld is
// left running with w still watching, for the figures that follow a start.
type coldStart struct {
	Env, All          time.Duration
	FDB, Neigh, Route time.Duration
	// The IPv6 entries of a dual-stack network (FDB, Neigh and Route are
	// then the IPv4 ones).
	FDB6, Neigh6, Route6 time.Duration
	CPU, HWM, RSS        float64
	UserCPU, SysCPU      float64
	// HarnessCPU is what the harness itself spent (mostly following the
	// notifications) between the fork and the last entry: it competes
	// with twilld for the machine's cores.
	HarnessCPU float64
	Phases     map[string]time.Duration
	// The wireguard backend's daemon, wireguard-go (when the kernel has
	// no WireGuard): its CPU since it started, and its memory, read just
	// after the last route; and twilld's own count of peers written
	// (twill_kernel_writes_total{kind="peer"}).
	WGCPU, WGRSS, WGHWM float64
	PeerWrites          float64
	w                   *kernelWatch
}

func (e *etcdMode) coldStart(ctx context.Context, n int, extra ...string) (*coldStart, error) {
	if err := e.reset(ctx); err != nil {
		return nil, fmt.Errorf("reset h1 before a start: %w", err)
	}
	w, err := watchKernel(e.hostNS())
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			w.close()
		}
	}()
	until, what := allAtLeast(n, e.dual), fmt.Sprintf("%d routes, neighbours and FDB entries", n)
	if e.dual {
		what += " of each family"
	}
	if e.backend == subnet.BackendWireGuard {
		// The peers are not in rtnetlink (wgctrl sets them, all in one
		// request, before the first route): the last route ends the start.
		until, what = routesAtLeast(n), fmt.Sprintf("%d routes into %s", n, wgDevice)
	}
	r, err := timeStart(ctx, w, until, what, n, e.envFile(), 30*time.Second, 2*time.Minute, func() (*Proc, error) {
		err := e.startTwilld(append([]string{"--log-level", "debug"}, extra...)...)
		return e.twilld, err
	})
	if err != nil {
		return nil, err
	}
	p := e.twilld
	if e.backend == subnet.BackendWireGuard {
		if err := e.wireGuardUsage(ctx, r); err != nil {
			return nil, err
		}
	}
	// The peak may come just after the last entry (the pass's own
	// bookkeeping); look again a moment later.
	if err := sleep(ctx, 300*time.Millisecond); err != nil {
		return nil, err
	}
	if u2, err := usage(p.Pid()); err == nil {
		r.HWM, r.RSS = max(r.HWM, u2.HWMMiB), u2.RSSMiB
	}
	if err := e.verify(ctx, n); err != nil {
		return nil, err
	}
	r.Phases = logPhases(p.Log, p.Started, e.dual)
	ok = true
	return r, nil
}

// timeStart forks twilld (start) while w follows the kernel, and times it to
// the env file and to the moment until holds (what says what it waits for:
// allAtLeast for n entries of each kind, of each family when dual); the
// moment each kind reaches n entries is recorded on the way. The figures of
// the usage of twilld and of the harness are read when until holds.
func timeStart(ctx context.Context, w *kernelWatch, until func(*kernelWatch) bool, what string, n int, envFile string, envTimeout, allTimeout time.Duration, start func() (*Proc, error)) (*coldStart, error) {
	w.trackCount(n)
	self0, _ := usage(os.Getpid())
	p, err := start()
	if err != nil {
		return nil, err
	}
	var envAt time.Time
	err = lab.Poll(ctx, envTimeout, time.Millisecond, "the subnet env file", func() error {
		if p.Exited() {
			return fmt.Errorf("twilld exited (see %s)", p.Log)
		}
		if _, err := os.Stat(envFile); err != nil {
			return err
		}
		envAt = time.Now()
		return nil
	})
	if err != nil {
		return nil, err
	}
	allAt, err := w.await(ctx, allTimeout, what, until)
	if err != nil {
		return nil, fmt.Errorf("%w (twilld log: %s)", err, p.Log)
	}
	u, err := usage(p.Pid())
	if err != nil {
		return nil, err
	}
	self1, _ := usage(os.Getpid())
	r := &coldStart{Env: envAt.Sub(p.Started), All: allAt.Sub(p.Started), CPU: u.CPUSeconds, UserCPU: u.UserSeconds, SysCPU: u.SysSeconds,
		HWM: u.HWMMiB, RSS: u.RSSMiB, HarnessCPU: self1.CPUSeconds - self0.CPUSeconds, w: w}
	for kind, d := range map[string]*time.Duration{"fdb": &r.FDB, "neigh": &r.Neigh, "route": &r.Route,
		"fdb6": &r.FDB6, "neigh6": &r.Neigh6, "route6": &r.Route6} {
		if t, ok := w.reachedAt(kind); ok {
			*d = t.Sub(p.Started)
		}
	}
	return r, nil
}

// verify dumps the host's tables (after the measurement) and checks that
// they hold exactly n entries of each kind, of each family when the network
// is dual-stack.
func (e *etcdMode) verify(ctx context.Context, n int) error {
	if e.backend == subnet.BackendWireGuard {
		return verifyWireGuard(ctx, e.hostNS(), n)
	}
	return verifyHost(ctx, e.topo, n, e.dual)
}
