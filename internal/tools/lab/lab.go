package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/twillnet/twill/internal/atomicfile"
	"github.com/twillnet/twill/subnet"
)

// EtcdPort is where the lab's etcd listens, on WorldAddr in the underlay.
const EtcdPort = 2379

// Options describe a lab.
type Options struct {
	Dir         string // the lab's folder: state, logs, etcd data
	Prefix      string // namespace name prefix
	Hosts       int
	PodsPerHost int
	Backend     string // vxlan, host-gw, alloc or wireguard
	// BackendOptions are added to the network config's Backend object,
	// e.g. {"Mode": "auto"} for the wireguard backend.
	BackendOptions map[string]any `json:",omitempty"`
	// IPFamily is the pod network's: "ipv4" (the default when empty),
	// "ipv6" or "dual".
	IPFamily    string `json:",omitempty"`
	Network     netip.Prefix
	IPv6Network netip.Prefix `json:",omitempty"`
	BinDir      string       // holds twilld, twillctl and twill
	CNIBinDir   string       // holds bridge, host-local, loopback, portmap
	IPMasq      bool
	// NFTables sets "EnableNFTables": true in the network config: twilld
	// writes its rules with nftables.
	NFTables   bool     `json:",omitempty"`
	DaemonArgs []string // extra twilld flags, e.g. a short --resync-interval in tests
	// DaemonEnv is added to twilld's environment (e.g. a PATH without
	// iptables).
	DaemonEnv []string `json:",omitempty"`
	// Datastore is "etcd" (twilld leases from etcd) or "kube" (a real
	// kube-apiserver on the lab's etcd; twilld --kube-subnet-mgr).
	Datastore     string
	KubeAPIServer string // the kube-apiserver binary, for Datastore kube
	// EtcdMembers above 1 replaces the embedded etcd by a cluster of that
	// many members of the real etcd (EtcdBinary), every twilld and twillctl
	// given all of their endpoints: for member failures.
	EtcdMembers int    `json:",omitempty"`
	EtcdBinary  string `json:",omitempty"`
	// EtcdPrefix is the network's key prefix ("": twill's default); flannel's
	// is /coreos.com/network.
	EtcdPrefix string `json:",omitempty"`
	// FromFlannel makes `lab run` show a node's migration from flannel.
	FromFlannel bool `json:",omitempty"`
	// KubeAnnotationPrefix is the prefix of the Node annotations in
	// Kubernetes mode ("": twill.io); flannel's is flannel.alpha.coreos.com.
	KubeAnnotationPrefix string `json:",omitempty"`
	// KubeMode is twilld's --kube-mode: "" or "nodenetwork" (NodeNetwork
	// records; the lab runs kube-controller-manager's garbage collector,
	// which deletes a Node's record with the Node), or "annotations".
	KubeMode string `json:",omitempty"`
}

// State is what `lab up` leaves in <dir>/lab.json for status, check and down.
type State struct {
	Options
	Pods           []Pod
	KubeAdminToken string `json:",omitempty"`
}

// Pod is one pod the lab made.
type Pod struct {
	Name   string     // container ID and namespace suffix, e.g. h1-p2
	Host   int        // host number
	NS     string     // namespace name
	Addr   netip.Addr // the IPv4 address host-local gave it; zero in an IPv6-only lab
	AddrV6 netip.Addr `json:",omitempty"` // its IPv6 address, with IPv6
}

// AddrOf returns the pod's address of one family.
func (p Pod) AddrOf(v6 bool) netip.Addr {
	if v6 {
		return p.AddrV6
	}
	return p.Addr
}

// Families lists the lab's pod network families: false for IPv4, true for
// IPv6.
func (o Options) Families() []bool {
	switch o.IPFamily {
	case "ipv6":
		return []bool{true}
	case "dual":
		return []bool{false, true}
	}
	return []bool{false}
}

// DefaultIPv6Network is the lab's IPv6 pod network unless told otherwise.
var DefaultIPv6Network = netip.MustParsePrefix("fd00:10:244::/56")

// NetConf is the lab's network config (net-conf.json).
func (o Options) NetConf() string {
	backend := map[string]any{"Type": o.Backend}
	for k, v := range o.BackendOptions {
		backend[k] = v
	}
	conf := map[string]any{"Backend": backend}
	for _, v6 := range o.Families() {
		if v6 {
			conf["EnableIPv6"], conf["IPv6Network"] = true, o.ipv6Network().String()
		} else {
			conf["Network"] = o.Network.String()
		}
	}
	if o.IPFamily == "ipv6" {
		conf["EnableIPv4"] = false
	}
	if o.NFTables {
		conf["EnableNFTables"] = true
	}
	b, _ := json.Marshal(conf)
	return string(b)
}

func (o Options) ipv6Network() netip.Prefix {
	if o.IPv6Network.IsValid() {
		return o.IPv6Network
	}
	return DefaultIPv6Network
}

// Lab is a lab being built or torn down.
type Lab struct {
	State
	log *slog.Logger
	out io.Writer
}

// Topology returns the lab's namespaces.
func (l *Lab) Topology() Topology { return Topology{Prefix: l.Prefix, Hosts: l.Hosts} }

func (l *Lab) statePath() string { return filepath.Join(l.Dir, "lab.json") }

// EtcdURL is the client URL of the lab's etcd, reachable from every host.
func EtcdURL() string {
	return "http://" + net.JoinHostPort(WorldAddr.String(), strconv.Itoa(EtcdPort))
}

// New prepares a lab with o; nothing is created yet.
func New(o Options, out io.Writer, log *slog.Logger) *Lab {
	return &Lab{State: State{Options: o}, out: out, log: log}
}

// Load reads the state a previous `lab up` left in dir.
func Load(dir string, out io.Writer, log *slog.Logger) (*Lab, error) {
	data, err := os.ReadFile(filepath.Join(dir, "lab.json"))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("no lab in %s (run `twillctl lab up` first)", dir)
		}
		return nil, err
	}
	var s State
	if err := json.Unmarshal(data, &s); err != nil {
		return nil, fmt.Errorf("lab state %s: %w", filepath.Join(dir, "lab.json"), err)
	}
	return &Lab{State: s, out: out, log: log}, nil
}

func (l *Lab) save() error {
	data, err := json.MarshalIndent(l.State, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(l.statePath(), data, 0o644)
}

func (l *Lab) say(format string, args ...any) { fmt.Fprintf(l.out, format+"\n", args...) }

// Up builds the lab: namespaces, etcd, the network config, one twilld per
// host, and the pods. On failure what was made is left for Down (and the logs
// for reading).
func (l *Lab) Up(ctx context.Context) error {
	if err := l.preflight(ctx); err != nil {
		return err
	}
	if err := os.MkdirAll(l.Dir, 0o755); err != nil {
		return err
	}
	if err := l.save(); err != nil {
		return err
	}
	l.say("creating %d hosts on underlay %s (namespaces %su, %sh1..%d)", l.Hosts, Underlay, l.Prefix, l.Prefix, l.Hosts)
	if err := l.Topology().Up(ctx); err != nil {
		return err
	}
	if l.EtcdMembers > 1 {
		l.say("starting an etcd cluster of %d members at %s in %s", l.EtcdMembers, l.EtcdEndpoints(), l.Topology().UnderlayNS())
	} else {
		l.say("starting etcd (embedded in twillctl) at %s in %s", EtcdURL(), l.Topology().UnderlayNS())
	}
	if err := l.startEtcd(ctx); err != nil {
		return err
	}
	conf := l.NetConf()
	if l.Datastore == "kube" {
		if err := l.startKube(ctx); err != nil {
			return err
		}
		l.writeConf(conf)
	} else if _, err := l.Ctl(ctx, "config", "set", "--file", l.writeConf(conf)); err != nil {
		return err
	}
	l.say("network config: %s", conf)
	for i := 1; i <= l.Hosts; i++ {
		if err := l.StartDaemon(i); err != nil {
			return err
		}
	}
	for i := 1; i <= l.Hosts; i++ {
		env, err := l.WaitEnv(ctx, i)
		if err != nil {
			return err
		}
		switch {
		case !env.IPv6Subnet.IsValid():
			l.say("h%d (%s): subnet %s, pod MTU %d", i, l.Topology().HostAddr(i), env.Subnet.Masked(), env.MTU)
		case !env.Subnet.IsValid():
			l.say("h%d (%s): IPv6 subnet %s, pod MTU %d", i, l.Topology().HostAddrV6(i), env.IPv6Subnet.Masked(), env.MTU)
		default:
			l.say("h%d (%s, %s): subnets %s and %s, pod MTU %d", i, l.Topology().HostAddr(i), l.Topology().HostAddrV6(i), env.Subnet.Masked(), env.IPv6Subnet.Masked(), env.MTU)
		}
	}
	for i := 1; i <= l.Hosts; i++ {
		for j := 1; j <= l.PodsPerHost; j++ {
			p, err := l.addPod(ctx, i, j)
			if err != nil {
				return err
			}
			l.Pods = append(l.Pods, p)
			if err := l.save(); err != nil {
				return err
			}
		}
	}
	l.say("%d pods up", len(l.Pods))
	return nil
}

func (l *Lab) preflight(ctx context.Context) error {
	if os.Geteuid() != 0 {
		return errors.New("the lab needs root: it creates network namespaces")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return errors.New("the lab needs iproute2's `ip` (apt-get install iproute2)")
	}
	for _, bin := range []string{filepath.Join(l.BinDir, "twilld"), filepath.Join(l.BinDir, "twill")} {
		if _, err := os.Stat(bin); err != nil {
			return fmt.Errorf("%s not found: run `make build` (or pass --bin-dir)", bin)
		}
	}
	if l.EtcdMembers > 1 {
		if l.Datastore != "etcd" {
			return fmt.Errorf("an etcd cluster of %d members is for --datastore etcd", l.EtcdMembers)
		}
		if _, err := os.Stat(l.EtcdBinary); err != nil {
			return fmt.Errorf("etcd binary for a %d-member cluster not found at %q: run `make tools`", l.EtcdMembers, l.EtcdBinary)
		}
	}
	switch l.Backend {
	case subnet.BackendVXLAN, subnet.BackendHostGW, subnet.BackendAlloc:
	case subnet.BackendWireGuard:
		if err := wireGuardPreflight(); err != nil {
			return err
		}
	default:
		return fmt.Errorf("--backend %q: want vxlan, host-gw, alloc or wireguard", l.Backend)
	}
	switch l.IPFamily {
	case "", "ipv4", "ipv6", "dual":
	default:
		return fmt.Errorf("--ip-family %q: want ipv4, ipv6 or dual", l.IPFamily)
	}
	switch l.Datastore {
	case "etcd":
	case "kube":
		if _, err := os.Stat(l.KubeAPIServer); err != nil {
			return fmt.Errorf("kube-apiserver not found at %s: run `make tools` (or pass --kube-apiserver)", l.KubeAPIServer)
		}
		switch l.KubeMode {
		case "", "nodenetwork":
			if _, err := os.Stat(l.kubeControllerManager()); err != nil {
				return fmt.Errorf("kube-controller-manager not found beside kube-apiserver (%s): run `make tools`", l.kubeControllerManager())
			}
		case "annotations":
		default:
			return fmt.Errorf("--kube-mode %q: want nodenetwork or annotations", l.KubeMode)
		}
	default:
		return fmt.Errorf("--datastore %q: want etcd or kube", l.Datastore)
	}
	for _, p := range []string{"bridge", "host-local", "loopback", "portmap"} {
		if _, err := os.Stat(filepath.Join(l.CNIBinDir, p)); err != nil {
			return fmt.Errorf("CNI plugin %s not found in %s: run `make cni-plugins` (or pass --cni-bin-dir)", p, l.CNIBinDir)
		}
	}
	exists, err := l.Topology().Exists(ctx)
	if err != nil {
		return err
	}
	if exists {
		return fmt.Errorf("a lab with namespace prefix %q already exists: run `twillctl lab down` first", l.Prefix)
	}
	return nil
}

func (l *Lab) writeConf(conf string) string {
	p := filepath.Join(l.Dir, "net-conf.json")
	os.WriteFile(p, []byte(conf), 0o644)
	return p
}

func (l *Lab) hostDir(i int) string { return filepath.Join(l.Dir, fmt.Sprintf("h%d", i)) }

// EnvFile is host i's subnet env file.
func (l *Lab) EnvFile(i int) string { return filepath.Join(l.hostDir(i), "subnet.env") }

func (l *Lab) startEtcd(ctx context.Context) error {
	if l.EtcdMembers > 1 {
		return l.startEtcdCluster(ctx)
	}
	self := filepath.Join(l.BinDir, "twillctl")
	if err := l.spawn("etcd", l.Topology().UnderlayNS(), self, "lab", "etcd",
		"--data-dir", filepath.Join(l.Dir, "etcd"), "--listen", net.JoinHostPort(WorldAddr.String(), strconv.Itoa(EtcdPort))); err != nil {
		return err
	}
	return poll(ctx, 30*time.Second, "etcd to serve", func() error {
		_, err := l.Ctl(ctx, "leases", "list")
		return err
	})
}

// StartDaemon starts twilld on host i, with extra flags after the lab's own.
func (l *Lab) StartDaemon(i int, extra ...string) error {
	if err := os.MkdirAll(l.hostDir(i), 0o755); err != nil {
		return err
	}
	args := []string{
		"--subnet-file", l.EnvFile(i),
		"--node-name", fmt.Sprintf("h%d", i),
		"--http-addr", "127.0.0.1:9867",
	}
	if l.Datastore == "kube" {
		args = append(args, "--kube-subnet-mgr", "--kube-mode", l.kubeMode(), "--kubeconfig", l.kubeconfig(i), "--net-config", filepath.Join(l.Dir, "net-conf.json"))
		if l.KubeAnnotationPrefix != "" {
			args = append(args, "--kube-annotation-prefix", l.KubeAnnotationPrefix)
		}
	} else {
		args = append(args, "--etcd-endpoints", l.EtcdEndpoints())
		if l.EtcdPrefix != "" {
			args = append(args, "--etcd-prefix", l.EtcdPrefix)
		}
	}
	if l.IPMasq {
		args = append(args, "--ip-masq")
	}
	if l.isWireGuard() {
		// A key of its own, and its own /run/wireguard (see wireguard.go).
		if err := os.MkdirAll(l.WireGuardDir(i), 0o700); err != nil {
			return err
		}
		args = append(args, "--wireguard-key-file", l.WireGuardKeyFile(i))
	}
	args = append(append(args, l.DaemonArgs...), extra...)
	return l.spawnCmd(fmt.Sprintf("h%d/twilld", i), l.DaemonEnv, l.hostCommand(i, filepath.Join(l.BinDir, "twilld"), args...))
}

// WaitEnv waits for host i's subnet env file and returns it.
func (l *Lab) WaitEnv(ctx context.Context, i int) (subnet.Env, error) {
	var env subnet.Env
	err := poll(ctx, 60*time.Second, fmt.Sprintf("h%d's subnet env file (see %s)", i, filepath.Join(l.hostDir(i), "twilld.log")), func() error {
		var err error
		env, err = subnet.ReadEnv(l.EnvFile(i))
		return err
	})
	return env, err
}

// spawn starts a long-lived process in a namespace, detached from twillctl so
// it outlives `lab up`. Its pid goes to <dir>/<name>.pid, its output to
// <dir>/<name>.log.
func (l *Lab) spawn(name, netns, bin string, args ...string) error {
	return l.spawnEnv(name, netns, nil, bin, args...)
}

// spawnEnv is spawn with env added to the process's environment.
func (l *Lab) spawnEnv(name, netns string, env []string, bin string, args ...string) error {
	return l.spawnCmd(name, env, append([]string{"ip", "netns", "exec", netns, bin}, args...))
}

// spawnCmd is spawn of a whole command line, which must end in the program
// through exec (as `ip netns exec` does), so that its pid is the program's.
func (l *Lab) spawnCmd(name string, env []string, argv []string) error {
	logf, err := os.OpenFile(filepath.Join(l.Dir, name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...) // the last of a name wins
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	pid := cmd.Process.Pid
	cmd.Process.Release()
	return os.WriteFile(filepath.Join(l.Dir, name+".pid"), []byte(strconv.Itoa(pid)), 0o644)
}

// StopDaemon stops twilld on host i with SIGTERM, as a service manager would.
func (l *Lab) StopDaemon(ctx context.Context, i int) error {
	return stopPid(ctx, filepath.Join(l.hostDir(i), "twilld.pid"))
}

// DaemonLog is the path of host i's twilld log.
func (l *Lab) DaemonLog(i int) string { return filepath.Join(l.hostDir(i), "twilld.log") }

// Ctl runs twillctl against the lab's etcd, from inside the underlay namespace.
func (l *Lab) Ctl(ctx context.Context, args ...string) (string, error) {
	args = append(args, "--etcd-endpoints", l.EtcdEndpoints())
	if l.EtcdPrefix != "" {
		args = append(args, "--etcd-prefix", l.EtcdPrefix)
	}
	return InNS(ctx, l.Topology().UnderlayNS(), filepath.Join(l.BinDir, "twillctl"), args...)
}

// Down stops the lab's processes and deletes its namespaces. Logs stay in
// the lab's folder unless removeDir is set.
func (l *Lab) Down(ctx context.Context, removeDir bool) error {
	var errs []error
	pids, _ := filepath.Glob(filepath.Join(l.Dir, "*.pid"))
	more, _ := filepath.Glob(filepath.Join(l.Dir, "*", "*.pid"))
	// Daemons, then the API server, then etcd (alphabetical order of the
	// top-level pid files puts etcd before kube-apiserver).
	slices.Reverse(pids)
	for _, p := range append(more, pids...) {
		if err := stopPid(ctx, p); err != nil {
			errs = append(errs, err)
		}
	}
	// wireguard-go outlives twilld, and keeps its namespace while it runs.
	if err := l.stopWireGuard(ctx); err != nil {
		errs = append(errs, err)
	}
	names, err := ListNS(ctx)
	if err != nil {
		errs = append(errs, err)
	}
	for _, n := range names {
		if strings.HasPrefix(n, l.Prefix) {
			if _, err := IP(ctx, "netns", "del", n); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := l.checkWireGuardGone(); err != nil {
		errs = append(errs, err)
	}
	if removeDir {
		if err := os.RemoveAll(l.Dir); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// stopPid sends SIGTERM to the process named in a pid file, waits for it to
// go, then removes the file. `ip netns exec` replaces itself with the
// program, so the pid is the program's own.
func stopPid(ctx context.Context, path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil || pid <= 1 {
		os.Remove(path)
		return nil
	}
	if syscall.Kill(pid, syscall.SIGTERM) == nil {
		err := poll(ctx, 15*time.Second, "process "+strconv.Itoa(pid)+" to exit", func() error {
			if syscall.Kill(pid, 0) != nil || isZombie(pid) {
				return nil
			}
			return errors.New("still running")
		})
		if err != nil {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	return os.Remove(path)
}

func isZombie(pid int) bool {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// The state follows the command name in parentheses.
	s := string(data)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] == 'Z'
	}
	return false
}

// Poll calls f every interval until it succeeds, d passes or ctx ends.
func Poll(ctx context.Context, d, interval time.Duration, what string, f func() error) error {
	deadline := time.Now().Add(d)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		err := f()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %s waiting for %s: %w", d, what, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// poll is Poll every 100 ms.
func poll(ctx context.Context, d time.Duration, what string, f func() error) error {
	return Poll(ctx, d, 100*time.Millisecond, what, f)
}
