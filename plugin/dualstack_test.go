package plugin_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/twillnet/twill/plugin"
	"github.com/twillnet/twill/subnet"
)

// dualEnv is defaultEnv's node with an IPv6 subnet as well; v6OnlyEnv has
// the IPv6 subnet alone.
var (
	dualEnv = subnet.Env{
		Network:     defaultEnv.Network,
		Subnet:      defaultEnv.Subnet,
		IPv6Network: netip.MustParsePrefix("fd00:10:244::/48"),
		IPv6Subnet:  netip.MustParsePrefix("fd00:10:244:7::1/64"),
		MTU:         1400,
		IPMasq:      true,
	}
	v6OnlyEnv = subnet.Env{IPv6Network: dualEnv.IPv6Network, IPv6Subnet: dualEnv.IPv6Subnet, MTU: 1400, IPMasq: true}
)

// addReady adds a pod and checks that it can use its IPv6 address as soon as
// ADD returns: nothing tentative on the bridge or in the pod, and the IPv6
// gateway answers the first echo request. It returns how long ADD took.
func addReady(t *testing.T, n *node, list *libcni.NetworkConfigList, p *pod) time.Duration {
	t.Helper()
	start := time.Now()
	if _, err := n.add(list, p); err != nil {
		t.Fatalf("ADD %s: %v", p.id, err)
	}
	took := time.Since(start)
	if err := noTentative(n, p); err != nil {
		t.Errorf("right after ADD %s: %v", p.id, err)
	}
	if err := pingTries(p, n.env.IPv6Subnet.Addr(), 1); err != nil {
		t.Errorf("right after ADD, %s cannot reach its IPv6 gateway %s: %v", p.id, n.env.IPv6Subnet.Addr(), err)
	}
	return took
}

// noTentative fails if cni0 or the pod's eth0 has an IPv6 address still in
// duplicate address detection.
func noTentative(n *node, p *pod) error {
	check := func(where, ifName string) error {
		l, err := netlink.LinkByName(ifName)
		if err != nil {
			return err
		}
		addrs, err := retryDump(func() ([]netlink.Addr, error) { return netlink.AddrList(l, netlink.FAMILY_V6) })
		if err != nil {
			return err
		}
		for _, a := range addrs {
			if a.Flags&unix.IFA_F_TENTATIVE != 0 {
				return fmt.Errorf("%s %s has %s tentative (flags %#x)", where, ifName, a.IPNet, a.Flags)
			}
		}
		return nil
	}
	return errors.Join(
		n.inHost(func() error { return check("node", "cni0") }),
		p.ns.Do(func(ns.NetNS) error { return check(p.id, "eth0") }))
}

// assertFamilies checks the pod's side for every family of the node: one
// address from the node subnet with the node's gateway, a route to the
// cluster network via the gateway and, with isDefaultGateway, exactly one
// default route via the gateway; nothing of a family the node lacks.
func assertFamilies(t *testing.T, n *node, p *pod, defaultGW bool) {
	t.Helper()
	for _, f := range []struct {
		name        string
		family      int
		sn, network netip.Prefix
		ip          netip.Prefix
		gw          netip.Addr
	}{
		{"IPv4", netlink.FAMILY_V4, n.env.Subnet, n.env.Network, p.ip, p.gw},
		{"IPv6", netlink.FAMILY_V6, n.env.IPv6Subnet, n.env.IPv6Network, p.ip6, p.gw6},
	} {
		err := p.ns.Do(func(ns.NetNS) error {
			l, err := netlink.LinkByName("eth0")
			if err != nil {
				return err
			}
			addrs, err := retryDump(func() ([]netlink.Addr, error) { return netlink.AddrList(l, f.family) })
			if err != nil {
				return err
			}
			var global []string
			for _, a := range addrs {
				if !a.IP.IsLinkLocalUnicast() {
					global = append(global, a.IPNet.String())
				}
			}
			routes, err := retryDump(func() ([]netlink.Route, error) { return netlink.RouteList(l, f.family) })
			if err != nil {
				return err
			}
			if !f.sn.IsValid() {
				if len(global) != 0 || f.ip.IsValid() {
					t.Errorf("%s has %s addresses %v on a node without %s", p.id, f.name, global, f.name)
				}
				for _, r := range routes {
					if r.Dst == nil || !r.Dst.IP.IsLinkLocalUnicast() {
						t.Errorf("%s has an %s route %v on a node without %s", p.id, f.name, r, f.name)
					}
				}
				return nil
			}
			if !f.sn.Masked().Contains(f.ip.Addr()) || f.ip.Bits() != f.sn.Bits() || f.ip.Addr() == f.sn.Addr() {
				t.Errorf("%s got %s %s, want a host address of %s", p.id, f.name, f.ip, f.sn.Masked())
			}
			if f.gw != f.sn.Addr() {
				t.Errorf("%s %s gateway %s, want %s", p.id, f.name, f.gw, f.sn.Addr())
			}
			if len(global) != 1 || global[0] != f.ip.String() {
				t.Errorf("%s eth0 %s addresses %v, want %s", p.id, f.name, global, f.ip)
			}
			var toNetwork, defaults int
			for _, r := range routes {
				via := r.Gw.String() == f.gw.String()
				switch {
				case r.Dst != nil && r.Dst.String() == f.network.String() && via:
					toNetwork++
				case (r.Dst == nil || r.Dst.IP.IsUnspecified() && prefixLen(r.Dst) == 0) && via:
					defaults++
				}
			}
			if toNetwork != 1 {
				t.Errorf("%s has %d %s routes to %s via %s, want 1: %v", p.id, toNetwork, f.name, f.network, f.gw, routes)
			}
			if want := map[bool]int{true: 1, false: 0}[defaultGW]; defaults != want {
				t.Errorf("%s has %d %s default routes via %s, want %d: %v", p.id, defaults, f.name, f.gw, want, routes)
			}
			return nil
		})
		if err != nil {
			t.Errorf("%s: %v", p.id, err)
		}
	}
}

func prefixLen(n *net.IPNet) int {
	ones, _ := n.Mask.Size()
	return ones
}

// assertBridgeFamilies checks cni0's addresses: the gateway of each family
// the node has, nothing else but link-local ones.
func assertBridgeFamilies(t *testing.T, n *node) {
	t.Helper()
	err := n.inHost(func() error {
		l, err := netlink.LinkByName("cni0")
		if err != nil {
			return err
		}
		addrs, err := retryDump(func() ([]netlink.Addr, error) { return netlink.AddrList(l, netlink.FAMILY_ALL) })
		if err != nil {
			return err
		}
		var got, want []string
		for _, a := range addrs {
			if !a.IP.IsLinkLocalUnicast() {
				got = append(got, a.IPNet.String())
			}
		}
		for _, sn := range []netip.Prefix{n.env.Subnet, n.env.IPv6Subnet} {
			if sn.IsValid() {
				want = append(want, sn.String())
			}
		}
		slices.Sort(got)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Errorf("cni0 addresses %v, want %v", got, want)
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}

// assertReservations checks that host-local holds exactly the pods' addresses
// of every family.
func assertReservations(t *testing.T, n *node, pods ...*pod) {
	t.Helper()
	want := map[string]string{}
	for _, p := range pods {
		for _, ip := range []netip.Prefix{p.ip, p.ip6} {
			if ip.IsValid() {
				want[ip.Addr().String()] = p.id + "/eth0"
			}
		}
	}
	got := n.reservations()
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("host-local reservations %v, want %v", got, want)
	}
}

// tcpEcho connects from one pod to a listener in another and echoes a line.
func tcpEcho(from, to *pod, addr netip.Addr) error {
	var ln net.Listener
	if err := to.ns.Do(func(ns.NetNS) (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(addr, 0).String())
		return err
	}); err != nil {
		return fmt.Errorf("listen in %s: %w", to.id, err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.Copy(c, c)
	}()
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	return from.ns.Do(func(ns.NetNS) error {
		c, err := net.DialTimeout("tcp", netip.AddrPortFrom(addr, port).String(), 3*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		msg := []byte("hello from " + from.id + "\n")
		if _, err := c.Write(msg); err != nil {
			return err
		}
		back := make([]byte, len(msg))
		if _, err := io.ReadFull(c, back); err != nil {
			return err
		}
		if !bytes.Equal(back, msg) {
			return fmt.Errorf("echo %q, sent %q", back, msg)
		}
		return nil
	})
}

// inPod runs f in the pod's namespace on its eth0.
func inPod(p *pod, f func(l netlink.Link) error) error {
	return p.ns.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		return f(l)
	})
}

// TestCNIDualStack: on a dual-stack node three pods get an address of each
// family, routes to both cluster networks and a default route per family
// (isDefaultGateway), can use IPv6 the moment ADD returns, reach each other
// over IPv6 (ICMP and TCP) and IPv4; CHECK passes and then finds a removed
// IPv6 address, a removed IPv6 route and a changed IPv6 subnet; DEL frees
// both families' addresses and leaves no state.
func TestCNIDualStack(t *testing.T) {
	n := newNode(t, dualEnv)
	list := n.confListWith("1.1.0", map[string]any{"isDefaultGateway": true})
	a, b, c := n.newPod("dual-a"), n.newPod("dual-b"), n.newPod("dual-c")

	// a is the first pod on a new bridge: its ADD puts the IPv6 gateway
	// on cni0, where duplicate address detection keeps it tentative for a
	// second or two; ADD returns once it is usable.
	first := addReady(t, n, list, a)
	second := addReady(t, n, list, b)
	t.Logf("ADD on a new bridge took %v, the next one %v", first.Round(time.Millisecond), second.Round(time.Millisecond))
	if err := pingTries(b, a.ip6.Addr(), 1); err != nil {
		t.Errorf("right after its ADD, %s cannot reach %s over IPv6: %v", b.id, a.id, err)
	}
	if err := pingTries(a, b.ip6.Addr(), 1); err != nil {
		t.Errorf("right after ADD of %s, %s cannot reach it over IPv6: %v", b.id, a.id, err)
	}
	addReady(t, n, list, c)
	pods := []*pod{a, b, c}

	t.Run("addresses and routes", func(t *testing.T) {
		for _, p := range pods {
			assertFamilies(t, n, p, true)
		}
		assertBridgeFamilies(t, n)
		assertReservations(t, n, pods...)
		if got := n.stateFiles(); len(got) != len(pods) {
			t.Errorf("state files %v, want one per pod", got)
		}
		st, err := (&plugin.Store{DataDir: n.dataDir, Network: netName}).Load(a.id, "eth0")
		if err != nil {
			t.Fatal(err)
		}
		if want := (plugin.EnvRecord{Network: "10.244.0.0/16", Subnet: "10.244.7.1/24", IPv6Network: "fd00:10:244::/48", IPv6Subnet: "fd00:10:244:7::1/64", MTU: 1400, IPMasq: true}); st.Env != want {
			t.Errorf("state env %+v, want %+v", st.Env, want)
		}
	})

	t.Run("connectivity", func(t *testing.T) {
		// A control: an IPv6 address nobody has must not answer.
		if err := pingTries(a, netip.MustParseAddr("fd00:10:244:7::fff0"), 1); err == nil {
			t.Fatal("ping to an unassigned IPv6 address succeeded")
		}
		for _, x := range pods {
			for _, y := range pods {
				if x == y {
					continue
				}
				for _, to := range []netip.Addr{y.ip6.Addr(), y.ip.Addr()} {
					if err := ping(x, to); err != nil {
						t.Errorf("%s cannot reach %s at %s: %v", x.id, y.id, to, err)
					}
				}
			}
		}
		if err := tcpEcho(a, b, b.ip6.Addr()); err != nil {
			t.Errorf("TCP over IPv6 from %s to %s: %v", a.id, b.id, err)
		}
	})

	t.Run("check", func(t *testing.T) {
		for _, p := range pods {
			if err := n.check(list, p); err != nil {
				t.Errorf("CHECK %s: %v", p.id, err)
			}
		}
		// The node's IPv6 subnet changed under the pods.
		changed := n.env
		changed.IPv6Subnet = netip.MustParsePrefix("fd00:10:244:8::1/64")
		n.writeEnv(changed)
		if err := n.check(list, c); err == nil || !strings.Contains(err.Error(), "IPv6 subnet fd00:10:244:7::1/64") {
			t.Errorf("CHECK after TWILL_IPV6_SUBNET changed: %v", err)
		}
		n.writeEnv(n.env)
		// Someone removes a's IPv6 address, and b's IPv6 default route.
		if err := inPod(a, func(l netlink.Link) error {
			return netlink.AddrDel(l, &netlink.Addr{IPNet: prefixNet(a.ip6)})
		}); err != nil {
			t.Fatal(err)
		}
		if err := n.check(list, a); err == nil || !strings.Contains(err.Error(), a.ip6.Addr().String()) {
			t.Errorf("CHECK %s after its IPv6 address was removed: %v", a.id, err)
		}
		if err := inPod(b, func(l netlink.Link) error {
			return netlink.RouteDel(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: prefixNet(netip.MustParsePrefix("::/0")), Gw: b.gw6.AsSlice()})
		}); err != nil {
			t.Fatal(err)
		}
		// The bridge's message prints the route as a struct: ::/0 is "IP:::".
		if err := n.check(list, b); err == nil || !strings.Contains(err.Error(), "Expected Route {Dst:{IP::: ") {
			t.Errorf("CHECK %s after its IPv6 default route was removed: %v", b.id, err)
		}
		if err := n.check(list, c); err != nil {
			t.Errorf("CHECK %s (untouched): %v", c.id, err)
		}
	})

	t.Run("del", func(t *testing.T) {
		for _, p := range pods {
			if err := n.del(list, p); err != nil {
				t.Errorf("DEL %s: %v", p.id, err)
			}
		}
		if got := n.stateFiles(); len(got) != 0 {
			t.Errorf("twill state left after DEL: %v", got)
		}
		assertReservations(t, n)
		for _, p := range pods {
			if err := inPod(p, func(netlink.Link) error { return nil }); err == nil {
				t.Errorf("%s still has eth0 after DEL", p.id)
			}
			if err := n.del(list, p); err != nil {
				t.Errorf("second DEL %s: %v", p.id, err)
			}
		}
	})
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// TestCNIIPv6Only: on a node without IPv4 the pods get an IPv6 address and
// IPv6 routes only, reach each other right after ADD, pass CHECK until their
// route to the cluster network goes, and DEL leaves nothing behind.
func TestCNIIPv6Only(t *testing.T) {
	n := newNode(t, v6OnlyEnv)
	list := n.confListWith("1.0.0", map[string]any{"isDefaultGateway": true})
	a, b := n.newPod("v6-a"), n.newPod("v6-b")
	addReady(t, n, list, a)
	addReady(t, n, list, b)
	if err := pingTries(b, a.ip6.Addr(), 1); err != nil {
		t.Errorf("right after its ADD, %s cannot reach %s: %v", b.id, a.id, err)
	}
	if a.ip.IsValid() || b.ip.IsValid() {
		t.Errorf("IPv4 addresses %s, %s in the results of an IPv6-only node", a.ip, b.ip)
	}
	for _, p := range []*pod{a, b} {
		assertFamilies(t, n, p, true)
	}
	assertBridgeFamilies(t, n)
	assertReservations(t, n, a, b)
	if err := tcpEcho(b, a, a.ip6.Addr()); err != nil {
		t.Errorf("TCP from %s to %s: %v", b.id, a.id, err)
	}

	for _, p := range []*pod{a, b} {
		if err := n.check(list, p); err != nil {
			t.Errorf("CHECK %s: %v", p.id, err)
		}
	}
	if err := inPod(a, func(l netlink.Link) error {
		return netlink.RouteDel(&netlink.Route{LinkIndex: l.Attrs().Index, Dst: prefixNet(n.env.IPv6Network), Gw: a.gw6.AsSlice()})
	}); err != nil {
		t.Fatal(err)
	}
	if err := n.check(list, a); err == nil || !strings.Contains(err.Error(), "Expected Route {Dst:{IP:"+n.env.IPv6Network.Addr().String()+" ") {
		t.Errorf("CHECK %s after its route to %s was removed: %v", a.id, n.env.IPv6Network, err)
	}
	if err := n.check(list, b); err != nil {
		t.Errorf("CHECK %s (untouched): %v", b.id, err)
	}

	for _, p := range []*pod{a, b} {
		if err := n.del(list, p); err != nil {
			t.Errorf("DEL %s: %v", p.id, err)
		}
	}
	if s, r := n.stateFiles(), n.reservations(); len(s)+len(r) != 0 {
		t.Errorf("left after DEL: state %v, reservations %v", s, r)
	}
}

// TestCNIDualStackEveryVersion: a result with an address of each family goes
// back in every version twill supports, CHECK (0.4.0 on) passes, DEL frees
// both addresses.
func TestCNIDualStackEveryVersion(t *testing.T) {
	n := newNode(t, dualEnv)
	for i, v := range plugin.SupportedVersions {
		t.Run(v, func(t *testing.T) {
			list := n.confList(v)
			p := n.newPod(fmt.Sprintf("dual-ver-%d", i))
			res, err := n.add(list, p)
			if err != nil {
				t.Fatal(err)
			}
			if res.Version() != v {
				t.Errorf("result version %s, want %s", res.Version(), v)
			}
			if cur, err := current.NewResultFromResult(res); err != nil || len(cur.IPs) != 2 {
				t.Fatalf("result %v (%v), want two addresses", res, err)
			}
			assertFamilies(t, n, p, false)
			if err := n.check(list, p); err != nil && !errors.Is(err, libcni.ErrorCheckNotSupp) {
				t.Errorf("CHECK: %v", err)
			}
			if err := n.del(list, p); err != nil {
				t.Fatal(err)
			}
			if s, r := n.stateFiles(), n.reservations(); len(s)+len(r) != 0 {
				t.Errorf("left after DEL: state %v, reservations %v", s, r)
			}
		})
	}
}

// TestCNIIPv6EnvUnusable: an env file with IPv6 the plugin cannot wire a pod
// from fails ADD with code 7 and STATUS with 50, naming the problem, and
// touches nothing.
func TestCNIIPv6EnvUnusable(t *testing.T) {
	n := newNode(t, dualEnv)
	list := n.confList("1.1.0")
	for _, tc := range []struct{ name, env, msg string }{
		{"IPv6 subnet /127", "TWILL_IPV6_NETWORK=fd00:10:244::/48\nTWILL_IPV6_SUBNET=fd00:10:244:7::1/127\nTWILL_MTU=1400\nTWILL_IPMASQ=true\n", "leaves no room for pods"},
		{"MTU below 1280", "TWILL_IPV6_NETWORK=fd00:10:244::/48\nTWILL_IPV6_SUBNET=fd00:10:244:7::1/64\nTWILL_MTU=1200\nTWILL_IPMASQ=true\n", "TWILL_MTU 1200 is below 1280"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := os.WriteFile(n.envFile, []byte(tc.env), 0o644); err != nil {
				t.Fatal(err)
			}
			p := n.newPod("bad-env")
			_, err := n.add(list, p)
			assertCode(t, err, 7)
			if !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("ADD error %v, want it to say %q", err, tc.msg)
			}
			err = n.inHost(func() error { return n.cni.GetStatusNetworkList(ctx(t), list) })
			assertCode(t, err, 50)
			if s, r := n.stateFiles(), n.reservations(); len(s)+len(r) != 0 {
				t.Errorf("left after a refused ADD: state %v, reservations %v", s, r)
			}
			if err := n.inHost(func() error { _, err := netlink.LinkByName("cni0"); return err }); err == nil {
				t.Error("cni0 exists after a refused ADD")
			}
		})
	}
}
