package kube

import (
	"context"
	"errors"
	"maps"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"

	"github.com/twillnet/twill/subnet"
)

func TestNewManagerFamilies(t *testing.T) {
	cs := fake.NewClientset()
	o := Options{Client: cs.CoreV1().Nodes(), NodeName: "a"}
	noV6Net := dualConfig(t, false)
	noV6Net.IPv6Network = netip.Prefix{}
	badV6Data := dualAttrs("192.0.2.1", "2001:db8::1")
	badV6Data.BackendV6Data = []byte("{")
	for _, tc := range []struct {
		name  string
		cfg   *subnet.Config
		attrs subnet.LeaseAttrs
		want  string
	}{
		{"dual-stack without an IPv6 address", dualConfig(t, false), vxlanAttrs("192.0.2.1"), "public IPv6 address: no IPv6 address"},
		{"dual-stack without an IPv4 address", dualConfig(t, false), dualAttrs("", "2001:db8::1"), "public IPv4 address: 0.0.0.0 is not a unicast address"},
		{"IPv6-only with PublicIP 0.0.0.0", dualConfig(t, true), dualAttrs("", "2001:db8::1"), ""},
		{"IPv4 address as IPv6", dualConfig(t, false), dualAttrs("192.0.2.1", "192.0.2.2"), "public IPv6 address: 192.0.2.2 is not an IPv6 address"},
		{"link-local IPv6", dualConfig(t, true), dualAttrs("", "fe80::1"), "public IPv6 address: fe80::1 is not a unicast address"},
		{"bad IPv6 backend data", dualConfig(t, false), badV6Data, "IPv6 backend data is not valid JSON"},
		{"no IPv6Network", noV6Net, dualAttrs("192.0.2.1", "2001:db8::1"), "enables IPv6 but has no IPv6Network"},
	} {
		_, err := NewManager(o, tc.cfg, tc.attrs)
		if tc.want == "" {
			if err != nil {
				t.Errorf("%s: %v", tc.name, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want %q", tc.name, err, tc.want)
		}
	}

	// The fields of a family the network does not have are dropped.
	m, err := NewManager(o, testConfig(t), dualAttrs("192.0.2.1", "2001:db8::1"))
	if err != nil || m.attrs.PublicIPv6.IsValid() || m.attrs.BackendV6Data != nil || m.attrs.PublicIP.String() != "192.0.2.1" {
		t.Fatalf("IPv4-only network: attrs %+v, %v", m.attrs, err)
	}
	m, err = NewManager(o, dualConfig(t, true), dualAttrs("192.0.2.1", "2001:db8::1"))
	if err != nil || m.attrs.PublicIP != netip.IPv4Unspecified() || m.attrs.BackendData != nil || m.attrs.PublicIPv6.String() != "2001:db8::1" {
		t.Fatalf("IPv6-only network: attrs %+v, %v", m.attrs, err)
	}
}

// TestAcquireFamilies: the own lease takes the podCIDR of each family the
// network config enables, and a Node that lacks one, or has one outside its
// network, is waited on with a reason that says what to do.
func TestAcquireFamilies(t *testing.T) {
	dualCIDRs := []string{"10.244.1.0/24", "fd00:10:244:1::/64"}
	for _, tc := range []struct {
		name   string
		v6only bool // else dual-stack
		v4only bool // testConfig
		cidrs  []string
		ann    map[string]string
		want   string // familiesString of the own lease
		reason string // the wait reason, when there is no lease
		wrote  map[string]string
	}{
		{name: "dual-stack", cidrs: dualCIDRs,
			want:  "10.244.1.0/24 192.0.2.1 fd00:10:244:1::/64 2001:db8::1",
			wrote: publishedDual("192.0.2.1", "2001:db8::1")},
		{name: "dual-stack, IPv6 first", cidrs: []string{"fd00:10:244:1::/64", "10.244.1.0/24"},
			want: "10.244.1.0/24 192.0.2.1 fd00:10:244:1::/64 2001:db8::1"},
		{name: "dual-stack, both overwritten", cidrs: dualCIDRs, ann: map[string]string{
			"twill.io/public-ip-overwrite": "203.0.113.1", "twill.io/public-ipv6-overwrite": "2001:db8:ffff::1"},
			want: "10.244.1.0/24 203.0.113.1 fd00:10:244:1::/64 2001:db8:ffff::1",
			// The overwrites are the operator's: twilld writes its own addresses beside them.
			wrote: with(publishedDual("192.0.2.1", "2001:db8::1"), map[string]*string{
				"twill.io/public-ip-overwrite": ptr("203.0.113.1"), "twill.io/public-ipv6-overwrite": ptr("2001:db8:ffff::1")})},
		{name: "no IPv6 podCIDR", cidrs: []string{"10.244.1.0/24"},
			reason: "Node a has no IPv6 podCIDR (spec.podCIDRs: 10.244.1.0/24) and the network config enables IPv6: " +
				"give kube-controller-manager an IPv6 range in --cluster-cidr (one CIDR per family) and register the Node again, or set EnableIPv6 to false"},
		{name: "no IPv4 podCIDR", cidrs: []string{"fd00:10:244:1::/64"},
			reason: "Node a has no IPv4 podCIDR (spec.podCIDRs: fd00:10:244:1::/64) and the network config enables IPv4"},
		{name: "no podCIDR", reason: "Node a has no podCIDR yet"},
		{name: "IPv6 podCIDR outside", cidrs: []string{"10.244.1.0/24", "fd00:99::/64"},
			reason: "IPv6 podCIDR fd00:99::/64 of Node a is outside the IPv6Network fd00:10:244::/56 of the network config: change one of them"},
		{name: "bad IPv6 overwrite", cidrs: dualCIDRs, ann: map[string]string{"twill.io/public-ipv6-overwrite": "192.0.2.9"},
			reason: "annotation twill.io/public-ipv6-overwrite on Node a: 192.0.2.9 is not an IPv6 address"},
		{name: "IPv6-only", v6only: true, cidrs: []string{"fd00:10:244:1::/64"},
			want: "fd00:10:244:1::/64 2001:db8::1", wrote: publishedDual("", "2001:db8::1")},
		{name: "IPv6-only network, dual-stack Node", v6only: true, cidrs: dualCIDRs,
			// An IPv4 family published before (another config) is removed.
			ann:  with(publishedDual("192.0.2.1", "2001:db8::1"), map[string]*string{"twill.io/public-ip-overwrite": ptr("203.0.113.1")}),
			want: "fd00:10:244:1::/64 2001:db8::1", wrote: map[string]string{
				"twill.io/kube-subnet-manager": "true", "twill.io/backend-type": "vxlan", "twill.io/backend-v6-data": vxlanV6Data, "twill.io/public-ipv6": "2001:db8::1",
				"twill.io/public-ip-overwrite": "203.0.113.1"}},
		{name: "IPv6-only network, IPv4 Node", v6only: true, cidrs: []string{"10.244.1.0/24"},
			reason: "Node a has no IPv6 podCIDR (spec.podCIDRs: 10.244.1.0/24) and the network config enables IPv6"},
		{name: "IPv4-only network, dual-stack Node", v4only: true, cidrs: dualCIDRs,
			ann:  publishedDual("192.0.2.1", "2001:db8::1"),
			want: "10.244.1.0/24 192.0.2.1", wrote: published("192.0.2.1")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cs := fake.NewClientset(nodeCIDRs("a", tc.cidrs, maps.Clone(tc.ann)))
			cfg, attrs := dualConfig(t, tc.v6only), dualAttrs("192.0.2.1", "2001:db8::1")
			if tc.v6only {
				attrs = dualAttrs("", "2001:db8::1")
			}
			if tc.v4only {
				cfg = testConfig(t)
			}
			m, rec := newManagerFor(t, fakeNodes{cs.CoreV1().Nodes()}, "a", Options{}, cfg, attrs)
			timeout := 5 * time.Second
			if tc.reason != "" {
				timeout = 300 * time.Millisecond
			}
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			l, err := m.Acquire(ctx)
			if tc.reason != "" {
				if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), tc.reason) {
					t.Fatalf("got %v, want the deadline and %q", err, tc.reason)
				}
				if rec.count("waiting", tc.reason) != 1 {
					t.Errorf("the reason was not logged once")
				}
				if ann := getNode(t, cs, "a").Annotations; !maps.Equal(ann, tc.ann) {
					t.Errorf("annotations written on a node without a lease: %v", ann)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := familiesString(l); got != tc.want || l.Attrs.NodeName != "a" || !subnet.SameLease(l, m.Own()) {
				t.Fatalf("own lease %q %+v, want %q", got, l, tc.want)
			}
			if !l.Subnet.IsValid() && l.Attrs.PublicIP != netip.IPv4Unspecified() {
				t.Errorf("IPv6-only lease with PublicIP %v, want 0.0.0.0", l.Attrs.PublicIP)
			}
			if tc.wrote != nil {
				if ann := getNode(t, cs, "a").Annotations; !maps.Equal(ann, tc.wrote) {
					t.Errorf("annotations\n%v\nwant\n%v", ann, tc.wrote)
				}
			}
		})
	}
}

// TestSyncNodeFamilies drives the worker over Nodes of every mix of
// families, in a dual-stack network and an IPv6-only one.
func TestSyncNodeFamilies(t *testing.T) {
	dual := func(i string) []string { return []string{"10.244." + i + ".0/24", "fd00:10:244:" + i + "::/64"} }
	nodes := []*corev1.Node{
		nodeCIDRs("b", dual("2"), publishedDual("192.0.2.2", "2001:db8::2")),  // dual-stack
		nodeCIDRs("c", dual("3"), published("192.0.2.3")),                     // its twilld has IPv4 only
		nodeCIDRs("d", dual("4"), publishedDual("", "2001:db8::4")),           // its twilld has IPv6 only
		node("e", "10.244.5.0/24", publishedDual("192.0.2.5", "2001:db8::5")), // an IPv4 Node
		node("f", "fd00:10:244:6::/64", publishedDual("", "2001:db8::6")),     // an IPv6 Node
		nodeCIDRs("g", []string{"10.244.7.0/24", "fd00:99::/64"}, publishedDual("192.0.2.7", "2001:db8::7")),
		nodeCIDRs("h", dual("8"), with(publishedDual("192.0.2.8", "2001:db8::8"), map[string]*string{
			"twill.io/public-ipv6-overwrite": ptr("2001:db8:ffff::8")})),
		nodeCIDRs("i", dual("9"), with(publishedDual("192.0.2.9", "2001:db8::9"), map[string]*string{
			"twill.io/public-ipv6": ptr("192.0.2.9")})), // malformed
		nodeCIDRs("j", dual("10"), nil), // not a twill node yet
	}
	for _, tc := range []struct {
		name    string
		v6only  bool
		v4only  bool
		want    map[string]string
		skipped map[string]string // node -> reason logged
	}{
		{name: "dual-stack", want: map[string]string{
			"b": "10.244.2.0/24 192.0.2.2 fd00:10:244:2::/64 2001:db8::2",
			"c": "10.244.3.0/24 192.0.2.3",
			"d": "fd00:10:244:4::/64 2001:db8::4",
			"e": "10.244.5.0/24 192.0.2.5",
			"f": "fd00:10:244:6::/64 2001:db8::6",
			"h": "10.244.8.0/24 192.0.2.8 fd00:10:244:8::/64 2001:db8:ffff::8",
		}, skipped: map[string]string{
			"g": "IPv6 podCIDR fd00:99::/64 is outside the IPv6Network fd00:10:244::/56",
			"i": "malformed: node i: annotation twill.io/public-ipv6: 192.0.2.9 is not an IPv6 address",
		}},
		{name: "IPv6-only", v6only: true, want: map[string]string{
			"b": "fd00:10:244:2::/64 2001:db8::2",
			"d": "fd00:10:244:4::/64 2001:db8::4",
			"f": "fd00:10:244:6::/64 2001:db8::6",
			"h": "fd00:10:244:8::/64 2001:db8:ffff::8",
		}, skipped: map[string]string{
			"c": "no family the network config enables (IPv6) has both a podCIDR and a published address",
			"e": "no family the network config enables (IPv6) has both a podCIDR and a published address",
			"g": "IPv6 podCIDR fd00:99::/64 is outside the IPv6Network",
			"i": "malformed",
		}},
		// The IPv6 annotations are not read: g's IPv6 podCIDR and i's
		// public-ipv6 do not matter.
		{name: "IPv4-only", v4only: true, want: map[string]string{
			"b": "10.244.2.0/24 192.0.2.2",
			"c": "10.244.3.0/24 192.0.2.3",
			"e": "10.244.5.0/24 192.0.2.5",
			"g": "10.244.7.0/24 192.0.2.7",
			"h": "10.244.8.0/24 192.0.2.8",
			"i": "10.244.9.0/24 192.0.2.9",
		}, skipped: map[string]string{
			"d": "no family the network config enables (IPv4) has both a podCIDR and a published address",
			"f": "no family the network config enables (IPv4) has both a podCIDR and a published address",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := ctxT(t)
			attrs := dualAttrs("192.0.2.1", "2001:db8::1")
			if tc.v6only {
				attrs = dualAttrs("", "2001:db8::1")
			}
			cfg := dualConfig(t, tc.v6only)
			if tc.v4only {
				cfg = testConfig(t)
			}
			cs := fake.NewClientset(nodeCIDRs("a", dual("1"), nil))
			m, rec := newManagerFor(t, fakeNodes{cs.CoreV1().Nodes()}, "a", Options{}, cfg, attrs)
			if _, err := m.Acquire(ctx); err != nil {
				t.Fatal(err)
			}
			store := cache.NewStore(cache.MetaNamespaceKeyFunc)
			m.store = store
			for _, n := range append([]*corev1.Node{getNode(t, cs, "a")}, nodes...) {
				o, _ := SlimNode("")(n)
				if err := store.Add(o); err != nil {
					t.Fatal(err)
				}
			}
			m.syncAll(ctx)
			got, synced := peerMap(m)
			if !synced || !maps.Equal(got, tc.want) {
				t.Fatalf("peers\n%v\nwant\n%v", got, tc.want)
			}
			peers, _ := m.Peers()
			for _, p := range peers {
				if err := checkLease(p); err != nil {
					t.Errorf("peer %s: %v", p.Attrs.NodeName, err)
				}
				if p.IPv6Subnet.IsValid() && string(p.Attrs.BackendV6Data) != vxlanV6Data {
					t.Errorf("peer %s: IPv6 backend data %s", p.Attrs.NodeName, p.Attrs.BackendV6Data)
				}
				if _, ok := p.Family(true); ok != p.IPv6Subnet.IsValid() {
					t.Errorf("peer %s: Family(true) ok=%v", p.Attrs.NodeName, ok)
				}
			}
			for name, reason := range tc.skipped {
				if rec.count("skipping node", "peer="+name, reason) != 1 {
					t.Errorf("node %s not skipped once with %q", name, reason)
				}
			}
			if n := rec.count("skipping node"); n != len(tc.skipped) {
				t.Errorf("%d nodes skipped, want %d", n, len(tc.skipped))
			}

			// The operator's overwrite on the own Node moves the own lease.
			drain(m)
			a := getNode(t, cs, "a")
			a.Annotations["twill.io/public-ipv6-overwrite"] = "2001:db8:ffff::1"
			a.Annotations["twill.io/public-ip-overwrite"] = "203.0.113.1"
			o, _ := SlimNode("")(a)
			if err := store.Update(o); err != nil {
				t.Fatal(err)
			}
			if err := m.syncNode(ctx, "a"); err != nil {
				t.Fatal(err)
			}
			want := "10.244.1.0/24 203.0.113.1 fd00:10:244:1::/64 2001:db8:ffff::1"
			switch {
			case tc.v4only:
				want = "10.244.1.0/24 203.0.113.1"
			case tc.v6only:
				want = "fd00:10:244:1::/64 2001:db8:ffff::1"
			}
			if own := m.Own(); familiesString(own) != want || !drain(m) {
				t.Fatalf("own lease %q after the overwrites, want %q", familiesString(own), want)
			}
		})
	}
}
