package kube

import (
	"context"
	"maps"
	"net/netip"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/twillnet/twill/subnet"
)

// saManagerFor is saManager for a network config and attributes.
func (c *cluster) saManagerFor(t *testing.T, name string, o Options, cfg *subnet.Config, attrs subnet.LeaseAttrs) (*Manager, *logRecorder) {
	t.Helper()
	m, rec := newManagerFor(t, c.nodes, name, o, cfg, attrs)
	m.retryMax = 200 * time.Millisecond
	return m, rec
}

// dualCIDRs are the podCIDRs kube-controller-manager gives Node i of a
// dual-stack cluster (--cluster-cidr=10.244.0.0/16,fd00:10:244::/56).
func dualCIDRs(i string) []string {
	return []string{"10.244." + i + ".0/24", "fd00:10:244:" + i + "::/64"}
}

// TestDualStackOnAPIServer: on dual-stack Nodes the own lease has both
// subnets, the annotations written are flannel's names with flannel's
// values, and peers are seen with the families they have.
func TestDualStackOnAPIServer(t *testing.T) {
	c := newCluster(t)
	ctx := ctxT(t)
	c.createNode(t, nodeCIDRs("a", dualCIDRs("1"), nil))
	c.createNode(t, nodeCIDRs("b", dualCIDRs("2"), nil))
	c.createNode(t, nodeCIDRs("c", dualCIDRs("3"), nil))
	c.createNode(t, node("d", "fd00:10:244:4::/64", nil))
	// The API server keeps podCIDRs as given, and podCIDR is the first.
	if n := getNode(t, c.admin, "b"); n.Spec.PodCIDR != "10.244.2.0/24" || len(n.Spec.PodCIDRs) != 2 {
		t.Fatalf("Node b spec %+v", n.Spec)
	}

	m, _ := c.saManagerFor(t, "a", Options{}, dualConfig(t, false), dualAttrs("192.0.2.1", "2001:db8::1"))
	own, err := m.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if own.Subnet.String() != "10.244.1.0/24" || own.IPv6Subnet.String() != "fd00:10:244:1::/64" ||
		own.Attrs.PublicIP.String() != "192.0.2.1" || own.Attrs.PublicIPv6.String() != "2001:db8::1" ||
		string(own.Attrs.BackendV6Data) != vxlanV6Data {
		t.Fatalf("own lease %+v", own)
	}
	// flannel's names under twill's prefix, with flannel's values.
	want := map[string]string{
		"twill.io/kube-subnet-manager": "true",
		"twill.io/backend-type":        "vxlan",
		"twill.io/backend-data":        `{"VNI":1,"VtepMAC":"ae:12:34:56:78:9a"}`,
		"twill.io/public-ip":           "192.0.2.1",
		"twill.io/backend-v6-data":     `{"VNI":1,"VtepMAC":"ae:12:34:56:78:9b"}`,
		"twill.io/public-ipv6":         "2001:db8::1",
	}
	if ann := c.annotations(t, "a"); !maps.Equal(ann, want) {
		t.Fatalf("annotations of Node a\n%v\nwant\n%v", ann, want)
	}

	runManager(t, m)
	waitFor(t, "the first listing", 10*time.Second, func() bool { _, ok := m.Peers(); return ok })

	// Other twillds publish (played by the admin): b with both families, c
	// with IPv4 only (its twilld is not dual-stack yet), d an IPv6 Node.
	c.annotate(t, "b", strMap(publishedDual("192.0.2.2", "2001:db8::2")))
	c.annotate(t, "c", strMap(published("192.0.2.3")))
	c.annotate(t, "d", strMap(publishedDual("", "2001:db8::4")))
	wantPeers := map[string]string{
		"b": "10.244.2.0/24 192.0.2.2 fd00:10:244:2::/64 2001:db8::2",
		"c": "10.244.3.0/24 192.0.2.3",
		"d": "fd00:10:244:4::/64 2001:db8::4",
	}
	waitFor(t, "peers b, c and d", 10*time.Second, func() bool { p, _ := peerMap(m); return maps.Equal(p, wantPeers) })
	peers, _ := m.Peers()
	for _, p := range peers {
		if err := checkLease(p); err != nil {
			t.Errorf("peer %s: %v", p.Attrs.NodeName, err)
		}
	}

	// c's twilld becomes dual-stack; b's operator overwrites its IPv6
	// address; and the own one.
	c.annotate(t, "c", strMap(publishedDual("192.0.2.3", "2001:db8::3")))
	waitFor(t, "peer c's IPv6 family", 10*time.Second, func() bool {
		p, _ := peerMap(m)
		return p["c"] == "10.244.3.0/24 192.0.2.3 fd00:10:244:3::/64 2001:db8::3"
	})
	c.annotate(t, "b", map[string]any{"twill.io/public-ipv6-overwrite": "2001:db8:ffff::2"})
	waitFor(t, "peer b's IPv6 overwrite", 10*time.Second, func() bool {
		p, _ := peerMap(m)
		return p["b"] == "10.244.2.0/24 192.0.2.2 fd00:10:244:2::/64 2001:db8:ffff::2"
	})
	drain(m)
	c.annotate(t, "a", map[string]any{"twill.io/public-ipv6-overwrite": "2001:db8:ffff::1"})
	waitFor(t, "the own IPv6 overwrite", 10*time.Second, func() bool { return m.Own().Attrs.PublicIPv6.String() == "2001:db8:ffff::1" })
	waitChanged(t, m, "the own lease")
	if got := c.annotations(t, "a")["twill.io/public-ipv6"]; got != "2001:db8::1" {
		t.Errorf("published public-ipv6 %q; the overwrite must not replace it", got)
	}

	// Someone removes the own IPv6 annotations: they are written again.
	c.annotate(t, "a", map[string]any{"twill.io/public-ipv6": nil, "twill.io/backend-v6-data": nil})
	waitFor(t, "the own IPv6 annotations to come back", 10*time.Second, func() bool {
		ann := c.annotations(t, "a")
		return ann["twill.io/public-ipv6"] == "2001:db8::1" && ann["twill.io/backend-v6-data"] == vxlanV6Data
	})

	if err := m.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if ann := c.annotations(t, "a"); !maps.Equal(ann, map[string]string{"twill.io/public-ipv6-overwrite": "2001:db8:ffff::1"}) {
		t.Fatalf("annotations after Release: %v", ann)
	}
}

// TestIPv6OnlyOnAPIServer: with EnableIPv4 false the own lease is the IPv6
// podCIDR alone, twilld writes the IPv6 annotations only (and removes IPv4
// ones left from another config), and peers are their IPv6 families.
func TestIPv6OnlyOnAPIServer(t *testing.T) {
	c := newCluster(t)
	ctx := ctxT(t)
	c.createNode(t, node("a", "fd00:10:244:1::/64", nil))
	// A dual-stack Node whose twilld ran with both families before.
	c.createNode(t, nodeCIDRs("b", dualCIDRs("2"), publishedDual("192.0.2.2", "2001:db8::2")))
	c.createNode(t, node("c", "fd00:10:244:3::/64", nil))

	m, _ := c.saManagerFor(t, "a", Options{}, dualConfig(t, true), dualAttrs("", "2001:db8::1"))
	own, err := m.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if own.Subnet.IsValid() || own.IPv6Subnet.String() != "fd00:10:244:1::/64" ||
		own.Attrs.PublicIP != netip.IPv4Unspecified() || own.Attrs.PublicIPv6.String() != "2001:db8::1" {
		t.Fatalf("own lease %+v", own)
	}
	if f, ok := own.Family(false); ok {
		t.Errorf("IPv6-only lease has an IPv4 family %+v", f)
	}
	want := map[string]string{
		"twill.io/kube-subnet-manager": "true",
		"twill.io/backend-type":        "vxlan",
		"twill.io/backend-v6-data":     vxlanV6Data,
		"twill.io/public-ipv6":         "2001:db8::1",
	}
	if ann := c.annotations(t, "a"); !maps.Equal(ann, want) {
		t.Fatalf("annotations of Node a\n%v\nwant\n%v", ann, want)
	}

	// b restarts IPv6-only too: its IPv4 annotations go.
	mb, _ := c.saManagerFor(t, "b", Options{}, dualConfig(t, true), dualAttrs("", "2001:db8::2"))
	if _, err := mb.Acquire(ctx); err != nil {
		t.Fatal(err)
	}
	if ann := c.annotations(t, "b"); !maps.Equal(ann, map[string]string{
		"twill.io/kube-subnet-manager": "true", "twill.io/backend-type": "vxlan", "twill.io/backend-v6-data": vxlanV6Data, "twill.io/public-ipv6": "2001:db8::2"}) {
		t.Fatalf("annotations of Node b: %v", ann)
	}

	runManager(t, m)
	// c publishes as flannel's host-gw does on an IPv6-only node.
	c.annotate(t, "c", map[string]any{"twill.io/backend-type": "host-gw", "twill.io/backend-data": "null",
		"twill.io/public-ip": "0.0.0.0", "twill.io/backend-v6-data": "null", "twill.io/public-ipv6": "2001:db8::3"})
	wantPeers := map[string]string{"b": "fd00:10:244:2::/64 2001:db8::2", "c": "fd00:10:244:3::/64 2001:db8::3"}
	waitFor(t, "peers b and c", 10*time.Second, func() bool { p, ok := peerMap(m); return ok && maps.Equal(p, wantPeers) })
	peers, _ := m.Peers()
	for _, p := range peers {
		if err := checkLease(p); err != nil {
			t.Errorf("peer %s: %v", p.Attrs.NodeName, err)
		}
	}
}

// TestDualStackWaitsOnAPIServer: a Node without an IPv6 podCIDR in a
// dual-stack network is waited on with a reason that names the Node, the
// family and what to do, until the Node is registered again with both.
func TestDualStackWaitsOnAPIServer(t *testing.T) {
	c := newCluster(t)
	ctx := ctxT(t)
	var reasons waitReasons
	waiting, seen := reasons.record, reasons.seen

	// The cluster gave IPv4 podCIDRs only (--cluster-cidr without an IPv6 range).
	c.createNode(t, node("w", "10.244.7.0/24", nil))
	m, rec := c.saManagerFor(t, "w", Options{Waiting: waiting}, dualConfig(t, false), dualAttrs("192.0.2.1", "2001:db8::1"))
	done := make(chan error, 1)
	go func() { _, err := m.Acquire(ctx); done <- err }()
	reason := "Node w has no IPv6 podCIDR (spec.podCIDRs: 10.244.7.0/24) and the network config enables IPv6: " +
		"give kube-controller-manager an IPv6 range in --cluster-cidr (one CIDR per family) and register the Node again, or set EnableIPv6 to false"
	waitFor(t, "Acquire to wait for the IPv6 podCIDR", 10*time.Second, seen(reason, 3))
	if n := rec.count("waiting", reason); n != 1 {
		t.Errorf("the reason was logged %d times, want once", n)
	}
	if ann := c.annotations(t, "w"); len(ann) != 0 {
		t.Errorf("annotations written before the lease: %v", ann)
	}
	select {
	case err := <-done:
		t.Fatalf("Acquire returned %v", err)
	default:
	}

	// The API server does not let podCIDRs change once set: the operator
	// registers the Node again, with a podCIDR of each family.
	if err := c.admin.CoreV1().Nodes().Delete(ctx, "w", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	c.createNode(t, nodeCIDRs("w", dualCIDRs("7"), nil))
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Acquire still waits after the Node has both podCIDRs")
	}
	if got := familiesString(m.Own()); got != "10.244.7.0/24 192.0.2.1 fd00:10:244:7::/64 2001:db8::1" {
		t.Fatalf("own lease %q", got)
	}

	// An IPv6 podCIDR outside IPv6Network is waited on too.
	c.createNode(t, nodeCIDRs("x", []string{"10.244.8.0/24", "fd00:99:0:8::/64"}, nil))
	mx, _ := c.saManagerFor(t, "x", Options{Waiting: waiting}, dualConfig(t, false), dualAttrs("192.0.2.8", "2001:db8::8"))
	xctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() { _, err := mx.Acquire(xctx); done <- err }()
	waitFor(t, "Acquire to wait on the IPv6 podCIDR outside the network", 10*time.Second,
		seen("IPv6 podCIDR fd00:99:0:8::/64 of Node x is outside the IPv6Network fd00:10:244::/56", 2))
	cancel()
	<-done
}
