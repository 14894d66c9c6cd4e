package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/twillnet/twill/deploy"
	"github.com/twillnet/twill/internal/tools/kubeapi"
	"github.com/twillnet/twill/internal/tools/testenv"
)

// The namespace and ServiceAccount of deploy/kube-twill.yaml.
const (
	deployNamespace = "kube-twill"
	deploySA        = "twill"
)

// recordCluster is a real kube-apiserver with deploy/kube-twill.yaml applied
// as shipped: the NodeNetwork CRD, the ClusterRole and the
// ValidatingAdmissionPolicy.
type recordCluster struct {
	api     *testenv.KubeAPI
	admin   kubernetes.Interface
	records RecordClient // the admin's
}

func newRecordCluster(t *testing.T) *recordCluster {
	t.Helper()
	api := testenv.StartKubeAPI(t, testenv.KubeAPIOptions{})
	ctx := ctxT(t)
	if _, err := kubeapi.Apply(ctx, api.AdminConfig(), deploy.KubeManifest, false); err != nil {
		t.Fatalf("apply deploy/kube-twill.yaml: %v", err)
	}
	c := &recordCluster{api: api, admin: api.AdminClient(t)}
	var err error
	if c.records, err = NewRecordClient(api.AdminConfig()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the NodeNetwork CRD to be served", 30*time.Second, func() bool {
		_, err := c.records.List(ctx, metav1.ListOptions{})
		return err == nil
	})
	return c
}

// node creates a Node with a podCIDR.
func (c *recordCluster) node(t *testing.T, name, podCIDR string) *corev1.Node {
	t.Helper()
	n, err := c.admin.CoreV1().Nodes().Create(ctxT(t), node(name, podCIDR, nil), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// twilldOn returns the clients of a twilld on a node: authenticated with a
// token of the DaemonSet's ServiceAccount bound to a Pod scheduled there, as
// the kubelet gives the twilld pod (the Pod stays Pending: no kubelet runs).
func (c *recordCluster) twilldOn(t *testing.T, nodeName string) (NodeClient, RecordClient) {
	t.Helper()
	return c.clients(t, c.api.PodBoundToken(t, deployNamespace, deploySA, "twill-"+nodeName, nodeName))
}

func (c *recordCluster) clients(t *testing.T, token string) (NodeClient, RecordClient) {
	t.Helper()
	cfg := c.api.ConfigForToken(token)
	nodes, err := NewNodeClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	records, err := NewRecordClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return nodes, records
}

// recordManager is a nodenetwork-mode manager of a node with the given public
// address, using a twilld's clients.
func recordManager(t *testing.T, nodes NodeClient, records RecordClient, name, ip string) (*Manager, *logRecorder, *eventCounts) {
	t.Helper()
	return modeManager(t, ModeNodeNetwork, nodes, records, name, ip)
}

// modeManager is a manager of a mode, using a twilld's clients.
func modeManager(t *testing.T, mode Mode, nodes NodeClient, records RecordClient, name, ip string) (*Manager, *logRecorder, *eventCounts) {
	t.Helper()
	ev := &eventCounts{n: map[string]int{}}
	m, rec := newManagerFor(t, nodes, name, Options{Mode: mode, Records: records, Event: ev.add}, testConfig(t), vxlanAttrs(ip))
	m.retryMax = 200 * time.Millisecond
	return m, rec, ev
}

// eventCounts counts the objects a manager's informers deliver, by resource.
type eventCounts struct {
	mu sync.Mutex
	n  map[string]int
}

func (e *eventCounts) add(resource string) {
	e.mu.Lock()
	e.n[resource]++
	e.mu.Unlock()
}

func (e *eventCounts) get(resource string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.n[resource]
}

// waitPolicy waits until the admission policy denies a twilld's write to
// another node's record (a dry run: nothing is stored either way). The API
// server learns a new policy through an informer.
func waitPolicy(t *testing.T, records RecordClient, other string) {
	t.Helper()
	r := &NodeNetwork{ObjectMeta: metav1.ObjectMeta{Name: other}, Spec: NodeNetworkSpec{BackendType: "vxlan"}}
	waitFor(t, "the ValidatingAdmissionPolicy to take effect", 30*time.Second, func() bool {
		_, err := records.Create(ctxT(t), r, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return apierrors.IsForbidden(err) || apierrors.IsInvalid(err)
	})
}

// TestNodeNetworkOnAPIServer runs the nodenetwork mode on a real API server
// under deploy/kube-twill.yaml as shipped, each twilld with a token bound to
// its node: join, a public address change, a record deleted by hand, writes
// to another node's objects refused, and a Node leaving (its record
// collected by a real kube-controller-manager's garbage collector).
func TestNodeNetworkOnAPIServer(t *testing.T) {
	c := newRecordCluster(t)
	ctx := ctxT(t)
	nodeA := c.node(t, "a", "10.244.1.0/24")
	c.node(t, "b", "10.244.2.0/24")
	nodesA, recordsA := c.twilldOn(t, "a")
	nodesB, recordsB := c.twilldOn(t, "b")
	waitPolicy(t, recordsA, "b")

	ma, _, evA := recordManager(t, nodesA, recordsA, "a", "192.0.2.1")
	mb, recB, _ := recordManager(t, nodesB, recordsB, "b", "192.0.2.2")
	for _, m := range []*Manager{ma, mb} {
		if _, err := m.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
		runManager(t, m)
	}
	peersAre := func(m *Manager, want map[string]string) func() bool {
		return func() bool {
			got, synced := peerMap(m)
			return synced && fmt.Sprint(got) == fmt.Sprint(want)
		}
	}
	waitFor(t, "a and b to see each other", 10*time.Second, peersAre(ma, map[string]string{"b": "10.244.2.0/24 192.0.2.2"}))
	waitFor(t, "b to see a", 10*time.Second, peersAre(mb, map[string]string{"a": "10.244.1.0/24 192.0.2.1"}))

	// The record as stored: the lease, owned by the Node.
	ra, err := c.records.Get(ctx, "a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	wantSpec := NodeNetworkSpec{BackendType: "vxlan", Subnet: "10.244.1.0/24", PublicIP: "192.0.2.1", BackendData: json.RawMessage(vxlanData)}
	if !sameSpec(ra.Spec, wantSpec) {
		t.Errorf("record a: spec %+v, want %+v", ra.Spec, wantSpec)
	}
	if got := nodeOwner(ra.OwnerReferences); got != nodeA.UID {
		t.Errorf("record a: Node owner %q, want Node a's UID %q (%+v)", got, nodeA.UID, ra.OwnerReferences)
	}

	t.Run("other Nodes' status writes reach no twilld", func(t *testing.T) {
		// The kubelets' status writes were every watcher's cost in the
		// annotations mode. Twenty heartbeats of b's, then one of a's as a
		// fence: a's twilld receives a's alone, and no record.
		nodes0, records0 := evA.get(ResourceNodes), evA.get(Resource)
		heartbeat := func(name string, i int) {
			t.Helper()
			patch := fmt.Appendf(nil, `{"status":{"conditions":[{"type":"Ready","status":"True","reason":"KubeletReady","lastHeartbeatTime":"2026-12-02T00:%02d:00Z"}]}}`, i)
			if _, err := c.admin.CoreV1().Nodes().Patch(ctx, name, types.StrategicMergePatchType, patch, metav1.PatchOptions{}, "status"); err != nil {
				t.Fatal(err)
			}
		}
		for i := range 20 {
			heartbeat("b", i)
		}
		heartbeat("a", 0)
		waitFor(t, "a's twilld to see its own Node's heartbeat", 10*time.Second, func() bool { return evA.get(ResourceNodes) > nodes0 })
		time.Sleep(200 * time.Millisecond) // room for a stray event to arrive
		if n, r := evA.get(ResourceNodes)-nodes0, evA.get(Resource)-records0; n != 1 || r != 0 {
			t.Errorf("a's twilld received %d Node and %d NodeNetwork events for 20 status writes of b's and 1 of a's; want 1 and 0", n, r)
		}
	})

	t.Run("another node's objects are refused", func(t *testing.T) {
		rb, err := recordsA.Get(ctx, "b", metav1.GetOptions{})
		if err != nil {
			t.Fatalf("a twilld reads every record: %v", err)
		}
		rb.Spec.PublicIP = "192.0.2.66"
		_, err = recordsA.Update(ctx, rb, metav1.UpdateOptions{})
		wantForbidden(t, "a's token updates b's record", err, "the twilld of node a may not write the objects of node b")
		err = recordsA.Delete(ctx, "b", metav1.DeleteOptions{})
		wantForbidden(t, "a's token deletes b's record", err, "may not write the objects of node b")
		_, err = recordsA.Create(ctx, &NodeNetwork{ObjectMeta: metav1.ObjectMeta{Name: "c"}, Spec: NodeNetworkSpec{BackendType: "vxlan"}}, metav1.CreateOptions{})
		wantForbidden(t, "a's token creates a record of node c", err, "may not write the objects of node c")
		patch := []byte(`{"metadata":{"annotations":{"twill.io/public-ip":"192.0.2.66"}}}`)
		_, err = nodesA.Patch(ctx, "b", types.MergePatchType, patch, metav1.PatchOptions{}, "status")
		wantForbidden(t, "a's token patches b's nodes/status", err, "may not write the objects of node b")

		// Its own record, owned by another Node: refused.
		own, err := recordsA.Get(ctx, "a", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		own.OwnerReferences = withNodeOwner(own.OwnerReferences, "b", "0000")
		_, err = recordsA.Update(ctx, own, metav1.UpdateOptions{})
		wantForbidden(t, "a's token makes its record owned by Node b", err, "owned by its own Node only")

		// A token of the ServiceAccount bound to no node writes nothing,
		// not even a record named after the node it claims.
		_, unbound := c.clients(t, c.api.ServiceAccountToken(t, deployNamespace, deploySA))
		own, err = unbound.Get(ctx, "a", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		own.Spec.PublicIP = "192.0.2.66"
		_, err = unbound.Update(ctx, own, metav1.UpdateOptions{})
		wantForbidden(t, "an unbound token updates record a", err, "bound to no node")

		// Nothing changed: b is still reached at its address.
		if got, _ := peerMap(ma); got["b"] != "10.244.2.0/24 192.0.2.2" {
			t.Errorf("a's peers after the refused writes: %v", got)
		}
	})

	t.Run("the CRD refuses a malformed record", func(t *testing.T) {
		bad := &NodeNetwork{ObjectMeta: metav1.ObjectMeta{Name: "bad"}, Spec: NodeNetworkSpec{BackendType: "vxlan", Subnet: "10.244.9.1/24", PublicIP: "192.0.2.9"}}
		_, err := c.records.Create(ctx, bad, metav1.CreateOptions{})
		if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), "an IPv4 network address") {
			t.Errorf("record with host bits in its subnet: %v, want Invalid naming the rule", err)
		}
	})

	t.Run("a record outside the network is skipped", func(t *testing.T) {
		x := &NodeNetwork{ObjectMeta: metav1.ObjectMeta{Name: "x"}, Spec: NodeNetworkSpec{BackendType: "vxlan", Subnet: "10.99.0.0/24", PublicIP: "192.0.2.99"}}
		if _, err := c.records.Create(ctx, x, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "b to skip record x", 10*time.Second, func() bool { return recB.count("skipping node", "peer=x", "outside the Network") == 1 })
		if got, _ := peerMap(mb); got["x"] != "" {
			t.Errorf("b programs x: %v", got)
		}
		if err := c.records.Delete(ctx, "x", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("public address change", func(t *testing.T) {
		// An operator moves node a behind NAT: the overwrite annotation on
		// its Node. a's twilld sees its own Node change and rewrites its
		// record; b follows the record.
		patch := []byte(`{"metadata":{"annotations":{"twill.io/public-ip-overwrite":"192.0.2.11"}}}`)
		if _, err := c.admin.CoreV1().Nodes().Patch(ctx, "a", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "b to reach a at the new address", 10*time.Second, peersAre(mb, map[string]string{"a": "10.244.1.0/24 192.0.2.11"}))
	})

	t.Run("a record deleted by hand comes back", func(t *testing.T) {
		if err := c.records.Delete(ctx, "a", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "a's twilld to write its record again", 10*time.Second, func() bool {
			r, err := c.records.Get(ctx, "a", metav1.GetOptions{})
			return err == nil && r.Spec.PublicIP == "192.0.2.11" && nodeOwner(r.OwnerReferences) == nodeA.UID
		})
		waitFor(t, "b to see a again", 10*time.Second, peersAre(mb, map[string]string{"a": "10.244.1.0/24 192.0.2.11"}))
	})

	t.Run("a Node that leaves takes its record along", func(t *testing.T) {
		c.api.StartControllerManager(t, "garbagecollector")
		if err := c.admin.CoreV1().Nodes().Delete(ctx, "b", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the garbage collector to delete b's record", 60*time.Second, func() bool {
			_, err := c.records.Get(ctx, "b", metav1.GetOptions{})
			return apierrors.IsNotFound(err)
		})
		waitFor(t, "a to drop b", 10*time.Second, peersAre(ma, map[string]string{}))
	})
}

// wantForbidden checks that a write was refused by twill's admission policy
// with a message containing msg.
func wantForbidden(t *testing.T, what string, err error, msg string) {
	t.Helper()
	if !apierrors.IsForbidden(err) || !strings.Contains(err.Error(), msg) {
		t.Errorf("%s: %v; want Forbidden by twill's policy (%q)", what, err, msg)
	}
}

// TestSwitchToNodeNetworkMode switches a cluster from the annotations mode to
// the nodenetwork mode node by node, as a DaemonSet rolls the change out,
// and checks that every pair of nodes reaches each other at every step: the
// annotations mode keeps each node's record beside its annotations, and a
// node switched keeps its old annotations current for the others.
func TestSwitchToNodeNetworkMode(t *testing.T) {
	c := newRecordCluster(t)
	ctx := ctxT(t)
	names := []string{"s1", "s2", "s3"}
	type twilld struct {
		nodes   NodeClient
		records RecordClient
		stop    context.CancelFunc
		m       *Manager
	}
	ds := map[string]*twilld{}
	for i, n := range names {
		c.node(t, n, fmt.Sprintf("10.244.%d.0/24", i+1))
		d := &twilld{}
		d.nodes, d.records = c.twilldOn(t, n)
		ds[n] = d
	}
	waitPolicy(t, ds["s1"].records, "s2")
	start := func(i int, mode Mode, ip string) {
		t.Helper()
		d := ds[names[i]]
		if d.stop != nil {
			d.stop()
		}
		d.m, _, _ = modeManager(t, mode, d.nodes, d.records, names[i], ip)
		if _, err := d.m.Acquire(ctx); err != nil {
			t.Fatal(err)
		}
		runCtx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { d.m.Run(runCtx); close(done) }()
		d.stop = func() { cancel(); <-done }
		t.Cleanup(d.stop)
	}
	allSeeAll := func(step string, ips []string) {
		t.Helper()
		for i, n := range names {
			want := map[string]string{}
			for j, p := range names {
				if j != i {
					want[p] = fmt.Sprintf("10.244.%d.0/24 %s", j+1, ips[j])
				}
			}
			waitFor(t, step+": "+n+" to see every other node", 10*time.Second, func() bool {
				got, synced := peerMap(ds[n].m)
				return synced && fmt.Sprint(got) == fmt.Sprint(want)
			})
		}
	}
	ips := []string{"192.0.2.1", "192.0.2.2", "192.0.2.3"}
	for i := range names {
		start(i, ModeAnnotations, ips[i])
	}
	allSeeAll("all in the annotations mode", ips)
	for i := range names {
		if _, err := c.records.Get(ctx, names[i], metav1.GetOptions{}); err != nil {
			t.Fatalf("the annotations mode keeps no record of %s: %v", names[i], err)
		}
	}
	// s1 switches, and comes back with another address: the others, still
	// in the annotations mode, follow its annotations, which it keeps current.
	ips[0] = "192.0.2.11"
	start(0, ModeNodeNetwork, ips[0])
	allSeeAll("s1 switched", ips)
	start(1, ModeNodeNetwork, ips[1])
	allSeeAll("s2 switched", ips)
	start(2, ModeNodeNetwork, ips[2])
	allSeeAll("all switched", ips)
}

// TestNodeNetworkWithoutCRD: a twilld in the nodenetwork mode on a cluster
// whose manifest predates the CRD waits, not ready, and says what to do;
// once the manifest is applied it goes on by itself.
func TestNodeNetworkWithoutCRD(t *testing.T) {
	api := testenv.StartKubeAPI(t, testenv.KubeAPIOptions{})
	ctx := ctxT(t)
	admin := api.AdminClient(t)
	if _, err := admin.CoreV1().Nodes().Create(ctx, node("a", "10.244.1.0/24", nil), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	nodes, err := NewNodeClient(api.AdminConfig())
	if err != nil {
		t.Fatal(err)
	}
	records, err := NewRecordClient(api.AdminConfig())
	if err != nil {
		t.Fatal(err)
	}
	var reasons waitReasons
	m, _ := newManagerFor(t, nodes, "a", Options{Mode: ModeNodeNetwork, Records: records, Waiting: reasons.record}, testConfig(t), vxlanAttrs("192.0.2.1"))
	acquired := make(chan error, 1)
	go func() { _, err := m.Acquire(ctx); acquired <- err }()
	waitFor(t, "Acquire to say the CRD is missing", 20*time.Second,
		reasons.seen("the NodeNetwork CustomResourceDefinition is not installed: apply deploy/kube-twill.yaml, or run twilld with --kube-mode=annotations", 2))
	select {
	case err := <-acquired:
		t.Fatalf("Acquire returned without the CRD: %v", err)
	default:
	}
	if _, err := kubeapi.Apply(ctx, api.AdminConfig(), deploy.KubeManifest, false); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-acquired:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Acquire still waiting 30 s after the CRD was applied")
	}
	if _, err := records.Get(ctx, "a", metav1.GetOptions{}); err != nil {
		t.Fatalf("record after Acquire: %v", err)
	}
}
