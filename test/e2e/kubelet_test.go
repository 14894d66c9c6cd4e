package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/twillnet/twill/internal/tools/kubelab"
	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/internal/tools/testenv"
)

// TestKubeletNodes proves the node harness (testenv.StartKubeNode) with real
// kubelets and containerds on two lab hosts, without Docker: the API server
// runs in the underlay namespace, the controller manager gives each
// registered Node a podCIDR, and the scheduler and the DaemonSet controller
// place a hostNetwork pod on both nodes while they are NotReady for want of
// a CNI conflist; that pod is in its node's network namespace and its
// hostPath /run/twill is its own node's. Each node becomes Ready once a
// conflist is in its own /etc/cni/net.d (which the other node does not see),
// and a pod on the CNI network on each node gets an address from its node's
// podCIDR. With kube-proxy on each node, the kubernetes Service's ClusterIP
// answers from the nodes' network namespace (a hostNetwork pod's). About 21
// to 24 s on a 2-core VM.
func TestKubeletNodes(t *testing.T) {
	start := time.Now()
	k := startKubeletCluster(t, 2)
	api, cs, nodes := k.API, k.Client, k.Nodes
	t.Logf("control plane and nodes started in %v", time.Since(start).Round(time.Millisecond))

	// Both Nodes register and get a podCIDR; they are NotReady: no conflist.
	podCIDRs := map[string]netip.Prefix{}
	waitFor(t, "both Nodes registered with a podCIDR, NotReady for want of a network", 90*time.Second, func() error {
		for name := range nodes {
			n, err := cs.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if n.Spec.PodCIDR == "" {
				return fmt.Errorf("node %s has no podCIDR yet", name)
			}
			p, err := netip.ParsePrefix(n.Spec.PodCIDR)
			if err != nil {
				return err
			}
			podCIDRs[name] = p
			ready := kubelab.NodeCondition(n, corev1.NodeReady)
			if ready == nil {
				return fmt.Errorf("node %s has no Ready condition yet", name)
			}
			if ready.Status != corev1.ConditionFalse || !strings.Contains(ready.Message, "network not ready") {
				return fmt.Errorf("node %s: Ready %s: %s", name, ready.Status, ready.Message)
			}
		}
		return nil
	})
	if podCIDRs["h1"] == podCIDRs["h2"] {
		t.Fatalf("both nodes got podCIDR %s", podCIDRs["h1"])
	}
	for name, n := range nodes {
		ready := kubelab.NodeCondition(getNode(t, cs, name), corev1.NodeReady)
		t.Logf("node %s: podCIDR %s, Ready %s: %s (%s)", name, podCIDRs[name], ready.Status, ready.Message, n.NodeIP)
	}
	t.Logf("nodes registered, NotReady, in %v", time.Since(start).Round(time.Millisecond))

	// A hostNetwork pod runs on a node whose network is not ready. It
	// mounts the node's /run/twill (a hostPath, as twill's DaemonSet does):
	// each node's pod must find its own node's file there.
	for name, n := range nodes {
		if err := os.WriteFile(n.HostPath("/run/twill/node"), []byte(name), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	createPauseDaemonSet(t, cs, "host-pause", true)
	hostPods := waitDaemonSetPods(t, cs, "host-pause", nodes, 90*time.Second)
	for name, p := range hostPods {
		if p.Status.PodIP != nodes[name].NodeIP {
			t.Errorf("hostNetwork pod %s on %s has address %s, want the node's %s", p.Name, name, p.Status.PodIP, nodes[name].NodeIP)
		}
		pid := containerPID(t, nodes[name], p.Name)
		// Its process is in the node's network namespace...
		if got, want := nsInode(t, fmt.Sprintf("/proc/%d/ns/net", pid)), nsInode(t, "/run/netns/"+nodes[name].NetNS); got != want {
			t.Errorf("hostNetwork pod %s on %s: network namespace %d, want the node's %d", p.Name, name, got, want)
		}
		// ...and its hostPath volume is the node's own /run/twill.
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/root/host/run/twill/node", pid))
		if err != nil || string(data) != name {
			t.Errorf("hostNetwork pod %s on %s reads %q from its hostPath /run/twill (%v), want %q", p.Name, name, data, err, name)
		}
	}
	t.Logf("hostNetwork pods running on both nodes at %v", time.Since(start).Round(time.Millisecond))

	// Each node's own conflist, a bridge network over its podCIDR, in its
	// own /etc/cni/net.d; the reference plugins in its own /opt/cni/bin.
	for name, n := range nodes {
		installBridgeNetwork(t, n, podCIDRs[name])
	}
	for name, n := range nodes {
		// The other node's conflist is not in this node's view.
		out, err := n.Exec("ls", "/etc/cni/net.d")
		if err != nil {
			t.Fatal(err)
		}
		if got, want := strings.TrimSpace(out), "10-bridge-"+name+".conflist"; got != want {
			t.Fatalf("node %s sees %q in its /etc/cni/net.d, want only %q", name, got, want)
		}
	}
	for name, n := range nodes {
		waitFor(t, "the runtime of "+name+" to load its conflist", 20*time.Second, func() error {
			out, err := n.Runtime.Crictl(t, "info")
			if err != nil {
				return err
			}
			var info struct {
				Config struct {
					CNI struct{ ConfDir string } `json:"cni"`
				} `json:"config"`
				CNIConfig struct {
					Networks []struct {
						Config struct{ Name string }
					}
				} `json:"cniconfig"`
				LastCNILoadStatus string `json:"lastCNILoadStatus"`
			}
			if err := json.Unmarshal([]byte(out), &info); err != nil {
				return fmt.Errorf("crictl info: %w", err)
			}
			var names []string
			for _, nw := range info.CNIConfig.Networks {
				names = append(names, nw.Config.Name)
			}
			if info.LastCNILoadStatus != "OK" || !slices.Contains(names, "bridge-"+name) {
				return fmt.Errorf("networks %v, last CNI load: %s", names, info.LastCNILoadStatus)
			}
			return nil
		})
	}
	waitFor(t, "both Nodes Ready", 60*time.Second, func() error {
		for name := range nodes {
			n, err := cs.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if ready := kubelab.NodeCondition(n, corev1.NodeReady); ready == nil || ready.Status != corev1.ConditionTrue {
				return fmt.Errorf("node %s: %+v", name, ready)
			}
		}
		return nil
	})
	t.Logf("nodes Ready at %v", time.Since(start).Round(time.Millisecond))

	// A pod on the CNI network on each node, addressed from its podCIDR.
	createPauseDaemonSet(t, cs, "pod-pause", false)
	pods := waitDaemonSetPods(t, cs, "pod-pause", nodes, 90*time.Second)
	for name, p := range pods {
		ip, err := netip.ParseAddr(p.Status.PodIP)
		if err != nil || !podCIDRs[name].Contains(ip) {
			t.Errorf("pod %s on %s has address %q, not in the node's podCIDR %s", p.Name, name, p.Status.PodIP, podCIDRs[name])
		}
		t.Logf("pod %s on %s: %s (podCIDR %s)", p.Name, name, p.Status.PodIP, podCIDRs[name])
	}
	t.Logf("pods on the CNI network running at %v", time.Since(start).Round(time.Millisecond))

	// kube-proxy on each node: the kubernetes Service's ClusterIP reaches
	// the API server from the node's network namespace, which is what a
	// hostNetwork pod (twilld, through rest.InClusterConfig) sees.
	svc, err := cs.CoreV1().Services("default").Get(context.Background(), "kubernetes", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range k.Topo.HostNumbers() {
		nodes[fmt.Sprintf("h%d", i)].StartKubeProxy(t, testenv.KubeProxyOptions{ClusterCIDR: kubelab.ClusterCIDR})
	}
	clusterURL := "https://" + net.JoinHostPort(svc.Spec.ClusterIP, "443")
	for _, i := range k.Topo.HostNumbers() {
		cfg := api.AdminConfig()
		cfg.Host = clusterURL
		cfg.Dial = lab.DialInNS(k.Topo.HostNS(i))
		cfg.Timeout = 5 * time.Second
		hc, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			t.Fatal(err)
		}
		waitFor(t, fmt.Sprintf("the kubernetes Service (%s) to answer from h%d", clusterURL, i), 60*time.Second, func() error {
			v, err := hc.Discovery().ServerVersion()
			if err == nil {
				t.Logf("h%d: %s answers: %s", i, clusterURL, v.GitVersion)
			}
			return err
		})
	}
	t.Logf("the kubernetes Service answers from both nodes at %v", time.Since(start).Round(time.Millisecond))
}

func getNode(t *testing.T, cs kubernetes.Interface, name string) *corev1.Node {
	t.Helper()
	n, err := cs.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// createPauseDaemonSet creates a DaemonSet in default of the local pause
// image (never pulled), tolerating every taint (the nodes are NotReady at
// first).
func createPauseDaemonSet(t *testing.T, cs kubernetes.Interface, name string, hostNetwork bool) {
	t.Helper()
	labels := map[string]string{"app": name}
	ds := &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					HostNetwork:                   hostNetwork,
					Tolerations:                   []corev1.Toleration{{Operator: corev1.TolerationOpExists}},
					TerminationGracePeriodSeconds: new(int64),
					Containers: []corev1.Container{{
						Name:            "pause",
						Image:           testenv.PauseImage,
						ImagePullPolicy: corev1.PullNever,
						VolumeMounts:    []corev1.VolumeMount{{Name: "run-twill", MountPath: "/host/run/twill", ReadOnly: true}},
					}},
					Volumes: []corev1.Volume{{
						Name:         "run-twill",
						VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: "/run/twill"}},
					}},
				},
			},
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := cs.AppsV1().DaemonSets("default").Create(ctx, ds, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create DaemonSet %s: %v", name, err)
	}
}

// waitDaemonSetPods waits until the DaemonSet's pod on every node is
// Running with an address, and returns them by node.
func waitDaemonSetPods(t *testing.T, cs kubernetes.Interface, name string, nodes map[string]*testenv.KubeNode, d time.Duration) map[string]*corev1.Pod {
	t.Helper()
	var byNode map[string]*corev1.Pod
	waitFor(t, "the pods of DaemonSet "+name+" running on every node", d, func() error {
		list, err := cs.CoreV1().Pods("default").List(context.Background(), metav1.ListOptions{LabelSelector: "app=" + name})
		if err != nil {
			return err
		}
		byNode = map[string]*corev1.Pod{}
		var states []string
		for i := range list.Items {
			p := &list.Items[i]
			states = append(states, fmt.Sprintf("%s on %q: %s %s", p.Name, p.Spec.NodeName, p.Status.Phase, kubelab.PodWaiting(p)))
			if p.Status.Phase == corev1.PodRunning && p.Status.PodIP != "" {
				byNode[p.Spec.NodeName] = p
			}
		}
		for n := range nodes {
			if byNode[n] == nil {
				return fmt.Errorf("none running on %s yet: %s", n, strings.Join(states, "; "))
			}
		}
		return nil
	})
	return byNode
}

// installBridgeNetwork puts the reference bridge, host-local and loopback
// plugins in the node's /opt/cni/bin and a bridge conflist over podCIDR in
// its /etc/cni/net.d, named after the node.
func installBridgeNetwork(t *testing.T, n *testenv.KubeNode, podCIDR netip.Prefix) {
	t.Helper()
	src := testenv.CNIBinDir(t)
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		data, err := os.ReadFile(filepath.Join(src, p))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(n.HostPath("/opt/cni/bin"), p), data, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	gw := podCIDR.Addr().Next()
	conflist := `{
  "cniVersion": "1.0.0",
  "name": "bridge-` + n.Name + `",
  "plugins": [{
    "type": "bridge",
    "bridge": "cni0",
    "isGateway": true,
    "ipam": {
      "type": "host-local",
      "dataDir": "/run/twill/ipam",
      "ranges": [[{"subnet": "` + podCIDR.String() + `", "gateway": "` + gw.String() + `"}]]
    }
  }]
}
`
	// Written aside and renamed, so that containerd never reads half a
	// file; the temporary file is in the same folder (with a name libcni
	// skips): containerd 1.6 ignores the Create event of a file moved in
	// from elsewhere and reloads on Write, Rename (away) and Remove.
	final := filepath.Join(n.HostPath("/etc/cni/net.d"), "10-bridge-"+n.Name+".conflist")
	tmp := final + ".tmp"
	if err := os.WriteFile(tmp, []byte(conflist), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, final); err != nil {
		t.Fatal(err)
	}
}

// containerPID is the process id (in the test's namespace) of the one
// container of a pod on node n, as its runtime reports it.
func containerPID(t *testing.T, n *testenv.KubeNode, pod string) int {
	t.Helper()
	out, err := n.Runtime.Crictl(t, "ps", "-q", "--label", "io.kubernetes.pod.name="+pod)
	if err != nil {
		t.Fatal(err)
	}
	ids := strings.Fields(out)
	if len(ids) != 1 {
		t.Fatalf("pod %s on %s: containers %q, want one", pod, n.Name, ids)
	}
	out, err = n.Runtime.Crictl(t, "inspect", ids[0])
	if err != nil {
		t.Fatal(err)
	}
	var info struct {
		Info struct{ Pid int } `json:"info"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil || info.Info.Pid == 0 {
		t.Fatalf("crictl inspect %s: no pid (%v)", ids[0], err)
	}
	return info.Info.Pid
}

// nsInode is the inode of a namespace file (what identifies the namespace).
func nsInode(t *testing.T, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// `twillctl lab run --kubelet`, as a user runs it: a cluster of two real
// kubelets, the manifest as shipped, workload pods that reach each other.
// It exits 0 only if every probe passed; it tells each step (the Nodes
// NotReady until twill's conflist is there, each NodeNetwork, each probe);
// and it leaves nothing behind: no namespace, folder or process of its own,
// no mount point it made on the machine, the kernel settings the kubelet
// changes as they were. About 35 s on a 2-core VM.
func TestLabRunKubelet(t *testing.T) {
	testenv.RequireRoot(t)
	for _, tool := range []string{"kubelet", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy", "etcd", "pause"} {
		testenv.Tool(t, tool)
	}
	testenv.Image(t, "twill.tar")
	testenv.Image(t, "twill-test-workload.tar")
	testenv.Image(t, "workload")
	bin := testenv.Binary(t, "twillctl")
	prefix := nsPrefix()
	dir := filepath.Join(t.TempDir(), "lab")
	topo := lab.Topology{Prefix: prefix, Hosts: 2}
	t.Cleanup(func() { topo.Down(context.Background()) })

	kernel := func() string {
		var b strings.Builder
		for _, k := range []string{"kernel/panic", "kernel/panic_on_oops", "vm/overcommit_memory"} {
			v, _ := os.ReadFile("/proc/sys/" + k)
			b.WriteString(k + "=" + strings.TrimSpace(string(v)) + " ")
		}
		return b.String()
	}
	kernelBefore := kernel()
	var absent []string
	for _, m := range testenv.NodeMounts {
		if _, err := os.Stat(m); errors.Is(err, os.ErrNotExist) {
			absent = append(absent, m)
		}
	}

	out, err := exec.CommandContext(ctxFor(t, 4*time.Minute), bin, "lab", "run", "--kubelet", "--dir", dir, "--prefix", prefix).CombinedOutput()
	if err != nil {
		t.Fatalf("lab run --kubelet: %v\n%s", err, out)
	}
	t.Logf("lab run --kubelet:\n%s", out)
	want := []string{
		"cni plugin not initialized", // a Node before twill's conflist
		"applied Namespace kube-twill, ServiceAccount twill, CustomResourceDefinition nodenetworks.twill.io,",
		"PASS: 4 probe pods", "lab removed",
	}
	for i := 1; i <= 2; i++ {
		want = append(want, fmt.Sprintf("probe-h%d-world on h%d: ok tcp", i, i), fmt.Sprintf("from=%s", topo.HostAddr(i)))
	}
	for _, w := range want {
		if !strings.Contains(string(out), w) {
			t.Errorf("output lacks %q", w)
		}
	}
	// Which /24 node IPAM gives which Node is its choice.
	for _, re := range []string{
		`node h1: Ready; twilld published NodeNetwork h1 \(backend vxlan, subnet 10\.244\.\d+\.0/24, public IP ` + regexp.QuoteMeta(topo.HostAddr(1).String()) + `\)`,
		`node h2: Ready; twilld published NodeNetwork h2 \(backend vxlan, subnet 10\.244\.\d+\.0/24, public IP ` + regexp.QuoteMeta(topo.HostAddr(2).String()) + `\)`,
		`probe-h1-h2 on h1: ok tcp 10\.244\.\d+\.\d+:8080: echo in \S+ \| ok udp`,
		`probe-h2-h1 on h2: ok tcp 10\.244\.\d+\.\d+:8080: echo in \S+ \| ok udp`,
	} {
		if !regexp.MustCompile(re).Match(out) {
			t.Errorf("output has no line matching %s", re)
		}
	}

	checkLabGone(t, topo, dir)
	for _, m := range absent {
		if _, err := os.Stat(m); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s was not on the machine before lab run --kubelet, and is now (%v)", m, err)
		}
	}
	if after := kernel(); after != kernelBefore {
		t.Errorf("kernel settings %s after lab run --kubelet, were %s", after, kernelBefore)
	}
}
