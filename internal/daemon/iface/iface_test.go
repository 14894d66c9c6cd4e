package iface

import (
	"context"
	"net"
	"net/netip"
	"regexp"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/twillnet/twill/internal/tools/testenv"
)

// twoInterfaces makes a network namespace with eth0 (10.0.0.1/24, the
// default route, no IPv6) and eth1 (192.168.5.1/24 and fd00:5::1/64), each a
// veth whose peer (eth0p, eth1p) has no address, and returns a handle in it.
func twoInterfaces(t *testing.T) *netlink.Handle {
	t.Helper()
	testenv.RequireRoot(t)
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	ns, err := netns.New()
	if err != nil {
		t.Fatal(err)
	}
	netns.Set(orig) // the test thread leaves; the handle works in ns
	runtime.UnlockOSThread()
	orig.Close()
	t.Cleanup(func() { ns.Close() })
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	for _, d := range []struct {
		name  string
		addrs []string
	}{{"eth0", []string{"10.0.0.1/24"}}, {"eth1", []string{"192.168.5.1/24", "fd00:5::1/64"}}} {
		link := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: d.name}, PeerName: d.name + "p"}
		if err := h.LinkAdd(link); err != nil {
			t.Fatal(err)
		}
		if peer, err := h.LinkByName(d.name + "p"); err != nil || h.LinkSetUp(peer) != nil {
			t.Fatalf("peer of %s: %v", d.name, err)
		}
		for _, a := range d.addrs {
			addr, _ := netlink.ParseAddr(a)
			addr.Flags = unix.IFA_F_NODAD // usable at once
			if err := h.AddrAdd(link, addr); err != nil {
				t.Fatal(err)
			}
		}
		if err := h.LinkSetUp(link); err != nil {
			t.Fatal(err)
		}
	}
	eth0, _ := h.LinkByName("eth0")
	if err := h.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: net.ParseIP("10.0.0.254")}); err != nil {
		t.Fatal(err)
	}
	return h
}

// Each flag picks the interface it should, in flannel's precedence, and a
// failure names every candidate tried and why it was not taken.
func TestKernelResolve(t *testing.T) {
	h := twoInterfaces(t)
	ctx := context.Background()
	re := regexp.MustCompile
	for _, c := range []struct {
		name   string
		sel    Selector
		v6     bool
		want   string // interface name and IPv4 address, or "" for an error
		errHas []string
	}{
		{name: "default route", want: "eth0 10.0.0.1"},
		{name: "a name", sel: Selector{Names: []string{"eth1"}}, want: "eth1 192.168.5.1"},
		{name: "an address", sel: Selector{Names: []string{"192.168.5.1"}}, want: "eth1 192.168.5.1"},
		{name: "the first that exists", sel: Selector{Names: []string{"wlan9", "eth1", "eth0"}}, want: "eth1 192.168.5.1"},
		{name: "names before regexes", sel: Selector{Names: []string{"eth0"}, Regexes: []*regexp.Regexp{re("eth1")}}, want: "eth0 10.0.0.1"},
		{name: "a regex of an address", sel: Selector{Regexes: []*regexp.Regexp{re(`^192\.168\.`)}}, want: "eth1 192.168.5.1"},
		{name: "a regex of a name", sel: Selector{Regexes: []*regexp.Regexp{re(`^eth1$`)}}, want: "eth1 192.168.5.1"},
		{name: "regexes in order", sel: Selector{Regexes: []*regexp.Regexp{re(`^wl`), re(`^eth0$`)}}, want: "eth0 10.0.0.1"},
		{name: "can reach, connected", sel: Selector{CanReach: netip.MustParseAddr("192.168.5.77")}, want: "eth1 192.168.5.1"},
		{name: "can reach, by the default route", sel: Selector{CanReach: netip.MustParseAddr("203.0.113.9")}, want: "eth0 10.0.0.1"},
		{name: "regexes before can-reach", sel: Selector{Regexes: []*regexp.Regexp{re(`eth1`)}, CanReach: netip.MustParseAddr("203.0.113.9")}, want: "eth1 192.168.5.1"},
		{name: "a candidate without IPv6 is passed over", sel: Selector{Names: []string{"eth0", "eth1"}}, v6: true, want: "eth1 192.168.5.1"},
		{name: "nothing fits", sel: Selector{Names: []string{"wlan9", "eth0"}, Regexes: []*regexp.Regexp{re(`^bond`)}, CanReach: netip.MustParseAddr("203.0.113.9")}, v6: true,
			errHas: []string{`--iface wlan9: no interface "wlan9"`, "--iface eth0: interface eth0 has no usable IPv6 address",
				"--iface-regex ^bond: matches no interface's address or name (interfaces: lo, ", "--iface-can-reach 203.0.113.9: interface eth0 has no usable IPv6"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := Resolve(ctx, h, c.sel, true, c.v6)
			if c.want == "" {
				if err == nil {
					t.Fatalf("chose %s, want an error", got.V4.Name)
				}
				for _, s := range c.errHas {
					if !strings.Contains(err.Error(), s) {
						t.Errorf("error %q lacks %q", err, s)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if s := got.V4.Name + " " + got.V4.Addr.String(); s != c.want {
				t.Errorf("chose %s, want %s", s, c.want)
			}
			if c.v6 && got.V6.Addr != netip.MustParseAddr("fd00:5::1") {
				t.Errorf("IPv6 address %v", got.V6.Addr)
			}
		})
	}
}
