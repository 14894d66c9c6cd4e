package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/internal/tools/testenv"
)

// twill in Kubernetes mode on a real kube-apiserver: the lab applies the
// DaemonSet manifest (server-side dry run, then for real), creates Nodes with
// podCIDRs, and runs each twilld with a token of the manifest's
// ServiceAccount, so everything below works with exactly the RBAC the
// manifest grants.
func TestKubernetesMode(t *testing.T) {
	l := newLab(t, lab.Options{Hosts: 3, PodsPerHost: 1, Backend: "vxlan", IPMasq: true,
		Datastore: "kube", KubeAPIServer: testenv.Tool(t, "kube-apiserver")})
	ctx := ctxFor(t, 4*time.Minute)
	cs, err := l.KubeClient()
	if err != nil {
		t.Fatal(err)
	}

	// Leases are the podCIDRs; annotations and the node condition are written.
	for i := 1; i <= 3; i++ {
		if got := hostEnv(t, l, i).Subnet.Masked(); got != l.NodePodCIDR(i) {
			t.Fatalf("h%d's env file names %s, its Node's podCIDR is %s", i, got, l.NodePodCIDR(i))
		}
		waitFor(t, fmt.Sprintf("h%d's annotations and condition", i), 15*time.Second, func() error {
			n, err := cs.CoreV1().Nodes().Get(ctx, fmt.Sprintf("h%d", i), metav1.GetOptions{})
			if err != nil {
				return err
			}
			if n.Annotations["twill.io/public-ip"] != l.Topology().HostAddr(i).String() || n.Annotations["twill.io/backend-type"] != "vxlan" ||
				!strings.Contains(n.Annotations["twill.io/backend-data"], "VtepMAC") {
				return fmt.Errorf("annotations %v", n.Annotations)
			}
			for _, c := range n.Status.Conditions {
				if c.Type == corev1.NodeNetworkUnavailable && c.Status == corev1.ConditionFalse {
					return nil
				}
			}
			return fmt.Errorf("no NetworkUnavailable=False condition: %+v", n.Status.Conditions)
		})
		waitCounts(t, l, i, expected("vxlan", 2), 10*time.Second)
	}
	requireMatrix(t, l)

	// A restart changes nothing: the new twilld writes no kernel entry.
	h1 := l.Topology().HostNS(1)
	if err := l.StopDaemon(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if err := l.StartDaemon(1); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "h1's first reconcile after the restart", 20*time.Second, func() error {
		v, err := metricValue(h1, `twill_reconcile_total{result="ok"}`)
		if err == nil && v < 1 {
			err = fmt.Errorf("no reconcile yet")
		}
		return err
	})
	for _, kind := range []string{"route", "fdb", "neigh", "device"} {
		if w := metric(t, h1, `twill_kernel_writes_total{family="ipv4",kind="`+kind+`"}`); w != 0 {
			t.Errorf("restarted twilld wrote %v %s entries; want none", w, kind)
		}
	}

	// public-ip-overwrite: peers send h3's traffic to the address it names.
	h3 := l.Topology().HostNS(3)
	ipn(t, h3, "addr", "add", "198.18.0.103/24", "dev", "eth0")
	patch := []byte(`{"metadata":{"annotations":{"twill.io/public-ip-overwrite":"198.18.0.103"}}}`)
	if _, err := cs.CoreV1().Nodes().Patch(ctx, "h3", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, i := range []int{1, 2} {
		hn := l.Topology().HostNS(i)
		waitFor(t, fmt.Sprintf("h%d to send h3's traffic to 198.18.0.103", i), 15*time.Second, func() error {
			out := bridgeCmd(t, hn, "fdb", "show", "dev", "twill.1")
			if !strings.Contains(out, "dst 198.18.0.103 ") || strings.Contains(out, "dst 198.18.0.3 ") {
				return fmt.Errorf("fdb:\n%s", out)
			}
			return nil
		})
	}
	requireMatrix(t, l)

	// The API server goes away and comes back: the datapath stays, and
	// twilld resumes following the Nodes.
	if err := l.StopKubeAPI(ctx); err != nil {
		t.Fatal(err)
	}
	// /readyz and twill_datastore_up say so, from the informer's failing
	// requests, and say it again when they succeed.
	waitFor(t, "h1's /readyz to report the API server gone", 30*time.Second, func() error {
		code, body, err := readyzOf(l, 1)
		if err != nil || code != 503 || !strings.Contains(body, "datastore unreachable") {
			return fmt.Errorf("readyz %d %q (%v)", code, body, err)
		}
		if up := metric(t, h1, "twill_datastore_up"); up != 0 {
			return fmt.Errorf("twill_datastore_up = %v", up)
		}
		return nil
	})
	requireMatrix(t, l)
	if err := l.StartKubeAPI(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "h1's /readyz to report the API server back", 60*time.Second, func() error {
		if code, body, err := readyzOf(l, 1); err != nil || code != 200 {
			return fmt.Errorf("readyz %d %q (%v)", code, body, err)
		}
		if up := metric(t, h1, "twill_datastore_up"); up != 1 {
			return fmt.Errorf("twill_datastore_up = %v", up)
		}
		return nil
	})
	if err := l.StopDaemon(ctx, 3); err != nil {
		t.Fatal(err)
	}
	if err := cs.CoreV1().Nodes().Delete(ctx, "h3", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitCounts(t, l, 1, expected("vxlan", 1), 30*time.Second)
	waitCounts(t, l, 2, expected("vxlan", 1), 30*time.Second)
}

// Dual-stack in Kubernetes mode on a real kube-apiserver: each Node has a
// podCIDR of each family, twilld leases both, publishes flannel's IPv6
// annotations under twill's prefix beside the IPv4 ones, programs exactly
// the entries of each family, and pods reach each other in both.
func TestKubernetesModeDualStack(t *testing.T) {
	l := newLab(t, lab.Options{Hosts: 3, PodsPerHost: 1, Backend: "vxlan", IPMasq: true, IPFamily: "dual",
		Datastore: "kube", KubeAPIServer: testenv.Tool(t, "kube-apiserver")})
	ctx := ctxFor(t, 4*time.Minute)
	cs, err := l.KubeClient()
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 3; i++ {
		env := hostEnv(t, l, i)
		if env.Subnet.Masked() != l.NodePodCIDR(i) || env.IPv6Subnet.Masked() != l.NodePodCIDRV6(i) {
			t.Fatalf("h%d's env file names %s and %s, its Node's podCIDRs are %s and %s", i, env.Subnet, env.IPv6Subnet, l.NodePodCIDR(i), l.NodePodCIDRV6(i))
		}
		waitFor(t, fmt.Sprintf("h%d's annotations", i), 15*time.Second, func() error {
			n, err := cs.CoreV1().Nodes().Get(ctx, fmt.Sprintf("h%d", i), metav1.GetOptions{})
			if err != nil {
				return err
			}
			a := n.Annotations
			if a["twill.io/public-ip"] != l.Topology().HostAddr(i).String() || a["twill.io/public-ipv6"] != l.Topology().HostAddrV6(i).String() ||
				!strings.Contains(a["twill.io/backend-data"], "VtepMAC") || !strings.Contains(a["twill.io/backend-v6-data"], "VtepMAC") ||
				a["twill.io/backend-data"] == a["twill.io/backend-v6-data"] {
				return fmt.Errorf("annotations %v", a)
			}
			return nil
		})
	}
	for i := 1; i <= 3; i++ {
		for _, v6 := range l.Families() {
			waitFamilyEntries(t, l, i, v6, 10*time.Second)
		}
	}
	requireMatrix(t, l)
}

// A node-public-ip annotation on a Node, as flannel reads it, is the node's
// public address: twilld on h1 publishes it instead of its interface's
// first address, and h2 sends h1's pod traffic there.
func TestNodePublicIPAnnotation(t *testing.T) {
	l := newLab(t, lab.Options{Hosts: 2, PodsPerHost: 1, Backend: "vxlan",
		Datastore: "kube", KubeAPIServer: testenv.Tool(t, "kube-apiserver")})
	ctx := ctxFor(t, 2*time.Minute)
	cs, err := l.KubeClient()
	if err != nil {
		t.Fatal(err)
	}
	if err := l.StopDaemon(ctx, 1); err != nil {
		t.Fatal(err)
	}
	const second = "198.18.0.101"
	ipn(t, l.Topology().HostNS(1), "addr", "add", second+"/24", "dev", "eth0")
	patch := []byte(`{"metadata":{"annotations":{"twill.io/node-public-ip":"` + second + `"}}}`)
	if _, err := cs.CoreV1().Nodes().Patch(ctx, "h1", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := l.StartDaemon(1); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "h1 to publish the annotated address and h2 to use it", 20*time.Second, func() error {
		n, err := cs.CoreV1().Nodes().Get(ctx, "h1", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if got := n.Annotations["twill.io/public-ip"]; got != second {
			return fmt.Errorf("h1 publishes %s", got)
		}
		if out := bridgeCmd(t, l.Topology().HostNS(2), "fdb", "show", "dev", "twill.1"); !strings.Contains(out, "dst "+second) {
			return fmt.Errorf("h2's FDB:\n%s", out)
		}
		return nil
	})
	requireMatrix(t, l)
}
