package e2e

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/twillnet/twill/deploy"
	"github.com/twillnet/twill/internal/tools/kubelab"
	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/internal/tools/testenv"
	"github.com/twillnet/twill/subnet/kube"
)

// startKubeletCluster starts a kubelab cluster of the given number of
// nodes, on namespaces of a prefix of the test's own.
func startKubeletCluster(t *testing.T, hosts int) *kubelab.Cluster {
	t.Helper()
	return kubelab.Start(t, lab.Topology{Prefix: nsPrefix(), Hosts: hosts})
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
	twillBin := testenv.Binary(t, "twill")

	k := startKubeletCluster(t, 2)
	cs, nodes := k.Client, k.Nodes
	ctx := t.Context()
	at("control plane and nodes started")
	k.PrepareNodes(t)
	at("kube-proxy started, images imported, reference plugins installed")
	applied := k.ApplyTwill(t)
	at(fmt.Sprintf("manifest applied (%d objects)", len(applied)))
	podCIDRs := k.WaitPodCIDRs(t)

	// The DaemonSet's pod runs and is ready on each node.
	twillPods := k.WaitPodsReady(t, "kube-twill", "app=twill", 120*time.Second)
	for _, name := range k.NodeNames() {
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
	for _, name := range k.NodeNames() {
		n := nodes[name]
		checkInstalled(t, name, n.HostPath("/opt/cni/bin/twill"), wantPlugin, 0o755)
		checkInstalled(t, name, n.HostPath("/etc/cni/net.d/10-twill.conflist"), wantConf, 0o644)
	}

	// Each twilld published its node's NodeNetwork and cleared
	// NetworkUnavailable; the Nodes are Ready.
	k.WaitNetworkReady(t, podCIDRs)
	at("NodeNetworks published, Nodes Ready")
	records, err := kube.NewRecordClient(k.API.AdminConfig())
	if err != nil {
		t.Fatal(err)
	}
	// The node's own veths (its link to the underlay), before any pod's.
	vethsBefore := map[string][]string{}
	for _, name := range k.NodeNames() {
		vethsBefore[name] = veths(t, nodes[name])
	}

	// Pods of a Deployment, one per node, reach each other over TCP and
	// UDP, and the underlay with the node's address as the source.
	reach := k.CheckReach(t, podCIDRs)
	echo, echoIP, probes := reach.Echo, reach.EchoIP, reach.Probes
	// twilld masquerades with nftables (no iptables in its image).
	for _, name := range k.NodeNames() {
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
	kubelab.WaitFor(t, "twill's DaemonSet to recreate its pod on h1, ready", 60*time.Second, func() error {
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
			states = append(states, fmt.Sprintf("%s: %s ready=%v", p.Name, p.Status.Phase, kubelab.PodReady(p)))
			if p.UID != old.UID && p.Status.Phase == corev1.PodRunning && kubelab.PodReady(p) {
				recreated = p
			}
		}
		if recreated == nil {
			return fmt.Errorf("%v", states)
		}
		return nil
	}, func() { k.DescribePods(t, "kube-twill", "app=twill") })
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
	after := []kubelab.Probe{{Name: "probe-h1-h2-after", Node: "h1", Args: []string{"-addr", echoIP["h2"].String()}}}
	k.RunProbePods(t, after, 60*time.Second)
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
		if err := cs.CoreV1().Pods("default").Delete(ctx, p.Name, metav1.DeleteOptions{}); err != nil {
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
	for _, name := range k.NodeNames() {
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
func podWaitsForTwilld(t *testing.T, k *kubelab.Cluster, podCIDRs map[string]netip.Prefix, at func(string)) {
	t.Helper()
	ctx := t.Context()
	cs := k.Client
	const ds, node, podName = "twill", "h1", "waits-for-twilld"
	offH1 := `{"spec":{"template":{"spec":{"affinity":{"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":` +
		`{"nodeSelectorTerms":[{"matchExpressions":[{"key":"kubernetes.io/hostname","operator":"NotIn","values":["` + node + `"]}]}]}}}}}}}`
	if _, err := cs.AppsV1().DaemonSets("kube-twill").Patch(ctx, ds, types.StrategicMergePatchType, []byte(offH1), metav1.PatchOptions{}); err != nil {
		t.Fatalf("patch DaemonSet %s off %s: %v", ds, node, err)
	}
	kubelab.WaitFor(t, "no twill pod left on "+node, 60*time.Second, func() error {
		list, err := cs.CoreV1().Pods("kube-twill").List(ctx, metav1.ListOptions{LabelSelector: "app=twill", FieldSelector: "spec.nodeName=" + node})
		if err != nil {
			return err
		}
		if len(list.Items) > 0 {
			return fmt.Errorf("%s: %s", list.Items[0].Name, list.Items[0].Status.Phase)
		}
		return nil
	}, func() { k.DescribePods(t, "kube-twill", "app=twill") })
	n := k.Nodes[node]
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
		if c := kubelab.NodeCondition(no, corev1.NodeReady); c != nil {
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
			Containers:                    []corev1.Container{kubelab.EchoContainer()},
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
	kubelab.WaitFor(t, "an event of pod "+podName+" saying why it has no sandbox", 60*time.Second, func() error {
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
	}, func() { k.DescribePods(t, "default", "") })
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
	k.DescribePod(t, p)
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
	k.WaitPodsReady(t, "kube-twill", "app=twill", 120*time.Second)
	at("twill's DaemonSet back on " + node)
	kubelab.WaitFor(t, "pod "+podName+" running and ready", 90*time.Second, func() error {
		p, err = cs.CoreV1().Pods("default").Get(ctx, podName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if p.Status.Phase != corev1.PodRunning || !kubelab.PodReady(p) {
			return fmt.Errorf("%s ready=%v %s", p.Status.Phase, kubelab.PodReady(p), kubelab.PodWaiting(p))
		}
		return nil
	}, func() { k.DescribePods(t, "default", "") })
	ip, err := netip.ParseAddr(p.Status.PodIP)
	if err != nil || !podCIDRs[node].Contains(ip) {
		t.Errorf("pod %s has address %q, not in %s's podCIDR %s", podName, p.Status.PodIP, node, podCIDRs[node])
	}
	t.Logf("pod %s running with %s, %v after it was created, %v after the DaemonSet was restored", podName, ip,
		time.Since(created).Round(time.Millisecond), time.Since(restored).Round(time.Millisecond))
	k.DescribePod(t, p)
	if err := cs.CoreV1().Pods("default").Delete(ctx, podName, metav1.DeleteOptions{}); err != nil {
		t.Error(err)
	}
	at("pod " + podName + " started once twilld was back")
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
