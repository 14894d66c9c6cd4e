package e2e

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/internal/tools/testenv"
	"github.com/twillnet/twill/subnet"
)

// labEtcdctl runs the real etcdctl against the lab's etcd.
func labEtcdctl(t *testing.T, l *lab.Lab, args ...string) string {
	t.Helper()
	out, err := lab.InNS(ctxFor(t, 30*time.Second), l.Topology().UnderlayNS(), testenv.Tool(t, "etcdctl"),
		append([]string{"--endpoints", l.EtcdEndpoints()}, args...)...)
	if err != nil {
		t.Fatalf("etcdctl %s: %v\n%s", strings.Join(args, " ")[:min(80, len(strings.Join(args, " ")))], err, out)
	}
	return out
}

// freeSubnets returns n /24s of 10.244.0.0/16 that no host of l holds.
func freeSubnets(t *testing.T, l *lab.Lab, n int) []netip.Prefix {
	t.Helper()
	held := map[netip.Prefix]bool{}
	for i := 1; i <= l.Hosts; i++ {
		held[hostEnv(t, l, i).Subnet.Masked()] = true
	}
	var out []netip.Prefix
	for k := 254; len(out) < n; k-- {
		if p := netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", k)); !held[p] {
			out = append(out, p)
		}
	}
	return out
}

// Whatever is written under the prefix, by a careless operator, another
// program or an attacker who got write access: values that are not leases
// are skipped at decoding, leases that would take traffic they have no claim
// on are skipped before the backend sees them, each with a warning, and the
// nodes go on serving their pods, whether the keys arrive by the watch or
// are there when twilld starts.
func TestBadLeasesAreSkipped(t *testing.T) {
	l := newLab(t, lab.Options{Hosts: 2, PodsPerHost: 1, Backend: "vxlan",
		DaemonArgs: []string{"--resync-interval", "1s", "--public-ip-cidr", "198.18.0.0/25"}})
	for i := 1; i <= 2; i++ {
		waitCounts(t, l, i, expected("vxlan", 1), 10*time.Second)
	}
	h2 := hostEnv(t, l, 2).Subnet.Masked()
	free := freeSubnets(t, l, 6)
	key := func(p netip.Prefix) string { return "/twill.io/network/subnets/" + subnet.KeyName(p) }
	lease := func(ip string) string {
		return fmt.Sprintf(`{"PublicIP":%q,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:99"},"NodeName":"intruder"}`, ip)
	}
	// A pod on h2 in the lower half of its subnet: the /25 below would take
	// its traffic by longest prefix match if it were programmed.
	target := podsOn(l, 2)[0]
	if !netip.PrefixFrom(h2.Addr(), 25).Contains(target.Addr) {
		t.Fatalf("h2's pod %s is not in the lower half of %s", target.Addr, h2)
	}
	ping := startPing(t, podsOn(l, 1)[0].NS, target.Addr, 50*time.Millisecond)

	malformed := map[string]string{ // key -> value: refused when decoded
		"/twill.io/network/subnets/not-a-subnet":  lease("198.18.0.9"),
		"/twill.io/network/subnets/10.244.3.7-24": lease("198.18.0.9"), // host bits
		key(free[0]): "{garbage",
		key(free[1]): `{"PublicIP":"198.18.0.9"}`,
		key(free[2]): `{"PublicIP":"127.0.0.1","BackendType":"vxlan"}`,
		key(free[3]): `{"PublicIP":"198.18.0.9","BackendType":"vxlan","NodeName":"` + strings.Repeat("x", subnet.MaxLeaseValueSize) + `"}`,
	}
	rogue := map[string]string{ // well-formed leases that must not be programmed
		key(netip.MustParsePrefix("192.168.9.0/24")):  lease("198.18.0.9"),  // outside the network
		key(netip.PrefixFrom(h2.Addr(), 25)):          lease("198.18.0.99"), // inside h2's subnet, written later
		key(netip.PrefixFrom(h2.Addr(), 23).Masked()): lease("198.18.0.98"), // around h2's subnet
		key(free[4]): lease("198.18.0.200"), // public IP outside --public-ip-cidr
	}
	for k, v := range malformed {
		labEtcdctl(t, l, "put", k, v)
	}
	for k, v := range rogue {
		labEtcdctl(t, l, "put", k, v)
	}

	check := func(when string) {
		t.Helper()
		for i := 1; i <= 2; i++ {
			hn := l.Topology().HostNS(i)
			waitFor(t, fmt.Sprintf("h%d to skip the rogue leases (%s)", i, when), 15*time.Second, func() error {
				if v, err := metricValue(hn, "twill_peers_skipped"); err != nil || v != float64(len(rogue)) {
					return fmt.Errorf("twill_peers_skipped %v (%v)", v, err)
				}
				return nil
			})
			waitReconciles(t, l, []int{i}, 2, 10*time.Second)
			waitCounts(t, l, i, expected("vxlan", 1), 5*time.Second)
			if e := metric(t, hn, `twill_reconcile_total{result="error"}`); e != 0 {
				t.Errorf("h%d (%s): %v failed reconcile passes", i, when, e)
			}
			if code, body, err := readyzOf(l, i); err != nil || code != 200 {
				t.Errorf("h%d (%s): readyz %d %q (%v)", i, when, code, body, err)
			}
			if out := ipn(t, hn, "route", "show", "proto", "116"); strings.Contains(out, "192.168.9.0") || strings.Contains(out, "/25") || strings.Contains(out, "/23") {
				t.Errorf("h%d (%s) programmed a rogue route:\n%s", i, when, out)
			}
		}
		requireMatrix(t, l)
	}
	check("arriving by the watch")

	// Each was logged as skipped, with why.
	log, _ := readFile(l.DaemonLog(1))
	for _, want := range []string{"skipping malformed lease", "not-a-subnet", "has host bits", "not valid JSON", "no BackendType",
		"127.0.0.1 is not a unicast address", "more than the 65536 allowed",
		"is outside the network 10.244.0.0/16", "claimed first", "outside the allowed"} {
		if !strings.Contains(log, want) {
			t.Errorf("h1's log does not say %q", want)
		}
	}

	// A twilld starting with all of it in etcd lists it: same outcome.
	ctx := ctxFor(t, time.Minute)
	if err := l.StopDaemon(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if err := l.StartDaemon(1); err != nil {
		t.Fatal(err)
	}
	check("listed at start")
	st := ping.finish()
	t.Logf("pings from h1's pod to h2's pod %s while the rogue keys were written and h1 restarted: %s", target.Addr, st)
	if st.Lost > 0 {
		t.Errorf("%d pings lost", st.Lost)
	}
}
