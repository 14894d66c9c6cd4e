package e2e

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/twillnet/twill/backend/vxlan"
	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/internal/tools/testenv"
	"github.com/twillnet/twill/subnet/kube"
)

// kubeModes are twilld's --kube-mode values as lab.Options.KubeMode names
// them: "" is the default, nodenetwork.
var kubeModes = []struct{ name, opt string }{{"nodenetwork", ""}, {"annotations", "annotations"}}

// nodeNetworkMode reports whether a lab's nodes publish NodeNetwork records
// (--kube-mode=nodenetwork, the default) rather than Node annotations.
func nodeNetworkMode(l *lab.Lab) bool {
	return l.Datastore == "kube" && (l.KubeMode == "" || l.KubeMode == "nodenetwork")
}

// recordClient is an admin client of the lab's NodeNetwork records.
func recordClient(t *testing.T, l *lab.Lab) kube.RecordClient {
	t.Helper()
	rc, err := kube.NewRecordClient(l.KubeServer().Config(l.KubeAdminToken, lab.DialInNS(l.Topology().UnderlayNS())))
	if err != nil {
		t.Fatal(err)
	}
	return rc
}

// publication is a node's lease as its peers read it: from its NodeNetwork
// record, or from its Node's annotations. VtepMAC is the VXLAN backend's.
type publication struct {
	BackendType                      string
	Subnet, PublicIP, VtepMAC        string
	IPv6Subnet, PublicIPv6, VtepMAC6 string
}

// wantPublication is what host i must publish: its Node's podCIDR and its
// underlay address (or public4, when valid) for each family of the lab, and
// the MAC of its VXLAN device of that family.
func wantPublication(t *testing.T, l *lab.Lab, i int, public4 netip.Addr) publication {
	t.Helper()
	hn := l.Topology().HostNS(i)
	p := publication{BackendType: "vxlan"}
	for _, v6 := range l.Families() {
		if v6 {
			p.IPv6Subnet, p.PublicIPv6, p.VtepMAC6 = l.NodePodCIDRV6(i).String(), l.Topology().HostAddrV6(i).String(), deviceMAC(t, hn, vxlan.DeviceName(1, true))
			continue
		}
		if !public4.IsValid() {
			public4 = l.Topology().HostAddr(i)
		}
		p.Subnet, p.PublicIP, p.VtepMAC = l.NodePodCIDR(i).String(), public4.String(), deviceMAC(t, hn, vxlan.DeviceName(1, false))
	}
	return p
}

// operatorAnnotations are the twill.io annotations an operator writes on a
// Node and twilld only reads.
var operatorAnnotations = map[string]bool{
	"twill.io/public-ip-overwrite": true, "twill.io/public-ipv6-overwrite": true,
	"twill.io/node-public-ip": true, "twill.io/node-public-ipv6": true,
}

// readPublication reads what host i publishes. In the nodenetwork mode it is
// its record, which must be owned by its Node as it is now (an
// ownerReference naming the Node's UID, so that the garbage collector
// deletes it with that Node), and the Node must carry none of the
// annotations the annotations mode writes.
func readPublication(ctx context.Context, l *lab.Lab, cs kubernetes.Interface, rc kube.RecordClient, i int) (publication, error) {
	name := fmt.Sprintf("h%d", i)
	n, err := cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return publication{}, err
	}
	mac := func(data []byte) string {
		if d, err := vxlan.ParseData(data); err == nil {
			return d.VtepMAC.String()
		}
		return "(" + string(data) + ")"
	}
	if !nodeNetworkMode(l) {
		// The annotations carry the address and backend data of each
		// family; the subnet is the Node's podCIDR of that family. As
		// flannel reads them, an operator's overwrite annotation is the
		// address peers use in place of the one twilld writes.
		a, p := n.Annotations, publication{BackendType: n.Annotations["twill.io/backend-type"]}
		addr := func(v6 string) string {
			if ow := a["twill.io/public-ip"+v6+"-overwrite"]; ow != "" && a["twill.io/public-ip"+v6] != "" {
				return ow
			}
			return a["twill.io/public-ip"+v6]
		}
		for _, c := range n.Spec.PodCIDRs {
			switch pc, err := netip.ParsePrefix(c); {
			case err != nil:
				return publication{}, fmt.Errorf("Node %s: podCIDR %q: %v", name, c, err)
			case pc.Addr().Is4() && a["twill.io/public-ip"] != "":
				p.Subnet, p.PublicIP, p.VtepMAC = c, addr(""), mac([]byte(a["twill.io/backend-data"]))
			case pc.Addr().Is6() && a["twill.io/public-ipv6"] != "":
				p.IPv6Subnet, p.PublicIPv6, p.VtepMAC6 = c, addr("v6"), mac([]byte(a["twill.io/backend-v6-data"]))
			}
		}
		return p, nil
	}
	for k := range n.Annotations {
		if strings.HasPrefix(k, "twill.io/") && !operatorAnnotations[k] {
			return publication{}, fmt.Errorf("Node %s carries annotation %s=%q in the nodenetwork mode", name, k, n.Annotations[k])
		}
	}
	r, err := rc.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return publication{}, err
	}
	want := metav1.OwnerReference{APIVersion: "v1", Kind: "Node", Name: name, UID: n.UID}
	if len(r.OwnerReferences) != 1 || r.OwnerReferences[0].APIVersion != want.APIVersion || r.OwnerReferences[0].Kind != want.Kind ||
		r.OwnerReferences[0].Name != want.Name || r.OwnerReferences[0].UID != want.UID {
		return publication{}, fmt.Errorf("record %s's owners %+v; want only its Node %+v", name, r.OwnerReferences, want)
	}
	if _, ok, err := kube.RecordToLease(r); !ok || err != nil {
		return publication{}, fmt.Errorf("record %s %+v does not parse as a lease (%v)", name, r.Spec, err)
	}
	s := r.Spec
	p := publication{BackendType: s.BackendType, Subnet: s.Subnet, PublicIP: s.PublicIP, IPv6Subnet: s.IPv6Subnet, PublicIPv6: s.PublicIPv6}
	if s.Subnet != "" {
		p.VtepMAC = mac(s.BackendData)
	}
	if s.IPv6Subnet != "" {
		p.VtepMAC6 = mac(s.BackendV6Data)
	}
	return p, nil
}

// waitPublished waits until host i publishes want.
func waitPublished(t *testing.T, l *lab.Lab, cs kubernetes.Interface, rc kube.RecordClient, i int, want publication, d time.Duration) {
	t.Helper()
	waitFor(t, fmt.Sprintf("h%d to publish %+v", i, want), d, func() error {
		got, err := readPublication(ctxFor(t, 10*time.Second), l, cs, rc, i)
		if err == nil && got != want {
			err = fmt.Errorf("published %+v", got)
		}
		return err
	})
}

// recordGone waits until the record of host i is gone.
func recordGone(t *testing.T, rc kube.RecordClient, i int, d time.Duration) {
	t.Helper()
	waitFor(t, fmt.Sprintf("h%d's record to be deleted", i), d, func() error {
		r, err := rc.Get(ctxFor(t, 10*time.Second), fmt.Sprintf("h%d", i), metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return nil
		}
		if err == nil {
			err = fmt.Errorf("record %s (uid %s) is there", r.Name, r.UID)
		}
		return err
	})
}

// twill in Kubernetes mode on a real kube-apiserver, in each --kube-mode:
// the lab applies the DaemonSet manifest (server-side dry run, then for
// real), creates Nodes with podCIDRs, and runs each twilld with a token of
// the manifest's ServiceAccount bound to a pod on its node, so everything
// below works with exactly the RBAC and admission policy the manifest
// grants. In the nodenetwork mode the lab runs kube-controller-manager's
// garbage collector, which deletes a Node's record with the Node.
func TestKubernetesMode(t *testing.T) {
	for _, m := range kubeModes {
		t.Run(m.name, func(t *testing.T) { testKubernetesMode(t, m.opt) })
	}
}

func testKubernetesMode(t *testing.T, mode string) {
	l := newLab(t, lab.Options{Hosts: 3, PodsPerHost: 1, Backend: "vxlan", IPMasq: true,
		Datastore: "kube", KubeMode: mode, KubeAPIServer: testenv.Tool(t, "kube-apiserver")})
	ctx := ctxFor(t, 4*time.Minute)
	cs, err := l.KubeClient()
	if err != nil {
		t.Fatal(err)
	}
	rc := recordClient(t, l)
	records := nodeNetworkMode(l)

	// Leases are the podCIDRs; each node publishes its lease (its record,
	// or its Node's annotations) and sets the node condition.
	for i := 1; i <= 3; i++ {
		if got := hostEnv(t, l, i).Subnet.Masked(); got != l.NodePodCIDR(i) {
			t.Fatalf("h%d's env file names %s, its Node's podCIDR is %s", i, got, l.NodePodCIDR(i))
		}
		waitPublished(t, l, cs, rc, i, wantPublication(t, l, i, netip.Addr{}), 15*time.Second)
		waitFor(t, fmt.Sprintf("h%d's NetworkUnavailable=False condition", i), 15*time.Second, func() error {
			n, err := cs.CoreV1().Nodes().Get(ctx, fmt.Sprintf("h%d", i), metav1.GetOptions{})
			if err != nil {
				return err
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

	// A restart changes nothing: the new twilld writes no kernel entry,
	// and in the nodenetwork mode does not write its record again.
	h1 := l.Topology().HostNS(1)
	var rv1 string
	if records {
		r, err := rc.Get(ctx, "h1", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		rv1 = r.ResourceVersion
	}
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
	if records {
		r, err := rc.Get(ctx, "h1", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if r.ResourceVersion != rv1 {
			t.Errorf("the restarted twilld wrote h1's record again (resourceVersion %s -> %s): %+v", rv1, r.ResourceVersion, r.Spec)
		}
	}

	// public-ip-overwrite: peers send h3's traffic to the address it names;
	// their FDB is the proof. In the annotations mode peers read the
	// annotation itself. In the nodenetwork mode h3 publishes the address in
	// its record, and h1 learns it from that record alone: it receives no
	// event of h3's Node, which it does not watch.
	nodeEvents := func() float64 { return metric(t, h1, `twill_kube_watch_events_total{resource="nodes"}`) }
	recordEvents := func() float64 { return metric(t, h1, `twill_kube_watch_events_total{resource="nodenetworks"}`) }
	nodes0, recs0 := nodeEvents(), 0.0
	if records {
		recs0 = recordEvents()
	}
	h3 := l.Topology().HostNS(3)
	ipn(t, h3, "addr", "add", "198.18.0.103/24", "dev", "eth0")
	patch := []byte(`{"metadata":{"annotations":{"twill.io/public-ip-overwrite":"198.18.0.103"}}}`)
	if _, err := cs.CoreV1().Nodes().Patch(ctx, "h3", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	waitPublished(t, l, cs, rc, 3, wantPublication(t, l, 3, netip.MustParseAddr("198.18.0.103")), 15*time.Second)
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
	if n := nodeEvents(); records && n != nodes0 {
		t.Errorf("h1 received %v Node events for the change of h3's Node; it watches its own Node alone", n-nodes0)
	} else if !records && n <= nodes0 {
		t.Errorf("h1 received no Node event (%v) for the change of h3's Node", n)
	}
	if records {
		if n := recordEvents(); n <= recs0 {
			t.Errorf("h1 received no NodeNetwork event (%v) for the change of h3's record", n)
		}
	}
	requireMatrix(t, l)

	// The API server goes away and comes back: the datapath stays, and
	// twilld resumes following the records (the GC's deletion of h3's
	// record below reaches the peers). (In the annotations mode, the
	// Node informer's resumption, relist included, is proved on a real API
	// server by subnet/kube's TestRelistAfterCompaction, and /readyz reports
	// the transport's state, whatever the mode.)
	if records {
		apiServerOutage(t, l)
	}

	// h3 leaves the cluster: its twilld stops (its lease stays published:
	// no --release-on-exit) and its Node is deleted. The peers drop it. In
	// the nodenetwork mode the record goes with the Node: the garbage
	// collector deletes it, since it names the Node as its owner.
	if err := l.StopDaemon(ctx, 3); err != nil {
		t.Fatal(err)
	}
	if records {
		if _, err := rc.Get(ctx, "h3", metav1.GetOptions{}); err != nil {
			t.Fatalf("h3's record after its twilld stopped: %v", err)
		}
	}
	waitCounts(t, l, 1, expected("vxlan", 2), time.Second)
	if err := cs.CoreV1().Nodes().Delete(ctx, "h3", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if records {
		recordGone(t, rc, 3, 30*time.Second)
	}
	waitCounts(t, l, 1, expected("vxlan", 1), 30*time.Second)
	waitCounts(t, l, 2, expected("vxlan", 1), 30*time.Second)
}

// apiServerOutage stops the lab's API server gracefully and starts it again:
// h1's /readyz and twill_datastore_up report the outage, from the
// informers' failing requests, and its end when they succeed; the pods
// reach each other throughout.
func apiServerOutage(t *testing.T, l *lab.Lab) {
	t.Helper()
	ctx := ctxFor(t, 2*time.Minute)
	h1 := l.Topology().HostNS(1)
	if err := l.StopKubeAPI(ctx); err != nil {
		t.Fatal(err)
	}
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
}

// Dual-stack in Kubernetes mode on a real kube-apiserver: each Node has a
// podCIDR of each family, twilld leases both and publishes both families
// in its record (a subnet, a public address and a VTEP MAC each, the MACs
// of its two devices), programs exactly the entries of each family, and
// pods reach each other in both.
func TestKubernetesModeDualStack(t *testing.T) {
	l := newLab(t, lab.Options{Hosts: 3, PodsPerHost: 1, Backend: "vxlan", IPMasq: true, IPFamily: "dual",
		Datastore: "kube", KubeAPIServer: testenv.Tool(t, "kube-apiserver")})
	cs, err := l.KubeClient()
	if err != nil {
		t.Fatal(err)
	}
	rc := recordClient(t, l)
	for i := 1; i <= 3; i++ {
		env := hostEnv(t, l, i)
		if env.Subnet.Masked() != l.NodePodCIDR(i) || env.IPv6Subnet.Masked() != l.NodePodCIDRV6(i) {
			t.Fatalf("h%d's env file names %s and %s, its Node's podCIDRs are %s and %s", i, env.Subnet, env.IPv6Subnet, l.NodePodCIDR(i), l.NodePodCIDRV6(i))
		}
		want := wantPublication(t, l, i, netip.Addr{})
		if want.VtepMAC == want.VtepMAC6 || want.VtepMAC6 == "" {
			t.Fatalf("h%d's VXLAN devices have MACs %q and %q", i, want.VtepMAC, want.VtepMAC6)
		}
		waitPublished(t, l, cs, rc, i, want, 15*time.Second)
	}
	for i := 1; i <= 3; i++ {
		for _, v6 := range l.Families() {
			waitFamilyEntries(t, l, i, v6, 10*time.Second)
		}
	}
	requireMatrix(t, l)
}

// A node-public-ip annotation on a Node, as flannel reads it, is the node's
// public address in both modes: twilld on h1 publishes it (in its record,
// or its Node's public-ip annotation) instead of its interface's first
// address, and h2 sends h1's pod traffic there.
func TestNodePublicIPAnnotation(t *testing.T) {
	for _, m := range kubeModes {
		t.Run(m.name, func(t *testing.T) {
			l := newLab(t, lab.Options{Hosts: 2, PodsPerHost: 1, Backend: "vxlan",
				Datastore: "kube", KubeMode: m.opt, KubeAPIServer: testenv.Tool(t, "kube-apiserver")})
			ctx := ctxFor(t, 2*time.Minute)
			cs, err := l.KubeClient()
			if err != nil {
				t.Fatal(err)
			}
			rc := recordClient(t, l)
			waitPublished(t, l, cs, rc, 1, wantPublication(t, l, 1, netip.Addr{}), 15*time.Second)
			if err := l.StopDaemon(ctx, 1); err != nil {
				t.Fatal(err)
			}
			second := netip.MustParseAddr("198.18.0.101")
			ipn(t, l.Topology().HostNS(1), "addr", "add", second.String()+"/24", "dev", "eth0")
			patch := []byte(`{"metadata":{"annotations":{"twill.io/node-public-ip":"` + second.String() + `"}}}`)
			if _, err := cs.CoreV1().Nodes().Patch(ctx, "h1", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
				t.Fatal(err)
			}
			if err := l.StartDaemon(1); err != nil {
				t.Fatal(err)
			}
			waitPublished(t, l, cs, rc, 1, wantPublication(t, l, 1, second), 20*time.Second)
			waitFor(t, "h2 to send h1's traffic to the annotated address", 20*time.Second, func() error {
				out := bridgeCmd(t, l.Topology().HostNS(2), "fdb", "show", "dev", "twill.1")
				if !strings.Contains(out, "dst "+second.String()+" ") || strings.Contains(out, "dst "+l.Topology().HostAddr(1).String()+" ") {
					return fmt.Errorf("h2's FDB:\n%s", out)
				}
				return nil
			})
			requireMatrix(t, l)
		})
	}
}

// `twillctl lab run --datastore kube`, as a user runs it: a kube-apiserver,
// the manifest applied, twilld in the (default) nodenetwork mode beside
// kube-controller-manager's garbage collector. It exits 0 only if every pod
// reaches every other; it prints each node's NodeNetwork record; and it
// leaves no namespace and no process of the lab behind.
func TestLabRunKube(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.Tool(t, "kube-apiserver")
	testenv.Tool(t, "kube-controller-manager")
	testenv.Binary(t, "twilld")
	testenv.Binary(t, "twill")
	bin := testenv.Binary(t, "twillctl")
	prefix := nsPrefix()
	dir := filepath.Join(t.TempDir(), "lab")
	topo := lab.Topology{Prefix: prefix, Hosts: 3}
	t.Cleanup(func() { topo.Down(context.Background()) })
	out, err := exec.CommandContext(ctxFor(t, 3*time.Minute), bin, "lab", "run", "--datastore", "kube", "--hosts", "3", "--pods-per-host", "1",
		"--dir", dir, "--prefix", prefix, "--cni-bin-dir", testenv.CNIBinDir(t)).CombinedOutput()
	if err != nil {
		t.Fatalf("lab run --datastore kube: %v\n%s", err, out)
	}
	for _, w := range []string{"kube-controller-manager running its garbage collector", "NodeNetwork records (kube-apiserver ",
		"PASS: all 6 pod pairs reach each other over IPv4", "lab removed"} {
		if !strings.Contains(string(out), w) {
			t.Fatalf("output lacks %q:\n%s", w, out)
		}
	}
	for i := 1; i <= 3; i++ {
		// The record's line: its name, backend, subnet, address and data.
		re := regexp.MustCompile(fmt.Sprintf(`(?m)^  h%d  backend vxlan  subnet 10\.244\.%d\.0/24  public-ip %s  \{.*"VtepMAC":"[0-9a-f:]{17}".*\}$`,
			i, i, regexp.QuoteMeta(topo.HostAddr(i).String())))
		if !re.Match(out) {
			t.Fatalf("output has no line for h%d's record (%s):\n%s", i, re, out)
		}
	}
	// No process of the lab (twilld, kube-apiserver, kube-controller-manager,
	// etcd) is left.
	checkLabGone(t, topo, dir)
}

// checkLabGone checks that a passed `lab run` left no namespace of the
// topology, no folder dir and no process naming dir.
func checkLabGone(t *testing.T, topo lab.Topology, dir string) {
	t.Helper()
	if up, err := topo.Exists(context.Background()); err != nil || up {
		t.Errorf("the lab's namespaces are still there (%v)", err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lab run passed but left its folder %s (%v)", dir, err)
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		if b, err := os.ReadFile(p); err == nil && strings.Contains(string(b), dir) {
			t.Errorf("%s outlived lab run: %q", filepath.Dir(p), strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
}
