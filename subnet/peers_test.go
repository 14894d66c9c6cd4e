package subnet

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func lease(sn, ip string, claimed int64) Lease {
	return Lease{Subnet: netip.MustParsePrefix(sn), Attrs: LeaseAttrs{PublicIP: netip.MustParseAddr(ip), BackendType: BackendVXLAN}, Claimed: claimed}
}

func TestFilterPeers(t *testing.T) {
	network := netip.MustParsePrefix("10.244.0.0/16")
	own := lease("10.244.1.0/24", "198.18.0.1", 5)
	cases := []struct {
		name      string
		allow     []string
		peers     []Lease
		kept      []string          // subnets
		skipped   map[string]string // subnet -> part of the reason
		skipCount int
	}{
		{
			name:  "well-behaved peers",
			peers: []Lease{lease("10.244.3.0/24", "198.18.0.3", 9), lease("10.244.2.0/24", "198.18.0.2", 7)},
			kept:  []string{"10.244.2.0/24", "10.244.3.0/24"},
		},
		{
			name: "outside the network",
			peers: []Lease{lease("10.245.0.0/24", "198.18.0.2", 7), lease("0.0.0.0/0", "198.18.0.3", 8),
				lease("10.244.0.0/16", "198.18.0.4", 9), lease("10.0.0.0/8", "198.18.0.5", 10), lease("10.244.4.0/24", "198.18.0.6", 11)},
			kept: []string{"10.244.4.0/24"},
			skipped: map[string]string{"10.245.0.0/24": "outside the network", "0.0.0.0/0": "outside the network",
				"10.244.0.0/16": "outside the network", "10.0.0.0/8": "outside the network"},
		},
		{
			name:    "overlapping the own subnet",
			peers:   []Lease{lease("10.244.1.128/25", "198.18.0.9", 1), lease("10.244.0.0/23", "198.18.0.8", 2)},
			skipped: map[string]string{"10.244.1.128/25": "overlaps this node's subnet", "10.244.0.0/23": "overlaps this node's subnet"},
		},
		{
			name: "a later, narrower claim on a peer's addresses",
			// The /25 would win by longest prefix match if it were programmed.
			peers:   []Lease{lease("10.244.2.0/25", "198.18.0.99", 20), lease("10.244.2.0/24", "198.18.0.2", 7)},
			kept:    []string{"10.244.2.0/24"},
			skipped: map[string]string{"10.244.2.0/25": "overlaps 10.244.2.0/24, claimed first"},
		},
		{
			name:    "a later, wider claim",
			peers:   []Lease{lease("10.244.2.0/24", "198.18.0.2", 7), lease("10.244.2.0/23", "198.18.0.99", 20), lease("10.244.8.0/22", "198.18.0.98", 21), lease("10.244.9.0/24", "198.18.0.9", 8)},
			kept:    []string{"10.244.2.0/24", "10.244.9.0/24"},
			skipped: map[string]string{"10.244.2.0/23": "claimed first", "10.244.8.0/22": "overlaps 10.244.9.0/24"},
		},
		{
			name:    "unknown order: lower address, then shorter prefix wins",
			peers:   []Lease{lease("10.244.2.128/25", "198.18.0.3", 0), lease("10.244.2.0/24", "198.18.0.2", 0)},
			kept:    []string{"10.244.2.0/24"},
			skipped: map[string]string{"10.244.2.128/25": "overlaps 10.244.2.0/24"},
		},
		{
			name:    "a known claim is earlier than an unknown one",
			peers:   []Lease{lease("10.244.2.0/24", "198.18.0.2", 0), lease("10.244.2.0/25", "198.18.0.3", 30)},
			kept:    []string{"10.244.2.0/25"},
			skipped: map[string]string{"10.244.2.0/24": "overlaps 10.244.2.0/25"},
		},
		{
			name:    "the own public IP",
			peers:   []Lease{lease("10.244.2.0/24", "198.18.0.1", 7)},
			skipped: map[string]string{"10.244.2.0/24": "this node's own"},
		},
		{
			name:    "public IP allow-list",
			allow:   []string{"198.18.0.0/28", "192.0.2.0/24"},
			peers:   []Lease{lease("10.244.2.0/24", "198.18.0.2", 7), lease("10.244.3.0/24", "198.18.0.200", 8), lease("10.244.4.0/24", "192.0.2.7", 9)},
			kept:    []string{"10.244.2.0/24", "10.244.4.0/24"},
			skipped: map[string]string{"10.244.3.0/24": "outside the allowed"},
		},
		{
			name:      "host bits and IPv6",
			peers:     []Lease{{Subnet: netip.MustParsePrefix("10.244.2.1/24")}, {Subnet: netip.MustParsePrefix("fd00::/64")}, {}},
			skipCount: 3,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := PeerPolicy{Network: network}
			for _, a := range tc.allow {
				p.PublicIPs = append(p.PublicIPs, netip.MustParsePrefix(a))
			}
			kept, skipped := FilterPeers(p, own, tc.peers)
			var got []string
			for _, l := range kept {
				got = append(got, l.Subnet.String())
			}
			if !slices.Equal(got, tc.kept) {
				t.Errorf("kept %v, want %v", got, tc.kept)
			}
			want := len(tc.skipped)
			if tc.skipCount > 0 {
				want = tc.skipCount
			}
			if len(skipped) != want || len(kept)+len(skipped) != len(tc.peers) {
				t.Errorf("skipped %+v, want %d", skipped, want)
			}
			for _, s := range skipped {
				if frag, ok := tc.skipped[s.Lease.Subnet.String()]; ok && !strings.Contains(s.Reason, frag) {
					t.Errorf("%s skipped for %q, want it to say %q", s.Lease.Subnet, s.Reason, frag)
				} else if !ok && tc.skipped != nil {
					t.Errorf("%s skipped unexpectedly: %s", s.Lease.Subnet, s.Reason)
				}
			}
		})
	}
}

// The filter's answer does not depend on the order the datastore lists the
// leases in, and nothing it keeps overlaps anything else it keeps.
func TestFilterPeersOrderIndependent(t *testing.T) {
	network := netip.MustParsePrefix("10.0.0.0/8")
	own := lease("10.0.0.0/24", "198.18.0.1", 1)
	var peers []Lease
	for i := range 200 {
		bits := 22 + i%5
		addr := netip.AddrFrom4([4]byte{10, byte(i % 7), byte(i * 37 % 256), 0})
		peers = append(peers, lease(netip.PrefixFrom(addr, bits).Masked().String(), fmt.Sprintf("198.18.%d.%d", i/200, i%200+2), int64(i%50)))
	}
	want, _ := FilterPeers(PeerPolicy{Network: network}, own, peers)
	for i := range want {
		for j := range i {
			if want[i].Subnet.Overlaps(want[j].Subnet) {
				t.Fatalf("kept overlapping %s and %s", want[i].Subnet, want[j].Subnet)
			}
		}
	}
	slices.Reverse(peers)
	got, _ := FilterPeers(PeerPolicy{Network: network}, own, peers)
	if len(got) != len(want) {
		t.Fatalf("reversed input kept %d leases, forward %d", len(got), len(want))
	}
	for i := range got {
		if got[i].Subnet != want[i].Subnet || got[i].Attrs.PublicIP != want[i].Attrs.PublicIP {
			t.Fatalf("reversed input kept %s (%s), forward %s (%s)", got[i].Subnet, got[i].Attrs.PublicIP, want[i].Subnet, want[i].Attrs.PublicIP)
		}
	}
}

func BenchmarkFilterPeers(b *testing.B) {
	network := netip.MustParsePrefix("10.0.0.0/8")
	own := lease("10.0.0.0/24", "198.18.0.1", 1)
	var peers []Lease
	for i := 1; i <= 5000; i++ {
		peers = append(peers, lease(netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0}), 24).String(), "198.19.0.1", int64(i)))
	}
	for b.Loop() {
		FilterPeers(PeerPolicy{Network: network}, own, peers)
	}
}

// PeerFilter, fed one change at a time, admits a lease exactly when
// FilterPeers over the whole new set would skip nothing.
func TestPeerFilterAgreesWithFilterPeers(t *testing.T) {
	policy := PeerPolicy{Network: netip.MustParsePrefix("10.244.0.0/16"), PublicIPs: []netip.Prefix{netip.MustParsePrefix("198.18.0.0/16")}}
	own := lease("10.244.1.0/24", "198.18.0.1", 1)
	rng := uint64(1)
	next := func(n int) int { // xorshift: fixed, so a failure reproduces
		rng ^= rng << 13
		rng ^= rng >> 7
		rng ^= rng << 17
		return int(rng % uint64(n))
	}
	candidate := func() Lease {
		sn := fmt.Sprintf("10.244.%d.0/24", next(40))
		switch next(10) {
		case 0:
			sn = fmt.Sprintf("10.244.%d.0/23", 2*next(20)) // may overlap two /24s
		case 1:
			sn = "10.245.0.0/24" // outside the network
		}
		ip := fmt.Sprintf("198.18.%d.%d", next(3), 2+next(200))
		switch next(12) {
		case 0:
			ip = "198.18.0.1" // the own public IP
		case 1:
			ip = "203.0.113.7" // not allowed
		}
		return lease(sn, ip, int64(next(1000)))
	}
	current := map[netip.Prefix]Lease{}
	var f *PeerFilter
	agreed, admitted := 0, 0
	for step := 0; step < 3000; step++ {
		if f == nil {
			all := slices.Collect(maps.Values(current))
			kept, skipped := FilterPeers(policy, own, all)
			if len(skipped) > 0 {
				// Start over from a clean set, as the daemon's full pass would.
				clear(current)
				continue
			}
			f = NewPeerFilter(policy, own, kept)
		}
		var changed Lease
		var removed bool
		if len(current) > 0 && next(3) == 0 {
			keys := slices.SortedFunc(maps.Keys(current), ComparePrefix)
			changed, removed = current[keys[next(len(keys))]], true
		} else {
			changed = candidate()
		}
		after := maps.Clone(current)
		if removed {
			delete(after, changed.Subnet)
			f.Drop(changed.Subnet)
		} else {
			after[changed.Subnet] = changed
			f.Drop(changed.Subnet)
		}
		_, skipped := FilterPeers(policy, own, slices.Collect(maps.Values(after)))
		ok := true
		if !removed {
			ok = f.Admit(changed) == ""
		}
		if ok != (len(skipped) == 0) {
			t.Fatalf("step %d: %v (removed %t): PeerFilter admits %t, FilterPeers skips %v", step, changed.Subnet, removed, ok, skipped)
		}
		agreed++
		current = after
		if !ok {
			f = nil // the daemon runs the full pass
			continue
		}
		admitted++
	}
	t.Logf("%d changes admitted, %d refused", admitted, agreed-admitted)
	if admitted < 500 || agreed-admitted < 100 {
		t.Fatalf("the walk tested too little: %d steps admitted, %d refused", admitted, agreed-admitted)
	}
}
