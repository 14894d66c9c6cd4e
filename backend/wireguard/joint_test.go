package wireguard

import (
	"net/netip"
	"testing"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// The single device joins the families' peers: one peer per key, allowed
// both subnets, at the endpoint the mode picks. Before a family's first
// pass, what the device holds for that family is kept.
func TestJointWant(t *testing.T) {
	k := testKey(t)
	sn4, sn6 := netip.MustParsePrefix("10.244.2.0/24"), netip.MustParsePrefix("fd00:10:244:2::/64")
	ep4, ep6 := netip.MustParseAddrPort("198.18.0.2:51820"), netip.MustParseAddrPort("[2001:db8::2]:51820")
	v4 := map[wgtypes.Key]Peer{k: {Key: k, Endpoint: ep4, Subnets: [2]netip.Prefix{sn4}}}
	v6 := map[wgtypes.Key]Peer{k: {Key: k, Endpoint: ep6, Subnets: [2]netip.Prefix{1: sn6}}}
	both := Peer{Key: k, Subnets: [2]netip.Prefix{sn4, sn6}}

	// A restart: the device holds the joined peer; the IPv4 pass comes
	// first and must not take the IPv6 subnet away.
	have := map[wgtypes.Key]Peer{k: {Key: k, Endpoint: ep4, Subnets: both.Subnets}}
	j := NewJoint(ModeIPv4)
	got := j.want(false, netip.MustParseAddr("198.18.0.1"), v4, have)
	if want := (Peer{Key: k, Endpoint: ep4, Subnets: both.Subnets}); got[k] != want {
		t.Fatalf("IPv4 pass first: %+v, want %+v", got[k], want)
	}
	got = j.want(true, netip.MustParseAddr("2001:db8::1"), v6, have)
	if got[k].Subnets != both.Subnets || got[k].Endpoint != ep4 {
		t.Fatalf("both passes, mode ipv4: %+v", got[k])
	}

	for _, tc := range []struct {
		mode   string
		ownV6  string
		peer4  string
		expect netip.AddrPort
	}{
		{ModeIPv6, "2001:db8::1", "198.18.0.2:51820", ep6},
		{ModeIPv4, "2001:db8::1", "198.18.0.2:51820", ep4},
		// auto: IPv4 unless the peer's IPv4 is private and both IPv6 are public.
		{ModeAuto, "2001:db8::1", "198.18.0.2:51820", ep4}, // 198.18/15 is not "private" to netip
		{ModeAuto, "2001:db8::1", "10.0.0.2:51820", ep6},
		{ModeAuto, "fd00::1", "10.0.0.2:51820", netip.MustParseAddrPort("10.0.0.2:51820")},
	} {
		j := NewJoint(tc.mode)
		p4 := map[wgtypes.Key]Peer{k: {Key: k, Endpoint: netip.MustParseAddrPort(tc.peer4), Subnets: [2]netip.Prefix{sn4}}}
		j.want(false, netip.MustParseAddr("198.18.0.1"), p4, nil)
		got := j.want(true, netip.MustParseAddr(tc.ownV6), v6, nil)
		if got[k].Endpoint != tc.expect || got[k].Subnets != both.Subnets {
			t.Errorf("mode %s, own %s, peer %s: %+v, want endpoint %s", tc.mode, tc.ownV6, tc.peer4, got[k], tc.expect)
		}
	}

	// A peer gone from one family keeps the other's subnet only.
	j = NewJoint(ModeAuto)
	j.want(false, netip.MustParseAddr("198.18.0.1"), v4, nil)
	got = j.want(true, netip.MustParseAddr("2001:db8::1"), map[wgtypes.Key]Peer{}, nil)
	if got[k].Subnets != [2]netip.Prefix{sn4} || got[k].Endpoint != ep4 {
		t.Fatalf("peer without IPv6 any more: %+v", got[k])
	}
}
