package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/twillnet/twill/deploy"
	"github.com/twillnet/twill/internal/tools/kubeapi"
	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/internal/tools/testenv"
	"github.com/twillnet/twill/subnet/kube"
)

// kubeletCluster is a control plane in the underlay namespace (API server,
// controller manager with node IPAM, scheduler) and a kubelet node on each
// lab host, named h1, h2, ...
type kubeletCluster struct {
	c     *cluster
	api   *testenv.KubeAPI
	cs    kubernetes.Interface
	nodes map[string]*testenv.KubeNode
}

func startKubeletCluster(t *testing.T, hosts int) *kubeletCluster {
	t.Helper()
	c := newCluster(t, hosts)
	u := c.topo.UnderlayNS()
	api := testenv.StartKubeAPI(t, testenv.KubeAPIOptions{
		Host:    lab.WorldAddr.String(),
		Port:    lab.KubePort,
		EtcdURL: c.etcdURL,
		Wrap:    []string{"nsenter", "--net=/run/netns/" + u},
		Dial:    lab.DialInNS(u),
		// The API server keeps the kubernetes Service's endpoints (its
		// advertised address, the underlay's, reachable from the nodes),
		// which pods reach through kube-proxy.
		Args: []string{"--endpoint-reconciler-type=lease"},
	})
	api.StartClusterControllers(t, testenv.ClusterControllersOptions{ClusterCIDR: kubeClusterCIDR})
	api.StartScheduler(t)
	k := &kubeletCluster{c: c, api: api, cs: api.AdminClient(t), nodes: map[string]*testenv.KubeNode{}}
	for _, i := range c.topo.HostNumbers() {
		name := fmt.Sprintf("h%d", i)
		k.nodes[name] = testenv.StartKubeNode(t, testenv.KubeNodeOptions{
			Name:   name,
			NetNS:  c.topo.HostNS(i),
			NodeIP: c.topo.HostAddr(i).String(),
			API:    api,
		})
	}
	return k
}

// nodeNames are the nodes' names, sorted.
func (k *kubeletCluster) nodeNames() []string {
	var names []string
	for n := range k.nodes {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// TestKubeletRunsTheDaemonSet deploys twill as users do, on real kubelets
// and containerds: deploy/kube-twill.yaml as shipped (only the image's name
// changed to the image `make image` builds, imported into each node's
// runtime), the reference plugins in each node's /opt/cni/bin as a
// distribution ships them. The DaemonSet's init containers install the
// plugin and the conflist on each node, twilld becomes ready, publishes its
// node's NodeNetwork and clears NetworkUnavailable, and the Nodes become
// Ready. Pods of a Deployment, one per node, get addresses from their node's
// podCIDR and reach each other over TCP and UDP (probe pods, both ways);
// traffic to outside the cluster network leaves with the node's address
// (--ip-masq, nftables rules: the image has no iptables); a pod-to-pod
// ping every 50 ms loses nothing while the twilld pod of one node is
// deleted and recreated, which keeps the node's NodeNetwork as it was, and
// a pod started on that node afterwards reaches the other's; deleting the
// pods releases their addresses and veths; and a pod created on a node
// whose twilld is gone (its env file too) waits with twill's error in its
// events (FailedCreatePodSandBox) and starts once twilld is back. 65 to
// 80 s on a 2-core VM (the longer under load).
func TestKubeletRunsTheDaemonSet(t *testing.T) {
	start := time.Now()
	at := func(what string) { t.Logf("%s at %v", what, time.Since(start).Round(time.Millisecond)) }
	twillTar := requireImage(t, "twill.tar")
	workloadTar := requireImage(t, "twill-test-workload.tar")
	workloadBin := requireImage(t, "workload")
	twillBin := testenv.Binary(t, "twill")

	k := startKubeletCluster(t, 2)
	cs, nodes := k.cs, k.nodes
	ctx := t.Context()
	at("control plane and nodes started")

	// twilld reaches the API server as a pod does (in-cluster config: the
	// kubernetes Service), so each node runs kube-proxy.
	var wg sync.WaitGroup
	var errs []error
	var mu sync.Mutex
	for _, name := range k.nodeNames() {
		n := nodes[name]
		n.StartKubeProxy(t, testenv.KubeProxyOptions{ClusterCIDR: kubeClusterCIDR})
		// The images, imported as an operator without a registry would.
		for _, tar := range []string{twillTar, workloadTar} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if out, err := n.Runtime.Ctr("-n", "k8s.io", "images", "import", tar); err != nil {
					mu.Lock()
					errs = append(errs, fmt.Errorf("node %s: import %s: %v\n%s", name, tar, err, out))
					mu.Unlock()
				}
			}()
		}
		// The reference plugins twill delegates to and chains, where a
		// distribution's package puts them.
		for _, p := range []string{"bridge", "host-local", "loopback", "portmap"} {
			copyFile(t, filepath.Join(testenv.CNIBinDir(t), p), filepath.Join(n.HostPath("/opt/cni/bin"), p), 0o755)
		}
	}
	wg.Wait()
	for _, err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
	for _, name := range k.nodeNames() {
		out, err := nodes[name].Runtime.Ctr("-n", "k8s.io", "images", "ls", "-q")
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{"docker.io/library/twill:dev", "docker.io/twill-test/workload:1"} {
			if !strings.Contains("\n"+out, "\n"+want+"\n") {
				t.Fatalf("node %s: image %s not in the runtime after import:\n%s", name, want, out)
			}
		}
	}
	at("images imported, reference plugins installed")

	// The manifest as shipped, with only the image's name changed.
	const shipped, ours = "twill:v0.1.0", "twill:dev"
	if got := bytes.Count(deploy.KubeManifest, []byte(shipped)); got != 3 {
		t.Fatalf("deploy/kube-twill.yaml names %s %d times, want 3 (the init containers and twilld)", shipped, got)
	}
	manifest := bytes.ReplaceAll(deploy.KubeManifest, []byte(shipped), []byte(ours))
	applyCtx, cancel := context.WithTimeout(ctx, 60*time.Second)
	applied, err := kubeapi.Apply(applyCtx, k.api.AdminConfig(), manifest, false)
	cancel()
	if err != nil {
		t.Fatalf("apply deploy/kube-twill.yaml (applied %v): %v", applied, err)
	}
	at(fmt.Sprintf("manifest applied (%d objects)", len(applied)))

	// Each Node registers and gets a podCIDR.
	podCIDRs := map[string]netip.Prefix{}
	waitFor(t, "both Nodes registered with a podCIDR", 60*time.Second, func() error {
		for name := range nodes {
			n, err := cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			p, err := netip.ParsePrefix(n.Spec.PodCIDR)
			if err != nil {
				return fmt.Errorf("node %s: podCIDR %q: %v", name, n.Spec.PodCIDR, err)
			}
			podCIDRs[name] = p
		}
		return nil
	})

	// The DaemonSet's pod runs and is ready on each node.
	twillPods := waitPodsReady(t, k, "kube-twill", "app=twill", 120*time.Second)
	for _, name := range k.nodeNames() {
		p := twillPods[name]
		if p.Status.PodIP != nodes[name].NodeIP {
			t.Errorf("twill pod %s on %s has address %s, want the node's %s (hostNetwork)", p.Name, name, p.Status.PodIP, nodes[name].NodeIP)
		}
		for _, s := range p.Status.InitContainerStatuses {
			if s.State.Terminated == nil || s.State.Terminated.ExitCode != 0 {
				t.Errorf("twill pod %s on %s: init container %s: %+v", p.Name, name, s.Name, s.State)
			}
		}
	}
	at("twill's DaemonSet pods ready on both nodes")

	// The init containers installed the plugin and the conflist on each
	// node, in its own folders.
	wantPlugin, err := os.ReadFile(twillBin)
	if err != nil {
		t.Fatal(err)
	}
	cm, err := cs.CoreV1().ConfigMaps("kube-twill").Get(ctx, "twill-cfg", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	wantConf := []byte(cm.Data["cni-conf.json"])
	if shippedConf, err := deploy.KubeCNIConf(); err != nil || !bytes.Equal(shippedConf, wantConf) {
		t.Fatalf("the ConfigMap's cni-conf.json differs from the manifest's (%v):\n%s", err, wantConf)
	}
	for _, name := range k.nodeNames() {
		n := nodes[name]
		checkInstalled(t, name, n.HostPath("/opt/cni/bin/twill"), wantPlugin, 0o755)
		checkInstalled(t, name, n.HostPath("/etc/cni/net.d/10-twill.conflist"), wantConf, 0o644)
	}

	// Each twilld published its node's NodeNetwork and cleared
	// NetworkUnavailable; the Nodes are Ready.
	records, err := kube.NewRecordClient(k.api.AdminConfig())
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a NodeNetwork of each node with its podCIDR and address", 30*time.Second, func() error {
		for _, name := range k.nodeNames() {
			r, err := records.Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return fmt.Errorf("NodeNetwork %s: %w", name, err)
			}
			if r.Spec.BackendType != "vxlan" || r.Spec.Subnet != podCIDRs[name].String() || r.Spec.PublicIP != nodes[name].NodeIP {
				return fmt.Errorf("NodeNetwork %s: %+v, want vxlan, %s, %s", name, r.Spec, podCIDRs[name], nodes[name].NodeIP)
			}
			owned := false
			for _, o := range r.OwnerReferences {
				owned = owned || (o.Kind == "Node" && o.Name == name)
			}
			if !owned {
				return fmt.Errorf("NodeNetwork %s: owners %+v, want its Node", name, r.OwnerReferences)
			}
		}
		return nil
	})
	waitFor(t, "both Nodes Ready with NetworkUnavailable False (TwillIsUp)", 60*time.Second, func() error {
		for _, name := range k.nodeNames() {
			n, err := cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if c := nodeCondition(n, corev1.NodeNetworkUnavailable); c == nil || c.Status != corev1.ConditionFalse || c.Reason != "TwillIsUp" {
				return fmt.Errorf("node %s: NetworkUnavailable %+v", name, c)
			}
			if c := nodeCondition(n, corev1.NodeReady); c == nil || c.Status != corev1.ConditionTrue {
				return fmt.Errorf("node %s: Ready %+v", name, c)
			}
		}
		return nil
	})
	at("NodeNetworks published, Nodes Ready")
	// The node's own veths (its link to the underlay), before any pod's.
	vethsBefore := map[string][]string{}
	for _, name := range k.nodeNames() {
		vethsBefore[name] = veths(t, nodes[name])
	}

	// A Deployment of echo servers, one per node, on the pod network.
	createEchoDeployment(t, cs, "echo")
	echo := waitPodsReady(t, k, "default", "app=echo", 60*time.Second)
	echoIP := map[string]netip.Addr{}
	for _, name := range k.nodeNames() {
		p := echo[name]
		ip, err := netip.ParseAddr(p.Status.PodIP)
		if err != nil || !podCIDRs[name].Contains(ip) {
			t.Fatalf("echo pod %s on %s has address %q, not in the node's podCIDR %s", p.Name, name, p.Status.PodIP, podCIDRs[name])
		}
		echoIP[name] = ip
		t.Logf("echo pod %s on %s: %s", p.Name, name, ip)
	}
	at("echo pods ready")

	// Each node's pod reaches the other node's over TCP and UDP: probe pods.
	probes := []probeSpec{
		{name: "probe-h1-h2", node: "h1", args: []string{"-addr", echoIP["h2"].String()}},
		{name: "probe-h2-h1", node: "h2", args: []string{"-addr", echoIP["h1"].String()}},
	}
	// And outside the cluster network (the underlay's address, where an
	// echo server runs in the underlay namespace): the node's address is
	// the source (--ip-masq).
	startUnderlayEcho(t, k.c.topo.UnderlayNS(), workloadBin, 18080, 18081)
	for _, name := range k.nodeNames() {
		probes = append(probes, probeSpec{name: "probe-" + name + "-world", node: name,
			args: []string{"-addr", lab.WorldAddr.String(), "-tcp", "18080", "-udp", "18081", "-whoami"}})
	}
	logs := runProbePods(t, k, probes, 60*time.Second)
	for _, p := range probes {
		t.Logf("%s on %s: %s", p.name, p.node, strings.Join(strings.Fields(strings.ReplaceAll(logs[p.name], "\n", " | ")), " "))
		if strings.HasSuffix(p.name, "-world") {
			m := regexp.MustCompile(`from=(\S+)`).FindStringSubmatch(logs[p.name])
			if m == nil || m[1] != nodes[p.node].NodeIP {
				t.Errorf("%s: the underlay's server saw %v, want the node's address %s (--ip-masq):\n%s", p.name, m, nodes[p.node].NodeIP, logs[p.name])
			}
		}
	}
	// twilld masquerades with nftables (no iptables in its image).
	for _, name := range k.nodeNames() {
		out, err := nodes[name].Exec("nft", "list", "table", "inet", "twill")
		if err != nil || !strings.Contains(out, "masquerade") {
			t.Errorf("node %s: no masquerade rule in twilld's nftables table (%v):\n%s", name, err, out)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	at("pods reach each other (TCP, UDP, both ways) and the underlay, masqueraded")

	// twilld's pod on h1 is deleted; the DaemonSet recreates it. A ping
	// every 50 ms from h1's echo pod to h2's loses nothing meanwhile.
	pid := containerPID(t, nodes["h1"], echo["h1"].Name)
	ping := exec.Command("nsenter", fmt.Sprintf("--net=/proc/%d/ns/net", pid),
		"ping", "-n", "-i", "0.05", "-W", "1", "-w", "90", echoIP["h2"].String())
	var pingOut bytes.Buffer
	ping.Stdout, ping.Stderr = &pingOut, &pingOut
	if err := ping.Start(); err != nil {
		t.Fatal(err)
	}
	pingDone := make(chan struct{})
	go func() { ping.Wait(); close(pingDone) }()
	t.Cleanup(func() {
		ping.Process.Kill()
		<-pingDone
	})
	recordBefore, err := records.Get(ctx, "h1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	old := twillPods["h1"]
	if err := cs.CoreV1().Pods("kube-twill").Delete(ctx, old.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatalf("delete twill pod %s: %v", old.Name, err)
	}
	deleted := time.Now()
	var recreated *corev1.Pod
	waitForDiag(t, "twill's DaemonSet to recreate its pod on h1, ready", 60*time.Second, func() error {
		list, err := cs.CoreV1().Pods("kube-twill").List(ctx, metav1.ListOptions{LabelSelector: "app=twill"})
		if err != nil {
			return err
		}
		var states []string
		for i := range list.Items {
			p := &list.Items[i]
			if p.Spec.NodeName != "h1" {
				continue
			}
			states = append(states, fmt.Sprintf("%s: %s ready=%v", p.Name, p.Status.Phase, podReady(p)))
			if p.UID != old.UID && p.Status.Phase == corev1.PodRunning && podReady(p) {
				recreated = p
			}
		}
		if recreated == nil {
			return fmt.Errorf("%v", states)
		}
		return nil
	}, func() { describePods(t, k, "kube-twill", "app=twill") })
	t.Logf("twill pod %s deleted, %s ready %v later", old.Name, recreated.Name, time.Since(deleted).Round(time.Millisecond))
	// The new twilld kept the node's record as it was (the same VTEP: the
	// device was adopted, not made anew).
	recordAfter, err := records.Get(ctx, "h1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if recordAfter.UID != recordBefore.UID || !reflect.DeepEqual(recordAfter.Spec, recordBefore.Spec) {
		t.Errorf("h1's NodeNetwork changed across the twilld restart: %s %+v, was %s %+v", recordAfter.UID, recordAfter.Spec, recordBefore.UID, recordBefore.Spec)
	}
	// Two more seconds of pings with the new twilld, then stop them.
	time.Sleep(2 * time.Second)
	ping.Process.Signal(syscall.SIGINT)
	select {
	case <-pingDone:
	case <-time.After(10 * time.Second):
		t.Fatal("ping did not exit within 10s of SIGINT")
	}
	sent, lost, err := pingLosses(pingOut.String())
	if err != nil {
		t.Fatalf("ping from h1's echo pod to %s: %v:\n%s", echoIP["h2"], err, pingOut.String())
	}
	if len(lost) > 0 || sent < 100 {
		t.Errorf("ping every 50 ms from h1's pod to h2's (%s) while h1's twilld was replaced: %d sent, icmp_seq %v lost", echoIP["h2"], sent, lost)
	} else {
		t.Logf("ping every 50 ms from h1's pod to h2's while h1's twilld was replaced: %d sent, none lost", sent)
	}
	at("twilld on h1 replaced without loss")

	// A new pod on h1 (the new pod's init containers installed the plugin
	// and the conflist again) gets an address and reaches h2's pod.
	after := []probeSpec{{name: "probe-h1-h2-after", node: "h1", args: []string{"-addr", echoIP["h2"].String()}}}
	runProbePods(t, k, after, 60*time.Second)
	probes = append(probes, after...)
	if t.Failed() {
		t.FailNow()
	}
	at("a new pod on h1 reaches h2's")

	// Deleting the pods releases their addresses (host-local's store, in
	// each node's own /var/lib/cni) and removes their veths.
	if err := cs.AppsV1().Deployments("default").Delete(ctx, "echo", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, p := range probes {
		if err := cs.CoreV1().Pods("default").Delete(ctx, p.name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "no pods left in default", 60*time.Second, func() error {
		list, err := cs.CoreV1().Pods("default").List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		if len(list.Items) > 0 {
			var names []string
			for _, p := range list.Items {
				names = append(names, p.Name+" ("+string(p.Status.Phase)+")")
			}
			return fmt.Errorf("still there: %v", names)
		}
		return nil
	})
	for _, name := range k.nodeNames() {
		n := nodes[name]
		store := n.HostPath("/var/lib/cni/networks/twill")
		waitFor(t, "the addresses and veths of "+name+"'s pods released", 30*time.Second, func() error {
			entries, err := os.ReadDir(store)
			if err != nil {
				return err
			}
			var held []string
			for _, e := range entries {
				if _, err := netip.ParseAddr(e.Name()); err == nil {
					held = append(held, e.Name())
				}
			}
			if len(held) > 0 {
				return fmt.Errorf("host-local still holds %v in %s", held, store)
			}
			if got := veths(t, n); !slices.Equal(got, vethsBefore[name]) {
				return fmt.Errorf("veths %v, want those from before the pods: %v", got, vethsBefore[name])
			}
			return nil
		})
	}
	at("pods deleted, addresses and veths released")

	// A pod created on a node whose twilld is gone (the plugin and the
	// conflist still installed, the env file not written) waits, with
	// twill's error in its events, and starts once twilld is back.
	podWaitsForTwilld(t, k, podCIDRs, at)
}

// The env file twilld writes and the plugin reads (the conflist names no
// other), and what the plugin says while it is missing: STATUS's message
// (code 50), which containerd 2 would pass on as the node's NetworkReady
// condition (containerd 1.6, here, does not ask), and ADD's (code 11, "try
// again later").
const (
	twillEnvFile       = "/run/twill/subnet.env"
	twillStatusMissing = "twill: not ready: subnet env file " + twillEnvFile + " does not exist yet; is twilld running on this node?"
	twillAddMissing    = "twill: subnet env file " + twillEnvFile + " does not exist yet; is twilld running on this node?"
)

// podWaitsForTwilld keeps twill's DaemonSet off h1 (a node affinity patched
// in), removes h1's env file as a node without twilld has none, creates a
// pod on h1 and checks what its events say while it waits; then restores
// the DaemonSet and checks that the pod starts with an address of h1's
// podCIDR.
func podWaitsForTwilld(t *testing.T, k *kubeletCluster, podCIDRs map[string]netip.Prefix, at func(string)) {
	t.Helper()
	ctx := t.Context()
	cs := k.cs
	const ds, node, podName = "twill", "h1", "waits-for-twilld"
	offH1 := `{"spec":{"template":{"spec":{"affinity":{"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":` +
		`{"nodeSelectorTerms":[{"matchExpressions":[{"key":"kubernetes.io/hostname","operator":"NotIn","values":["` + node + `"]}]}]}}}}}}}`
	if _, err := cs.AppsV1().DaemonSets("kube-twill").Patch(ctx, ds, types.StrategicMergePatchType, []byte(offH1), metav1.PatchOptions{}); err != nil {
		t.Fatalf("patch DaemonSet %s off %s: %v", ds, node, err)
	}
	waitForDiag(t, "no twill pod left on "+node, 60*time.Second, func() error {
		list, err := cs.CoreV1().Pods("kube-twill").List(ctx, metav1.ListOptions{LabelSelector: "app=twill", FieldSelector: "spec.nodeName=" + node})
		if err != nil {
			return err
		}
		if len(list.Items) > 0 {
			return fmt.Errorf("%s: %s", list.Items[0].Name, list.Items[0].Status.Phase)
		}
		return nil
	}, func() { describePods(t, k, "kube-twill", "app=twill") })
	n := k.nodes[node]
	if err := os.Remove(n.HostPath(twillEnvFile)); err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	for _, f := range []string{"/opt/cni/bin/twill", "/etc/cni/net.d/10-twill.conflist"} {
		if _, err := os.Stat(n.HostPath(f)); err != nil {
			t.Fatalf("node %s: %v (the plugin and the conflist stay installed without twilld)", node, err)
		}
	}
	at("twilld gone from " + node + ", its env file removed")

	// The Node stays Ready (containerd 1.6 reports its network ready once
	// it loaded a conflist, and never asks the plugin's STATUS), so the
	// kubelet goes on creating sandboxes on it.
	if no, err := cs.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{}); err == nil {
		if c := nodeCondition(no, corev1.NodeReady); c != nil {
			t.Logf("node %s without twilld: Ready=%s (%s: %s)", node, c.Status, c.Reason, c.Message)
		}
	}

	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: podName, Namespace: "default"},
		Spec: corev1.PodSpec{
			// Bound to h1 as the scheduler would (and would keep off
			// the node if it were NotReady).
			NodeName:                      node,
			TerminationGracePeriodSeconds: new(int64(1)),
			Containers: []corev1.Container{{
				Name:            "serve",
				Image:           "twill-test/workload:1",
				ImagePullPolicy: corev1.PullNever,
				Args:            []string{"serve"},
				ReadinessProbe: &corev1.Probe{
					ProbeHandler:  corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(8080)}},
					PeriodSeconds: 1,
				},
			}},
		},
	}
	if _, err := cs.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create pod %s: %v", podName, err)
	}
	created := time.Now()
	podEvents := func() ([]corev1.Event, error) {
		list, err := cs.CoreV1().Events("default").List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + podName})
		if err != nil {
			return nil, err
		}
		return list.Items, nil
	}
	var twillEvent corev1.Event
	waitForDiag(t, "an event of pod "+podName+" saying why it has no sandbox", 60*time.Second, func() error {
		events, err := podEvents()
		if err != nil {
			return err
		}
		var seen []string
		for _, e := range events {
			if e.Reason == "FailedCreatePodSandBox" || e.Reason == "NetworkNotReady" {
				twillEvent = e
				return nil
			}
			seen = append(seen, e.Reason+": "+e.Message)
		}
		return fmt.Errorf("events %q", seen)
	}, func() { describePods(t, k, "default", "") })
	t.Logf("pod %s: event %s %s (x%d, from %s): %s", podName, twillEvent.Type, twillEvent.Reason, twillEvent.Count, twillEvent.Source.Component, twillEvent.Message)
	// The kubelet creates the sandbox and the plugin's ADD fails with code
	// 11 (FailedCreatePodSandBox); were the node's network not ready (a
	// runtime that asks STATUS again), the kubelet would not try and say so
	// instead (NetworkNotReady, with STATUS's message).
	switch twillEvent.Reason {
	case "NetworkNotReady":
		if !strings.Contains(twillEvent.Message, twillStatusMissing) {
			t.Errorf("event %s: %q does not contain %q", twillEvent.Reason, twillEvent.Message, twillStatusMissing)
		}
	case "FailedCreatePodSandBox":
		if !strings.Contains(twillEvent.Message, twillAddMissing) {
			t.Errorf("event %s: %q does not contain %q", twillEvent.Reason, twillEvent.Message, twillAddMissing)
		}
	}
	// It keeps waiting.
	time.Sleep(3 * time.Second)
	p, err := cs.CoreV1().Pods("default").Get(ctx, podName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if p.Status.Phase != corev1.PodPending || p.Status.PodIP != "" {
		t.Errorf("pod %s without twilld on %s: %s, IP %q, want Pending without an address", podName, node, p.Status.Phase, p.Status.PodIP)
	}
	describePod(t, k, p)
	if t.Failed() {
		t.FailNow()
	}
	at("pod " + podName + " waits on " + node + " with twill's error in its events")

	// twilld back on h1: the pod starts, with an address of h1's podCIDR.
	if _, err := cs.AppsV1().DaemonSets("kube-twill").Patch(ctx, ds, types.JSONPatchType,
		[]byte(`[{"op":"remove","path":"/spec/template/spec/affinity"}]`), metav1.PatchOptions{}); err != nil {
		t.Fatalf("restore DaemonSet %s: %v", ds, err)
	}
	restored := time.Now()
	waitPodsReady(t, k, "kube-twill", "app=twill", 120*time.Second)
	at("twill's DaemonSet back on " + node)
	waitForDiag(t, "pod "+podName+" running and ready", 90*time.Second, func() error {
		p, err = cs.CoreV1().Pods("default").Get(ctx, podName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if p.Status.Phase != corev1.PodRunning || !podReady(p) {
			return fmt.Errorf("%s ready=%v %s", p.Status.Phase, podReady(p), podWaiting(p))
		}
		return nil
	}, func() { describePods(t, k, "default", "") })
	ip, err := netip.ParseAddr(p.Status.PodIP)
	if err != nil || !podCIDRs[node].Contains(ip) {
		t.Errorf("pod %s has address %q, not in %s's podCIDR %s", podName, p.Status.PodIP, node, podCIDRs[node])
	}
	t.Logf("pod %s running with %s, %v after it was created, %v after the DaemonSet was restored", podName, ip,
		time.Since(created).Round(time.Millisecond), time.Since(restored).Round(time.Millisecond))
	describePod(t, k, p)
	if err := cs.CoreV1().Pods("default").Delete(ctx, podName, metav1.DeleteOptions{}); err != nil {
		t.Error(err)
	}
	at("pod " + podName + " started once twilld was back")
}

func requireImage(t *testing.T, name string) string {
	t.Helper()
	p := filepath.Join(testenv.RepoRoot(), "bin", "image", name)
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("%s: run `make image` first (%v)", p, err)
	}
	return p
}

func copyFile(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, data, mode); err != nil {
		t.Fatal(err)
	}
}

// checkInstalled checks that the file at path has the content and mode want.
func checkInstalled(t *testing.T, node, path string, want []byte, mode os.FileMode) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Errorf("node %s: %v", node, err)
		return
	}
	if !bytes.Equal(got, want) {
		t.Errorf("node %s: %s differs from what the DaemonSet installs (%d bytes, want %d)", node, path, len(got), len(want))
	}
	if fi, err := os.Stat(path); err == nil && fi.Mode().Perm() != mode {
		t.Errorf("node %s: %s has mode %v, want %v", node, path, fi.Mode().Perm(), mode)
	}
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// waitForDiag is waitFor that calls diag before failing.
func waitForDiag(t *testing.T, what string, d time.Duration, f func() error, diag func()) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			diag()
			t.Fatalf("timed out after %s waiting for %s: %v", d, what, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitPodsReady waits until a pod of the selector is Running and Ready on
// every node, and returns them by node. On timeout it describes the pods.
func waitPodsReady(t *testing.T, k *kubeletCluster, ns, selector string, d time.Duration) map[string]*corev1.Pod {
	t.Helper()
	var byNode map[string]*corev1.Pod
	waitForDiag(t, "pods "+selector+" in "+ns+" running and ready on every node", d, func() error {
		list, err := k.cs.CoreV1().Pods(ns).List(context.Background(), metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			return err
		}
		byNode = map[string]*corev1.Pod{}
		var states []string
		for i := range list.Items {
			p := &list.Items[i]
			states = append(states, fmt.Sprintf("%s on %q: %s ready=%v %s", p.Name, p.Spec.NodeName, p.Status.Phase, podReady(p), podWaiting(p)))
			if p.Status.Phase == corev1.PodRunning && podReady(p) && p.Status.PodIP != "" && p.DeletionTimestamp == nil {
				byNode[p.Spec.NodeName] = p
			}
		}
		for n := range k.nodes {
			if byNode[n] == nil {
				return fmt.Errorf("none ready on %s yet: %s", n, strings.Join(states, "; "))
			}
		}
		return nil
	}, func() { describePods(t, k, ns, selector) })
	return byNode
}

// describePods logs what `kubectl describe` would show of the pods (status,
// containers, events) and the end of their containers' logs, read from
// their node's /var/log/pods.
func describePods(t *testing.T, k *kubeletCluster, ns, selector string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	list, err := k.cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		t.Logf("list pods %s in %s: %v", selector, ns, err)
		return
	}
	for i := range list.Items {
		describePod(t, k, &list.Items[i])
	}
	for _, name := range k.nodeNames() {
		n, err := k.cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			continue
		}
		var conds []string
		for _, c := range n.Status.Conditions {
			conds = append(conds, fmt.Sprintf("%s=%s (%s: %s)", c.Type, c.Status, c.Reason, c.Message))
		}
		t.Logf("node %s: podCIDR %s, taints %v, conditions %s", name, n.Spec.PodCIDR, n.Spec.Taints, strings.Join(conds, "; "))
	}
}

func describePod(t *testing.T, k *kubeletCluster, p *corev1.Pod) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var b strings.Builder
	fmt.Fprintf(&b, "pod %s/%s on %q: phase %s, IP %s\n", p.Namespace, p.Name, p.Spec.NodeName, p.Status.Phase, p.Status.PodIP)
	for _, c := range p.Status.Conditions {
		fmt.Fprintf(&b, "  condition %s=%s %s %s\n", c.Type, c.Status, c.Reason, c.Message)
	}
	statuses := append(append([]corev1.ContainerStatus{}, p.Status.InitContainerStatuses...), p.Status.ContainerStatuses...)
	for _, s := range statuses {
		fmt.Fprintf(&b, "  container %s: ready=%v restarts=%d state=%s last=%s\n", s.Name, s.Ready, s.RestartCount, containerState(s.State), containerState(s.LastTerminationState))
	}
	events, err := k.cs.CoreV1().Events(p.Namespace).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + p.Name})
	if err == nil {
		for _, e := range events.Items {
			fmt.Fprintf(&b, "  event %s %s (x%d): %s\n", e.Type, e.Reason, e.Count, e.Message)
		}
	}
	if n := k.nodes[p.Spec.NodeName]; n != nil {
		dir := n.HostPath(fmt.Sprintf("/var/log/pods/%s_%s_%s", p.Namespace, p.Name, p.UID))
		files, _ := filepath.Glob(filepath.Join(dir, "*", "*.log"))
		for _, f := range files {
			data, _ := os.ReadFile(f)
			lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
			if len(lines) > 30 {
				lines = lines[len(lines)-30:]
			}
			rel, _ := filepath.Rel(dir, f)
			fmt.Fprintf(&b, "  log %s:\n    %s\n", rel, strings.Join(lines, "\n    "))
		}
	}
	t.Log(b.String())
}

func containerState(s corev1.ContainerState) string {
	switch {
	case s.Running != nil:
		return "Running since " + s.Running.StartedAt.Format(time.TimeOnly)
	case s.Waiting != nil:
		return "Waiting " + s.Waiting.Reason + ": " + s.Waiting.Message
	case s.Terminated != nil:
		return fmt.Sprintf("Terminated %s (exit %d): %s", s.Terminated.Reason, s.Terminated.ExitCode, s.Terminated.Message)
	}
	return "-"
}

// podLog is a container's log as its node's runtime wrote it (CRI format:
// time, stream, tag, message), the messages only.
func podLog(k *kubeletCluster, p *corev1.Pod, container string) (string, error) {
	n := k.nodes[p.Spec.NodeName]
	if n == nil {
		return "", fmt.Errorf("pod %s is on no node of the test (%q)", p.Name, p.Spec.NodeName)
	}
	files, err := filepath.Glob(n.HostPath(fmt.Sprintf("/var/log/pods/%s_%s_%s/%s/*.log", p.Namespace, p.Name, p.UID, container)))
	if err != nil || len(files) == 0 {
		return "", fmt.Errorf("no log of %s/%s on %s (%v)", p.Name, container, n.Name, err)
	}
	sort.Strings(files)
	data, err := os.ReadFile(files[len(files)-1])
	if err != nil {
		return "", err
	}
	var b strings.Builder
	for _, line := range strings.Split(strings.TrimRight(string(data), "\n"), "\n") {
		if f := strings.SplitN(line, " ", 4); len(f) == 4 {
			b.WriteString(f[3] + "\n")
		}
	}
	return b.String(), nil
}

// createEchoDeployment creates a Deployment of the workload image's echo
// server in default, with one pod per node (required anti-affinity), ready
// once it listens on TCP.
func createEchoDeployment(t *testing.T, cs kubernetes.Interface, name string) {
	t.Helper()
	labels := map[string]string{"app": name}
	replicas := int32(2)
	d := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec: appsv1.DeploymentSpec{
			Replicas: &replicas,
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					TerminationGracePeriodSeconds: new(int64(2)),
					Affinity: &corev1.Affinity{PodAntiAffinity: &corev1.PodAntiAffinity{
						RequiredDuringSchedulingIgnoredDuringExecution: []corev1.PodAffinityTerm{{
							LabelSelector: &metav1.LabelSelector{MatchLabels: labels},
							TopologyKey:   corev1.LabelHostname,
						}},
					}},
					Containers: []corev1.Container{{
						Name:            "serve",
						Image:           "twill-test/workload:1",
						ImagePullPolicy: corev1.PullNever,
						Args:            []string{"serve"},
						ReadinessProbe: &corev1.Probe{
							ProbeHandler:  corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(8080)}},
							PeriodSeconds: 1,
						},
					}},
				},
			},
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := cs.AppsV1().Deployments("default").Create(ctx, d, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create Deployment %s: %v", name, err)
	}
}

// probeSpec is a pod on a node running `workload probe ARGS...`.
type probeSpec struct {
	name, node string
	args       []string
}

// runProbePods runs the probe pods at once and waits until each has ended;
// it returns their logs by name, and fails the test (with the pod's log and
// description) for each that did not succeed.
func runProbePods(t *testing.T, k *kubeletCluster, probes []probeSpec, d time.Duration) map[string]string {
	t.Helper()
	ctx := t.Context()
	for _, p := range probes {
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: p.name, Namespace: "default", Labels: map[string]string{"role": "probe"}},
			Spec: corev1.PodSpec{
				NodeSelector:                  map[string]string{corev1.LabelHostname: p.node},
				RestartPolicy:                 corev1.RestartPolicyNever,
				TerminationGracePeriodSeconds: new(int64(1)),
				Containers: []corev1.Container{{
					Name:            "probe",
					Image:           "twill-test/workload:1",
					ImagePullPolicy: corev1.PullNever,
					Args:            append([]string{"probe"}, p.args...),
				}},
			},
		}
		if _, err := k.cs.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			t.Fatalf("create pod %s: %v", p.name, err)
		}
	}
	ended := map[string]*corev1.Pod{}
	waitForDiag(t, "the probe pods to end", d, func() error {
		var running []string
		for _, p := range probes {
			if ended[p.name] != nil {
				continue
			}
			pod, err := k.cs.CoreV1().Pods("default").Get(ctx, p.name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
				ended[p.name] = pod
				continue
			}
			running = append(running, fmt.Sprintf("%s: %s %s", p.name, pod.Status.Phase, podWaiting(pod)))
		}
		if len(running) > 0 {
			return fmt.Errorf("%v", running)
		}
		return nil
	}, func() { describePods(t, k, "default", "role=probe") })
	logs := map[string]string{}
	for _, p := range probes {
		pod := ended[p.name]
		log, err := podLog(k, pod, "probe")
		if err != nil {
			t.Errorf("probe %s: %v", p.name, err)
		}
		logs[p.name] = log
		if pod.Status.Phase != corev1.PodSucceeded {
			describePod(t, k, pod)
			t.Errorf("probe pod %s on %s (workload probe %s): %s:\n%s", p.name, p.node, strings.Join(p.args, " "), pod.Status.Phase, log)
		}
	}
	return logs
}

// startUnderlayEcho runs the workload's echo server in the underlay
// namespace (outside the cluster network) until the test ends.
func startUnderlayEcho(t *testing.T, underlay, bin string, tcp, udp int) {
	t.Helper()
	cmd := exec.Command("nsenter", "--net=/run/netns/"+underlay, bin, "serve", "-tcp", strconv.Itoa(tcp), "-udp", strconv.Itoa(udp))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
	})
	waitFor(t, "the underlay's echo server", 10*time.Second, func() error {
		select {
		case <-done:
			return fmt.Errorf("exited: %s", out.String())
		default:
		}
		out, err := lab.InNS(context.Background(), underlay, "ss", "-Hltn", "sport = :"+strconv.Itoa(tcp))
		if err != nil {
			return err
		}
		if strings.TrimSpace(out) == "" {
			return fmt.Errorf("nothing listens on TCP port %d yet", tcp)
		}
		return nil
	})
}

// pingLosses reads ping's output (not -q): how many requests it sent, and
// the sequence numbers of those not answered, except the last one, which may
// still have been on its way when ping was interrupted.
func pingLosses(out string) (sent int, lost []int, err error) {
	m := regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`).FindStringSubmatch(out)
	if m == nil {
		return 0, nil, fmt.Errorf("no summary")
	}
	sent, _ = strconv.Atoi(m[1])
	answered := map[int]bool{}
	for _, r := range regexp.MustCompile(`bytes from .* icmp_seq=(\d+) `).FindAllStringSubmatch(out, -1) {
		n, _ := strconv.Atoi(r[1])
		answered[n] = true
	}
	for seq := 1; seq < sent; seq++ {
		if !answered[seq] {
			lost = append(lost, seq)
		}
	}
	return sent, lost, nil
}

// veths are the names of the veths in the node's network namespace.
func veths(t *testing.T, n *testenv.KubeNode) []string {
	t.Helper()
	out, err := n.Exec("ip", "-o", "link", "show", "type", "veth")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if f := strings.Fields(line); len(f) > 1 {
			names = append(names, strings.TrimSuffix(f[1], ":"))
		}
	}
	sort.Strings(names)
	return names
}
