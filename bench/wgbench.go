package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/twillnet/twill/backend/wireguard"
	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/subnet"
)

// The wireguard backend's devices. The harness reads and checks them with
// the `wg` program, as an operator would.
var (
	wgDevice   = wireguard.DeviceName(false)
	wgDeviceV6 = wireguard.DeviceName(true)
)

// limWGDevice is the device of the WireGuard batch limit, in a namespace of
// its own.
const limWGDevice = "twbench-lim-wg"

// wgSocketDir is where wireguard-go puts a device's control socket,
// <device>.sock. It is one folder for the whole machine (for its mount
// namespace), whatever the network namespace: two wireguard-go devices of
// the same name cannot run at once, even in different network namespaces.
const wgSocketDir = "/var/run/wireguard"

func wgSocket(dev string) string { return filepath.Join(wgSocketDir, dev+".sock") }

// checkWGSocketFree fails when a wireguard-go device named dev already runs
// on this machine (another twilld, in any network namespace): the
// harness's twilld would fail to start its own, or worse, configure the
// other one. A socket nothing answers on is a stale one, left by a
// wireguard-go that was killed; wireguard-go replaces it.
func checkWGSocketFree(dev string) error {
	path := wgSocket(dev)
	if _, err := os.Stat(path); err != nil {
		return nil
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err != nil {
		return nil
	}
	c.Close()
	return fmt.Errorf("%s answers: a wireguard-go device %s already runs on this machine (another twilld, in any network namespace); "+
		"wireguard-go's control sockets are shared by all network namespaces, so the harness's twilld would collide with it: stop it, or run with --wireguard=false",
		path, dev)
}

// waitWGSocketGone waits for the wireguard-go of a deleted device to exit
// and remove its control socket (a kernel device has none).
func waitWGSocketGone(ctx context.Context, dev string) error {
	return lab.Poll(ctx, 10*time.Second, 20*time.Millisecond, "wireguard-go of "+dev+" to exit", func() error {
		if _, err := os.Stat(wgSocket(dev)); err == nil {
			return fmt.Errorf("%s still there", wgSocket(dev))
		}
		return nil
	})
}

// routesAtLeast: n IPv4 routes of twill's (the wireguard backend writes no
// neighbour or FDB entry).
func routesAtLeast(n int) func(*kernelWatch) bool {
	return func(w *kernelWatch) bool { return w.n[0][kindRoute] >= n }
}

// wireguardGoPid finds the wireguard-go daemon of device dev in the named
// namespace.
func wireguardGoPid(netns, dev string) (int, error) {
	want, err := os.Stat(nsPath(netns))
	if err != nil {
		return 0, err
	}
	wantIno := want.Sys().(*syscall.Stat_t).Ino
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	for _, ent := range entries {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
		if len(args) < 2 || filepath.Base(args[0]) != "wireguard-go" || args[len(args)-1] != dev {
			continue
		}
		fi, err := os.Stat(filepath.Join("/proc", ent.Name(), "ns", "net"))
		if err != nil || fi.Sys().(*syscall.Stat_t).Ino != wantIno {
			continue
		}
		if st, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "stat")); err == nil && strings.Contains(string(st), ") Z ") {
			continue // exited, not yet reaped
		}
		return pid, nil
	}
	return 0, fmt.Errorf("no wireguard-go process for %s in %s (a kernel device?)", dev, netns)
}

// wireGuardUsage records, after a start with the wireguard backend, what
// its wireguard-go used and how many peers twilld says it wrote.
func (e *etcdMode) wireGuardUsage(ctx context.Context, r *coldStart) error {
	pid, err := wireguardGoPid(e.hostNS(), wgDevice)
	if err != nil {
		return err
	}
	u, err := usage(pid)
	if err != nil {
		return fmt.Errorf("wireguard-go: %w", err)
	}
	r.WGCPU, r.WGRSS, r.WGHWM = u.CPUSeconds, u.RSSMiB, u.HWMMiB
	tw, err := e.h.twilldMetrics(ctx, e)
	if err != nil {
		return fmt.Errorf("twilld metrics: %w", err)
	}
	if !hasSample(tw, "twill_kernel_writes_total", map[string]string{"kind": "peer"}) {
		return errors.New(`twilld has no twill_kernel_writes_total{kind="peer"}: not the wireguard backend?`)
	}
	r.PeerWrites = promValue(tw, "twill_kernel_writes_total", map[string]string{"kind": "peer"})
	return nil
}

// verifyWireGuard checks, after a start, that the host holds exactly n
// routes of twill's, all into twill-wg, and that twill-wg has n peers, each
// with one /24 as its allowed IPs and port 51820 in its endpoint. It reads
// the peers with `wg show`, which prints only public keys.
func verifyWireGuard(ctx context.Context, netns string, n int) error {
	out, err := ipCmd(ctx, "-n", netns, "-4", "route", "show", "proto", "116")
	if err != nil {
		return err
	}
	routes := 0
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if line == "" {
			continue
		}
		if !strings.Contains(line, " dev "+wgDevice+" ") {
			return fmt.Errorf("route %q is not into %s", line, wgDevice)
		}
		routes++
	}
	if routes != n {
		return fmt.Errorf("h1 holds %d routes of twill's; want %d", routes, n)
	}
	show := func(what string) ([]string, error) {
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		out, err := run(cctx, "ip", "netns", "exec", netns, "wg", "show", wgDevice, what)
		if err != nil {
			return nil, err
		}
		return strings.Split(strings.TrimSpace(out), "\n"), nil
	}
	ips, err := show("allowed-ips")
	if err != nil {
		return err
	}
	eps, err := show("endpoints")
	if err != nil {
		return err
	}
	if len(ips) != n || len(eps) != n {
		return fmt.Errorf("%s has %d peers (%d endpoints); want %d", wgDevice, len(ips), len(eps), n)
	}
	for _, line := range ips {
		if f := strings.Fields(line); len(f) != 2 || !strings.HasSuffix(f[1], "/24") {
			return fmt.Errorf("%s: peer %q: want exactly one /24 as allowed IPs", wgDevice, line)
		}
	}
	for _, line := range eps {
		if !strings.HasSuffix(line, ":"+strconv.Itoa(subnet.DefaultWireGuardPort)) {
			return fmt.Errorf("%s: peer %q: want an endpoint on port %d", wgDevice, line, subnet.DefaultWireGuardPort)
		}
	}
	return nil
}

// wgLimit is the limit of a cold start with the wireguard backend: the same
// n peers and n routes written by the `wg` and `ip` programs into a fresh
// WireGuard device (made as twilld makes it: in the kernel, or by
// wireguard-go) in a fresh namespace: `wg addconf` sets every peer in one
// request, as twilld does, then `ip -batch` writes the routes. Making the
// device is timed apart and is not part of the limit.
type wgLimit struct {
	Total, Peers, Routes, Device time.Duration
}

func measureWGLimit(ctx context.Context, h *Harness, n int) (*wgLimit, error) {
	netns := h.cfg.Prefix + "lim"
	dir := filepath.Join(h.work, "limit-wg")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	var peers, routes strings.Builder
	for i := range n {
		p := peerAt(0, i)
		fmt.Fprintf(&peers, "[Peer]\nPublicKey = %s\nEndpoint = %s:%d\nAllowedIPs = %s\n\n", p.WGKey, p.PublicIP, subnet.DefaultWireGuardPort, p.Subnet)
		fmt.Fprintf(&routes, "route replace %s dev %s scope link proto 116\n", p.Subnet, limWGDevice)
	}
	// Any 32 bytes do as the device's private key here.
	files := map[string]string{"peers.conf": peers.String(), "routes.batch": routes.String(), "private.key": fakeWGKey(9, 0) + "\n"}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o600); err != nil {
			return nil, err
		}
	}
	if err := checkWGSocketFree(limWGDevice); err != nil {
		return nil, err
	}
	l := &wgLimit{}
	if _, err := ipCmd(ctx, "netns", "add", netns); err != nil {
		return nil, err
	}
	defer func() {
		bg := context.Background()
		if _, err := ipCmd(bg, "-n", netns, "link", "del", limWGDevice); err == nil {
			waitWGSocketGone(bg, limWGDevice)
		}
		ipCmd(bg, "netns", "del", netns)
	}()
	for _, s := range [][]string{
		{"-n", netns, "link", "set", "lo", "up"},
		{"-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"},
		{"-n", netns, "addr", "add", "198.18.0.1/24", "dev", "eth0"},
		{"-n", netns, "link", "set", "eth0", "up"},
		{"-n", netns, "link", "set", "eth0p", "up"},
	} {
		if _, err := ipCmd(ctx, s...); err != nil {
			return nil, err
		}
	}
	start := time.Now()
	if _, err := ipCmd(ctx, "-n", netns, "link", "add", limWGDevice, "type", "wireguard"); err != nil {
		// No WireGuard in the kernel: wireguard-go, as twilld runs it.
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, err := run(cctx, "ip", "netns", "exec", netns, "wireguard-go", limWGDevice)
		cancel()
		if err != nil {
			return nil, err
		}
	}
	l.Device = time.Since(start)
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	for _, s := range [][]string{
		{"ip", "netns", "exec", netns, "wg", "set", limWGDevice, "private-key", filepath.Join(dir, "private.key"), "listen-port", strconv.Itoa(subnet.DefaultWireGuardPort)},
		{"ip", "-n", netns, "link", "set", limWGDevice, "mtu", "1440", "up"},
		{"ip", "-n", netns, "addr", "add", "10.0.0.0/32", "dev", limWGDevice},
	} {
		if _, err := run(cctx, s[0], s[1:]...); err != nil {
			return nil, err
		}
	}
	if err := timedRun(ctx, &l.Peers, "ip", "netns", "exec", netns, "wg", "addconf", limWGDevice, filepath.Join(dir, "peers.conf")); err != nil {
		return nil, err
	}
	if err := timedRun(ctx, &l.Routes, "ip", "-n", netns, "-batch", filepath.Join(dir, "routes.batch")); err != nil {
		return nil, err
	}
	l.Total = l.Peers + l.Routes
	return l, nil
}

// resyncWindow is twilld at rest after a start: the full passes its resync
// timer ran in a window (their durations from its log), and the CPU it and
// its wireguard-go (wireguard backend) used in the window.
type resyncWindow struct {
	Window           time.Duration
	Passes           []time.Duration
	TwilldCPU, WGCPU float64 // seconds in the window
	// Writes is what twill_kernel_writes_total (all kinds) grew by in the
	// window: 0 when the passes found everything in place.
	Writes float64
	wg     bool
}

// measureResync watches twilld (just started, converged) for the harness's
// resync window; wg says that a wireguard-go runs beside it.
func (h *Harness) measureResync(ctx context.Context, e *etcdMode, wg bool) (*resyncWindow, error) {
	r := &resyncWindow{Window: h.cfg.ResyncWindow, wg: wg}
	h.say("  twilld at rest for %s: its resync passes", r.Window)
	p := e.twilld
	offset := fileSize(p.Log)
	wgPid := 0
	var w0 ProcUsage
	if wg {
		var err error
		if wgPid, err = wireguardGoPid(e.hostNS(), wgDevice); err != nil {
			return nil, err
		}
		if w0, err = usage(wgPid); err != nil {
			return nil, err
		}
	}
	m0, err := h.twilldMetrics(ctx, e)
	if err != nil {
		return nil, fmt.Errorf("twilld metrics: %w", err)
	}
	u0, err := usage(p.Pid())
	if err != nil {
		return nil, err
	}
	if err := sleep(ctx, r.Window); err != nil {
		return nil, err
	}
	m1, err := h.twilldMetrics(ctx, e)
	if err != nil {
		return nil, fmt.Errorf("twilld metrics: %w", err)
	}
	r.Writes = promValue(m1, "twill_kernel_writes_total", nil) - promValue(m0, "twill_kernel_writes_total", nil)
	u1, err := usage(p.Pid())
	if err != nil {
		return nil, err
	}
	r.TwilldCPU = u1.CPUSeconds - u0.CPUSeconds
	if wg {
		w1, err := usage(wgPid)
		if err != nil {
			return nil, fmt.Errorf("wireguard-go: %w", err)
		}
		r.WGCPU = w1.CPUSeconds - w0.CPUSeconds
	}
	r.Passes = reconcileTimes(p.Log, offset)
	if len(r.Passes) == 0 {
		return nil, fmt.Errorf("no pass in twilld's log (%s) within %s", p.Log, r.Window)
	}
	return r, nil
}

func (r *resyncWindow) figures(h *Harness, sec *Section, label string) {
	h.add(sec, &Figure{Name: fmt.Sprintf("%s, at rest: full pass of the resync timer (twilld log, %d passes in %s)", label, len(r.Passes), r.Window), Unit: "ms",
		Stats: Summarize(millis(r.Passes))})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s, at rest: kernel writes (twill_kernel_writes_total, all kinds)", label), Unit: "count", Value: newValue(r.Writes),
		Targets: []Target{{"value", "<=", 0}}})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s, at rest: twilld CPU", label), Unit: "% of a core", Value: newValue(100 * r.TwilldCPU / r.Window.Seconds())})
	if r.wg {
		h.add(sec, &Figure{Name: fmt.Sprintf("%s, at rest: wireguard-go CPU", label), Unit: "% of a core", Value: newValue(100 * r.WGCPU / r.Window.Seconds())})
	}
}
