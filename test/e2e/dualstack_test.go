package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/twillnet/twill/backend/vxlan"
	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/subnet"
	"github.com/twillnet/twill/subnet/kube"
)

// familyEntries is what `ip` shows of twill's entries of one family on a
// host: routes by twill's protocol as "dst via gw dev", and for VXLAN the
// permanent neighbours and FDB entries on the family's device.
type familyEntries struct {
	Routes, Neighs, FDB []string
}

func readFamilyEntries(t *testing.T, netns string, v6 bool) familyEntries {
	t.Helper()
	fam, dev := "-4", vxlan.DeviceName(1, false)
	if v6 {
		fam, dev = "-6", vxlan.DeviceName(1, true)
	}
	var e familyEntries
	var routes []struct {
		Dst, Gateway, Dev string
	}
	if err := json.Unmarshal([]byte(ipn(t, netns, "-j", fam, "route", "show", "proto", "116")), &routes); err != nil {
		t.Fatal(err)
	}
	for _, r := range routes {
		e.Routes = append(e.Routes, r.Dst+" via "+r.Gateway+" dev "+r.Dev)
	}
	if strings.Contains(ipn(t, netns, "link", "show"), dev+":") {
		var neighs []struct {
			Dst, Lladdr string
			State       []string
		}
		if err := json.Unmarshal([]byte(ipn(t, netns, "-j", fam, "neigh", "show", "dev", dev, "nud", "permanent")), &neighs); err != nil {
			t.Fatal(err)
		}
		for _, n := range neighs {
			e.Neighs = append(e.Neighs, n.Dst+" "+n.Lladdr)
		}
		var fdb []struct{ Mac, Dst string }
		if err := json.Unmarshal([]byte(bridgeCmd(t, netns, "-j", "fdb", "show", "dev", dev)), &fdb); err != nil {
			t.Fatal(err)
		}
		for _, f := range fdb {
			if f.Dst != "" {
				e.FDB = append(e.FDB, f.Mac+" "+f.Dst)
			}
		}
	}
	return e
}

// wantFamilyEntries is what host i must hold for its peers in one family,
// computed from the peers' env files and leases: for VXLAN a route to each
// peer subnet via its network address on the family's device, a neighbour
// entry for that address with the peer's VTEP MAC of the family, and an FDB
// entry sending that MAC to the peer's public address of the family; for
// host-gw a route via the peer's public address on eth0.
func wantFamilyEntries(t *testing.T, l *lab.Lab, i int, v6 bool) familyEntries {
	t.Helper()
	var e familyEntries
	leases := labLeases(t, l)
	for j := 1; j <= l.Hosts; j++ {
		if j == i {
			continue
		}
		env := hostEnv(t, l, j)
		sn, public := env.Subnet.Masked(), l.Topology().HostAddr(j)
		if v6 {
			sn, public = env.IPv6Subnet.Masked(), l.Topology().HostAddrV6(j)
		}
		if l.Backend == "host-gw" {
			e.Routes = append(e.Routes, fmt.Sprintf("%s via %s dev eth0", sn, public))
			continue
		}
		mac := leases[public]
		if mac == "" {
			t.Fatalf("no VTEP MAC published for %s (leases %v)", public, leases)
		}
		e.Routes = append(e.Routes, fmt.Sprintf("%s via %s dev %s", sn, sn.Addr(), vxlan.DeviceName(1, v6)))
		e.Neighs = append(e.Neighs, fmt.Sprintf("%s %s", sn.Addr(), mac))
		e.FDB = append(e.FDB, fmt.Sprintf("%s %s", mac, public))
	}
	return e
}

// annotationPrefix is the prefix of the lab's Node annotations (in the
// annotations mode).
func annotationPrefix(l *lab.Lab) string {
	if l.KubeAnnotationPrefix != "" {
		return l.KubeAnnotationPrefix
	}
	return "twill.io"
}

// subnetsPrefix is where the lab's leases are in etcd.
func subnetsPrefix(l *lab.Lab) string {
	if l.EtcdPrefix != "" {
		return strings.TrimRight(l.EtcdPrefix, "/") + "/subnets/"
	}
	return "/twill.io/network/subnets/"
}

// labLeases maps each public address of the lab's leases (etcd's, or in
// Kubernetes mode the NodeNetwork records or the Nodes' annotations, as
// the lab's mode publishes them) to the VTEP MAC published for its family.
func labLeases(t *testing.T, l *lab.Lab) map[netip.Addr]string {
	t.Helper()
	var all []subnet.LeaseAttrs
	if nodeNetworkMode(l) {
		recs, err := recordClient(t, l).List(ctxFor(t, 30*time.Second), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for i := range recs.Items {
			l, ok, err := kube.RecordToLease(&recs.Items[i])
			if err != nil || !ok {
				t.Fatalf("record %s: %v (a lease: %v)", recs.Items[i].Name, err, ok)
			}
			all = append(all, l.Attrs)
		}
	} else if l.Datastore == "kube" {
		cs, err := l.KubeClient()
		if err != nil {
			t.Fatal(err)
		}
		nodes, err := cs.CoreV1().Nodes().List(ctxFor(t, 30*time.Second), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for i := range nodes.Items {
			l, ok, err := kube.NodeToLease(&nodes.Items[i], annotationPrefix(l))
			if err != nil || !ok {
				t.Fatalf("Node %s: %v (published: %v)", nodes.Items[i].Name, err, ok)
			}
			all = append(all, l.Attrs)
		}
	} else {
		for _, kv := range strings.Split(strings.TrimSpace(labEtcdctl(t, l, "get", "--prefix", subnetsPrefix(l), "--print-value-only")), "\n") {
			if kv == "" {
				continue
			}
			a, err := subnet.ParseLeaseAttrs([]byte(kv))
			if err != nil {
				t.Fatalf("lease %q: %v", kv, err)
			}
			all = append(all, a)
		}
	}
	out := map[netip.Addr]string{}
	for _, a := range all {
		for _, fam := range []struct {
			ip   netip.Addr
			data json.RawMessage
		}{{a.PublicIP, a.BackendData}, {a.PublicIPv6, a.BackendV6Data}} {
			if d, err := vxlan.ParseData(fam.data); err == nil && fam.ip.IsValid() {
				out[fam.ip] = d.VtepMAC.String()
			}
		}
	}
	return out
}

func sameEntries(a, b familyEntries) bool {
	eq := func(x, y []string) bool {
		return slices.Equal(slices.Sorted(slices.Values(x)), slices.Sorted(slices.Values(y)))
	}
	return eq(a.Routes, b.Routes) && eq(a.Neighs, b.Neighs) && eq(a.FDB, b.FDB)
}

func waitFamilyEntries(t *testing.T, l *lab.Lab, i int, v6 bool, d time.Duration) {
	t.Helper()
	want := wantFamilyEntries(t, l, i, v6)
	var got familyEntries
	waitFor(t, fmt.Sprintf("h%d's %s entries", i, subnet.FamilyName(v6)), d, func() error {
		got = readFamilyEntries(t, l.Topology().HostNS(i), v6)
		if !sameEntries(got, want) {
			return fmt.Errorf("got %+v, want %+v", got, want)
		}
		return nil
	})
}

// Dual-stack and IPv6-only networks over both backends, on the real kernel:
// every pod reaches every other pod in each family of the network (ping);
// a TCP transfer crosses hosts intact in each family with the pod's own
// source address; each host holds exactly the entries its peers' leases
// call for in each family; IPv6 traffic leaving the cluster network is
// masqueraded to the node's IPv6 address; and v6 entries deleted by hand
// come back, counted as IPv6 repairs.
func TestDualStackDatapath(t *testing.T) {
	for _, tc := range []struct{ family, backend string }{
		{"dual", "vxlan"}, {"dual", "host-gw"}, {"ipv6", "vxlan"}, {"ipv6", "host-gw"},
	} {
		t.Run(tc.family+"/"+tc.backend, func(t *testing.T) {
			l := newLab(t, lab.Options{Hosts: 3, PodsPerHost: 2, Backend: tc.backend, IPFamily: tc.family, IPMasq: true,
				DaemonArgs: []string{"--resync-interval", "1s"}})
			for i := 1; i <= 3; i++ {
				for _, v6 := range l.Families() {
					waitFamilyEntries(t, l, i, v6, 10*time.Second)
				}
			}
			if tc.family == "ipv6" {
				if got := readFamilyEntries(t, l.Topology().HostNS(1), false); len(got.Routes)+len(got.Neighs)+len(got.FDB) != 0 {
					t.Fatalf("IPv6-only network, yet IPv4 entries: %+v", got)
				}
			}
			requireMatrix(t, l)
			// In the steady state a resync writes nothing: the kernel's form
			// of each entry (an IPv6 route's metric 1024 among them) is
			// what twill wants.
			// The kernel's own multicast neighbour entries on twill-v6.1
			// (ff02::...) are not twill's either.
			writes := func() (w [3]float64) {
				for i, kind := range []string{"route", "neigh", "fdb"} {
					w[i] = metric(t, l.Topology().HostNS(1), `twill_kernel_writes_total{family="ipv6",kind="`+kind+`"}`)
				}
				return w
			}
			before := writes()
			time.Sleep(3500 * time.Millisecond) // three resyncs
			if after := writes(); after != before {
				t.Fatalf("IPv6 route, neighbour and FDB writes went from %v to %v over three resyncs with nothing changed", before, after)
			}

			a, b := podsOn(l, 1)[0], podsOn(l, 3)[1]
			for _, v6 := range l.Families() {
				if src := tcpTransfer(t, a.NS, b.NS, b.AddrOf(v6), 2<<20); src != a.AddrOf(v6) {
					t.Fatalf("%s pod to pod: the receiver saw source %s, want the pod's %s", subnet.FamilyName(v6), src, a.AddrOf(v6))
				}
			}
			if src := tcpTransfer(t, a.NS, l.Topology().UnderlayNS(), lab.WorldAddrV6, 64<<10); src != l.Topology().HostAddrV6(1) {
				t.Fatalf("IPv6 pod to outside: the receiver saw source %s, want h1's address %s (masquerade)", src, l.Topology().HostAddrV6(1))
			}
			if rules := ip6tablesS(t, l.Topology().HostNS(1), "nat", "TWILL-POSTRTG"); !strings.Contains(rules, "! -d ff00::/8") {
				t.Fatalf("TWILL-POSTRTG in ip6tables:\n%s", rules)
			}

			// Drift of the IPv6 entries is repaired and counted as such.
			h1 := l.Topology().HostNS(1)
			peer := hostEnv(t, l, 2).IPv6Subnet.Masked()
			ipn(t, h1, "-6", "route", "del", peer.String())
			if tc.backend == "vxlan" {
				ipn(t, h1, "-6", "neigh", "del", peer.Addr().String(), "dev", vxlan.DeviceName(1, true))
			}
			waitFamilyEntries(t, l, 1, true, 10*time.Second)
			waitFor(t, "the IPv6 route repair to be counted", 5*time.Second, func() error {
				if r := metric(t, h1, `twill_repairs_total{family="ipv6",kind="route"}`); r < 1 {
					return fmt.Errorf("IPv6 route repairs = %v", r)
				}
				return nil
			})
			if tc.backend == "vxlan" {
				ipn(t, h1, "link", "del", vxlan.DeviceName(1, true))
				waitFamilyEntries(t, l, 1, true, 15*time.Second)
			}
			requireMatrix(t, l)
		})
	}
}

// ip6tablesS lists a chain of ip6tables, or the whole table when chain is "".
func ip6tablesS(t *testing.T, netns, table, chain string) string {
	t.Helper()
	args := []string{"-w", "-t", table, "-S"}
	if chain != "" {
		args = append(args, chain)
	}
	out, err := lab.InNS(ctxFor(t, 30*time.Second), netns, "ip6tables", args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// snmp6 reads one counter of /proc/net/snmp6 in a namespace.
func snmp6(t *testing.T, netns, name string) int {
	t.Helper()
	out, err := lab.InNS(ctxFor(t, 10*time.Second), netns, "cat", "/proc/net/snmp6")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == name {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	t.Fatalf("no %s in /proc/net/snmp6", name)
	return 0
}

// VXLAN over an IPv6 underlay adds 70 bytes (outer IPv6 40, UDP 8, VXLAN 8,
// inner Ethernet 14), not the 50 of IPv4: the pod MTU of an IPv6-only
// network is the underlay's minus 70. A ping of exactly the pod MTU with
// "don't fragment" crosses hosts, and its tunnel packets fill the underlay's
// 1500 bytes without being fragmented (the sending host's fragment counter
// does not move); with the pod's own limit lifted, one byte more is refused
// by the tunnel device instead of being fragmented on the underlay.
func TestIPv6UnderlayMTU(t *testing.T) {
	l := newLab(t, lab.Options{Hosts: 2, PodsPerHost: 1, Backend: "vxlan", IPFamily: "ipv6"})
	env := hostEnv(t, l, 1)
	if env.MTU != 1500-vxlan.OverheadIPv6 {
		t.Fatalf("pod MTU %d, want %d (1500 - 70)", env.MTU, 1500-vxlan.OverheadIPv6)
	}
	a, b := podsOn(l, 1)[0], podsOn(l, 2)[0]
	h1 := l.Topology().HostNS(1)
	ping := func(size int) error {
		_, err := lab.InNS(ctxFor(t, 20*time.Second), a.NS, "ping", "-6", "-c", "2", "-i", "0.3", "-W", "2", "-M", "do", "-s", strconv.Itoa(size), b.AddrV6.String())
		return err
	}
	const icmp6Headers = 40 + 8
	frags := snmp6(t, h1, "Ip6FragCreates")
	if err := ping(env.MTU - icmp6Headers); err != nil {
		t.Fatalf("a DF ping of the pod MTU (%d bytes) failed: %v", env.MTU, err)
	}
	if n := snmp6(t, h1, "Ip6FragCreates"); n != frags {
		t.Fatalf("h1 fragmented %d packets: the tunnel packets did not fit the underlay", n-frags)
	}
	// Lift the pod's own limit (its interface and the host's end of it),
	// so the next packet meets the tunnel device's MTU.
	ipn(t, a.NS, "link", "set", "eth0", "mtu", "1500")
	var veths []struct{ Ifname string }
	if err := json.Unmarshal([]byte(ipn(t, h1, "-j", "link", "show", "type", "veth")), &veths); err != nil {
		t.Fatal(err)
	}
	for _, v := range veths {
		ipn(t, h1, "link", "set", v.Ifname, "mtu", "1500")
	}
	if err := ping(env.MTU - icmp6Headers + 1); err == nil {
		t.Fatalf("a DF ping one byte over the pod MTU crossed the tunnel: the device MTU is above %d", env.MTU)
	}
	if n := snmp6(t, h1, "Ip6FragCreates"); n != frags {
		t.Fatalf("h1 fragmented %d packets", n-frags)
	}
}

// A node without an IPv6 address on its interface cannot join a network
// with IPv6: twilld stops at start with an error that names the interface
// and the family, and leases nothing.
func TestMissingIPv6AddressIsAStartError(t *testing.T) {
	c := newCluster(t, 1)
	c.setConfig(`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}`)
	h1 := c.topo.HostNS(1)
	ipn(t, h1, "-6", "addr", "flush", "dev", "eth0", "scope", "global")
	d := c.startDaemon(1)
	select {
	case <-d.done:
	case <-time.After(20 * time.Second):
		t.Fatal("twilld kept running without an IPv6 address")
	}
	log, _ := os.ReadFile(d.log)
	if !strings.Contains(string(log), "interface eth0 has no usable IPv6 address") {
		t.Fatalf("twilld's log does not say what is missing:\n%s", log)
	}
	if ls := c.leases(); len(ls) != 0 {
		t.Fatalf("leases after the failed start: %+v", ls)
	}
}
