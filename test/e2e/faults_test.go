package e2e

// Faults of real clusters, each with pods pinging across hosts through it.
// Documentation/reliability.md lists what each test proves.

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/twillnet/twill/internal/tools/lab"
)

var kernelKinds = []string{"route", "fdb", "neigh", "device"}

// kernelWrites is twill_kernel_writes_total of host i's twilld, by kind.
func kernelWrites(t *testing.T, l *lab.Lab, i int) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	for _, k := range kernelKinds {
		out[k] = metric(t, l.Topology().HostNS(i), `twill_kernel_writes_total{family="ipv4",kind="`+k+`"}`)
	}
	return out
}

func sameWrites(a, b map[string]float64) bool {
	for _, k := range kernelKinds {
		if a[k] != b[k] {
			return false
		}
	}
	return true
}

// readyzOf returns host i's /readyz status and body.
func readyzOf(l *lab.Lab, i int) (int, string, error) {
	return httpGetInNS(l.Topology().HostNS(i), 9867, "/readyz")
}

// waitReconciles waits until each of the hosts has done n more good passes
// than it had when the call began: whatever a pass would change has been
// changed.
func waitReconciles(t *testing.T, l *lab.Lab, hosts []int, n float64, d time.Duration) {
	t.Helper()
	start := map[int]float64{}
	for _, i := range hosts {
		start[i], _ = metricValue(l.Topology().HostNS(i), `twill_reconcile_total{result="ok"}`)
	}
	waitFor(t, fmt.Sprintf("hosts %v to reconcile %v more times", hosts, n), d, func() error {
		for _, i := range hosts {
			v, err := metricValue(l.Topology().HostNS(i), `twill_reconcile_total{result="ok"}`)
			if err == nil && v < start[i]+n {
				err = fmt.Errorf("h%d: %v passes", i, v-start[i])
			}
			if err != nil {
				return err
			}
		}
		return nil
	})
}

// leaseOf returns the lease (from twillctl) carrying public IP ip.
func leaseOf(t *testing.T, l *lab.Lab, ip netip.Addr) (leaseJSON, bool) {
	t.Helper()
	out, err := l.Ctl(ctxFor(t, 30*time.Second), "leases", "list", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var ls []leaseJSON
	if err := json.Unmarshal([]byte(out), &ls); err != nil {
		t.Fatalf("parse leases: %v\n%s", err, out)
	}
	for _, x := range ls {
		if x.PublicIP == ip.String() {
			return x, true
		}
	}
	return leaseJSON{}, false
}

// crossPings starts a pinger from each host's first pod to the first pod of
// the next host, so that every host's datapath carries traffic both ways.
func crossPings(t *testing.T, l *lab.Lab, hosts int) []*pinger {
	t.Helper()
	var ps []*pinger
	for i := 1; i <= hosts; i++ {
		from, to := podsOn(l, i)[0], podsOn(l, i%hosts+1)[0]
		ps = append(ps, startPing(t, from.NS, to.Addr, 100*time.Millisecond))
	}
	return ps
}

// requireNoLoss stops the pingers and fails the test if one request went
// unanswered; the figures go to the test log either way.
func requireNoLoss(t *testing.T, what string, ps []*pinger) {
	t.Helper()
	for _, p := range ps {
		p.halt()
	}
	for _, p := range ps {
		st := p.finish()
		t.Logf("%s: pings to %s: %s", what, p.to, st)
		if st.Lost > 0 {
			t.Errorf("%s: %d of %d pings to %s lost", what, st.Lost, st.Sent, p.to)
		}
	}
}

// etcdOutage is how long TestEtcdOutage keeps etcd stopped: 60s by default,
// which spans several resync passes and gRPC reconnect attempts; the
// guarantee does not depend on the length as long as it is shorter than the
// lease TTL. TWILL_ETCD_OUTAGE=15s gives a quicker run while working on it.
func etcdOutage(t *testing.T) time.Duration {
	if s := os.Getenv("TWILL_ETCD_OUTAGE"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			t.Fatalf("TWILL_ETCD_OUTAGE: %v", err)
		}
		return d
	}
	return 60 * time.Second
}

// Fault 1. etcd stops: the pods keep talking, a pod can still be added, and
// every node says on /readyz and twill_datastore_up that the datastore is
// unreachable. When etcd is back the nodes are ready again with the same
// subnets, and nothing in the kernel was rewritten.
func TestEtcdOutage(t *testing.T) {
	const hosts = 3
	outage := etcdOutage(t)
	l := newLab(t, lab.Options{Hosts: hosts, PodsPerHost: 1, Backend: "vxlan", DaemonArgs: []string{"--resync-interval", "2s"}})
	ctx := ctxFor(t, outage+3*time.Minute)
	envs := map[int]any{}
	writes := map[int]map[string]float64{}
	for i := 1; i <= hosts; i++ {
		waitCounts(t, l, i, expected("vxlan", hosts-1), 10*time.Second)
	}
	waitReconciles(t, l, l.Topology().HostNumbers(), 1, 10*time.Second)
	for i := 1; i <= hosts; i++ {
		envs[i] = hostEnv(t, l, i)
		writes[i] = kernelWrites(t, l, i)
	}
	pings := crossPings(t, l, hosts)

	began := time.Now()
	if err := l.StopEtcd(ctx); err != nil {
		t.Fatal(err)
	}
	// etcd's graceful stop keeps existing streams open for a few seconds.
	stopped := time.Now()
	t.Logf("etcd exited %s after SIGTERM", stopped.Sub(began).Round(100*time.Millisecond))
	for i := 1; i <= hosts; i++ {
		hn := l.Topology().HostNS(i)
		waitFor(t, fmt.Sprintf("h%d to report the datastore unreachable", i), 15*time.Second, func() error {
			if up, err := metricValue(hn, "twill_datastore_up"); err != nil || up != 0 {
				return fmt.Errorf("twill_datastore_up %v (%v)", up, err)
			}
			code, body, err := readyzOf(l, i)
			if err != nil || code != 503 || !strings.Contains(body, "datastore unreachable") {
				return fmt.Errorf("readyz %d %q (%v)", code, body, err)
			}
			return nil
		})
	}
	t.Logf("every node reported the outage %s after etcd exited", time.Since(stopped).Round(100*time.Millisecond))

	// The CNI plugin needs only the env file: a pod added now gets an address
	// and reaches a pod on another host.
	p, err := l.AddPod(ctx, 2, "h2-outage")
	if err != nil {
		t.Fatalf("add a pod during the outage: %v", err)
	}
	if !lab.Ping(ctx, podsOn(l, 1)[0].NS, p.Addr.String()) {
		t.Fatalf("h1's pod cannot reach %s, added during the outage", p.Addr)
	}

	time.Sleep(time.Until(stopped.Add(outage))) // the fault itself, not a wait for a condition
	for i := 1; i <= hosts; i++ {
		if _, err := l.DaemonPID(i); err != nil {
			t.Fatalf("h%d: %v", i, err)
		}
		if code, body, err := readyzOf(l, i); err != nil || code != 503 {
			t.Fatalf("h%d at the end of the outage: readyz %d %q (%v)", i, code, body, err)
		}
	}
	back := time.Now()
	if err := l.StartEtcd(ctx); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= hosts; i++ {
		waitFor(t, fmt.Sprintf("h%d to be ready again", i), 30*time.Second, func() error {
			code, body, err := readyzOf(l, i)
			if err != nil || code != 200 {
				return fmt.Errorf("readyz %d %q (%v)", code, body, err)
			}
			if up, err := metricValue(l.Topology().HostNS(i), "twill_datastore_up"); err != nil || up != 1 {
				return fmt.Errorf("twill_datastore_up %v (%v)", up, err)
			}
			return nil
		})
	}
	t.Logf("every node ready %s after etcd was back (outage %s)", time.Since(back).Round(100*time.Millisecond), outage)

	waitReconciles(t, l, l.Topology().HostNumbers(), 2, 15*time.Second)
	for i := 1; i <= hosts; i++ {
		if env := hostEnv(t, l, i); env != envs[i] {
			t.Errorf("h%d's env changed: %+v -> %+v", i, envs[i], env)
		}
		if w := kernelWrites(t, l, i); !sameWrites(w, writes[i]) {
			t.Errorf("h%d wrote to the kernel across the outage: %v -> %v", i, writes[i], w)
		}
		if lost := metric(t, l.Topology().HostNS(i), "twill_lease_losses_total"); lost != 0 {
			t.Errorf("h%d lost its lease %v times", i, lost)
		}
		if _, ok := leaseOf(t, l, l.Topology().HostAddr(i)); !ok {
			t.Errorf("h%d's lease is gone", i)
		}
	}
	requireNoLoss(t, "etcd outage", pings)
	requireMatrix(t, l)
}

// Fault 3. twilld is SIGKILLed and started again: same subnet, the peers
// notice nothing, and the new twilld finds everything in place and writes
// no kernel entry, so no pod packet is lost.
func TestDaemonKilledAndRestarted(t *testing.T) {
	const hosts = 3
	l := newLab(t, lab.Options{Hosts: hosts, PodsPerHost: 1, Backend: "vxlan", IPMasq: true, DaemonArgs: []string{"--resync-interval", "1s"}})
	ctx := ctxFor(t, 2*time.Minute)
	for i := 1; i <= hosts; i++ {
		waitCounts(t, l, i, expected("vxlan", hosts-1), 10*time.Second)
	}
	env := hostEnv(t, l, 1)
	peerWrites := map[int]map[string]float64{2: kernelWrites(t, l, 2), 3: kernelWrites(t, l, 3)}
	pings := crossPings(t, l, hosts)
	// A rule that is deleted and added again starts counting from zero.
	fwdBefore := chainPackets(t, l.Topology().HostNS(1), "filter", "TWILL-FWD")

	if err := l.KillDaemon(ctx, 1); err != nil {
		t.Fatal(err)
	}
	// Down for a few of the peers' resync passes, as under a service
	// manager's restart delay.
	waitReconciles(t, l, []int{2}, 3, 10*time.Second)
	if err := l.StartDaemon(1); err != nil {
		t.Fatal(err)
	}
	waitReconciles(t, l, []int{1}, 2, 20*time.Second)
	if again := hostEnv(t, l, 1); again != env {
		t.Fatalf("h1's env after the restart %+v, before %+v", again, env)
	}
	if w := kernelWrites(t, l, 1); !sameWrites(w, map[string]float64{}) {
		t.Errorf("the restarted twilld wrote kernel entries: %v; want none", w)
	}
	if after := chainPackets(t, l.Topology().HostNS(1), "filter", "TWILL-FWD"); after < fwdBefore || fwdBefore == 0 {
		t.Errorf("TWILL-FWD counted %d packets before the restart, %d after: its rules were replaced", fwdBefore, after)
	}
	for i, before := range peerWrites {
		if w := kernelWrites(t, l, i); !sameWrites(w, before) {
			t.Errorf("h%d rewrote entries while h1 restarted: %v -> %v", i, before, w)
		}
	}
	if x, ok := leaseOf(t, l, l.Topology().HostAddr(1)); !ok || x.Subnet != env.Subnet.Masked().String() {
		t.Errorf("h1's lease after the restart: %+v", x)
	}
	requireNoLoss(t, "twilld SIGKILL and restart", pings)
}

// Fault 5. An operator deletes a live node's lease: the node takes the same
// subnet again without restarting and the peers follow. Peers drop the node
// until its new lease arrives, so pod traffic to it has a short gap, which
// is measured and bounded.
func TestLiveLeaseDeleted(t *testing.T) {
	const hosts = 3
	l := newLab(t, lab.Options{Hosts: hosts, PodsPerHost: 1, Backend: "vxlan", DaemonArgs: []string{"--resync-interval", "1s"}})
	ctx := ctxFor(t, 2*time.Minute)
	for i := 1; i <= hosts; i++ {
		waitCounts(t, l, i, expected("vxlan", hosts-1), 10*time.Second)
	}
	env := hostEnv(t, l, 1)
	pid, err := l.DaemonPID(1)
	if err != nil {
		t.Fatal(err)
	}
	ping := startPing(t, podsOn(l, 2)[0].NS, podsOn(l, 1)[0].Addr, 20*time.Millisecond)

	if _, err := l.Ctl(ctx, "leases", "delete", env.Subnet.Masked().String()); err != nil {
		t.Fatal(err)
	}
	h1 := l.Topology().HostNS(1)
	waitFor(t, "h1 to take its subnet again", 15*time.Second, func() error {
		x, ok := leaseOf(t, l, l.Topology().HostAddr(1))
		if !ok || x.Subnet != env.Subnet.Masked().String() || x.NodeName != "h1" {
			return fmt.Errorf("h1's lease: %+v (present %v)", x, ok)
		}
		if lost, err := metricValue(h1, "twill_lease_losses_total"); err != nil || lost != 1 {
			return fmt.Errorf("twill_lease_losses_total %v (%v)", lost, err)
		}
		return nil
	})
	for i := 2; i <= hosts; i++ {
		waitCounts(t, l, i, expected("vxlan", hosts-1), 10*time.Second)
	}
	requireMatrix(t, l)
	st := ping.finish()
	t.Logf("pings from h2's pod to h1's pod across the deletion: %s", st)
	if st.Outage > 5*time.Second {
		t.Errorf("h1's pod was unreachable for %s after its lease was deleted", st.Outage)
	}
	if again, err := l.DaemonPID(1); err != nil || again != pid {
		t.Errorf("h1's twilld is pid %d (%v), was %d: it restarted", again, err, pid)
	}
	if again := hostEnv(t, l, 1); again != env {
		t.Errorf("h1's env changed: %+v -> %+v", env, again)
	}
	if a := metric(t, h1, "twill_lease_acquisitions_total"); a != 2 {
		t.Errorf("twill_lease_acquisitions_total = %v, want 2", a)
	}
}

// Fault 4. A node dies (twilld killed, the machine gone) and its lease
// expires: every peer removes its entries, and its subnet goes to a new
// node. The network has exactly one subnet per host, so the new node can
// only get the dead one's.
func TestDeadNodeLeaseExpires(t *testing.T) {
	const hosts = 3 // the /22 hands out three /24s: its first is not handed out
	l := newLab(t, lab.Options{Hosts: hosts, PodsPerHost: 1, Backend: "vxlan", Network: netip.MustParsePrefix("10.244.0.0/22"),
		DaemonArgs: []string{"--resync-interval", "1s"}})
	ctx := ctxFor(t, 2*time.Minute)
	// The last host runs with a short TTL; its lease is taken over with it on restart.
	if err := l.StopDaemon(ctx, hosts); err != nil {
		t.Fatal(err)
	}
	if err := l.StartDaemon(hosts, "--lease-ttl", "3s"); err != nil {
		t.Fatal(err)
	}
	old := hostEnv(t, l, hosts).Subnet.Masked()
	waitFor(t, "the last host's lease to carry the short TTL", 15*time.Second, func() error {
		x, ok := leaseOf(t, l, l.Topology().HostAddr(hosts))
		if !ok || x.TTLSeconds > 3 {
			return fmt.Errorf("the last host's lease: %+v", x)
		}
		return nil
	})
	for i := 1; i <= hosts; i++ {
		waitCounts(t, l, i, expected("vxlan", hosts-1), 10*time.Second)
	}

	if err := l.KillDaemon(ctx, hosts); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	for i := 1; i < hosts; i++ {
		waitCounts(t, l, i, expected("vxlan", hosts-2), 15*time.Second)
	}
	t.Logf("every peer removed the dead node's entries %s after it died (TTL 3s)", time.Since(killed).Round(100*time.Millisecond))
	if _, ok := leaseOf(t, l, l.Topology().HostAddr(hosts)); ok {
		t.Fatal("the dead node's lease is still there")
	}

	// A new machine in its place: another address and name, no env file.
	last := l.Topology().HostNS(hosts)
	newAddr := netip.MustParseAddr("198.18.0.103")
	ipn(t, last, "addr", "del", netip.PrefixFrom(l.Topology().HostAddr(hosts), 24).String(), "dev", "eth0")
	ipn(t, last, "addr", "add", netip.PrefixFrom(newAddr, 24).String(), "dev", "eth0")
	ipn(t, last, "route", "replace", "default", "via", lab.WorldAddr.String())
	removeFile(t, l.EnvFile(hosts))
	if err := l.StartDaemon(hosts, "--node-name", "h3-new"); err != nil {
		t.Fatal(err)
	}
	if got := hostEnv(t, l, hosts).Subnet.Masked(); got != old {
		t.Fatalf("the new node got %s, want the dead node's %s", got, old)
	}
	if x, ok := leaseOf(t, l, newAddr); !ok || x.NodeName != "h3-new" || x.Subnet != old.String() {
		t.Fatalf("the new node's lease: %+v", x)
	}
	for i := 1; i <= hosts; i++ {
		waitCounts(t, l, i, expected("vxlan", hosts-1), 15*time.Second)
	}
	// The old pod's address is in the subnet, on the same bridge: it is
	// reachable through the new node.
	requireMatrix(t, l)
}

// Fault 10. A second twilld started with a public IP another node's lease
// carries: it exits with an error saying so, and the first node's lease is
// not touched, then or later.
func TestSamePublicIPIsRefused(t *testing.T) {
	c := newCluster(t, 2)
	c.setConfig(allocConf)
	c.startDaemon(1, "--lease-ttl", "1m")
	e1 := c.waitEnv(1)
	before := c.leases()
	d2 := c.startDaemon(2, "--lease-ttl", "1m", "--public-ip", "198.18.0.1")
	select {
	case <-d2.done:
	case <-time.After(30 * time.Second):
		t.Fatal("the second twilld with h1's public IP did not exit")
	}
	if d2.err == nil {
		t.Fatal("the second twilld exited with status 0")
	}
	log, _ := os.ReadFile(d2.log)
	for _, want := range []string{"public IP already in use by another node", `198.18.0.1 is leased to node "h1"`, "--public-ip"} {
		if !strings.Contains(string(log), want) {
			t.Errorf("h2's log lacks %q:\n%s", want, tail(string(log), 10))
		}
	}
	// Nothing fights: h1 keeps its lease and its etcd lease.
	for range 3 {
		after := c.leases()
		if len(after) != 1 || after[0].Subnet != before[0].Subnet || after[0].NodeName != "h1" {
			t.Fatalf("leases after the refusal: %+v, before %+v", after, before)
		}
		time.Sleep(time.Second)
	}
	if again := c.waitEnv(1); again != e1 {
		t.Fatalf("h1's env changed: %+v -> %+v", e1, again)
	}
	if v := metric(t, c.topo.HostNS(1), "twill_lease_losses_total"); v != 0 {
		t.Fatalf("h1 lost its lease %v times", v)
	}
}

func readFile(path string) (string, error) {
	b, err := os.ReadFile(path)
	return string(b), err
}

// chainPackets sums the packet counters of a chain's rules.
func chainPackets(t *testing.T, netns, table, chain string) int {
	t.Helper()
	out := iptables(t, netns, "-t", table, "-L", chain, "-v", "-x", "-n")
	total := 0
	for _, line := range strings.Split(out, "\n")[2:] {
		var n int
		if _, err := fmt.Sscan(line, &n); err == nil {
			total += n
		}
	}
	return total
}
