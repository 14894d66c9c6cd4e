package bench

import (
	"net/netip"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/backend/vxlan"
	"github.com/twillnet/twill/subnet"
	"github.com/twillnet/twill/subnet/etcd"
)

// The notifications below are built as the kernel sends them (rtmsg or
// ndmsg, then attributes), so kernelWatch's decoding is checked without a
// namespace; the harness's runs check it against the kernel itself.

func rtAttr(typ uint16, v []byte) []byte {
	l := unix.SizeofRtAttr + len(v)
	b := make([]byte, nlAlign(l))
	native.PutUint16(b[0:2], uint16(l))
	native.PutUint16(b[2:4], typ)
	copy(b[unix.SizeofRtAttr:], v)
	return b
}

func routeMsg(p netip.Prefix, proto byte) []byte {
	b := make([]byte, unix.SizeofRtMsg)
	b[0] = unix.AF_INET
	if p.Addr().Is6() {
		b[0] = unix.AF_INET6
	}
	b[1], b[4], b[5], b[7] = byte(p.Bits()), unix.RT_TABLE_MAIN, proto, unix.RTN_UNICAST
	table := make([]byte, 4)
	native.PutUint32(table, unix.RT_TABLE_MAIN)
	b = append(b, rtAttr(unix.RTA_DST, p.Addr().AsSlice())...)
	return append(b, rtAttr(unix.RTA_TABLE, table)...)
}

func neighMsg(family byte, ip netip.Addr, mac dataplane.MAC, state uint16, flags byte) []byte {
	b := make([]byte, unix.SizeofNdMsg)
	b[0] = family
	native.PutUint16(b[8:10], state)
	b[10] = flags
	b = append(b, rtAttr(unix.NDA_DST, ip.AsSlice())...)
	return append(b, rtAttr(unix.NDA_LLADDR, mac[:])...)
}

// peerMsgs are the notifications of one peer's entries, IPv4's or IPv6's.
func peerMsgs(p fakePeer, v6 bool) (route, neigh, fdb []byte) {
	sn, pub, mac, family := p.Subnet, p.PublicIP, p.MAC, byte(unix.AF_INET)
	if v6 {
		sn, pub, mac, family = p.IPv6Subnet, p.PublicIPv6, p.MACv6, unix.AF_INET6
	}
	return routeMsg(sn, byte(dataplane.RouteProtocol)),
		neighMsg(family, sn.Addr(), mac, unix.NUD_PERMANENT, 0),
		neighMsg(unix.AF_BRIDGE, pub, mac, unix.NUD_PERMANENT, unix.NTF_SELF)
}

func TestKernelWatchCountsEachFamily(t *testing.T) {
	w := newKernelWatch()
	w.trackCount(2)
	apply := func(typ uint16, b []byte) {
		w.mu.Lock()
		w.message(typ, b)
		w.check()
		w.mu.Unlock()
	}
	for i := range 2 {
		r, n, f := peerMsgs(peerAt(0, i), false)
		apply(unix.RTM_NEWROUTE, r)
		apply(unix.RTM_NEWNEIGH, n)
		apply(unix.RTM_NEWNEIGH, f)
	}
	if w.n[0] != [kinds]int{2, 2, 2} || w.n[1] != [kinds]int{} {
		t.Fatalf("after the IPv4 entries of 2 peers: counts %v", w.n)
	}
	if !allAtLeast(2, false)(w) || allAtLeast(2, true)(w) {
		t.Fatalf("IPv4 complete, IPv6 empty: allAtLeast(2, false) = %t, allAtLeast(2, true) = %t", allAtLeast(2, false)(w), allAtLeast(2, true)(w))
	}
	// Entries twill does not own, and repeats, change nothing.
	p := peerAt(0, 0)
	r6, n6, f6 := peerMsgs(p, true)
	for _, m := range []struct {
		typ uint16
		b   []byte
	}{
		{unix.RTM_NEWROUTE, routeMsg(p.IPv6Subnet, unix.RTPROT_KERNEL)},
		{unix.RTM_NEWNEIGH, neighMsg(unix.AF_INET6, netip.MustParseAddr("ff02::16"), dataplane.MAC{0x33, 0x33, 0, 0, 0, 0x16}, unix.NUD_NOARP, 0)},
		{unix.RTM_NEWNEIGH, neighMsg(unix.AF_INET6, p.IPv6Subnet.Addr(), p.MACv6, unix.NUD_REACHABLE, 0)},
		{unix.RTM_NEWNEIGH, neighMsg(unix.AF_BRIDGE, p.PublicIPv6, p.MACv6, unix.NUD_PERMANENT, 0)},
	} {
		apply(m.typ, m.b)
	}
	if w.n[1] != [kinds]int{} {
		t.Fatalf("entries twill does not own were counted: IPv6 counts %v", w.n[1])
	}
	for range 2 {
		apply(unix.RTM_NEWROUTE, r6)
		apply(unix.RTM_NEWNEIGH, n6)
		apply(unix.RTM_NEWNEIGH, f6)
	}
	if w.n[1] != [kinds]int{1, 1, 1} {
		t.Fatalf("one IPv6 peer, notified twice: IPv6 counts %v, want 1 of each", w.n[1])
	}
	r6, n6, f6 = peerMsgs(peerAt(0, 1), true)
	apply(unix.RTM_NEWROUTE, r6)
	apply(unix.RTM_NEWNEIGH, n6)
	apply(unix.RTM_NEWNEIGH, f6)
	if !allAtLeast(2, true)(w) {
		t.Fatalf("both families complete: allAtLeast(2, true) is false; counts %v", w.n)
	}
	for _, kind := range []string{"route", "neigh", "fdb", "route6", "neigh6", "fdb6"} {
		if _, ok := w.reachedAt(kind); !ok {
			t.Errorf("reachedAt(%q): not recorded", kind)
		}
	}
	apply(unix.RTM_DELROUTE, r6)
	apply(unix.RTM_DELNEIGH, n6)
	apply(unix.RTM_DELNEIGH, f6)
	if w.n[1] != [kinds]int{1, 1, 1} || w.n[0] != [kinds]int{2, 2, 2} {
		t.Fatalf("after removing one peer's IPv6 entries: counts %v", w.n)
	}
	if s := w.summary(); !strings.Contains(s, "IPv6: 1, 1, 1") {
		t.Errorf("summary %q does not give the IPv6 counts", s)
	}
}

// TestFakeDualStackPeers checks that the fake dual-stack leases are what
// twilld reads: one key per peer naming both subnets, a value with both
// public IPs and a VTEP MAC per family, all distinct and inside the
// networks of the config.
func TestFakeDualStackPeers(t *testing.T) {
	reg := etcd.NewRegistry(nil, etcd.DefaultPrefix, nil)
	seen := map[string]bool{}
	for series := range 2 {
		for i := range 5000 {
			p := peerAt(series, i)
			key := p.key(reg, true)
			v4, v6, err := subnet.ParseLeaseKey(strings.TrimPrefix(key, reg.SubnetsPrefix()))
			if err != nil || v4 != p.Subnet || v6 != p.IPv6Subnet {
				t.Fatalf("peer %d/%d: key %q parses to %v, %v, %v", series, i, key, v4, v6, err)
			}
			if !benchNetwork.Contains(v4.Addr()) || !benchNetworkV6.Contains(v6.Addr()) || v6.Bits() != 64 {
				t.Fatalf("peer %d/%d: subnets %v, %v outside %v, %v", series, i, v4, v6, benchNetwork, benchNetworkV6)
			}
			a, err := subnet.ParseLeaseAttrs([]byte(p.value(true)))
			if err != nil {
				t.Fatalf("peer %d/%d: value: %v", series, i, err)
			}
			d4, err4 := vxlan.ParseData(a.BackendData)
			d6, err6 := vxlan.ParseData(a.BackendV6Data)
			if err4 != nil || err6 != nil || d4.VtepMAC != p.MAC || d6.VtepMAC != p.MACv6 || a.PublicIP != p.PublicIP || a.PublicIPv6 != p.PublicIPv6 {
				t.Fatalf("peer %d/%d: value %s does not carry the peer's addresses and MACs", series, i, p.value(true))
			}
			for _, s := range []string{p.Subnet.String(), p.IPv6Subnet.String(), p.PublicIP.String(), p.PublicIPv6.String(), p.MAC.String(), p.MACv6.String()} {
				if seen[s] {
					t.Fatalf("peer %d/%d: %s is used twice", series, i, s)
				}
				seen[s] = true
			}
		}
	}
	if p := peerAt(0, 0); p.key(reg, false) != reg.SubnetKey(p.Subnet) || strings.Contains(p.value(false), "PublicIPv6") {
		t.Errorf("an IPv4 peer's lease changed: key %q, value %s", p.key(reg, false), p.value(false))
	}
}
