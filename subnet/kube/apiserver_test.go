package kube

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/twillnet/twill/internal/tools/testenv"
)

// The service account twilld runs as in these tests, bound to a ClusterRole
// with exactly what the manager needs.
const (
	saNamespace = "twill-system"
	saName      = "twill"
)

var twillRules = []rbacv1.PolicyRule{
	{APIGroups: []string{""}, Resources: []string{"nodes"}, Verbs: []string{"get", "list", "watch"}},
	{APIGroups: []string{""}, Resources: []string{"nodes/status"}, Verbs: []string{"patch"}},
}

type cluster struct {
	api   *testenv.KubeAPI
	admin kubernetes.Interface
	sa    kubernetes.Interface // authenticated as the service account
	nodes NodeClient           // twilld's own client, as the service account
}

// newCluster starts a real kube-apiserver (RBAC on) and a client of a service
// account bound only to twillRules.
func newCluster(t *testing.T) *cluster {
	t.Helper()
	api := testenv.StartKubeAPI(t, testenv.KubeAPIOptions{})
	c := &cluster{api: api, admin: api.AdminClient(t)}
	ctx := ctxT(t)
	must := func(_ any, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(c.admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: saNamespace}}, metav1.CreateOptions{}))
	must(c.admin.CoreV1().ServiceAccounts(saNamespace).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: saName}}, metav1.CreateOptions{}))
	must(c.admin.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "twill"}, Rules: twillRules}, metav1.CreateOptions{}))
	must(c.admin.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "twill"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "twill"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: saNamespace, Name: saName}},
	}, metav1.CreateOptions{}))
	saConfig := api.ConfigForToken(api.ServiceAccountToken(t, saNamespace, saName))
	sa, err := kubernetes.NewForConfig(saConfig)
	if err != nil {
		t.Fatal(err)
	}
	c.sa = sa
	if c.nodes, err = NewNodeClient(saConfig); err != nil {
		t.Fatal(err)
	}
	// The RBAC authorizer learns the binding through its informer.
	waitFor(t, "the service account's binding to take effect", 10*time.Second, func() bool {
		_, err := sa.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		return err == nil
	})
	return c
}

func (c *cluster) createNode(t *testing.T, n *corev1.Node) {
	t.Helper()
	if _, err := c.admin.CoreV1().Nodes().Create(ctxT(t), n, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// annotate merges annotations (nil values remove) into a Node as the admin.
func (c *cluster) annotate(t *testing.T, name string, ann map[string]any) {
	t.Helper()
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": ann}})
	if _, err := c.admin.CoreV1().Nodes().Patch(ctxT(t), name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
}

func (c *cluster) annotations(t *testing.T, name string) map[string]string {
	t.Helper()
	return getNode(t, c.admin, name).Annotations
}

func strMap(m map[string]string) map[string]any {
	out := map[string]any{}
	for k, v := range m {
		out[k] = v
	}
	return out
}

// saManager is a manager of node name authenticated as the service account.
func (c *cluster) saManager(t *testing.T, name string, o Options) (*Manager, *logRecorder) {
	t.Helper()
	m, rec := newManagerWith(t, c.nodes, name, o)
	m.retryMax = 200 * time.Millisecond
	return m, rec
}

// TestManagerOnAPIServer runs the manager against a real API server as a
// service account with nothing but nodes get/list/watch and nodes/status
// patch.
func TestManagerOnAPIServer(t *testing.T) {
	c := newCluster(t)
	ctx := ctxT(t)
	k := Keys("")
	c.createNode(t, node("a", "10.244.1.0/24", nil))
	c.createNode(t, node("b", "10.244.2.0/24", nil))
	c.createNode(t, node("c", "10.244.3.0/24", nil))

	m, _ := c.saManager(t, "a", Options{SetNodeCondition: true})
	own, err := m.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if own.Subnet.String() != "10.244.1.0/24" || own.Attrs.PublicIP.String() != "192.0.2.1" {
		t.Fatalf("own lease %+v", own)
	}
	ann := c.annotations(t, "a")
	for key, want := range published("192.0.2.1") {
		if ann[key] != want {
			t.Errorf("annotation %s = %q, want %q", key, ann[key], want)
		}
	}

	runCtx, stop := context.WithCancel(ctx)
	runDone := make(chan error, 1)
	go func() { runDone <- m.Run(runCtx) }()
	defer stop()
	waitFor(t, "the first listing", 10*time.Second, func() bool { _, ok := m.Peers(); return ok })
	if p, _ := peerMap(m); len(p) != 0 {
		t.Fatalf("peers %v before any other node published", p)
	}

	// Other twillds publish (played by the admin).
	c.annotate(t, "b", strMap(published("192.0.2.2")))
	waitFor(t, "peer b", 10*time.Second, func() bool { p, _ := peerMap(m); return p["b"] == "10.244.2.0/24 192.0.2.2" })
	c.annotate(t, "c", strMap(published("192.0.2.3")))
	waitFor(t, "peer c", 10*time.Second, func() bool { p, _ := peerMap(m); return p["c"] == "10.244.3.0/24 192.0.2.3" })

	// An operator's overwrite wins, for a peer and for the own lease.
	c.annotate(t, "b", map[string]any{k.PublicIPOverwrite: "203.0.113.2"})
	waitFor(t, "peer b's overwrite", 10*time.Second, func() bool { p, _ := peerMap(m); return p["b"] == "10.244.2.0/24 203.0.113.2" })
	drain(m)
	c.annotate(t, "a", map[string]any{k.PublicIPOverwrite: "203.0.113.1"})
	waitFor(t, "the own overwrite", 10*time.Second, func() bool { return m.Own().Attrs.PublicIP.String() == "203.0.113.1" })
	waitChanged(t, m, "the own lease")

	// Someone removes the own annotations: they are written again.
	c.annotate(t, "a", map[string]any{k.BackendType: nil, k.BackendData: nil, k.PublicIP: nil})
	waitFor(t, "the own annotations to come back", 10*time.Second, func() bool {
		return c.annotations(t, "a")[k.PublicIP] == "192.0.2.1"
	})

	// A deleted Node leaves the peers.
	if err := c.admin.CoreV1().Nodes().Delete(ctx, "b", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "peer b to leave", 10*time.Second, func() bool { p, _ := peerMap(m); return p["b"] == "" && p["c"] != "" })

	// The node condition, idempotent.
	if err := m.DatapathReady(ctx); err != nil {
		t.Fatal(err)
	}
	cond := networkCondition(t, c.admin, "a")
	if cond == nil || cond.Status != corev1.ConditionFalse || cond.Reason != ConditionReason {
		t.Fatalf("NetworkUnavailable condition %+v", cond)
	}
	if err := m.DatapathReady(ctx); err != nil {
		t.Fatal(err)
	}
	if again := networkCondition(t, c.admin, "a"); !again.LastTransitionTime.Equal(&cond.LastTransitionTime) {
		t.Errorf("second DatapathReady moved lastTransitionTime from %v to %v", cond.LastTransitionTime, again.LastTransitionTime)
	}

	stop()
	if err := <-runDone; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run: %v", err)
	}
	if err := m.Release(ctx); err != nil {
		t.Fatal(err)
	}
	ann = c.annotations(t, "a")
	if _, ok := ann[k.BackendType]; ok || ann[k.PublicIP] != "" || ann[k.BackendData] != "" || ann[k.PublicIPOverwrite] != "203.0.113.1" {
		t.Fatalf("annotations after Release: %v", ann)
	}

	c.checkLeastPrivilege(t)
}

// checkLeastPrivilege shows that what the manager did above needed neither
// nodes patch nor nodes update: the service account has neither.
func (c *cluster) checkLeastPrivilege(t *testing.T) {
	ctx := ctxT(t)
	patch := []byte(`{"metadata":{"annotations":{"twill.io/probe":"x"}}}`)
	if _, err := c.sa.CoreV1().Nodes().Patch(ctx, "a", types.MergePatchType, patch, metav1.PatchOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("service account patched a Node without the status subresource: %v", err)
	}
	if _, err := c.sa.CoreV1().Nodes().Create(ctx, node("z", "", nil), metav1.CreateOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("service account created a Node: %v", err)
	}
	user := "system:serviceaccount:" + saNamespace + ":" + saName
	for _, tc := range []struct {
		verb, sub string
		allowed   bool
	}{
		{"patch", "status", true},
		{"watch", "", true},
		{"patch", "", false},
		{"update", "", false},
		{"update", "status", false},
		{"delete", "", false},
	} {
		sar, err := c.admin.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authorizationv1.SubjectAccessReview{
			Spec: authorizationv1.SubjectAccessReviewSpec{User: user, ResourceAttributes: &authorizationv1.ResourceAttributes{
				Verb: tc.verb, Resource: "nodes", Subresource: tc.sub, Name: "a",
			}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if sar.Status.Allowed != tc.allowed {
			t.Errorf("%s nodes/%s: allowed=%v, want %v", tc.verb, tc.sub, sar.Status.Allowed, tc.allowed)
		}
	}
}

func networkCondition(t *testing.T, cs kubernetes.Interface, name string) *corev1.NodeCondition {
	t.Helper()
	for _, c := range getNode(t, cs, name).Status.Conditions {
		if c.Type == corev1.NodeNetworkUnavailable {
			return &c
		}
	}
	return nil
}

// TestAcquireWaitsOnAPIServer: a Node without a podCIDR, then one with a
// podCIDR outside the network, are waited on, not failed.
func TestAcquireWaitsOnAPIServer(t *testing.T) {
	c := newCluster(t)
	ctx := ctxT(t)
	var reasons waitReasons
	waiting, seen := reasons.record, reasons.seen

	c.createNode(t, node("w", "", nil))
	m, _ := c.saManager(t, "w", Options{Waiting: waiting})
	done := make(chan error, 1)
	go func() { _, err := m.Acquire(ctx); done <- err }()
	waitFor(t, "Acquire to wait for the podCIDR", 10*time.Second, seen("has no podCIDR yet", 2))
	if _, err := c.admin.CoreV1().Nodes().Patch(ctx, "w", types.MergePatchType,
		[]byte(`{"spec":{"podCIDR":"10.244.7.0/24","podCIDRs":["10.244.7.0/24"]}}`), metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if m.Own().Subnet.String() != "10.244.7.0/24" || c.annotations(t, "w")[Keys("").PublicIP] != "192.0.2.1" {
		t.Fatalf("own %+v, annotations %v", m.Own(), c.annotations(t, "w"))
	}

	// A podCIDR outside the network: logged once, waited on until fixed.
	c.createNode(t, node("x", "10.99.0.0/24", nil))
	mx, rec := c.saManager(t, "x", Options{Waiting: waiting})
	go func() { _, err := mx.Acquire(ctx); done <- err }()
	waitFor(t, "Acquire to keep waiting on the podCIDR outside the network", 10*time.Second, seen("outside the Network", 5))
	if n := rec.count("waiting", "podCIDR 10.99.0.0/24 of Node x is outside the Network 10.244.0.0/16"); n != 1 {
		t.Errorf("the reason was logged %d times, want once", n)
	}
	select {
	case err := <-done:
		t.Fatalf("Acquire returned %v", err)
	default:
	}
	// The operator fixes it: podCIDR cannot be changed, so the Node is
	// registered again with a good one.
	if err := c.admin.CoreV1().Nodes().Delete(ctx, "x", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	c.createNode(t, node("x", "10.244.8.0/24", nil))
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if mx.Own().Subnet.String() != "10.244.8.0/24" {
		t.Fatalf("own %+v", mx.Own())
	}
}

// TestRelistAfterCompaction: while the API server is down a Node vanishes
// from etcd and etcd compacts its history, so the informer's watch cannot
// resume (410 Gone) and a deletion event is never sent. The reflector lists
// again and the manager drops the Node through the tombstone.
func TestRelistAfterCompaction(t *testing.T) {
	c := newCluster(t)
	ctx := ctxT(t)
	for i, n := range []string{"a", "b", "c"} {
		c.createNode(t, node(n, "10.244."+string(rune('1'+i))+".0/24", published("192.0.2."+string(rune('1'+i)))))
	}
	m, rec := c.saManager(t, "a", Options{})
	if _, err := m.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	runManager(t, m)
	waitFor(t, "peers b and c", 10*time.Second, func() bool { p, _ := peerMap(m); return len(p) == 2 })

	c.api.Stop(t)
	etcd := testenv.EtcdClient(t, c.api.EtcdURL)
	if _, err := etcd.Delete(ctx, "/registry/minions/c"); err != nil {
		t.Fatal(err)
	}
	resp, err := etcd.Get(ctx, "/registry/minions/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := etcd.Compact(ctx, resp.Header.Revision); err != nil {
		t.Fatal(err)
	}
	c.api.Start(t)
	c.createNode(t, node("d", "10.244.4.0/24", published("192.0.2.4")))
	waitFor(t, "c to leave and d to join", 30*time.Second, func() bool {
		p, _ := peerMap(m)
		return len(p) == 2 && p["b"] != "" && p["d"] != ""
	})
	if rec.count("node deletion learnt from a relist", "peer=c") != 1 {
		t.Error("c's deletion did not come as a tombstone")
	}
	t.Logf("watch ended with 410 (too old resource version): %v", rec.count("too old resource version") > 0)
}
