package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/twillnet/twill/internal/tools/kubelab"
	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/subnet"
)

func ipn(t *testing.T, netns string, args ...string) string {
	t.Helper()
	out, err := lab.IP(context.Background(), append([]string{"-n", netns}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func bridgeCmd(t *testing.T, netns string, args ...string) string {
	t.Helper()
	out, err := lab.InNS(context.Background(), netns, "bridge", args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func hostEnv(t *testing.T, l *lab.Lab, i int) subnet.Env {
	t.Helper()
	env, err := l.WaitEnv(ctxFor(t, 30*time.Second), i)
	if err != nil {
		t.Fatal(err)
	}
	return env
}

// Entries deleted by hand, and the VXLAN device itself, are back after the
// next resync, and so are twill's iptables chains; entries twill did not make
// are left alone.
func TestDriftIsRepaired(t *testing.T) {
	for _, backend := range []string{"vxlan", "host-gw"} {
		t.Run(backend, func(t *testing.T) { testDrift(t, backend) })
	}
}

func testDrift(t *testing.T, backend string) {
	l := newLab(t, lab.Options{Hosts: 3, PodsPerHost: 1, Backend: backend, IPMasq: true, DaemonArgs: []string{"--resync-interval", "1s"}})
	h1 := l.Topology().HostNS(1)
	want := expected(backend, 2)
	waitCounts(t, l, 1, want, 10*time.Second)

	// Foreign entries: a route and a permanent neighbour on the underlay interface.
	ipn(t, h1, "route", "add", "192.0.2.0/24", "via", lab.WorldAddr.String())
	ipn(t, h1, "neigh", "add", "198.18.0.77", "lladdr", "02:00:00:00:00:77", "dev", "eth0", "nud", "permanent")

	// Repairs are counted by kind in /metrics.
	repairs := func(kind string) float64 { return metric(t, h1, `twill_repairs_total{family="ipv4",kind="`+kind+`"}`) }
	if r := repairs("route"); r != 0 {
		t.Fatalf("twill_repairs_total{kind=route} = %v before any drift", r)
	}
	peer := hostEnv(t, l, 2).Subnet.Masked()
	ipn(t, h1, "route", "del", peer.String())
	waitCounts(t, l, 1, want, 10*time.Second)
	waitFor(t, "the route repair to be counted", 5*time.Second, func() error {
		if r := repairs("route"); r != 1 {
			return fmt.Errorf("route repairs = %v, want 1", r)
		}
		return nil
	})

	if backend == "vxlan" {
		// A route of a foreign protocol on twill's device is not twill's to remove.
		ipn(t, h1, "route", "add", "203.0.113.0/24", "dev", "twill.1", "proto", "static")
		ipn(t, h1, "neigh", "del", peer.Addr().String(), "dev", "twill.1")
		waitCounts(t, l, 1, want, 10*time.Second)
		if out := ipn(t, h1, "route", "show", "203.0.113.0/24"); !strings.Contains(out, "203.0.113.0/24") {
			t.Fatal("a foreign route on twill.1 was removed")
		}

		fdb := strings.Fields(bridgeCmd(t, h1, "fdb", "show", "dev", "twill.1", "dst", l.Topology().HostAddr(2).String()))
		if len(fdb) == 0 {
			t.Fatal("no FDB entry for h2")
		}
		bridgeCmd(t, h1, "fdb", "del", fdb[0], "dev", "twill.1", "dst", l.Topology().HostAddr(2).String())
		waitCounts(t, l, 1, want, 10*time.Second)

		ipn(t, h1, "link", "del", "twill.1")
		waitCounts(t, l, 1, want, 15*time.Second)
		if d, n, f := repairs("device"), repairs("neigh"), repairs("fdb"); d < 1 || n < 1 || f < 1 {
			t.Fatalf("repairs: device %v, neigh %v, fdb %v; want each at least 1", d, n, f)
		}
	}
	requireMatrix(t, l)

	// twill's iptables chains, flushed or unhooked by hand, come back.
	natRules := iptablesS(t, h1, "nat", "TWILL-POSTRTG")
	if !strings.Contains(natRules, "MASQUERADE") {
		t.Fatalf("no masquerade rule in TWILL-POSTRTG:\n%s", natRules)
	}
	iptables(t, h1, "-t", "nat", "-F", "TWILL-POSTRTG")
	iptables(t, h1, "-t", "filter", "-D", "FORWARD", "-m", "comment", "--comment", "twill: accept traffic from and to the cluster network", "-j", "TWILL-FWD")
	waitFor(t, "the chains to be restored", 10*time.Second, func() error {
		if got := iptablesS(t, h1, "nat", "TWILL-POSTRTG"); got != natRules {
			return fmt.Errorf("TWILL-POSTRTG:\n%s", got)
		}
		if !strings.Contains(iptablesS(t, h1, "filter", "FORWARD"), "-j TWILL-FWD") {
			return fmt.Errorf("FORWARD does not jump to TWILL-FWD")
		}
		if r := repairs("iptables"); r < 2 {
			return fmt.Errorf("rule repairs = %v, want at least 2", r)
		}
		return nil
	})

	// The foreign entries on the underlay interface are still there.
	if out := ipn(t, h1, "route", "show", "192.0.2.0/24"); !strings.Contains(out, "192.0.2.0/24") {
		t.Fatal("a route twill did not make was removed")
	}
	if out := ipn(t, h1, "neigh", "show", "198.18.0.77", "dev", "eth0"); !strings.Contains(out, "02:00:00:00:00:77") {
		t.Fatal("a neighbour entry twill did not make was removed")
	}
}

// A peer that vanished is removed by the others, whether they were running
// when it went or not.
func TestVanishedPeersAreRemoved(t *testing.T) {
	for _, backend := range []string{"vxlan", "host-gw"} {
		t.Run(backend, func(t *testing.T) { testVanishedPeers(t, backend) })
	}
}

func testVanishedPeers(t *testing.T, backend string) {
	l := newLab(t, lab.Options{Hosts: 3, PodsPerHost: 1, Backend: backend})
	ctx := ctxFor(t, 2*time.Minute)
	for i := 1; i <= 3; i++ {
		waitCounts(t, l, i, expected(backend, 2), 10*time.Second)
	}
	// h3 stops and its lease is deleted (as its TTL would): h1 and h2 follow.
	if err := l.StopDaemon(ctx, 3); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Ctl(ctx, "leases", "delete", hostEnv(t, l, 3).Subnet.Masked().String()); err != nil {
		t.Fatal(err)
	}
	waitCounts(t, l, 1, expected(backend, 1), 10*time.Second)
	waitCounts(t, l, 2, expected(backend, 1), 10*time.Second)

	// h2 vanishes while h1 is down: h1's restart removes the stale entries.
	if err := l.StopDaemon(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if err := l.StopDaemon(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Ctl(ctx, "leases", "delete", hostEnv(t, l, 2).Subnet.Masked().String()); err != nil {
		t.Fatal(err)
	}
	if c, _ := l.Counts(ctx, 1); c.Routes != 1 {
		t.Fatalf("h1 while down: %+v, want the stale entries of h2 still there", c)
	}
	if err := l.StartDaemon(1); err != nil {
		t.Fatal(err)
	}
	waitCounts(t, l, 1, expected(backend, 0), 15*time.Second)
}

// A node whose underlay address changes keeps its subnet; its VXLAN device is
// recreated on the new address, and every peer follows the new public IP and
// VTEP MAC in place.
func TestPublicIPChangeIsFollowed(t *testing.T) {
	for _, backend := range []string{"vxlan", "host-gw"} {
		t.Run(backend, func(t *testing.T) { testPublicIPChange(t, backend) })
	}
}

func testPublicIPChange(t *testing.T, backend string) {
	l := newLab(t, lab.Options{Hosts: 3, PodsPerHost: 1, Backend: backend})
	ctx := ctxFor(t, 2*time.Minute)
	before := hostEnv(t, l, 3)
	h3 := l.Topology().HostNS(3)
	incremental := func(i int) float64 { return metric(t, l.Topology().HostNS(i), "twill_reconcile_incremental_total") }
	updates := map[int]float64{1: incremental(1), 2: incremental(2)}
	if err := l.StopDaemon(ctx, 3); err != nil {
		t.Fatal(err)
	}
	newAddr := netip.MustParseAddr("198.18.0.103")
	ipn(t, h3, "addr", "del", netip.PrefixFrom(l.Topology().HostAddr(3), 24).String(), "dev", "eth0")
	ipn(t, h3, "addr", "add", netip.PrefixFrom(newAddr, 24).String(), "dev", "eth0")
	ipn(t, h3, "route", "replace", "default", "via", lab.WorldAddr.String())
	if err := l.StartDaemon(3); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		out, err := l.Ctl(ctx, "leases", "show", before.Subnet.Masked().String())
		var v struct {
			PublicIP string `json:"publicIP"`
		}
		if err == nil && json.Unmarshal([]byte(out), &v) == nil && v.PublicIP == newAddr.String() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("h3's lease %s did not move to %s: %v %s", before.Subnet.Masked(), newAddr, err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if after := hostEnv(t, l, 3); after != before {
		t.Fatalf("h3's env changed: %+v -> %+v", before, after)
	}
	for _, i := range []int{1, 2} {
		hn := l.Topology().HostNS(i)
		waitFor(t, fmt.Sprintf("h%d to send h3's traffic to %s", i, newAddr), 15*time.Second, func() error {
			var out string
			if backend == "vxlan" {
				out = bridgeCmd(t, hn, "fdb", "show", "dev", "twill.1")
			} else {
				out = ipn(t, hn, "route", "show", before.Subnet.Masked().String())
			}
			old := l.Topology().HostAddr(3).String() + " "
			if !strings.Contains(out, newAddr.String()) || strings.Contains(out, "dst "+old) || strings.Contains(out, "via "+old) {
				return fmt.Errorf("%s", out)
			}
			return nil
		})
		waitCounts(t, l, i, expected(backend, 2), 10*time.Second)
		// The lease change was programmed as a peer update, without a
		// full pass over every peer.
		if n := incremental(i); n <= updates[i] {
			t.Errorf("h%d: twill_reconcile_incremental_total %v -> %v: the change took no peer update", i, updates[i], n)
		}
	}
	requireMatrix(t, l)
}

// waitFor calls f every 100 ms until it returns nil, and fails the test
// with f's last error after d.
func waitFor(t *testing.T, what string, d time.Duration, f func() error) {
	t.Helper()
	kubelab.WaitFor(t, what, d, f, nil)
}

func iptables(t *testing.T, netns string, args ...string) string {
	t.Helper()
	out, err := lab.InNS(context.Background(), netns, "iptables", append([]string{"-w"}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// iptablesS lists a chain. iptables-nft 1.8.9 can misread a table that
// another process changes at that moment ("chain ... is incompatible"), so a
// failed read is tried again a few times.
func iptablesS(t *testing.T, netns, table, chain string) string {
	t.Helper()
	var err error
	for range 5 {
		var out string
		out, err = lab.InNS(context.Background(), netns, "iptables", "-w", "-t", table, "-S", chain)
		if err == nil {
			return out
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatal(err)
	return ""
}

// twilld --cleanup removes twill's device, routes and rules (iptables
// chains, or the nftables table), and nothing else.
func TestCleanup(t *testing.T) {
	for _, mode := range []string{"iptables", "nftables"} {
		t.Run(mode, func(t *testing.T) { testCleanup(t, mode == "nftables") })
	}
}

func testCleanup(t *testing.T, nftables bool) {
	l := newLab(t, lab.Options{Hosts: 2, PodsPerHost: 1, Backend: "vxlan", IPMasq: true, IPFamily: "dual", NFTables: nftables})
	ctx := ctxFor(t, time.Minute)
	h1 := l.Topology().HostNS(1)
	if nftables != (nftTable(t, h1) != "") || nftables == iptablesMentionsTwill(t, h1, false) {
		t.Fatalf("before the cleanup: nftables table %t, iptables chains %t; want the %s mode's only", nftTable(t, h1) != "", iptablesMentionsTwill(t, h1, false), map[bool]string{false: "iptables", true: "nftables"}[nftables])
	}
	waitCounts(t, l, 1, lab.HostCounts{Routes: 2, FDB: 2, Neigh: 2}, 10*time.Second) // one per peer and family
	if err := l.StopDaemon(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if out, err := lab.InNS(ctx, h1, l.BinDir+"/twilld", "--cleanup"); err != nil {
		t.Fatalf("twilld --cleanup: %v\n%s", err, out)
	}
	if c, err := l.Counts(ctx, 1); err != nil || c != (lab.HostCounts{}) {
		t.Fatalf("after cleanup h1 holds %+v (%v)", c, err)
	}
	if out := ipn(t, h1, "link", "show"); strings.Contains(out, "twill.") || strings.Contains(out, "twill-v6.") {
		t.Fatalf("device left:\n%s", out)
	}
	for _, tc := range [][2]string{{"nat", "POSTROUTING"}, {"filter", "FORWARD"}} {
		if out := iptables(t, h1, "-t", tc[0], "-S"); strings.Contains(out, "TWILL") {
			t.Fatalf("%s still mentions twill:\n%s", tc[0], out)
		}
		if out := ip6tablesS(t, h1, tc[0], ""); strings.Contains(out, "TWILL") {
			t.Fatalf("ip6tables %s still mentions twill:\n%s", tc[0], out)
		}
	}
	if table := nftTable(t, h1); table != "" {
		t.Fatalf("the nftables table is still there:\n%s", table)
	}
	// The pod bridge and the lease are not twilld's to remove here.
	if out := ipn(t, h1, "link", "show", "cni0"); !strings.Contains(out, "cni0") {
		t.Fatal("cleanup removed the pod bridge")
	}
	if out, err := l.Ctl(ctx, "leases", "list"); err != nil || strings.Count(out, "198.18.0.") != 2 {
		t.Fatalf("leases after cleanup: %v\n%s", err, out)
	}
}
