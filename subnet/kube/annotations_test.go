package kube

import (
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
)

func TestNodeToLease(t *testing.T) {
	full := func(extra map[string]string) map[string]string {
		a := published("192.0.2.1")
		for k, v := range extra {
			a[k] = v
		}
		return a
	}
	for _, tc := range []struct {
		name     string
		node     *corev1.Node
		prefix   string
		ok       bool
		err      string // substring; "" means no error
		subnet   string
		publicIP string
		data     string
	}{
		{name: "no podCIDR", node: node("a", "", full(nil))},
		{name: "no annotations", node: node("a", "10.244.1.0/24", nil)},
		{name: "only backend type", node: node("a", "10.244.1.0/24", map[string]string{"twill.io/backend-type": "vxlan"})},
		{name: "only public IP", node: node("a", "10.244.1.0/24", map[string]string{"twill.io/public-ip": "192.0.2.1"})},
		{name: "published", node: node("a", "10.244.1.0/24", full(nil)), ok: true,
			subnet: "10.244.1.0/24", publicIP: "192.0.2.1", data: `{"VNI":1,"VtepMAC":"ae:12:34:56:78:9a"}`},
		{name: "overwrite wins", node: node("a", "10.244.1.0/24", full(map[string]string{"twill.io/public-ip-overwrite": "203.0.113.7"})),
			ok: true, subnet: "10.244.1.0/24", publicIP: "203.0.113.7", data: `{"VNI":1,"VtepMAC":"ae:12:34:56:78:9a"}`},
		{name: "empty overwrite ignored", node: node("a", "10.244.1.0/24", full(map[string]string{"twill.io/public-ip-overwrite": ""})),
			ok: true, subnet: "10.244.1.0/24", publicIP: "192.0.2.1", data: `{"VNI":1,"VtepMAC":"ae:12:34:56:78:9a"}`},
		{name: "null backend data", node: node("a", "10.244.1.0/24", full(map[string]string{"twill.io/backend-data": "null"})),
			ok: true, subnet: "10.244.1.0/24", publicIP: "192.0.2.1"},
		{name: "no backend data", node: node("a", "10.244.1.0/24", map[string]string{"twill.io/backend-type": "host-gw", "twill.io/public-ip": "192.0.2.1"}),
			ok: true, subnet: "10.244.1.0/24", publicIP: "192.0.2.1"},
		{name: "bad public IP", node: node("a", "10.244.1.0/24", full(map[string]string{"twill.io/public-ip": "192.0.2"})), err: "twill.io/public-ip: \"192.0.2\" is not an IP"},
		{name: "IPv6 public IP", node: node("a", "10.244.1.0/24", full(map[string]string{"twill.io/public-ip": "2001:db8::1"})), err: "not an IPv4"},
		{name: "bad overwrite", node: node("a", "10.244.1.0/24", full(map[string]string{"twill.io/public-ip-overwrite": "nat-gw"})), err: "public-ip-overwrite"},
		{name: "bad backend data", node: node("a", "10.244.1.0/24", full(map[string]string{"twill.io/backend-data": "{VtepMAC:"})), err: "backend-data: not valid JSON"},
		{name: "bad podCIDR", node: node("a", "10.244.1.0", full(nil)), err: "not a CIDR"},
		{name: "host bits", node: node("a", "10.244.1.1/24", full(nil)), err: "host bits"},
		{name: "dual stack", node: &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "a", Annotations: full(nil)},
			Spec: corev1.NodeSpec{PodCIDR: "fd00:1::/64", PodCIDRs: []string{"fd00:1::/64", "10.244.9.0/24"}}},
			ok: true, subnet: "10.244.9.0/24", publicIP: "192.0.2.1", data: `{"VNI":1,"VtepMAC":"ae:12:34:56:78:9a"}`},
		{name: "IPv6 only", node: node("a", "fd00:1::/64", full(nil)), err: "no IPv4 podCIDR"},
		{name: "podCIDR without podCIDRs", node: &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "a", Annotations: full(nil)},
			Spec: corev1.NodeSpec{PodCIDR: "10.244.3.0/24"}}, ok: true, subnet: "10.244.3.0/24", publicIP: "192.0.2.1",
			data: `{"VNI":1,"VtepMAC":"ae:12:34:56:78:9a"}`},
		{name: "other prefix", node: node("a", "10.244.1.0/24", full(nil)), prefix: "net.example.com"},
		{name: "own prefix", node: node("a", "10.244.1.0/24", map[string]string{
			"net.example.com/backend-type": "host-gw", "net.example.com/public-ip": "192.0.2.4"}),
			prefix: "net.example.com", ok: true, subnet: "10.244.1.0/24", publicIP: "192.0.2.4"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l, ok, err := NodeToLease(tc.node, tc.prefix)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) || ok {
					t.Fatalf("got ok=%v err=%v, want an error containing %q", ok, err, tc.err)
				}
				if !strings.Contains(err.Error(), "node a") {
					t.Errorf("error %q does not name the node", err)
				}
				return
			}
			if err != nil || ok != tc.ok {
				t.Fatalf("got ok=%v err=%v, want ok=%v", ok, err, tc.ok)
			}
			if !ok {
				return
			}
			if l.Subnet.String() != tc.subnet || l.Attrs.PublicIP.String() != tc.publicIP || string(l.Attrs.BackendData) != tc.data || l.Attrs.NodeName != "a" {
				t.Fatalf("got %+v (data %s), want subnet %s, public IP %s, data %s", l, l.Attrs.BackendData, tc.subnet, tc.publicIP, tc.data)
			}
		})
	}
}

func TestPrefixValidation(t *testing.T) {
	for _, p := range []string{"twill.io", "net.example.com", "x"} {
		if err := checkPrefix(p); err != nil {
			t.Errorf("prefix %q: %v", p, err)
		}
	}
	for _, p := range []string{"twill.io/", "Twill.IO", "a b", "-x.io", strings.Repeat("a", 254)} {
		if err := checkPrefix(p); err == nil {
			t.Errorf("prefix %q accepted", p)
		}
	}
}

// A kubelet-written Node as the API server returns it, trimmed to the parts
// that matter for the transform.
func fatNode() *corev1.Node {
	n := node("worker-1", "10.244.7.0/24", published("192.0.2.7"))
	n.UID = "3b1a0f5e-0000-4000-8000-000000000001"
	n.ResourceVersion = "12345"
	n.Annotations["node.alpha.kubernetes.io/ttl"] = "0"
	n.Annotations["volumes.kubernetes.io/controller-managed-attach-detach"] = "true"
	n.Labels = map[string]string{"kubernetes.io/hostname": "worker-1", "kubernetes.io/os": "linux"}
	n.ManagedFields = []metav1.ManagedFieldsEntry{{Manager: "kubelet", Operation: metav1.ManagedFieldsOperationUpdate}}
	n.Spec.Taints = []corev1.Taint{{Key: "node.kubernetes.io/not-ready", Effect: corev1.TaintEffectNoSchedule}}
	n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.0.2.7"}}
	n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}}
	n.Status.Images = []corev1.ContainerImage{{Names: []string{"registry.k8s.io/pause:3.10"}, SizeBytes: 320000}}
	n.Status.NodeInfo.KubeletVersion = "v1.37.2"
	return n
}

func TestSlimNode(t *testing.T) {
	tr := SlimNode("")
	fat := fatNode()
	out, err := tr(fat)
	if err != nil {
		t.Fatal(err)
	}
	cached := out.(*cachedNode)
	pub := published("192.0.2.7")
	k := Keys("")
	want := &cachedNode{
		ObjectMeta:  metav1.ObjectMeta{Name: "worker-1", ResourceVersion: "12345"},
		podCIDRs:    []string{"10.244.7.0/24"},
		backendType: pub[k.BackendType], backendData: pub[k.BackendData], publicIP: pub[k.PublicIP],
	}
	if !reflect.DeepEqual(cached, want) {
		t.Fatalf("slim node\n%+v\nwant\n%+v", cached, want)
	}
	// The informer keys it by name, as it does the Node.
	if key, err := cache.MetaNamespaceKeyFunc(cached); key != "worker-1" || err != nil {
		t.Fatalf("key %q, %v", key, err)
	}
	// The lease is the same before and after.
	l1, ok1, err1 := NodeToLease(fat, "")
	l2, ok2, err2 := cached.lease(k)
	if !ok1 || !ok2 || err1 != nil || err2 != nil || !leaseEqual(l1, l2) {
		t.Fatalf("lease changed by the transform: %+v %v %v / %+v %v %v", l1, ok1, err1, l2, ok2, err2)
	}
	// Idempotent.
	if again, _ := tr(cached); again != any(cached) {
		t.Fatalf("transform not idempotent: %+v", again)
	}
	// spec.podCIDR alone, as older clusters set it.
	old := fatNode()
	old.Spec.PodCIDRs = nil
	if got, _ := tr(old); !reflect.DeepEqual(got.(*cachedNode).podCIDRs, []string{"10.244.7.0/24"}) {
		t.Fatalf("podCIDR alone: %v", got.(*cachedNode).podCIDRs)
	}
	// Tombstones pass through.
	ts := cache.DeletedFinalStateUnknown{Key: "worker-1", Obj: fat}
	if got, _ := tr(ts); got != any(ts) {
		t.Fatalf("tombstone changed: %#v", got)
	}
	// A node without twill's annotations keeps none.
	bare := fatNode()
	bare.Annotations = map[string]string{"node.alpha.kubernetes.io/ttl": "0"}
	if got, _ := tr(bare); got.(*cachedNode).backendType != "" || got.(*cachedNode).Annotations != nil {
		t.Fatalf("kept foreign annotations: %+v", got)
	}
}
