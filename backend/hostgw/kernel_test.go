package hostgw_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"sort"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/twillnet/twill/backend/backendtest"
	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/backend/hostgw"
	"github.com/twillnet/twill/subnet"
)

var own = subnet.Lease{Subnet: netip.MustParsePrefix("10.244.1.0/24"), Attrs: subnet.LeaseAttrs{
	PublicIP: netip.MustParseAddr("198.18.0.1"), BackendType: subnet.BackendHostGW}}

var peers = []subnet.Lease{
	backendtest.HostGWPeer("10.244.2.0/24", "198.18.0.2"),
	backendtest.HostGWPeer("10.244.3.0/24", "198.18.0.3"),
	backendtest.HostGWPeer("10.244.4.0/24", "198.18.0.4"),
}

func setup(t *testing.T) (*hostgw.Backend, *netlink.Handle, dataplane.ExternalInterface) {
	_, h := backendtest.NetNS(t)
	ext := backendtest.Underlay(t, h, "ext0", netip.MustParsePrefix("198.18.0.1/24"))
	be, err := hostgw.New(subnet.BackendConfig{Type: subnet.BackendHostGW}, ext, h, nil)
	if err != nil {
		t.Fatal(err)
	}
	data, mtu, err := be.Prepare(context.Background())
	if err != nil || data != nil || mtu != 1500 {
		t.Fatalf("Prepare = %s, %d, %v", data, mtu, err)
	}
	return be, h, ext
}

// routes renders twill's routes.
func routes(t *testing.T, h *netlink.Handle) string {
	var out []string
	for _, r := range backendtest.Routes(t, h) {
		out = append(out, r.Dst.String()+" via "+r.Gw.String())
	}
	sort.Strings(out)
	return strings.Join(out, ", ")
}

func TestReconcile(t *testing.T) {
	be, h, ext := setup(t)
	ctx := context.Background()
	if err := be.Reconcile(ctx, own, peers); err != nil {
		t.Fatal(err)
	}
	want := "10.244.2.0/24 via 198.18.0.2, 10.244.3.0/24 via 198.18.0.3, 10.244.4.0/24 via 198.18.0.4"
	if got := routes(t, h); got != want {
		t.Fatalf("routes %s, want %s", got, want)
	}
	for _, r := range backendtest.Routes(t, h) {
		if r.LinkIndex != ext.Index {
			t.Errorf("route %s on link %d, want %d", r.Dst, r.LinkIndex, ext.Index)
		}
	}

	// Deleted by hand: back. A foreign route is left alone.
	_, dst, _ := net.ParseCIDR("10.244.3.0/24")
	if err := h.RouteDel(&netlink.Route{Dst: dst, LinkIndex: ext.Index}); err != nil {
		t.Fatal(err)
	}
	_, other, _ := net.ParseCIDR("10.50.0.0/16")
	if err := h.RouteAdd(&netlink.Route{Dst: other, Gw: net.ParseIP("198.18.0.200"), LinkIndex: ext.Index}); err != nil {
		t.Fatal(err)
	}
	if err := be.Reconcile(ctx, own, peers); err != nil {
		t.Fatal(err)
	}
	if got := routes(t, h); got != want {
		t.Fatalf("after hand delete: %s, want %s", got, want)
	}

	// A peer moves, another goes.
	moved := []subnet.Lease{peers[0], backendtest.HostGWPeer("10.244.3.0/24", "198.18.0.33")}
	if err := be.Reconcile(ctx, own, moved); err != nil {
		t.Fatal(err)
	}
	if got, want := routes(t, h), "10.244.2.0/24 via 198.18.0.2, 10.244.3.0/24 via 198.18.0.33"; got != want {
		t.Fatalf("after change: %s, want %s", got, want)
	}

	if err := be.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	if got := routes(t, h); got != "" {
		t.Errorf("after Cleanup: %s", got)
	}
	rs, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: other}, netlink.RT_FILTER_DST)
	if err != nil || len(rs) != 1 {
		t.Errorf("foreign route: %v, %v", rs, err)
	}
}

func TestUnreachablePeer(t *testing.T) {
	be, h, _ := setup(t)
	far := backendtest.HostGWPeer("10.244.9.0/24", "203.0.113.9")
	err := be.Reconcile(context.Background(), own, append([]subnet.Lease{far}, peers...))
	if !errors.Is(err, hostgw.ErrUnreachable) || !strings.Contains(err.Error(), "peer 10.244.9.0/24") || !strings.Contains(err.Error(), "203.0.113.9") {
		t.Fatalf("want an unreachable error naming the peer, got %v", err)
	}
	var pe *dataplane.PeerError
	if !errors.As(err, &pe) || pe.Peer != far.Subnet {
		t.Errorf("PeerError = %+v", pe)
	}
	if got, want := routes(t, h), "10.244.2.0/24 via 198.18.0.2, 10.244.3.0/24 via 198.18.0.3, 10.244.4.0/24 via 198.18.0.4"; got != want {
		t.Errorf("the reachable peers: %s, want %s", got, want)
	}
}

func TestUpdate(t *testing.T) {
	be, h, _ := setup(t)
	ctx := context.Background()
	pfx := netip.MustParsePrefix
	if ok, err := be.Update(ctx, own, peers[:1], nil); ok || err != nil {
		t.Fatalf("Update before Reconcile = %t, %v; want a refusal", ok, err)
	}
	if err := be.Reconcile(ctx, own, peers[:2]); err != nil {
		t.Fatal(err)
	}
	moved := backendtest.HostGWPeer("10.244.3.0/24", "198.18.0.33")
	if ok, err := be.Update(ctx, own, []subnet.Lease{peers[2], moved}, []netip.Prefix{pfx("10.244.2.0/24")}); !ok || err != nil {
		t.Fatalf("Update = %t, %v", ok, err)
	}
	if got, want := routes(t, h), "10.244.3.0/24 via 198.18.0.33, 10.244.4.0/24 via 198.18.0.4"; got != want {
		t.Fatalf("after Update: %s, want %s", got, want)
	}
	far := backendtest.HostGWPeer("10.244.9.0/24", "203.0.113.9")
	if ok, err := be.Update(ctx, own, []subnet.Lease{far}, nil); ok || err != nil {
		t.Fatalf("Update with an unreachable peer = %t, %v; want a refusal", ok, err)
	}
	// What Update left is what a full pass wants: it writes nothing.
	before := be.Counters()
	if err := be.Reconcile(ctx, own, []subnet.Lease{moved, peers[2]}); err != nil {
		t.Fatal(err)
	}
	if w := be.Counters().Sub(before); w != (dataplane.Counters{}) {
		t.Errorf("a full pass after Update wrote %+v", w)
	}
}
