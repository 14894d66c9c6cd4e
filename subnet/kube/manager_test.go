package kube

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"

	"github.com/twillnet/twill/subnet"
)

// fakeNodes is the Node client of a fake clientset. Like the fake clientset
// itself, it tells the reflector that it cannot stream the initial list as a
// watch (WatchList).
type fakeNodes struct{ NodeClient }

func (fakeNodes) IsWatchListSemanticsUnSupported() bool { return true }

func newTestManager(t *testing.T, cs kubernetes.Interface, name string, o Options) (*Manager, *logRecorder) {
	t.Helper()
	return newManagerWith(t, fakeNodes{cs.CoreV1().Nodes()}, name, o)
}

func newManagerWith(t *testing.T, c NodeClient, name string, o Options) (*Manager, *logRecorder) {
	t.Helper()
	return newManagerFor(t, c, name, o, testConfig(t), vxlanAttrs("192.0.2.1"))
}

// newManagerFor is newManagerWith for a network config and attributes.
func newManagerFor(t *testing.T, c NodeClient, name string, o Options, cfg *subnet.Config, attrs subnet.LeaseAttrs) (*Manager, *logRecorder) {
	t.Helper()
	rec := newLogRecorder(t)
	o.Client, o.NodeName, o.Log = c, name, slog.New(rec)
	m, err := NewManager(o, cfg, attrs)
	if err != nil {
		t.Fatal(err)
	}
	m.retryMin, m.retryMax = 10*time.Millisecond, 50*time.Millisecond
	return m, rec
}

// runManager runs m until the test ends.
func runManager(t *testing.T, m *Manager) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Run: %v", err)
		}
	})
}

func getNode(t *testing.T, cs kubernetes.Interface, name string) *corev1.Node {
	t.Helper()
	n, err := cs.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestNewManagerChecks(t *testing.T) {
	cs := fake.NewClientset()
	cfg := testConfig(t)
	good := Options{Client: cs.CoreV1().Nodes(), NodeName: "a"}
	for _, tc := range []struct {
		name string
		o    Options
		want string
	}{
		{"no client", Options{NodeName: "a"}, "no Kubernetes client"},
		{"no node", Options{Client: good.Client}, "no node name"},
		{"bad prefix", Options{Client: good.Client, NodeName: "a", AnnotationPrefix: "twill.io/x"}, "annotation prefix"},
	} {
		if _, err := NewManager(tc.o, cfg, vxlanAttrs("192.0.2.1")); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want %q", tc.name, err, tc.want)
		}
	}
	a := vxlanAttrs("192.0.2.1")
	a.BackendData = []byte("{")
	if _, err := NewManager(good, cfg, a); err == nil {
		t.Error("invalid backend data accepted")
	}
	a = vxlanAttrs("192.0.2.1")
	a.BackendType = ""
	if _, err := NewManager(good, cfg, a); err == nil {
		t.Error("empty backend type accepted")
	}
	if _, err := NewManager(good, nil, vxlanAttrs("192.0.2.1")); err == nil {
		t.Error("nil config accepted")
	}
}

func TestAcquireWaitsForPodCIDR(t *testing.T) {
	ctx := ctxT(t)
	cs := fake.NewClientset()
	var mu sync.Mutex
	var reasons []string
	m, rec := newTestManager(t, cs, "a", Options{Waiting: func(r string) { mu.Lock(); reasons = append(reasons, r); mu.Unlock() }})
	lastReason := func() string {
		mu.Lock()
		defer mu.Unlock()
		if len(reasons) == 0 {
			return ""
		}
		return reasons[len(reasons)-1]
	}
	type result struct {
		l   any
		err error
	}
	done := make(chan result, 1)
	go func() { l, err := m.Acquire(ctx); done <- result{l, err} }()

	waitFor(t, "the wait for a missing Node", 5*time.Second, func() bool { return strings.Contains(lastReason(), "does not exist yet") })
	if _, err := cs.CoreV1().Nodes().Create(ctx, node("a", "", nil), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the wait for a podCIDR", 5*time.Second, func() bool { return strings.Contains(lastReason(), "has no podCIDR yet") })
	n := getNode(t, cs, "a")
	n.Spec.PodCIDR, n.Spec.PodCIDRs = "10.244.5.0/24", []string{"10.244.5.0/24"}
	if _, err := cs.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	if own := m.Own(); own.Subnet.String() != "10.244.5.0/24" || own.Attrs.PublicIP.String() != "192.0.2.1" || own.Attrs.NodeName != "a" {
		t.Fatalf("own lease %+v", own)
	}
	if got := getNode(t, cs, "a"); !m.published(slim(got, m.keys)) {
		t.Fatalf("annotations not published: %v", got.Annotations)
	}
	// Each reason is logged once, however often it was retried.
	if c := rec.count("waiting", "has no podCIDR yet"); c != 1 {
		t.Errorf("reason logged %d times", c)
	}
	select {
	case <-m.Changed():
	default:
		t.Error("Changed not signalled after Acquire")
	}
}

func TestAcquireOutsideNetworkWaits(t *testing.T) {
	cs := fake.NewClientset(node("a", "10.99.1.0/24", nil))
	m, rec := newTestManager(t, cs, "a", Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	_, err := m.Acquire(ctx)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "outside the Network 10.244.0.0/16") {
		t.Fatalf("got %v, want the deadline and the reason", err)
	}
	if c := rec.count("outside the Network"); c != 1 {
		t.Errorf("reason logged %d times, want once", c)
	}
	if ann := getNode(t, cs, "a").Annotations; len(ann) != 0 {
		t.Errorf("annotations published on a node that has no lease: %v", ann)
	}
}

func TestAcquireOverwriteWinsAndNoChurn(t *testing.T) {
	ctx := ctxT(t)
	ann := published("192.0.2.1")
	ann[Keys("").PublicIPOverwrite] = "203.0.113.1"
	cs := fake.NewClientset(node("a", "10.244.1.0/24", ann))
	m, _ := newTestManager(t, cs, "a", Options{})
	l, err := m.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if l.Attrs.PublicIP.String() != "203.0.113.1" {
		t.Fatalf("public IP %s, want the overwrite", l.Attrs.PublicIP)
	}
	// The annotations were already there (a restart): nothing is written.
	for _, a := range cs.Actions() {
		if a.GetVerb() == "patch" || a.GetVerb() == "update" {
			t.Errorf("unexpected write on restart: %v", a)
		}
	}
	if got := getNode(t, cs, "a").Annotations[Keys("").PublicIP]; got != "192.0.2.1" {
		t.Errorf("published public IP %q; the overwrite must not replace it", got)
	}
}

// TestSyncNodeSeeded drives the worker over a seeded informer store, as
// sample-controller tests its syncHandler.
func TestSyncNodeSeeded(t *testing.T) {
	ctx := ctxT(t)
	cs := fake.NewClientset(node("a", "10.244.1.0/24", published("192.0.2.1")))
	m, rec := newTestManager(t, cs, "a", Options{})
	if _, err := m.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	<-m.Changed()
	store := cache.NewStore(cache.MetaNamespaceKeyFunc)
	m.store = store
	slim := SlimNode("")
	add := func(n *corev1.Node) {
		o, _ := slim(n)
		if err := store.Update(o); err != nil {
			t.Fatal(err)
		}
	}
	bad := published("192.0.2.6")
	bad["twill.io/backend-data"] = "{"
	for _, n := range []*corev1.Node{
		node("a", "10.244.1.0/24", published("192.0.2.1")),
		node("b", "10.244.2.0/24", published("192.0.2.2")),
		node("c", "10.244.3.0/24", nil),                   // not a twill node yet
		node("d", "", published("192.0.2.4")),             // no podCIDR yet
		node("e", "10.99.0.0/24", published("192.0.2.5")), // outside the network
		node("f", "10.244.6.0/24", bad),                   // malformed
	} {
		add(n)
	}
	m.syncAll(ctx)
	got, synced := peerMap(m)
	if !synced || len(got) != 1 || got["b"] != "10.244.2.0/24 192.0.2.2" {
		t.Fatalf("peers %v synced=%v, want only b", got, synced)
	}
	if rec.count("skipping node", "peer=e", "outside the Network") != 1 || rec.count("skipping node", "peer=f", "malformed") != 1 {
		t.Error("skipped nodes e and f not logged once each")
	}
	if rec.count("skipping node", "peer=c") != 0 || rec.count("skipping node", "peer=d") != 0 {
		t.Error("nodes without a podCIDR or annotations are logged as problems")
	}
	drain(m)

	// c publishes; b's operator sets an overwrite; a heartbeat of b changes nothing.
	add(node("c", "10.244.3.0/24", published("192.0.2.3")))
	ow := published("192.0.2.2")
	ow["twill.io/public-ip-overwrite"] = "203.0.113.2"
	add(node("b", "10.244.2.0/24", ow))
	for _, k := range []string{"c", "b"} {
		if err := m.syncNode(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	got, _ = peerMap(m)
	if got["c"] != "10.244.3.0/24 192.0.2.3" || got["b"] != "10.244.2.0/24 203.0.113.2" {
		t.Fatalf("peers %v", got)
	}
	if !drain(m) {
		t.Error("Changed not signalled")
	}
	if err := m.syncNode(ctx, "b"); err != nil || drain(m) {
		t.Errorf("a sync that changes nothing signalled Changed (err %v)", err)
	}

	// b deleted: gone from the store, gone from the peers.
	store.Delete(&corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "b"}})
	if err := m.syncNode(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	if got, _ = peerMap(m); len(got) != 1 || got["c"] == "" || !drain(m) {
		t.Fatalf("after deleting b: peers %v", got)
	}

	// The own node is never a peer; its new overwrite moves the own lease.
	ow = published("192.0.2.1")
	ow["twill.io/public-ip-overwrite"] = "203.0.113.1"
	add(node("a", "10.244.1.0/24", ow))
	if err := m.syncNode(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if own := m.Own(); own.Attrs.PublicIP.String() != "203.0.113.1" || !drain(m) {
		t.Fatalf("own lease %+v after the overwrite", own)
	}
	if p, _ := peerMap(m); p["a"] != "" {
		t.Fatalf("own node among peers: %v", p)
	}
}

// waitChanged waits for Changed.
func waitChanged(t *testing.T, m *Manager, what string) {
	t.Helper()
	select {
	case <-m.Changed():
	case <-time.After(5 * time.Second):
		t.Errorf("Changed not signalled for %s", what)
	}
}

// TestRunRetriesFirstListing: a Node of the first listing whose sync fails
// is retried, although the handlers do not queue the Nodes of that listing.
func TestRunRetriesFirstListing(t *testing.T) {
	ctx := ctxT(t)
	cs := fake.NewClientset(node("a", "10.244.1.0/24", nil))
	m, rec := newTestManager(t, cs, "a", Options{})
	if _, err := m.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	// The annotations go missing before Run, and the first patch to restore
	// them fails.
	n := getNode(t, cs, "a")
	n.Annotations = nil
	if _, err := cs.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	patches := 0
	cs.PrependReactor("patch", "nodes", func(k8stesting.Action) (bool, runtime.Object, error) {
		mu.Lock()
		defer mu.Unlock()
		if patches++; patches == 1 {
			return true, nil, errors.New("injected: the API server is away")
		}
		return false, nil, nil
	})
	runManager(t, m)
	waitFor(t, "the own annotations to be restored", 5*time.Second, func() bool {
		return m.published(slim(getNode(t, cs, "a"), m.keys))
	})
	if rec.count("sync node; will retry", "injected") != 1 {
		t.Error("the failed sync was not logged once")
	}
}

// drain reports whether Changed was signalled, and clears it.
func drain(m *Manager) bool {
	select {
	case <-m.Changed():
		return true
	default:
		return false
	}
}

func TestRunFollowsNodes(t *testing.T) {
	ctx := ctxT(t)
	cs := fake.NewClientset(
		node("a", "10.244.1.0/24", nil),
		node("b", "10.244.2.0/24", published("192.0.2.2")),
	)
	m, _ := newTestManager(t, cs, "a", Options{})
	if _, err := m.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	if _, synced := m.Peers(); synced {
		t.Fatal("synced before Run")
	}
	runManager(t, m)
	waitFor(t, "peer b", 5*time.Second, func() bool { p, ok := peerMap(m); return ok && p["b"] != "" })

	if _, err := cs.CoreV1().Nodes().Create(ctx, node("c", "10.244.3.0/24", published("192.0.2.3")), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "peer c", 5*time.Second, func() bool { p, _ := peerMap(m); return p["c"] != "" })
	if err := cs.CoreV1().Nodes().Delete(ctx, "b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "peer b to leave", 5*time.Second, func() bool { p, _ := peerMap(m); return p["b"] == "" && p["c"] != "" })

	// Someone strips the own node's annotations: they come back.
	n := getNode(t, cs, "a")
	n.Annotations = map[string]string{"other": "x"}
	if _, err := cs.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the own annotations to be restored", 5*time.Second, func() bool {
		n := getNode(t, cs, "a")
		return m.published(slim(n, m.keys)) && n.Annotations["other"] == "x"
	})

	// The own Node comes back with another podCIDR (deleted and registered
	// again): the own lease follows.
	drain(m)
	n = getNode(t, cs, "a")
	n.Spec.PodCIDR, n.Spec.PodCIDRs = "10.244.9.0/24", []string{"10.244.9.0/24"}
	if _, err := cs.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the own lease to follow the podCIDR", 5*time.Second, func() bool { return m.Own().Subnet.String() == "10.244.9.0/24" })
	waitChanged(t, m, "the new podCIDR")
}

func TestReleaseAndDatapathReady(t *testing.T) {
	ctx := ctxT(t)
	ann := published("192.0.2.1")
	ann[Keys("").PublicIPOverwrite] = "203.0.113.1"
	ann["unrelated"] = "kept"
	cs := fake.NewClientset(node("a", "10.244.1.0/24", ann))

	off, _ := newTestManager(t, cs, "a", Options{})
	if err := off.DatapathReady(ctx); err != nil || len(cs.Actions()) != 0 {
		t.Fatalf("DatapathReady without SetNodeCondition: err %v, actions %v", err, cs.Actions())
	}

	m, _ := newTestManager(t, cs, "a", Options{SetNodeCondition: true})
	patches := 0
	cs.PrependReactor("patch", "nodes", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if a.GetSubresource() != "status" {
			t.Errorf("patch of %q, want the status subresource", a.GetSubresource())
		}
		patches++
		return false, nil, nil
	})
	for range 2 {
		if err := m.DatapathReady(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if patches != 1 {
		t.Errorf("DatapathReady patched %d times, want once", patches)
	}
	var cond *corev1.NodeCondition
	for _, c := range getNode(t, cs, "a").Status.Conditions {
		if c.Type == corev1.NodeNetworkUnavailable {
			cond = &c
		}
	}
	if cond == nil || cond.Status != corev1.ConditionFalse || cond.Reason != "TwillIsUp" {
		t.Fatalf("condition %+v", cond)
	}

	if err := m.Release(ctx); err != nil {
		t.Fatal(err)
	}
	got := getNode(t, cs, "a").Annotations
	k := Keys("")
	if _, ok := got[k.BackendType]; ok || got[k.PublicIP] != "" || got[k.BackendData] != "" ||
		got[k.PublicIPOverwrite] != "203.0.113.1" || got["unrelated"] != "kept" {
		t.Fatalf("annotations after Release: %v", got)
	}
}
