package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/internal/tools/testenv"
)

// criNode is one host of the containerd test: its runtime and the paths the
// conflist points at.
type criNode struct {
	rt       *testenv.Containerd
	envFile  string
	stateDir string // twill's saved delegate configurations
	ipamDir  string // host-local's store
}

// TestContainerdCRI runs pods the way a kubelet does, through the CRI of a
// real containerd on each of two hosts, with twill's plugin and conflist
// installed as the DaemonSet's init containers install them: pods get
// addresses from their node's subnet and reach each other across hosts, a
// host port mapping works from another host, a sandbox asked for before
// twilld is up fails with twill's try-again error and works once it is, a
// restart of containerd leaves running pods connected, and removing pods
// leaves nothing behind.
func TestContainerdCRI(t *testing.T) {
	for _, rt := range []criRuntime{
		// Debian 12's: CNI library 1.1, so the shipped conflist's cniVersion.
		{name: "containerd-1.6", cniVersion: "1.0.0"},
		// Built by `make tools`: CNI library 1.3, so the highest of cniVersions,
		// and with it STATUS behind the CRI's NetworkReady.
		{name: "containerd-2", binDir: filepath.Join(testenv.RepoRoot(), "bin", "tools", "containerd2"), cniVersion: "1.1.0", status: true},
	} {
		t.Run(rt.name, func(t *testing.T) { testContainerdCRI(t, rt) })
	}
}

// criRuntime is a containerd to test and what it should make of the
// shipped conflist.
type criRuntime struct {
	name       string
	binDir     string // "" for Debian's package
	cniVersion string // the version it should ask the chain for
	status     bool   // whether it asks STATUS for the CRI's NetworkReady
}

func testContainerdCRI(t *testing.T, rtc criRuntime) {
	c := newCluster(t, 2)
	testenv.Tool(t, "crictl")
	c.setConfig(`{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`)

	nodes := map[int]*criNode{}
	for i := 1; i <= 2; i++ {
		dir := filepath.Join(c.hostDir(i), "node")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		n := &criNode{
			envFile:  c.envFile(i),
			stateDir: filepath.Join(dir, "twill-state"),
			ipamDir:  filepath.Join(dir, "ipam"),
		}
		n.rt = testenv.StartContainerd(t, c.topo.HostNS(i), dir, rtc.binDir)
		n.install(t)
		nodes[i] = n
	}

	// twilld is not running yet. A runtime that asks STATUS reports the
	// network not ready with twill's reason; the sandbox fails with twill's
	// code-11 error, and the runtime cleans up after it.
	if rtc.status {
		waitFor(t, "NetworkReady false with twill's reason", 20*time.Second, func() error {
			return networkReady(t, nodes[1], false, "twill: not ready: subnet env file")
		})
	}
	early := podConfig(t, nodes[1], "early", nil)
	out, err := nodes[1].rt.Crictl(t, "runp", early)
	if err == nil {
		t.Fatalf("a sandbox started before twilld wrote its env file: %s", out)
	}
	if want := "failed (add): twill: subnet env file " + nodes[1].envFile + " does not exist yet"; !strings.Contains(err.Error(), want) {
		t.Fatalf("crictl runp before twilld: want %q in the error, got: %v", want, err)
	}
	for i := 1; i <= 2; i++ {
		c.startDaemon(i, "--ip-masq")
	}
	envs := map[int]netip.Prefix{}
	for i := 1; i <= 2; i++ {
		envs[i] = c.waitEnv(i).Subnet
	}
	waitFor(t, "NetworkReady true", 20*time.Second, func() error { return networkReady(t, nodes[1], true, "") })
	earlyID := runPod(t, nodes[1], early)
	if _, err := nodes[1].rt.Crictl(t, "stopp", earlyID); err != nil {
		t.Fatal(err)
	}
	if _, err := nodes[1].rt.Crictl(t, "rmp", earlyID); err != nil {
		t.Fatal(err)
	}

	// One pod per host; the one on h1 maps host port 18080 to its port 8080.
	const hostPort, podPort = 18080, 8080
	ids := map[int]string{
		1: runPod(t, nodes[1], podConfig(t, nodes[1], "web", []portMapping{{ContainerPort: podPort, HostPort: hostPort}})),
		2: runPod(t, nodes[2], podConfig(t, nodes[2], "client", nil)),
	}
	pods := map[int]sandbox{}
	for i := 1; i <= 2; i++ {
		pods[i] = inspectPod(t, nodes[i], ids[i])
		if !envs[i].Contains(pods[i].ip) {
			t.Fatalf("pod on h%d got %s, outside its node's subnet %s", i, pods[i].ip, envs[i])
		}
		if held := dirNames(t, filepath.Join(nodes[i].ipamDir, "twill"), func(n string) bool { return n != pods[i].ip.String() }); len(held) != 1 {
			t.Fatalf("h%d: host-local's store does not hold the pod's %s", i, pods[i].ip)
		}
		if state := dirNames(t, filepath.Join(nodes[i].stateDir, "twill"), func(string) bool { return false }); len(state) != 1 {
			t.Fatalf("h%d: twill's state for one pod is %v", i, state)
		}
		if v := cachedResultVersion(t, ids[i]); v != rtc.cniVersion {
			t.Errorf("%s cached a CNI result of version %q; the shipped conflist should give it %s", nodes[i].rt.Version(t), v, rtc.cniVersion)
		}
	}
	t.Logf("%s: pods h1 %s (%s), h2 %s (%s)", nodes[1].rt.Version(t), pods[1].ip, envs[1], pods[2].ip, envs[2])

	connected := func(when string) {
		t.Helper()
		for _, p := range [][2]int{{1, 2}, {2, 1}} {
			from, to := pods[p[0]], pods[p[1]]
			waitFor(t, fmt.Sprintf("%s: ping from h%d's pod to %s", when, p[0], to.ip), 10*time.Second, func() error {
				if !lab.Ping(ctxFor(t, 10*time.Second), from.netns, to.ip.String()) {
					return fmt.Errorf("no answer")
				}
				return nil
			})
			if src := tcpTransfer(t, from.netns, to.netns, to.ip, 64<<10); src != from.ip {
				t.Fatalf("%s: TCP from h%d's pod arrived from %s, want the pod's %s", when, p[0], src, from.ip)
			}
		}
	}
	connected("after RunPodSandbox")

	// The host port: from h2's own namespace to h1's underlay address.
	h1 := netip.AddrPortFrom(c.topo.HostAddr(1), hostPort)
	if got := serveOnce(t, pods[1].netns, podPort, c.topo.HostNS(2), h1); got != c.topo.HostAddr(2) {
		t.Errorf("through host port %s the pod saw source %s, want h2's %s", h1, got, c.topo.HostAddr(2))
	}

	// containerd restarts under running pods: they keep their network, and
	// the restarted runtime still knows them.
	nodes[1].rt.Stop(t)
	nodes[1].rt.Start(t)
	connected("after containerd restarted on h1")
	if again := inspectPod(t, nodes[1], ids[1]); again.ip != pods[1].ip || again.state != "SANDBOX_READY" {
		t.Fatalf("after the restart h1's pod is %s with %s, want SANDBOX_READY with %s", again.state, again.ip, pods[1].ip)
	}

	// StopPodSandbox + RemovePodSandbox release everything.
	for i := 1; i <= 2; i++ {
		n := nodes[i]
		if out, err := n.rt.Crictl(t, "stopp", ids[i]); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if out, err := n.rt.Crictl(t, "rmp", ids[i]); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if left := dirNames(t, filepath.Join(n.stateDir, "twill"), func(string) bool { return false }); len(left) > 0 {
			t.Errorf("h%d: twill's state left after the pods were removed: %v", i, left)
		}
		if left := dirNames(t, filepath.Join(n.ipamDir, "twill"), func(n string) bool {
			return n == "lock" || strings.HasPrefix(n, "last_reserved_ip.")
		}); len(left) > 0 {
			t.Errorf("h%d: host-local reservations left after the pods were removed: %v", i, left)
		}
		if veths := vethsIn(t, c.topo.HostNS(i)); len(veths) > 0 {
			t.Errorf("h%d: veths left after the pods were removed: %v", i, veths)
		}
	}
}

// install puts the CNI plugins and the conflist where this node's containerd
// looks, with `twillctl install` as the DaemonSet's init containers do. The
// reference plugins are the node's own (the DaemonSet does not ship them).
// The conflist is the DaemonSet's, with the paths that must differ between
// two nodes on one machine moved into the node's directory
// (lab.NodeConfList): everything else, the cniVersion above all, is as
// shipped.
func (n *criNode) install(t *testing.T) {
	t.Helper()
	install := func(src, dst, mode string) {
		t.Helper()
		out, err := exec.Command(testenv.Binary(t, "twillctl"), "install", "--src", src, "--dst", dst, "--mode", mode).CombinedOutput()
		if err != nil {
			t.Fatalf("twillctl install %s: %v\n%s", src, err, out)
		}
	}
	install(testenv.Binary(t, "twill"), filepath.Join(n.rt.CNIBinDir, "twill"), "0755")
	for _, p := range []string{"bridge", "host-local", "loopback", "portmap"} {
		install(filepath.Join(testenv.CNIBinDir(t), p), filepath.Join(n.rt.CNIBinDir, p), "0755")
	}
	conf, err := lab.NodeConfList(n.envFile, n.stateDir, n.ipamDir)
	if err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(n.rt.Dir, "cni-conf.json")
	if err := os.WriteFile(src, conf, 0o644); err != nil {
		t.Fatal(err)
	}
	install(src, filepath.Join(n.rt.CNIConfDir, "10-twill.conflist"), "0644")
}

type portMapping struct {
	ContainerPort int `json:"container_port"`
	HostPort      int `json:"host_port"`
}

// podConfig writes a PodSandboxConfig for crictl and returns its path.
func podConfig(t *testing.T, n *criNode, name string, ports []portMapping) string {
	t.Helper()
	conf := map[string]any{
		"metadata":      map[string]any{"name": name, "namespace": "default", "uid": "uid-" + name, "attempt": 0},
		"hostname":      name,
		"log_directory": filepath.Join(n.rt.Dir, "pod-logs", name),
		"linux":         map[string]any{"cgroup_parent": n.rt.CgroupParent},
	}
	if len(ports) > 0 {
		conf["port_mappings"] = ports
	}
	raw, _ := json.Marshal(conf)
	path := filepath.Join(n.rt.Dir, "pod-"+name+".json")
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// runPod runs RunPodSandbox and returns the sandbox's ID.
func runPod(t *testing.T, n *criNode, config string) string {
	t.Helper()
	out, err := n.rt.Crictl(t, "runp", config)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	lines := strings.Fields(out)
	if len(lines) == 0 {
		t.Fatalf("crictl runp printed no sandbox ID")
	}
	return lines[len(lines)-1]
}

// sandbox is what the CRI says of a pod sandbox.
type sandbox struct {
	state string
	ip    netip.Addr
	netns string // name under /run/netns
}

func inspectPod(t *testing.T, n *criNode, id string) sandbox {
	t.Helper()
	out, err := n.rt.Crictl(t, "inspectp", "-o", "json", id)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	var st struct {
		Status struct {
			State   string
			Network struct{ IP string }
		}
		Info struct {
			RuntimeSpec struct {
				Linux struct {
					Namespaces []struct{ Type, Path string }
				}
			}
		}
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("crictl inspectp: %v\n%s", err, out)
	}
	s := sandbox{state: st.Status.State}
	if s.ip, err = netip.ParseAddr(st.Status.Network.IP); err != nil {
		t.Fatalf("sandbox %s has no IP: %v\n%s", id, err, out)
	}
	for _, ns := range st.Info.RuntimeSpec.Linux.Namespaces {
		if ns.Type == "network" {
			s.netns = strings.TrimPrefix(ns.Path, "/var/run/netns/")
		}
	}
	if s.netns == "" || strings.Contains(s.netns, "/") {
		t.Fatalf("sandbox %s: no network namespace under /var/run/netns in\n%s", id, out)
	}
	return s
}

// cachedResultVersion is the cniVersion of the result libcni cached for a
// sandbox: the version the runtime asked the chain for.
func cachedResultVersion(t *testing.T, id string) string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("/var/lib/cni/results", "twill-"+id+"-eth0"))
	if err != nil {
		t.Fatalf("the runtime's cached CNI result: %v", err)
	}
	var cached struct {
		Result struct {
			CNIVersion string `json:"cniVersion"`
		} `json:"result"`
	}
	if err := json.Unmarshal(raw, &cached); err != nil {
		t.Fatalf("the runtime's cached CNI result: %v\n%s", err, raw)
	}
	return cached.Result.CNIVersion
}

// networkReady checks the CRI's NetworkReady condition and, when want is
// false, that its message contains reason.
func networkReady(t *testing.T, n *criNode, want bool, reason string) error {
	out, err := n.rt.Crictl(t, "info")
	if err != nil {
		return err
	}
	var info struct {
		Status struct {
			Conditions []struct {
				Type    string
				Status  bool
				Reason  string
				Message string
			}
		}
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		return fmt.Errorf("crictl info: %w", err)
	}
	for _, c := range info.Status.Conditions {
		if c.Type != "NetworkReady" {
			continue
		}
		if c.Status != want || !strings.Contains(c.Message, reason) {
			return fmt.Errorf("NetworkReady %v (%s: %s), want %v with %q", c.Status, c.Reason, c.Message, want, reason)
		}
		return nil
	}
	return fmt.Errorf("crictl info has no NetworkReady condition:\n%s", out)
}

// serveOnce accepts one TCP connection on port in listenNS, dialled from
// fromNS to addr, and returns the source address the listener saw.
func serveOnce(t *testing.T, listenNS string, port int, fromNS string, addr netip.AddrPort) netip.Addr {
	t.Helper()
	var ln net.Listener
	err := ns.WithNetNSPath("/run/netns/"+listenNS, func(ns.NetNS) error {
		var err error
		ln, err = net.Listen("tcp", fmt.Sprintf(":%d", port))
		return err
	})
	if err != nil {
		t.Fatalf("listen in %s: %v", listenNS, err)
	}
	defer ln.Close()
	seen := make(chan netip.Addr, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			close(seen)
			return
		}
		defer conn.Close()
		seen <- conn.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
		conn.Write([]byte("hello"))
	}()
	var reply []byte
	err = ns.WithNetNSPath("/run/netns/"+fromNS, func(ns.NetNS) error {
		conn, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
		if err != nil {
			return err
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		reply, err = io.ReadAll(conn)
		return err
	})
	if err != nil || string(reply) != "hello" {
		t.Fatalf("connect from %s to %s: %v (read %q)", fromNS, addr, err, reply)
	}
	return <-seen
}

func vethsIn(t *testing.T, netns string) []string {
	t.Helper()
	var names []string
	err := ns.WithNetNSPath("/run/netns/"+netns, func(ns.NetNS) error {
		links, err := netlink.LinkList()
		for _, l := range links {
			if l.Type() == "veth" && l.Attrs().Name != "eth0" {
				names = append(names, l.Attrs().Name)
			}
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return names
}
