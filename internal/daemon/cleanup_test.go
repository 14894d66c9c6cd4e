package daemon

import (
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/twillnet/twill/backend/backendtest"
	"github.com/twillnet/twill/backend/dataplane"
)

// A route that vanished between the listing and its deletion is no error of
// the clean-up; a route that could not be deleted for another reason is.
func TestDeleteRoutesToleratesGoneRoutes(t *testing.T) {
	_, h := backendtest.NetNS(t)
	ext := backendtest.Underlay(t, h, "eth0", netip.MustParsePrefix("198.18.0.1/24"))
	var routes []netlink.Route
	for i, dst := range []string{"10.244.2.0/24", "10.244.3.0/24"} {
		_, ipn, _ := net.ParseCIDR(dst)
		r := netlink.Route{LinkIndex: ext.Index, Dst: ipn, Gw: net.IPv4(198, 18, 0, byte(2+i)), Protocol: dataplane.RouteProtocol}
		if err := h.RouteAdd(&r); err != nil {
			t.Fatal(err)
		}
		routes = append(routes, r)
	}
	if err := h.RouteDel(&routes[0]); err != nil { // gone before the clean-up gets to it
		t.Fatal(err)
	}
	if err := deleteRoutes(h, routes); err != nil {
		t.Fatalf("deleteRoutes: %v", err)
	}
	if left := backendtest.Routes(t, h); len(left) != 0 {
		t.Fatalf("routes left: %v", left)
	}
}
