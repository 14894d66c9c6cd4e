// Package backendtest gives tests of the backends (and of what is built on
// them) a fresh network namespace with an underlay, and ways to look at what
// twill programmed there. Every namespace and handle is removed in
// t.Cleanup, also when the test fails.
package backendtest

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/internal/tools/testenv"
	"github.com/twillnet/twill/subnet"
)

// NetNS makes a fresh network namespace (needs root) and returns it with a
// netlink handle opened in it.
func NetNS(t testing.TB) (ns.NetNS, *netlink.Handle) {
	t.Helper()
	testenv.RequireRoot(t)
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatalf("create network namespace: %v", err)
	}
	t.Cleanup(func() {
		n.Close()
		if err := testutils.UnmountNS(n); err != nil {
			t.Errorf("remove network namespace %s: %v", n.Path(), err)
		}
	})
	h := Handle(t, n)
	// Bring up lo, as a real host has it.
	if lo, err := h.LinkByName("lo"); err == nil {
		_ = h.LinkSetUp(lo)
	}
	return n, h
}

// Handle opens another netlink handle in n, closed in t.Cleanup.
func Handle(t testing.TB, n ns.NetNS) *netlink.Handle {
	t.Helper()
	h, err := netlink.NewHandleAt(netns.NsHandle(n.Fd()))
	if err != nil {
		t.Fatalf("open netlink handle in %s: %v", n.Path(), err)
	}
	t.Cleanup(h.Close)
	return h
}

// Underlay creates a veth pair name/name+"p" in the handle's namespace (the
// kernel has no dummy driver everywhere), puts addr on name, sets both up and
// returns it as the external interface. No traffic leaves the namespace.
func Underlay(t testing.TB, h *netlink.Handle, name string, addr netip.Prefix) dataplane.ExternalInterface {
	t.Helper()
	attrs := netlink.NewLinkAttrs()
	attrs.Name, attrs.MTU = name, 1500
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: name + "p"}); err != nil {
		t.Fatalf("create veth %s: %v", name, err)
	}
	link, err := h.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	ipn := &net.IPNet{IP: addr.Addr().AsSlice(), Mask: net.CIDRMask(addr.Bits(), 32)}
	if err := h.AddrAdd(link, &netlink.Addr{IPNet: ipn}); err != nil {
		t.Fatalf("address %s on %s: %v", addr, name, err)
	}
	for _, n := range []string{name, name + "p"} {
		l, err := h.LinkByName(n)
		if err != nil {
			t.Fatal(err)
		}
		if err := h.LinkSetUp(l); err != nil {
			t.Fatalf("set %s up: %v", n, err)
		}
	}
	return dataplane.ExternalInterface{Name: name, Index: link.Attrs().Index, Addr: addr.Addr(), Prefix: addr.Masked(), MTU: 1500}
}

// VXLANPeer returns the lease of a VXLAN peer.
func VXLANPeer(sn string, publicIP string, mac string) subnet.Lease {
	data, _ := json.Marshal(map[string]any{"VNI": 1, "VtepMAC": mac})
	return subnet.Lease{Subnet: netip.MustParsePrefix(sn), Attrs: subnet.LeaseAttrs{
		PublicIP: netip.MustParseAddr(publicIP), BackendType: subnet.BackendVXLAN, BackendData: data,
	}}
}

// HostGWPeer returns the lease of a host-gw peer.
func HostGWPeer(sn, publicIP string) subnet.Lease {
	return subnet.Lease{Subnet: netip.MustParsePrefix(sn), Attrs: subnet.LeaseAttrs{
		PublicIP: netip.MustParseAddr(publicIP), BackendType: subnet.BackendHostGW,
	}}
}

// ManyVXLANPeers returns n (at most 32768) VXLAN peers with /24 subnets from
// 10.128.0.0/9, public IPs from 198.19.0.0/16 and distinct MACs.
func ManyVXLANPeers(n int) []subnet.Lease {
	peers := make([]subnet.Lease, n)
	for i := range n {
		hi, lo := byte(i>>8), byte(i)
		sn := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 128 + byte(i>>8), byte(i), 0}), 24)
		ip := netip.AddrFrom4([4]byte{198, 19, hi, lo})
		mac := fmt.Sprintf("02:77:00:00:%02x:%02x", hi, lo)
		peers[i] = VXLANPeer(sn.String(), ip.String(), mac)
	}
	return peers
}

// Routes returns twill's routes (by route protocol) in the main table.
func Routes(t testing.TB, h *netlink.Handle) []netlink.Route {
	t.Helper()
	rs, err := h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Protocol: dataplane.RouteProtocol}, netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		t.Fatalf("list routes: %v", err)
	}
	return rs
}

// AllRoutes returns every route in the main table.
func AllRoutes(t testing.TB, h *netlink.Handle) []netlink.Route {
	t.Helper()
	rs, err := h.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatalf("list routes: %v", err)
	}
	return rs
}

// Neighs returns the IPv4 neighbour entries on the link with index dev.
func Neighs(t testing.TB, h *netlink.Handle, dev int) []netlink.Neigh {
	t.Helper()
	ns, err := h.NeighList(dev, netlink.FAMILY_V4)
	if err != nil {
		t.Fatalf("list neighbours: %v", err)
	}
	return ns
}

// FDB returns the FDB entries of the device with index dev.
func FDB(t testing.TB, h *netlink.Handle, dev int) []netlink.Neigh {
	t.Helper()
	all, err := h.NeighList(dev, unix.AF_BRIDGE)
	if err != nil {
		t.Fatalf("list FDB: %v", err)
	}
	var out []netlink.Neigh
	for _, n := range all {
		if n.LinkIndex == dev {
			out = append(out, n)
		}
	}
	return out
}

// WaitFor polls cond until it returns nil or timeout passes, then fails the
// test with cond's last error. Use it for state that settles asynchronously;
// never sleep to synchronise.
func WaitFor(t testing.TB, timeout time.Duration, cond func() error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		err := cond()
		if err == nil {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("condition not met within %s: %v", timeout, err)
		case <-tick.C:
		}
	}
}
