package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/subnet"
)

// expected is what each host of a 3-host lab must hold: one entry of each
// kind per peer.
func expected(backend string, peers int) lab.HostCounts {
	if backend == "host-gw" {
		return lab.HostCounts{Routes: peers}
	}
	return lab.HostCounts{Routes: peers, FDB: peers, Neigh: peers}
}

// requireMatrix checks that every pod reaches every other pod in each
// family of the lab.
func requireMatrix(t *testing.T, l *lab.Lab) {
	t.Helper()
	for _, v6 := range l.Families() {
		m := l.Check(ctxFor(t, 2*time.Minute), v6)
		if m.Failures() > 0 {
			var b strings.Builder
			m.Print(&b)
			t.Fatalf("%d pod pairs failed over %s:\n%s", m.Failures(), subnet.FamilyName(v6), b.String())
		}
	}
}

// Pods on different hosts reach each other over both backends; each host holds
// exactly one route (and for VXLAN one FDB and one neighbour entry) per peer; a
// TCP transfer crosses hosts intact with the pod's own source address; traffic
// to an address outside the cluster network is masqueraded.
func TestCrossHostDatapath(t *testing.T) {
	for _, backend := range []string{"vxlan", "host-gw"} {
		t.Run(backend, func(t *testing.T) {
			l := newLab(t, lab.Options{Hosts: 3, PodsPerHost: 2, Backend: backend, IPMasq: true})
			for i := 1; i <= 3; i++ {
				waitCounts(t, l, i, expected(backend, 2), 10*time.Second)
			}
			requireMatrix(t, l)

			a, b := podsOn(l, 1)[0], podsOn(l, 3)[1]
			if src := tcpTransfer(t, a.NS, b.NS, b.Addr, 4<<20); src != a.Addr {
				t.Fatalf("pod to pod: the receiver saw source %s, want the pod's %s", src, a.Addr)
			}
			if src := tcpTransfer(t, a.NS, l.Topology().UnderlayNS(), lab.WorldAddr, 64<<10); src != l.Topology().HostAddr(1) {
				t.Fatalf("pod to outside: the receiver saw source %s, want h1's address %s (masquerade)", src, l.Topology().HostAddr(1))
			}
		})
	}
}
