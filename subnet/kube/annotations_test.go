package kube

import (
	"bytes"
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/twillnet/twill/subnet"
)

// with returns a copy of a with extra set; a nil value removes the key.
func with(a map[string]string, extra map[string]*string) map[string]string {
	out := maps.Clone(a)
	for k, v := range extra {
		if v == nil {
			delete(out, k)
		} else {
			out[k] = *v
		}
	}
	return out
}

func ptr(s string) *string { return &s }

func TestNodeToLease(t *testing.T) {
	v4 := published("192.0.2.1")
	full := func(extra map[string]string) map[string]string {
		a := maps.Clone(v4)
		maps.Copy(a, extra)
		return a
	}
	dual := publishedDual("192.0.2.1", "2001:db8::1")
	v6only := publishedDual("", "2001:db8::1")
	dualCIDRs := []string{"10.244.1.0/24", "fd00:10:244:1::/64"}
	for _, tc := range []struct {
		name   string
		node   *corev1.Node
		prefix string
		ok     bool
		err    string // substring; "" means no error
		want   string // familiesString of the lease
		data   string // backend data of the IPv4 family
		data6  string // of the IPv6 family
	}{
		{name: "no podCIDR", node: node("a", "", full(nil))},
		{name: "no annotations", node: node("a", "10.244.1.0/24", nil)},
		{name: "only backend type", node: node("a", "10.244.1.0/24", map[string]string{"twill.io/backend-type": "vxlan"})},
		{name: "only public IP", node: node("a", "10.244.1.0/24", map[string]string{"twill.io/public-ip": "192.0.2.1"})},
		{name: "published", node: node("a", "10.244.1.0/24", full(nil)), ok: true,
			want: "10.244.1.0/24 192.0.2.1", data: vxlanData},
		{name: "overwrite wins", node: node("a", "10.244.1.0/24", full(map[string]string{"twill.io/public-ip-overwrite": "203.0.113.7"})),
			ok: true, want: "10.244.1.0/24 203.0.113.7", data: vxlanData},
		{name: "empty overwrite ignored", node: node("a", "10.244.1.0/24", full(map[string]string{"twill.io/public-ip-overwrite": ""})),
			ok: true, want: "10.244.1.0/24 192.0.2.1", data: vxlanData},
		{name: "null backend data", node: node("a", "10.244.1.0/24", full(map[string]string{"twill.io/backend-data": "null"})),
			ok: true, want: "10.244.1.0/24 192.0.2.1"},
		{name: "no backend data", node: node("a", "10.244.1.0/24", map[string]string{"twill.io/backend-type": "host-gw", "twill.io/public-ip": "192.0.2.1"}),
			ok: true, want: "10.244.1.0/24 192.0.2.1"},
		{name: "bad public IP", node: node("a", "10.244.1.0/24", full(map[string]string{"twill.io/public-ip": "192.0.2"})), err: "twill.io/public-ip: \"192.0.2\" is not an IP"},
		{name: "IPv6 public IP", node: node("a", "10.244.1.0/24", full(map[string]string{"twill.io/public-ip": "2001:db8::1"})), err: "not an IPv4"},
		{name: "loopback public IP", node: node("a", "10.244.1.0/24", full(map[string]string{"twill.io/public-ip": "127.0.0.1"})), err: "twill.io/public-ip: 127.0.0.1 is not a unicast address"},
		{name: "bad overwrite", node: node("a", "10.244.1.0/24", full(map[string]string{"twill.io/public-ip-overwrite": "nat-gw"})), err: "public-ip-overwrite"},
		{name: "bad backend data", node: node("a", "10.244.1.0/24", full(map[string]string{"twill.io/backend-data": "{VtepMAC:"})), err: "backend-data: not valid JSON"},
		{name: "bad podCIDR", node: node("a", "10.244.1.0", full(nil)), err: "not a CIDR"},
		{name: "host bits", node: node("a", "10.244.1.1/24", full(nil)), err: "host bits"},
		{name: "IPv6 podCIDR first, IPv4 annotations", node: nodeCIDRs("a", []string{"fd00:1::/64", "10.244.9.0/24"}, full(nil)),
			ok: true, want: "10.244.9.0/24 192.0.2.1", data: vxlanData},
		{name: "IPv6 podCIDR, IPv4 annotations", node: node("a", "fd00:1::/64", full(nil))},
		{name: "podCIDR without podCIDRs", node: &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "a", Annotations: full(nil)},
			Spec: corev1.NodeSpec{PodCIDR: "10.244.3.0/24"}}, ok: true, want: "10.244.3.0/24 192.0.2.1", data: vxlanData},
		{name: "other prefix", node: node("a", "10.244.1.0/24", full(nil)), prefix: "net.example.com"},
		{name: "own prefix", node: node("a", "10.244.1.0/24", map[string]string{
			"net.example.com/backend-type": "host-gw", "net.example.com/public-ip": "192.0.2.4"}),
			prefix: "net.example.com", ok: true, want: "10.244.1.0/24 192.0.2.4"},

		// Dual-stack.
		{name: "dual-stack", node: nodeCIDRs("a", dualCIDRs, dual), ok: true,
			want: "10.244.1.0/24 192.0.2.1 fd00:10:244:1::/64 2001:db8::1", data: vxlanData, data6: vxlanV6Data},
		{name: "dual-stack, IPv6 podCIDR first", node: nodeCIDRs("a", []string{"fd00:10:244:1::/64", "10.244.1.0/24"}, dual), ok: true,
			want: "10.244.1.0/24 192.0.2.1 fd00:10:244:1::/64 2001:db8::1", data: vxlanData, data6: vxlanV6Data},
		{name: "dual-stack, each overwritten", node: nodeCIDRs("a", dualCIDRs, with(dual, map[string]*string{
			"twill.io/public-ip-overwrite": ptr("203.0.113.1"), "twill.io/public-ipv6-overwrite": ptr("2001:db8:ffff::1")})), ok: true,
			want: "10.244.1.0/24 203.0.113.1 fd00:10:244:1::/64 2001:db8:ffff::1", data: vxlanData, data6: vxlanV6Data},
		{name: "IPv6 overwrite alone", node: nodeCIDRs("a", dualCIDRs, with(dual, map[string]*string{"twill.io/public-ipv6-overwrite": ptr("2001:db8:ffff::1")})),
			ok: true, want: "10.244.1.0/24 192.0.2.1 fd00:10:244:1::/64 2001:db8:ffff::1", data: vxlanData, data6: vxlanV6Data},
		{name: "dual-stack Node, IPv4 published only", node: nodeCIDRs("a", dualCIDRs, v4), ok: true,
			want: "10.244.1.0/24 192.0.2.1", data: vxlanData},
		{name: "dual-stack Node, IPv6 published only", node: nodeCIDRs("a", dualCIDRs, v6only), ok: true,
			want: "fd00:10:244:1::/64 2001:db8::1", data6: vxlanV6Data},
		{name: "IPv4 Node, both published", node: node("a", "10.244.1.0/24", dual), ok: true,
			want: "10.244.1.0/24 192.0.2.1", data: vxlanData},
		{name: "IPv6-only", node: node("a", "fd00:10:244:1::/64", v6only), ok: true,
			want: "fd00:10:244:1::/64 2001:db8::1", data6: vxlanV6Data},
		{name: "IPv6-only as flannel's host-gw writes it", node: node("a", "fd00:10:244:1::/64", map[string]string{"twill.io/kube-subnet-manager": "true",
			"twill.io/backend-type": "host-gw", "twill.io/backend-data": "null", "twill.io/public-ip": "0.0.0.0",
			"twill.io/backend-v6-data": "null", "twill.io/public-ipv6": "2001:db8::1"}), ok: true, want: "fd00:10:244:1::/64 2001:db8::1"},
		{name: "IPv6-only, IPv4 overwrite ignored", node: node("a", "fd00:10:244:1::/64", with(v6only, map[string]*string{"twill.io/public-ip-overwrite": ptr("203.0.113.1")})),
			ok: true, want: "fd00:10:244:1::/64 2001:db8::1", data6: vxlanV6Data},
		{name: "IPv6 podCIDR, IPv6 annotations but no backend type", node: node("a", "fd00:10:244:1::/64", with(v6only, map[string]*string{"twill.io/backend-type": nil}))},
		{name: "IPv4 address as public-ipv6", node: nodeCIDRs("a", dualCIDRs, with(dual, map[string]*string{"twill.io/public-ipv6": ptr("192.0.2.1")})),
			err: "twill.io/public-ipv6: 192.0.2.1 is not an IPv6 address"},
		{name: "mapped public-ipv6", node: nodeCIDRs("a", dualCIDRs, with(dual, map[string]*string{"twill.io/public-ipv6": ptr("::ffff:192.0.2.1")})),
			err: "is not an IPv6 address"},
		{name: "link-local public-ipv6", node: nodeCIDRs("a", dualCIDRs, with(dual, map[string]*string{"twill.io/public-ipv6": ptr("fe80::1")})),
			err: "twill.io/public-ipv6: fe80::1 is not a unicast address"},
		{name: "bad public-ipv6", node: nodeCIDRs("a", dualCIDRs, with(dual, map[string]*string{"twill.io/public-ipv6": ptr("2001:db8::g")})),
			err: "twill.io/public-ipv6: \"2001:db8::g\" is not an IP address"},
		{name: "bad IPv6 overwrite", node: nodeCIDRs("a", dualCIDRs, with(dual, map[string]*string{"twill.io/public-ipv6-overwrite": ptr("203.0.113.1")})),
			err: "twill.io/public-ipv6-overwrite: 203.0.113.1 is not an IPv6 address"},
		{name: "bad backend-v6-data", node: nodeCIDRs("a", dualCIDRs, with(dual, map[string]*string{"twill.io/backend-v6-data": ptr("{")})),
			err: "twill.io/backend-v6-data: not valid JSON"},
		{name: "bad IPv6 podCIDR", node: nodeCIDRs("a", []string{"10.244.1.0/24", "fd00:10:244:1::/129"}, dual), err: `podCIDR "fd00:10:244:1::/129" is not a CIDR`},
		{name: "IPv6 podCIDR with host bits", node: nodeCIDRs("a", []string{"10.244.1.0/24", "fd00:10:244:1::1/64"}, dual), err: "podCIDR fd00:10:244:1::1/64 has host bits set"},
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
			if err := checkLease(l); err != nil {
				t.Fatalf("unusable lease %+v: %v", l, err)
			}
			if got := familiesString(l); got != tc.want || string(l.Attrs.BackendData) != tc.data || string(l.Attrs.BackendV6Data) != tc.data6 {
				t.Fatalf("got %q (data %s, v6 data %s), want %q (data %s, v6 data %s)",
					got, l.Attrs.BackendData, l.Attrs.BackendV6Data, tc.want, tc.data, tc.data6)
			}
		})
	}
}

func TestPodSubnets(t *testing.T) {
	for _, tc := range []struct {
		name    string
		podCIDR string
		cidrs   []string
		v4, v6  string // "" for none
		err     string
	}{
		{name: "none"},
		{name: "IPv4", cidrs: []string{"10.244.1.0/24"}, v4: "10.244.1.0/24"},
		{name: "dual-stack", cidrs: []string{"10.244.1.0/24", "fd00:10:244:1::/64"}, v4: "10.244.1.0/24", v6: "fd00:10:244:1::/64"},
		{name: "dual-stack, IPv6 first", cidrs: []string{"fd00:10:244:1::/64", "10.244.1.0/24"}, v4: "10.244.1.0/24", v6: "fd00:10:244:1::/64"},
		{name: "IPv6 only", cidrs: []string{"fd00:10:244:1::/64"}, v6: "fd00:10:244:1::/64"},
		{name: "podCIDR alone, IPv6", podCIDR: "fd00:10:244:1::/64", v6: "fd00:10:244:1::/64"},
		{name: "podCIDR alone, IPv4", podCIDR: "10.244.2.0/24", v4: "10.244.2.0/24"},
		{name: "podCIDRs win over podCIDR", podCIDR: "10.244.2.0/24", cidrs: []string{"10.244.2.0/24", "fd00:10:244:2::/64"}, v4: "10.244.2.0/24", v6: "fd00:10:244:2::/64"},
		{name: "first of a family", cidrs: []string{"10.244.1.0/24", "10.244.2.0/24"}, v4: "10.244.1.0/24"},
		{name: "not a CIDR", cidrs: []string{"10.244.1.0/24", "fd00:10:244:1::"}, err: `node n: podCIDR "fd00:10:244:1::" is not a CIDR`},
		{name: "host bits", cidrs: []string{"10.244.1.0/24", "fd00:10:244:1::1/64"}, err: "node n: podCIDR fd00:10:244:1::1/64 has host bits set"},
		{name: "IPv4-mapped", cidrs: []string{"::ffff:10.244.1.0/120"}, err: "node n: podCIDR ::ffff:10.244.1.0/120 is an IPv4-mapped IPv6 prefix"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n"}, Spec: corev1.NodeSpec{PodCIDR: tc.podCIDR, PodCIDRs: tc.cidrs}}
			v4, v6, err := PodSubnets(n)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("got %v, want an error containing %q", err, tc.err)
				}
				return
			}
			str := func(p netip.Prefix) string {
				if !p.IsValid() {
					return ""
				}
				return p.String()
			}
			if err != nil || str(v4) != tc.v4 || str(v6) != tc.v6 {
				t.Fatalf("got %v %v %v, want %q %q", v4, v6, err, tc.v4, tc.v6)
			}
		})
	}
}

// TestWrittenAnnotations: the annotations twilld writes, by flannel's names
// and in its formats, for each family the node has; and the merge patch
// that removes those of a family it lacks.
func TestWrittenAnnotations(t *testing.T) {
	k := Keys("")
	hostGW := vxlanAttrs("192.0.2.1")
	hostGW.BackendType, hostGW.BackendData = "host-gw", nil
	hostGW.PublicIPv6 = netip.MustParseAddr("2001:db8::1")
	for _, tc := range []struct {
		name  string
		attrs subnet.LeaseAttrs
		want  map[string]string
	}{
		{"IPv4", vxlanAttrs("192.0.2.1"), map[string]string{"twill.io/kube-subnet-manager": "true",
			"twill.io/backend-type": "vxlan", "twill.io/backend-data": vxlanData, "twill.io/public-ip": "192.0.2.1"}},
		{"dual-stack", dualAttrs("192.0.2.1", "2001:db8::1"), map[string]string{"twill.io/kube-subnet-manager": "true",
			"twill.io/backend-type": "vxlan", "twill.io/backend-data": vxlanData, "twill.io/public-ip": "192.0.2.1",
			"twill.io/backend-v6-data": vxlanV6Data, "twill.io/public-ipv6": "2001:db8::1"}},
		{"IPv6-only", dualAttrs("", "2001:db8::1"), map[string]string{"twill.io/kube-subnet-manager": "true",
			"twill.io/backend-type": "vxlan", "twill.io/backend-v6-data": vxlanV6Data, "twill.io/public-ipv6": "2001:db8::1"}},
		{"host-gw, no backend data", hostGW, map[string]string{"twill.io/kube-subnet-manager": "true",
			"twill.io/backend-type": "host-gw", "twill.io/backend-data": "null", "twill.io/public-ip": "192.0.2.1",
			"twill.io/backend-v6-data": "null", "twill.io/public-ipv6": "2001:db8::1"}},
		{"zero-compressed IPv6", dualAttrs("192.0.2.1", "2001:0db8:0000:0000:0000:0000:0000:0001"), map[string]string{"twill.io/kube-subnet-manager": "true",
			"twill.io/backend-type": "vxlan", "twill.io/backend-data": vxlanData, "twill.io/public-ip": "192.0.2.1",
			"twill.io/backend-v6-data": vxlanV6Data, "twill.io/public-ipv6": "2001:db8::1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := k.owned(tc.attrs); !maps.Equal(got, tc.want) {
				t.Fatalf("owned\n%v\nwant\n%v", got, tc.want)
			}
			patch := k.patch(writtenFor(tc.attrs))
			for _, key := range []string{k.SubnetManager, k.BackendType, k.BackendData, k.PublicIP, k.BackendV6Data, k.PublicIPv6} {
				v, ok := patch[key]
				switch want, set := tc.want[key]; {
				case !ok:
					t.Errorf("patch leaves %s out", key)
				case set && v != want, !set && v != nil:
					t.Errorf("patch %s = %v, want %q (set %v)", key, v, want, set)
				}
			}
			if len(patch) != 6 {
				t.Errorf("patch %v touches more than twilld's annotations", patch)
			}
			// Read back, they are the attributes written.
			back, ok, err := ParseAnnotations(tc.want, "")
			a := tc.attrs
			if !hasIPv4(a.PublicIP) {
				a.PublicIP = netip.IPv4Unspecified()
			}
			if !ok || err != nil || back.PublicIP != a.PublicIP || back.PublicIPv6 != a.PublicIPv6 || back.BackendType != a.BackendType ||
				!bytes.Equal(back.BackendData, a.BackendData) || !bytes.Equal(back.BackendV6Data, a.BackendV6Data) {
				t.Fatalf("read back as %+v %v %v, want %+v", back, ok, err, a)
			}
		})
	}
	// Release's patch removes every one twilld writes, and nothing else.
	if rm := k.patch(written{}); len(rm) != 6 || slices.ContainsFunc(slices.Collect(maps.Values(rm)), func(v any) bool { return v != nil }) {
		t.Fatalf("release patch %v", rm)
	}
	if got := Keys("net.example.com"); got.PublicIPv6 != "net.example.com/public-ipv6" ||
		got.BackendV6Data != "net.example.com/backend-v6-data" || got.PublicIPv6Overwrite != "net.example.com/public-ipv6-overwrite" {
		t.Fatalf("keys %+v", got)
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
	n.Status.Images = []corev1.ContainerImage{{Names: []string{"pause:3.10"}, SizeBytes: 320000}}
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
		backendType: "vxlan", backendData: pub[k.BackendData], publicIP: "192.0.2.7", subnetManager: true,
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
	l2, ok2, err2 := cached.lease(k, bothFamilies)
	if !ok1 || !ok2 || err1 != nil || err2 != nil || !leaseEqual(l1, l2) {
		t.Fatalf("lease changed by the transform: %+v %v %v / %+v %v %v", l1, ok1, err1, l2, ok2, err2)
	}
	// Idempotent.
	if again, _ := tr(cached); again != any(cached) {
		t.Fatalf("transform not idempotent: %+v", again)
	}
	// A dual-stack Node keeps both podCIDRs and the IPv6 annotations, the
	// operator's overwrite included, and gives the same lease.
	ds := fatNode()
	ds.Spec.PodCIDRs = []string{"10.244.7.0/24", "fd00:10:244:7::/64"}
	maps.Copy(ds.Annotations, publishedDual("192.0.2.7", "2001:db8::7"))
	ds.Annotations[k.PublicIPv6Overwrite] = "2001:db8:ffff::7"
	dsOut, _ := tr(ds)
	if c := dsOut.(*cachedNode); !reflect.DeepEqual(c.podCIDRs, ds.Spec.PodCIDRs) || c.more == nil || c.more.publicIPv6 != "2001:db8::7" ||
		c.more.backendV6Data != vxlanV6Data || c.more.publicIPv6Overwrite != "2001:db8:ffff::7" || c.annotations() != k.read(ds.Annotations) {
		t.Fatalf("dual-stack slim node %+v", c)
	}
	l1, ok1, err1 = NodeToLease(ds, "")
	l2, ok2, err2 = dsOut.(*cachedNode).lease(k, bothFamilies)
	if !ok1 || !ok2 || err1 != nil || err2 != nil || !leaseEqual(l1, l2) ||
		familiesString(l2) != "10.244.7.0/24 192.0.2.7 fd00:10:244:7::/64 2001:db8:ffff::7" {
		t.Fatalf("dual-stack lease changed by the transform: %+v %v %v / %+v %v %v", l1, ok1, err1, l2, ok2, err2)
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
	if got, _ := tr(bare); got.(*cachedNode).annotations() != (nodeAnnotations{}) || got.(*cachedNode).Annotations != nil {
		t.Fatalf("kept foreign annotations: %+v", got)
	}
}

func TestNodePublicIPs(t *testing.T) {
	v4, v6, err := NodePublicIPs(map[string]string{"twill.io/node-public-ip": "198.18.0.101", "twill.io/node-public-ipv6": "fd00:198:18::65"}, "")
	if err != nil || v4.String() != "198.18.0.101" || v6.String() != "fd00:198:18::65" {
		t.Fatalf("got %v %v %v", v4, v6, err)
	}
	if v4, v6, err := NodePublicIPs(map[string]string{"other/node-public-ip": "198.18.0.101"}, ""); err != nil || v4.IsValid() || v6.IsValid() {
		t.Fatalf("another prefix's annotation read: %v %v %v", v4, v6, err)
	}
	for _, bad := range []map[string]string{
		{"twill.io/node-public-ip": "fd00::1"},
		{"twill.io/node-public-ip": "127.0.0.1"},
		{"twill.io/node-public-ipv6": "198.18.0.1"},
		{"twill.io/node-public-ipv6": "nonsense"},
	} {
		if _, _, err := NodePublicIPs(bad, ""); err == nil || !strings.Contains(err.Error(), "annotation twill.io/node-public-ip") {
			t.Errorf("%v: err = %v", bad, err)
		}
	}
}
