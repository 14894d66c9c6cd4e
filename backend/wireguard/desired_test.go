package wireguard

import (
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/subnet"
)

func testKey(t *testing.T) wgtypes.Key {
	t.Helper()
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k.PublicKey()
}

func wgLease(t *testing.T, sn, ip string, key wgtypes.Key, port uint16) subnet.Lease {
	t.Helper()
	data, err := json.Marshal(Data{PublicKey: key.String(), Port: port})
	if err != nil {
		t.Fatal(err)
	}
	return subnet.Lease{Subnet: netip.MustParsePrefix(sn), Attrs: subnet.LeaseAttrs{
		PublicIP: netip.MustParseAddr(ip), BackendType: subnet.BackendWireGuard, BackendData: data}}
}

// Desired makes one peer and one route per wireguard lease, skips the own
// lease and other backends' leases, and names each lease it cannot serve.
func TestDesired(t *testing.T) {
	own := wgLease(t, "10.244.1.0/24", "198.18.0.1", testKey(t), 51820)
	s := settings{ownKey: testKey(t), ownPort: 51820, keepalive: 25 * time.Second, link: 7}
	k2, k3, k4 := testKey(t), testKey(t), testKey(t)
	flannelOld := wgLease(t, "10.244.4.0/24", "198.18.0.4", k4, 0) // flannel before 0.20: no Port
	leases := []subnet.Lease{
		own,
		wgLease(t, "10.244.3.0/24", "198.18.0.3", k3, 51999),
		wgLease(t, "10.244.2.0/24", "198.18.0.2", k2, 51820),
		flannelOld,
		{Subnet: netip.MustParsePrefix("10.244.5.0/24"), Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("198.18.0.5"), BackendType: subnet.BackendVXLAN}},
		wgLease(t, "10.244.6.0/24", "198.18.0.6", k2, 51820),       // k2 again
		wgLease(t, "10.244.7.0/24", "198.18.0.7", s.ownKey, 51820), // this node's key
		wgLease(t, "10.244.1.128/25", "198.18.0.8", testKey(t), 1), // overlaps own
	}
	bad := wgLease(t, "10.244.9.0/24", "198.18.0.9", testKey(t), 51820)
	bad.Attrs.BackendData = json.RawMessage(`{"PublicKey":"c2VjcmV0"}`)
	leases = append(leases, bad)

	peers, routes, err := Desired(own, leases, s)
	want := map[wgtypes.Key]Peer{
		k2: {Key: k2, Endpoint: netip.MustParseAddrPort("198.18.0.2:51820"), Subnets: [2]netip.Prefix{netip.MustParsePrefix("10.244.2.0/24")}, Keepalive: 25 * time.Second},
		k3: {Key: k3, Endpoint: netip.MustParseAddrPort("198.18.0.3:51999"), Subnets: [2]netip.Prefix{netip.MustParsePrefix("10.244.3.0/24")}, Keepalive: 25 * time.Second},
		k4: {Key: k4, Endpoint: netip.MustParseAddrPort("198.18.0.4:51820"), Subnets: [2]netip.Prefix{netip.MustParsePrefix("10.244.4.0/24")}, Keepalive: 25 * time.Second},
	}
	if len(peers) != len(want) {
		t.Fatalf("peers %v, want %v", peers, want)
	}
	for k, w := range want {
		if peers[k] != w {
			t.Errorf("peer %s = %+v, want %+v", k, peers[k], w)
		}
	}
	if len(routes.Routes) != 3 {
		t.Fatalf("routes %v", routes.Routes)
	}
	for _, r := range routes.Routes {
		if r.LinkIndex != 7 || r.Gw.IsValid() || r.Dst != r.Peer {
			t.Errorf("route %v: want the peer's subnet into device 7, no gateway", r)
		}
	}
	for _, sn := range []string{"10.244.6.0/24", "10.244.7.0/24", "10.244.1.128/25", "10.244.9.0/24"} {
		var pe *dataplane.PeerError
		found := false
		for _, e := range unwrapAll(err) {
			if errors.As(e, &pe) && pe.Peer.String() == sn {
				found = true
			}
		}
		if !found {
			t.Errorf("no error names the lease %s: %v", sn, err)
		}
	}
	if !strings.Contains(err.Error(), "c2VjcmV0") {
		// A public key is no secret: the error shows what the lease says.
		t.Errorf("the bad key is not shown: %v", err)
	}
}

func unwrapAll(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// diffPeers sets what is missing or differs, allowed IPs replaced, removes
// what is not wanted, and leaves equal peers alone.
func TestDiffPeers(t *testing.T) {
	k1, k2, k3 := testKey(t), testKey(t), testKey(t)
	p := func(k wgtypes.Key, ep, sn string) Peer {
		return Peer{Key: k, Endpoint: netip.MustParseAddrPort(ep), Subnets: [2]netip.Prefix{netip.MustParsePrefix(sn)}}
	}
	want := map[wgtypes.Key]Peer{k1: p(k1, "198.18.0.2:51820", "10.244.2.0/24"), k2: p(k2, "198.18.0.3:51820", "10.244.3.0/24")}
	have := map[wgtypes.Key]Peer{k1: p(k1, "198.18.0.2:51820", "10.244.2.0/24"), k2: p(k2, "198.18.0.9:51820", "10.244.3.0/24"), k3: p(k3, "198.18.0.4:51820", "10.244.4.0/24")}
	got := diffPeers(want, have)
	if len(got) != 2 {
		t.Fatalf("diff %+v, want k2 set and k3 removed", got)
	}
	for _, c := range got {
		switch c.PublicKey {
		case k2:
			if c.Remove || !c.ReplaceAllowedIPs || c.Endpoint.String() != "198.18.0.3:51820" || len(c.AllowedIPs) != 1 || c.AllowedIPs[0].String() != "10.244.3.0/24" {
				t.Errorf("k2's config %+v", c)
			}
		case k3:
			if !c.Remove {
				t.Errorf("k3 not removed: %+v", c)
			}
		default:
			t.Errorf("unexpected config %+v", c)
		}
	}
	if got := diffPeers(want, want); len(got) != 0 {
		t.Errorf("equal peers gave %+v", got)
	}
}

// An IPv6 device is given the family's view of a lease (subnet.Lease.Family:
// the IPv6 subnet, public IP and backend data in the plain fields), and
// makes its peer from that.
func TestDesiredIPv6(t *testing.T) {
	k := testKey(t)
	dual := wgLease(t, "10.244.2.0/24", "198.18.0.2", testKey(t), 51820)
	dual.IPv6Subnet = netip.MustParsePrefix("fd00:10:244:2::/64")
	dual.Attrs.PublicIPv6 = netip.MustParseAddr("fd00:198:18::2")
	dual.Attrs.BackendV6Data, _ = json.Marshal(Data{PublicKey: k.String(), Port: 51821})
	v6, ok := dual.Family(true)
	if !ok {
		t.Fatal("no IPv6 view of a dual-stack lease")
	}
	own := subnet.Lease{Subnet: netip.MustParsePrefix("fd00:10:244:1::/64")}
	peers, routes, err := Desired(own, []subnet.Lease{v6}, settings{v6: true, ownKey: testKey(t), ownPort: 51821, link: 3})
	if err != nil {
		t.Fatal(err)
	}
	want := Peer{Key: k, Endpoint: netip.MustParseAddrPort("[fd00:198:18::2]:51821"), Subnets: [2]netip.Prefix{1: netip.MustParsePrefix("fd00:10:244:2::/64")}}
	if len(peers) != 1 || peers[k] != want || len(routes.Routes) != 1 {
		t.Fatalf("peers %+v, routes %v; want %+v", peers, routes.Routes, want)
	}
}
