package kubelab

import (
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/internal/tools/testenv"
)

// Guided is `twillctl lab run --kubelet`: a cluster of real kubelets on the
// topology's hosts, twill deployed on it as users deploy it, and pods that
// reach each other, each step told as it happens. A failed check is
// reported with tb.Errorf (the run then fails); everything is undone when
// tb ends.
func Guided(tb testenv.TB, topo lab.Topology) {
	start := time.Now()
	say := func(format string, args ...any) { tb.Logf(format, args...) }
	step := func(format string, args ...any) {
		say("\n== %s  (%s)", fmt.Sprintf(format, args...), time.Since(start).Round(100*time.Millisecond))
	}

	step("a Kubernetes cluster of %d nodes on this machine", topo.Hosts)
	k := Start(tb, topo)
	say("control plane in namespace %s: etcd, kube-apiserver at %s, kube-controller-manager (every controller; node IPAM gives each Node a /24 of %s), kube-scheduler",
		topo.UnderlayNS(), k.API.URL, ClusterCIDR)
	for _, name := range k.NodeNames() {
		n := k.Nodes[name]
		say("node %s: network namespace %s (address %s) and a mount namespace of its own (/etc/cni/net.d, /opt/cni/bin, /run/twill, /var/lib/kubelet, ...); containerd and kubelet; files and logs in %s",
			name, n.NetNS, n.NodeIP, n.Dir)
	}

	step("preparing the nodes as an operator would, without a registry")
	k.PrepareNodes(tb)
	say("each node: kube-proxy running; images %s and %s imported into containerd (`ctr -n k8s.io images import`); the reference plugins bridge, host-local, loopback and portmap in /opt/cni/bin",
		TwillImage, WorkloadImage)
	podCIDRs := k.WaitPodCIDRs(tb)
	ctx := tb.Context()
	for _, name := range k.NodeNames() {
		n, err := k.Client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			tb.Fatal(err)
		}
		info := n.Status.NodeInfo
		ready := "not reported yet"
		if c := NodeCondition(n, corev1.NodeReady); c != nil {
			ready = fmt.Sprintf("%s (%s)", c.Status, c.Message)
		}
		say("node %s: kubelet %s, %s; podCIDR %s; Ready=%s", name, info.KubeletVersion, info.ContainerRuntimeVersion, podCIDRs[name], ready)
	}

	step("kubectl apply -f deploy/kube-twill.yaml (only the image changed: %s -> %s)", ShippedImage, TwillImage)
	applied := k.ApplyTwill(tb)
	say("applied %s", strings.Join(applied, ", "))
	twill := k.WaitPodsReady(tb, "kube-twill", "app=twill", 120*time.Second)
	for _, name := range k.NodeNames() {
		p := twill[name]
		var inits []string
		for _, s := range p.Status.InitContainerStatuses {
			inits = append(inits, s.Name)
		}
		say("pod %s on %s: Running and Ready; its init containers (%s) put the twill plugin in /opt/cni/bin and 10-twill.conflist in /etc/cni/net.d",
			p.Name, name, strings.Join(inits, ", "))
	}
	records := k.WaitNetworkReady(tb, podCIDRs)
	for _, name := range k.NodeNames() {
		r := records[name].Spec
		say("node %s: Ready; twilld published NodeNetwork %s (backend %s, subnet %s, public IP %s) and set NetworkUnavailable=False",
			name, name, r.BackendType, r.Subnet, r.PublicIP)
	}

	step("workload pods (a Deployment, one pod per node) and probe pods")
	r := k.CheckReach(tb, podCIDRs)

	if tb.Failed() {
		step("FAIL: see the errors above")
		return
	}
	step("PASS: %d probe pods: each node's pod reached every other node's over TCP and UDP, and a server outside the cluster network saw each node's address (masquerade)",
		len(r.Probes))
	say("tearing down: pods, kubelets, containerds, kube-proxies, the control plane, the namespaces")
}
