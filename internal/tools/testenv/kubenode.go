package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"
)

// A Kubernetes node of the test, on this one machine beside others: a
// kubelet (the real one from `make tools`) and a containerd, both in a lab
// host's network namespace and in a mount namespace of the node's own.
//
// Why a mount namespace: a DaemonSet's hostPath volumes (/opt/cni/bin,
// /etc/cni/net.d, /run/twill, /run/xtables.lock) resolve in the mount
// namespace of the container runtime, and the kubelet writes to fixed paths
// (/var/lib/kubelet, /var/log/pods, /var/log/containers,
// /usr/libexec/kubernetes), as do the CNI plugins (/var/lib/cni). Two nodes
// on one machine must each have their own, so in the node's namespace each
// of those paths is a bind mount of a folder of the node's under the test's
// temporary directory (NodeMounts).
// /sys and /proc stay the machine's: runc needs the cgroup hierarchies as
// they are. The namespace is a slave of the test's: namespaces and mounts
// made later by the test (a lab host's netns) show in it, and nothing
// mounted in it (the bind mounts, the kubelet's tmpfs volumes, containerd's
// pod namespaces and root file systems) shows outside or outlives it.

// NodeMounts are the paths that each node has of its own, bind-mounted in
// its mount namespace from folders under KubeNode.Dir (named after the path,
// "/" turned into "-"). /run/xtables.lock is a file.
var NodeMounts = []string{
	"/etc/cni/net.d",
	"/opt/cni/bin",
	"/run/twill",
	"/run/xtables.lock",
	"/var/lib/kubelet",
	"/var/log/pods",
	"/var/log/containers",
	"/usr/libexec/kubernetes",
	// The CNI plugins' state: host-local's leases (/var/lib/cni/networks)
	// and twill's attachment files (/var/lib/cni/twill), per node as on a
	// real machine (else two nodes share one store, and it outlives them).
	"/var/lib/cni",
}

// KubeNodeOptions are one node's.
type KubeNodeOptions struct {
	// Name is the Node's name (--hostname-override), e.g. the lab host's
	// name "h1".
	Name string
	// NetNS is the network namespace (a name under /run/netns) the node's
	// programs run in.
	NetNS string
	// NodeIP is the node's address (--node-ip), its underlay address.
	NodeIP string
	// API is the API server the kubelet registers with. Its URL must be
	// reachable from NetNS.
	API *KubeAPI
	// ContainerdBinDir is StartContainerd's binDir: "" for Debian's
	// containerd 1.6; bin/tools/containerd2 works too.
	ContainerdBinDir string
}

// KubeNode is a running node: its mount namespace, containerd and kubelet.
type KubeNode struct {
	Name, NetNS, NodeIP string
	// Dir holds the node's folders, configuration and logs.
	Dir string
	// MountNS is the node's mount namespace, /proc/<pid>/ns/mnt of the
	// process that holds it.
	MountNS string
	// Runtime is the node's containerd (in MountNS; its CNIBinDir and
	// CNIConfDir are the node's /opt/cni/bin and /etc/cni/net.d).
	Runtime *Containerd
	// KubeletLog is the kubelet's log file.
	KubeletLog string

	kubeconfig string
	cgroupRoot string
}

// HostPath is the test's path of a path inside one of the node's NodeMounts
// (such as /etc/cni/net.d/10-x.conflist): where the test reads and writes
// what the node's programs see there.
func (n *KubeNode) HostPath(nodePath string) string {
	for _, m := range NodeMounts {
		if nodePath == m || strings.HasPrefix(nodePath, m+"/") {
			return filepath.Join(n.Dir, mountFolder(m), strings.TrimPrefix(nodePath, m))
		}
	}
	panic("testenv: " + nodePath + " is not under one of the node's own mounts")
}

func mountFolder(path string) string { return strings.ReplaceAll(strings.Trim(path, "/"), "/", "-") }

// Exec runs a program in the node's mount and network namespaces and returns
// its stdout (a failure's error carries stderr).
func (n *KubeNode) Exec(bin string, args ...string) (string, error) {
	return run("nsenter", append([]string{"--mount=" + n.MountNS, "--net=/run/netns/" + n.NetNS, bin}, args...)...)
}

// Kubeconfig is the path of the node's kubeconfig (the API server's admin).
func (n *KubeNode) Kubeconfig() string { return n.kubeconfig }

// StartKubeNode starts a node: its mount namespace, a containerd with the
// pause image and a kubelet that registers the Node with the API server. It
// does not wait for the Node (see the test). Everything is stopped and undone
// when the test ends, pass or fail, in this order: the kubelet, the pods and
// containerd, the node's cgroups, the mount namespace; after the machine's
// last node, the kernel settings the kubelet changed and the empty mount
// points made on the machine (machine.go).
func StartKubeNode(t TB, o KubeNodeOptions) *KubeNode {
	t.Helper()
	RequireRoot(t)
	kubelet := Tool(t, "kubelet")
	if o.Name == "" || o.NetNS == "" || o.NodeIP == "" || o.API == nil {
		t.Fatal("StartKubeNode: Name, NetNS, NodeIP and API are required")
	}
	n := &KubeNode{
		Name:       o.Name,
		NetNS:      o.NetNS,
		NodeIP:     o.NodeIP,
		Dir:        filepath.Join(t.TempDir(), o.Name),
		cgroupRoot: "/" + o.NetNS,
	}
	if err := os.Mkdir(n.Dir, 0o755); err != nil {
		t.Fatal(err)
	}
	n.KubeletLog = filepath.Join(n.Dir, "kubelet.log")
	n.kubeconfig = filepath.Join(n.Dir, "kubeconfig")

	// The node's folders.
	for _, m := range NodeMounts {
		src := filepath.Join(n.Dir, mountFolder(m))
		var err error
		if m == "/run/xtables.lock" {
			err = os.WriteFile(src, nil, 0o600)
		} else {
			err = os.MkdirAll(src, 0o755)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	// The mount points, and the kernel settings the kubelet rewrites (see
	// machine.go).
	acquireMachine(t)
	t.Cleanup(func() { releaseMachine(t) })
	n.startMountNS(t)

	// The kubelet's cgroup root, in every hierarchy; removed after
	// containerd's cleanup (registered later, so it runs earlier) stopped
	// the pods.
	makeCgroupRoot(t, n.cgroupRoot)
	t.Cleanup(func() { removeCgroupTree(t, n.cgroupRoot) })

	n.Runtime = StartContainerdWith(t, ContainerdOptions{
		NetNS:      o.NetNS,
		Dir:        filepath.Join(n.Dir, "containerd"),
		BinDir:     o.ContainerdBinDir,
		MountNS:    n.MountNS,
		CNIBinDir:  n.HostPath("/opt/cni/bin"),
		CNIConfDir: n.HostPath("/etc/cni/net.d"),
	})

	// The kubelet authenticates as the API server's admin (system:masters):
	// a test's shortcut for the node's credentials (no bootstrap, no node
	// client certificate), which also lets it create TokenReviews and
	// SubjectAccessReviews for its webhook authentication and authorization.
	if err := o.API.Kubeconfig(n.kubeconfig, o.API.AdminConfig().BearerToken); err != nil {
		t.Fatal(err)
	}
	config := filepath.Join(n.Dir, "kubelet.yaml")
	if err := os.WriteFile(config, []byte(n.kubeletConfig()), 0o644); err != nil {
		t.Fatal(err)
	}
	args := []string{"--mount=" + n.MountNS, "--net=/run/netns/" + n.NetNS, kubelet,
		"--config=" + config,
		"--kubeconfig=" + n.kubeconfig,
		"--hostname-override=" + n.Name,
		"--node-ip=" + n.NodeIP,
		// The defaults, said plainly: in the node's mount namespace these
		// are the node's own folders.
		"--root-dir=/var/lib/kubelet",
		"--cert-dir=/var/lib/kubelet/pki",
		"--v=2",
	}
	startLogged(t, "kubelet "+n.Name, n.KubeletLog, 20*time.Second, "nsenter", args...)
	return n
}

// kubeletConfig is the node's KubeletConfiguration.
func (n *KubeNode) kubeletConfig() string {
	return `apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# The machine has cgroup v1 (hybrid) and no systemd cgroup manager to use.
cgroupDriver: cgroupfs
# v1.37 refuses to start on cgroup v1 unless told.
failCgroupV1: false
# Each node's pods under a cgroup of its own (made in every hierarchy first).
cgroupRoot: ` + n.cgroupRoot + `
# The node's containerd.
containerRuntimeEndpoint: unix://` + n.Runtime.Socket + `
# The kubelet API (logs, exec) on the node's address; each node has its own
# network namespace, so the default ports do not clash.
address: ` + n.NodeIP + `
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
# Requests to the kubelet API are checked by the API server (TokenReview,
# SubjectAccessReview), as in a real cluster.
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
authorization:
  mode: Webhook
registerNode: true
# The machine has no swap, but do not depend on it.
failSwapOn: false
# false (the default): the kubelet sets kernel.panic, kernel.panic_on_oops
# and vm.overcommit_memory itself (true would make it exit, since the
# machine's differ); they are restored after the machine's last node stops
# (machine.go).
protectKernelDefaults: false
# Report status changes (NetworkReady) quickly.
nodeStatusUpdateFrequency: 2s
nodeStatusReportFrequency: 10s
# The test machine's disk may be fuller than the default eviction
# thresholds; the test is not about eviction.
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  nodefs.inodesFree: "1%"
  imagefs.available: "1%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# No cluster DNS in the test: pods get the machine's resolv.conf.
resolvConf: /etc/resolv.conf
`
}

// startMountNS starts the process holding the node's mount namespace
// (unshare --mount --propagation slave), bind-mounts the node's folders in
// it, and kills it when the test ends.
func (n *KubeNode) startMountNS(t TB) {
	t.Helper()
	cmd := exec.Command("unshare", "--mount", "--propagation", "slave", "sleep", "infinity")
	if err := startProcess(cmd); err != nil {
		t.Fatalf("start the mount namespace of %s: %v", n.Name, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
	})
	n.MountNS = fmt.Sprintf("/proc/%d/ns/mnt", cmd.Process.Pid)
	own, _ := os.Readlink("/proc/self/ns/mnt")
	deadline := time.Now().Add(10 * time.Second)
	for {
		// unshare execs sleep in the same process once it has unshared.
		ns, err := os.Readlink(n.MountNS)
		exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", cmd.Process.Pid))
		if err == nil && ns != own && filepath.Base(exe) == "sleep" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the mount namespace of %s was not made within 10s (%s, %v)", n.Name, ns, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, m := range NodeMounts {
		src := filepath.Join(n.Dir, mountFolder(m))
		if out, err := run("nsenter", "--mount="+n.MountNS, "mount", "--bind", src, m); err != nil {
			t.Fatalf("node %s: bind %s: %v %s", n.Name, m, err, out)
		}
	}
}

// startLogged starts a program in its own process group with its output in
// logPath, and stops it when the test ends (SIGTERM, SIGKILL after grace),
// printing the log's end if the test failed.
func startLogged(t TB, name, logPath string, grace time.Duration, bin string, args ...string) *exec.Cmd {
	t.Helper()
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := startProcess(cmd); err != nil {
		logf.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(done) }()
	t.Cleanup(func() {
		if !terminateGroup(cmd, done, grace) {
			t.Logf("%s did not exit within %v of SIGTERM; killed", name, grace)
		}
		if t.Failed() {
			t.Logf("%s log (%s), last lines:\n%s", name, logPath, tail(logPath, 40))
		}
	})
	return cmd
}

// cgroupHierarchies are the directories of /sys/fs/cgroup that are
// hierarchies (v1 controllers, the named systemd one, the unified one),
// symlinks resolved and each once.
func cgroupHierarchies() []string {
	entries, _ := os.ReadDir("/sys/fs/cgroup")
	seen := map[string]bool{}
	var out []string
	for _, e := range entries {
		p, err := filepath.EvalSymlinks(filepath.Join("/sys/fs/cgroup", e.Name()))
		if err != nil || seen[p] {
			continue
		}
		if fi, err := os.Stat(p); err != nil || !fi.IsDir() {
			continue
		}
		seen[p] = true
		out = append(out, p)
	}
	return out
}

// makeCgroupRoot makes the kubelet's cgroupRoot in every hierarchy (the
// kubelet checks they all exist), with the cpuset's cpus and mems copied
// from the root cpuset (a new v1 cpuset starts empty and takes no task).
func makeCgroupRoot(t TB, root string) {
	t.Helper()
	for _, h := range cgroupHierarchies() {
		d := filepath.Join(h, root)
		if err := os.Mkdir(d, 0o755); err != nil && !os.IsExist(err) {
			t.Fatalf("make cgroup %s: %v", d, err)
		}
		if filepath.Base(h) == "cpuset" {
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				v, err := os.ReadFile(filepath.Join(h, f))
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(d, f), v, 0o644); err != nil {
					t.Fatalf("write %s/%s: %v", d, f, err)
				}
			}
		}
	}
}

// removeCgroupTree removes root and every cgroup under it in every
// hierarchy, deepest first. Cgroups still holding a process (none should,
// once the pods are stopped) are reported.
func removeCgroupTree(t TB, root string) {
	for _, h := range cgroupHierarchies() {
		top := filepath.Join(h, root)
		var dirs []string
		filepath.WalkDir(top, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		sort.Slice(dirs, func(i, j int) bool { return len(dirs[i]) > len(dirs[j]) })
		for _, d := range dirs {
			var err error
			// A cgroup just emptied may be busy for a moment.
			for try := 0; try < 50; try++ {
				if err = syscall.Rmdir(d); err == nil || os.IsNotExist(err) {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			if err != nil && !os.IsNotExist(err) {
				procs, _ := os.ReadFile(filepath.Join(d, "cgroup.procs"))
				t.Errorf("remove cgroup %s: %v (processes: %s)", d, err, strings.Join(strings.Fields(string(procs)), " "))
			}
		}
	}
}
