package e2e

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/internal/tools/testenv"
)

// etcdLeader returns which member (from 1) of the lab's cluster leads.
func etcdLeader(t *testing.T, l *lab.Lab) int {
	t.Helper()
	out, err := lab.InNS(ctxFor(t, 30*time.Second), l.Topology().UnderlayNS(), testenv.Tool(t, "etcdctl"),
		"--endpoints", l.EtcdEndpoints(), "endpoint", "status", "-w", "json")
	if err != nil {
		t.Fatalf("etcdctl endpoint status: %v\n%s", err, out)
	}
	var st []struct {
		Endpoint string
		Status   struct {
			Header struct {
				MemberID uint64 `json:"member_id"`
			} `json:"header"`
			Leader uint64 `json:"leader"`
		}
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("parse endpoint status: %v\n%s", err, out)
	}
	for _, s := range st {
		if s.Status.Leader != 0 && s.Status.Header.MemberID == s.Status.Leader {
			for k := 1; k <= l.EtcdMembers; k++ {
				if s.Endpoint == l.EtcdMemberURL(k) {
					return k
				}
			}
		}
	}
	t.Fatalf("no leader in %s", out)
	return 0
}

// Fault 2. A 3-member etcd cluster loses its leader to a crash. Every twilld
// was given all three endpoints: the datastore stays up for them, they stay
// ready, keep their leases and keep following changes (through the
// surviving members), and the pods notice nothing.
func TestEtcdMemberLoss(t *testing.T) {
	const hosts = 3
	l := newLab(t, lab.Options{Hosts: hosts, PodsPerHost: 1, Backend: "vxlan", EtcdMembers: 3, EtcdBinary: testenv.Tool(t, "etcd"),
		DaemonArgs: []string{"--resync-interval", "1s"}})
	ctx := ctxFor(t, 2*time.Minute)
	writes := map[int]map[string]float64{}
	for i := 1; i <= hosts; i++ {
		waitCounts(t, l, i, expected("vxlan", hosts-1), 10*time.Second)
	}
	waitReconciles(t, l, l.Topology().HostNumbers(), 1, 10*time.Second)
	for i := 1; i <= hosts; i++ {
		writes[i] = kernelWrites(t, l, i)
	}
	pings := crossPings(t, l, hosts)

	leader := etcdLeader(t, l)
	if err := l.KillEtcdMember(ctx, leader); err != nil {
		t.Fatal(err)
	}
	t.Logf("killed etcd member %d, the leader", leader)

	// For the next seconds (an election and the clients' failover), every
	// node stays ready and connected.
	deadline := time.Now().Add(6 * time.Second)
	samples := 0
	for time.Now().Before(deadline) {
		for i := 1; i <= hosts; i++ {
			if code, body, err := readyzOf(l, i); err != nil || code != 200 {
				t.Fatalf("h%d not ready after the member's loss: %d %q (%v)", i, code, body, err)
			}
			if up := metric(t, l.Topology().HostNS(i), "twill_datastore_up"); up != 1 {
				t.Fatalf("h%d: twill_datastore_up %v after the member's loss", i, up)
			}
		}
		samples++
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("readiness and twill_datastore_up sampled %d times on every node: always ready and up", samples)

	// The watch failed over: a new key under the prefix reaches every node.
	// It lies outside the network, so the nodes skip it (and count it).
	events := map[int]float64{}
	for i := 1; i <= hosts; i++ {
		events[i] = metric(t, l.Topology().HostNS(i), "twill_datastore_events_total")
	}
	if out, err := lab.InNS(ctx, l.Topology().UnderlayNS(), testenv.Tool(t, "etcdctl"), "--endpoints", l.EtcdEndpoints(),
		"put", "/twill.io/network/subnets/192.168.77.0-24", `{"PublicIP":"198.18.0.77","BackendType":"vxlan"}`); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	for i := 1; i <= hosts; i++ {
		hn := l.Topology().HostNS(i)
		waitFor(t, fmt.Sprintf("h%d to see the new key", i), 15*time.Second, func() error {
			ev, err := metricValue(hn, "twill_datastore_events_total")
			if err == nil && ev <= events[i] {
				err = fmt.Errorf("%v events", ev)
			}
			if sk, _ := metricValue(hn, "twill_peers_skipped"); err == nil && sk != 1 {
				err = fmt.Errorf("twill_peers_skipped %v", sk)
			}
			return err
		})
	}
	for i := 1; i <= hosts; i++ {
		hn := l.Topology().HostNS(i)
		if lost := metric(t, hn, "twill_lease_losses_total"); lost != 0 {
			t.Errorf("h%d lost its lease %v times", i, lost)
		}
		if w := kernelWrites(t, l, i); !sameWrites(w, writes[i]) {
			t.Errorf("h%d wrote to the kernel across the member's loss: %v -> %v", i, writes[i], w)
		}
		data, _ := readFile(l.DaemonLog(i))
		if strings.Contains(data, "lease lost") {
			t.Errorf("h%d's log mentions a lost lease", i)
		}
	}
	requireNoLoss(t, "etcd leader lost", pings)

	// The member comes back and rejoins; the nodes never needed it.
	if err := l.StartEtcdMember(leader); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the member to rejoin", 30*time.Second, func() error {
		_, err := lab.InNS(ctx, l.Topology().UnderlayNS(), testenv.Tool(t, "etcdctl"), "--endpoints", l.EtcdMemberURL(leader), "endpoint", "health")
		return err
	})
}
