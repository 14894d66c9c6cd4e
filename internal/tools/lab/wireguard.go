package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/twillnet/twill/subnet"
)

// The wireguard backend on a machine whose kernel has no WireGuard runs
// wireguard-go, which makes the device's control socket at
// /var/run/wireguard/<device>.sock: one folder for the whole machine, where
// the lab's hosts (every one with a twill-wg) would take each other's
// sockets. So with --backend wireguard each host's twilld runs in a mount
// namespace of its own in which /run/wireguard (/var/run is a link to /run)
// is a bind mount of the host's folder <dir>/h<i>/wireguard. wireguard-go,
// started by twilld, inherits that view and outlives it; a twilld started
// again binds the same folder and finds the running wireguard-go's socket.
// `wg` for a host (WG) runs in the same view.
//
// The mount namespace is a slave of the machine's: mounts made there later
// (a namespace `ip netns add` makes) appear in it too, while the bind mount
// stays inside it. Nothing of it outlives its last process: twilld, or the
// wireguard-go it started.

// wgMountScript runs as `sh -c wgMountScript <folder> <command...>` in a new
// mount namespace: it binds the folder at /run/wireguard and replaces itself
// by the command, which keeps the process id (unshare without --fork, sh's
// exec and `ip netns exec` all exec), so the pid file names the program.
const wgMountScript = `mkdir -p /run/wireguard && mount --bind "$0" /run/wireguard && exec "$@"`

// isWireGuard reports whether the lab runs the wireguard backend.
func (o Options) isWireGuard() bool { return o.Backend == subnet.BackendWireGuard }

// WireGuardDir is host i's folder bound at /run/wireguard for its twilld,
// wireguard-go and WG: the devices' control sockets.
func (l *Lab) WireGuardDir(i int) string { return filepath.Join(l.hostDir(i), "wireguard") }

// WireGuardKeyFile is host i's WireGuard private key (twilld
// --wireguard-key-file).
func (l *Lab) WireGuardKeyFile(i int) string { return filepath.Join(l.hostDir(i), "wireguard.key") }

// hostCommand is the command line that runs bin in host i's network
// namespace and, with the wireguard backend, in its view of /run/wireguard.
func (l *Lab) hostCommand(i int, bin string, args ...string) []string {
	cmd := append([]string{"ip", "netns", "exec", l.Topology().HostNS(i), bin}, args...)
	if !l.isWireGuard() {
		return cmd
	}
	return append([]string{"unshare", "--mount", "--propagation", "slave", "--", "sh", "-c", wgMountScript, l.WireGuardDir(i)}, cmd...)
}

// InHost runs a command on host i as its twilld sees the machine: in its
// network namespace and, with the wireguard backend, with its own
// /run/wireguard.
func (l *Lab) InHost(ctx context.Context, i int, name string, args ...string) (string, error) {
	if l.isWireGuard() {
		if err := os.MkdirAll(l.WireGuardDir(i), 0o700); err != nil {
			return "", err
		}
	}
	cmd := l.hostCommand(i, name, args...)
	return run(ctx, cmd[0], cmd[1:]...)
}

// WG runs wireguard-tools' wg for host i, e.g. WG(ctx, 1, "show", "twill-wg").
func (l *Lab) WG(ctx context.Context, i int, args ...string) (string, error) {
	return l.InHost(ctx, i, "wg", args...)
}

// wgPeers counts the peers of one of host i's WireGuard devices.
func (l *Lab) wgPeers(ctx context.Context, i int, dev string) (int, error) {
	out, err := l.WG(ctx, i, "show", dev, "peers")
	if err != nil {
		return 0, err
	}
	return len(strings.Fields(out)), nil
}

// WireGuardPIDs lists the wireguard-go processes of host i: those in its
// network namespace, and those that see its folder at /run/wireguard (which
// finds them after the namespace is gone too).
func (l *Lab) WireGuardPIDs(i int) ([]int, error) {
	all, err := l.wireGuardProcs([]int{i})
	return all[i], err
}

// wireGuardProcs finds the wireguard-go processes of the given hosts.
func (l *Lab) wireGuardProcs(hosts []int) (map[int][]int, error) {
	type id struct{ dev, ino uint64 }
	statOf := func(path string) (id, bool) {
		var st syscall.Stat_t
		if syscall.Stat(path, &st) != nil {
			return id{}, false
		}
		return id{uint64(st.Dev), st.Ino}, true
	}
	netnsOf, dirOf := map[id]int{}, map[id]int{}
	for _, i := range hosts {
		if s, ok := statOf(filepath.Join("/run/netns", l.Topology().HostNS(i))); ok {
			netnsOf[s] = i
		}
		if s, ok := statOf(l.WireGuardDir(i)); ok {
			dirOf[s] = i
		}
	}
	out := map[int][]int{}
	if len(netnsOf) == 0 && len(dirOf) == 0 {
		return out, nil
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid <= 1 {
			continue
		}
		proc := filepath.Join("/proc", e.Name())
		comm, err := os.ReadFile(filepath.Join(proc, "comm"))
		if err != nil || strings.TrimSpace(string(comm)) != "wireguard-go" || isZombie(pid) {
			continue
		}
		host, ok := 0, false
		if s, found := statOf(filepath.Join(proc, "ns", "net")); found {
			host, ok = netnsOf[s]
		}
		if !ok {
			// The process's own view: /proc/<pid>/root resolves in its
			// mount namespace.
			if s, found := statOf(filepath.Join(proc, "root", "run", "wireguard")); found {
				host, ok = dirOf[s]
			}
		}
		if ok {
			out[host] = append(out[host], pid)
		}
	}
	for _, pids := range out {
		slices.Sort(pids)
	}
	return out, nil
}

// stopWireGuard ends the lab's wireguard-go processes, before its
// namespaces are deleted: a process in a namespace keeps the namespace, and
// with it the process's tun device, so deleting the namespace would not end
// it. SIGTERM makes wireguard-go delete its device and socket and exit;
// what is still there after a bounded wait is killed.
func (l *Lab) stopWireGuard(ctx context.Context) error {
	procs, err := l.wireGuardProcs(l.Topology().HostNumbers())
	if err != nil {
		return err
	}
	var pids []int
	for _, p := range procs {
		pids = append(pids, p...)
	}
	if len(pids) == 0 {
		return nil
	}
	for _, pid := range pids {
		syscall.Kill(pid, syscall.SIGTERM)
	}
	if waitGone(ctx, pids, 10*time.Second) == nil {
		return nil
	}
	for _, pid := range pids {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	if err := waitGone(ctx, pids, 5*time.Second); err != nil {
		return fmt.Errorf("wireguard-go of the lab: %w", err)
	}
	return nil
}

// checkWireGuardGone fails if a wireguard-go of the lab is still running.
func (l *Lab) checkWireGuardGone() error {
	procs, err := l.wireGuardProcs(l.Topology().HostNumbers())
	if err != nil {
		return err
	}
	var errs []error
	for i, pids := range procs {
		errs = append(errs, fmt.Errorf("wireguard-go of h%d still running: pids %v", i, pids))
	}
	return errors.Join(errs...)
}

// waitGone waits until none of pids runs any more.
func waitGone(ctx context.Context, pids []int, d time.Duration) error {
	return poll(ctx, d, fmt.Sprintf("processes %v to exit", pids), func() error {
		for _, pid := range pids {
			if syscall.Kill(pid, 0) == nil && !isZombie(pid) {
				return fmt.Errorf("%d still running", pid)
			}
		}
		return nil
	})
}

// wireGuardPreflight checks what the wireguard backend needs on this
// machine.
func wireGuardPreflight() error {
	for _, bin := range []string{"unshare", "mount", "wg"} {
		if _, err := exec.LookPath(bin); err != nil {
			return fmt.Errorf("--backend wireguard needs %s (apt-get install util-linux mount wireguard-tools)", bin)
		}
	}
	if _, err := exec.LookPath("wireguard-go"); err != nil {
		if _, err := os.Stat("/sys/module/wireguard"); err != nil {
			return errors.New("--backend wireguard needs the kernel's WireGuard (modprobe wireguard) or wireguard-go (apt-get install wireguard-go)")
		}
	}
	return nil
}
