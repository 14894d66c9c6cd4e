package subnet

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
)

// PeerPolicy says which peer leases a node programs. Whoever can write to the
// datastore can write any lease, and a lease is a route: a bogus one would
// redirect pod traffic. These checks bound that damage to what a lease of a
// well-behaved node could do anyway.
type PeerPolicy struct {
	// Network is the cluster network; a peer subnet must lie inside it.
	Network netip.Prefix
	// PublicIPs, when not empty, are the only networks a peer's public IP
	// may be in (twilld --public-ip-cidr).
	PublicIPs []netip.Prefix
}

// Skipped is a peer lease that is not programmed, and why.
type Skipped struct {
	Lease  Lease
	Reason string
}

// FilterPeers returns the peers a node may program, in subnet order, and the
// ones it must skip. All leases are of one family, the Network's (see
// Lease.Family). A peer is skipped when its subnet is not a network address
// of that family strictly inside the network, when it overlaps the own subnet or a
// peer that claimed its addresses first, when it carries the node's own
// public IP, or when its public IP is outside the allow-list.
//
// Between overlapping peers the earlier claim wins (lower Lease.Claimed,
// then the lower address, then the shorter prefix), so a key written later
// cannot take the traffic of a node that was there before it. The work is
// O(n log n): it runs on every reconcile pass. kept comes back in
// ComparePrefix order.
func FilterPeers(p PeerPolicy, own Lease, peers []Lease) (kept []Lease, skipped []Skipped) {
	order := slices.Clone(peers)
	slices.SortFunc(order, func(a, b Lease) int {
		if a.Claimed != b.Claimed {
			// Unknown (0) sorts last: a known claim is an earlier one.
			switch {
			case a.Claimed == 0:
				return 1
			case b.Claimed == 0:
				return -1
			}
			return cmp.Compare(a.Claimed, b.Claimed)
		}
		if c := ComparePrefix(a.Subnet, b.Subnet); c != 0 {
			return c
		}
		return a.Attrs.PublicIP.Compare(b.Attrs.PublicIP)
	})
	var taken intervals
	if own.Subnet.IsValid() {
		taken.add(own.Subnet)
	}
	for _, l := range order {
		if reason := p.reject(own, l, &taken); reason != "" {
			skipped = append(skipped, Skipped{Lease: l, Reason: reason})
			continue
		}
		taken.add(l.Subnet)
		kept = append(kept, l)
	}
	slices.SortFunc(kept, func(a, b Lease) int { return ComparePrefix(a.Subnet, b.Subnet) })
	slices.SortFunc(skipped, func(a, b Skipped) int { return ComparePrefix(a.Lease.Subnet, b.Lease.Subnet) })
	return kept, skipped
}

func (p PeerPolicy) reject(own Lease, l Lease, taken *intervals) string {
	sn := l.Subnet
	switch {
	case !sn.IsValid() || sn.Addr().Is6() != p.Network.Addr().Is6() || sn.Masked() != sn:
		return fmt.Sprintf("subnet %v is not an %s network address", sn, FamilyName(p.Network.Addr().Is6()))
	case !p.Network.Contains(sn.Addr()) || sn.Bits() <= p.Network.Bits():
		return fmt.Sprintf("subnet %s is outside the network %s", sn, p.Network)
	case own.Subnet.IsValid() && own.Subnet.Overlaps(sn):
		return fmt.Sprintf("subnet %s overlaps this node's subnet %s", sn, own.Subnet)
	}
	if other, ok := taken.overlap(sn); ok {
		return fmt.Sprintf("subnet %s overlaps %s, claimed first", sn, other)
	}
	ip := l.Attrs.PublicIP
	if own.Attrs.PublicIP.IsValid() && ip == own.Attrs.PublicIP {
		return fmt.Sprintf("public IP %s is this node's own", ip)
	}
	if len(p.PublicIPs) > 0 && !slices.ContainsFunc(p.PublicIPs, func(n netip.Prefix) bool { return n.Contains(ip) }) {
		return fmt.Sprintf("public IP %s is outside the allowed %v", ip, p.PublicIPs)
	}
	return ""
}

// comparePrefix orders by address, then shorter prefix first.
func ComparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return cmp.Compare(a.Bits(), b.Bits())
}

// intervals is a set of disjoint prefixes of one family, sorted by address.
type intervals []netip.Prefix

// overlap returns a member that overlaps p. The members are disjoint, so
// only the last one starting at or before p and the first one after it can.
func (s intervals) overlap(p netip.Prefix) (netip.Prefix, bool) {
	i, _ := slices.BinarySearchFunc(s, p.Addr(), func(m netip.Prefix, a netip.Addr) int { return m.Addr().Compare(a) })
	for _, j := range []int{i - 1, i} {
		if j >= 0 && j < len(s) && s[j].Overlaps(p) {
			return s[j], true
		}
	}
	return netip.Prefix{}, false
}

func (s *intervals) add(p netip.Prefix) {
	i, _ := slices.BinarySearchFunc(*s, p.Addr(), func(m netip.Prefix, a netip.Addr) int { return m.Addr().Compare(a) })
	*s = slices.Insert(*s, i, p)
}

// PeerFilter is FilterPeers kept up to date one lease at a time. It is only
// exact while every peer was kept: then the order of claims decides nothing,
// and a lease is admitted exactly when FilterPeers would keep it. The daemon
// uses it for a pass over a few changed leases and falls back to FilterPeers
// when a lease is refused or some lease was skipped.
type PeerFilter struct {
	policy PeerPolicy
	own    Lease
	taken  intervals // the own subnet and every admitted peer's
}

// NewPeerFilter starts from kept, the peers FilterPeers kept (and skipped
// none of) for own.
func NewPeerFilter(p PeerPolicy, own Lease, kept []Lease) *PeerFilter {
	f := &PeerFilter{policy: p, own: own, taken: make(intervals, 0, len(kept)+1)}
	for _, l := range kept {
		f.taken = append(f.taken, l.Subnet)
	}
	if own.Subnet.IsValid() {
		f.taken = append(f.taken, own.Subnet)
	}
	slices.SortFunc(f.taken, ComparePrefix)
	return f
}

// Admit admits l and returns "", or returns why FilterPeers would skip it
// (and admits nothing). A changed lease must be dropped first.
func (f *PeerFilter) Admit(l Lease) string {
	if reason := f.policy.reject(f.own, l, &f.taken); reason != "" {
		return reason
	}
	f.taken.add(l.Subnet)
	return ""
}

// Drop forgets the admitted lease on p.
func (f *PeerFilter) Drop(p netip.Prefix) {
	i, ok := slices.BinarySearchFunc(f.taken, p, ComparePrefix)
	if ok && p != f.own.Subnet {
		f.taken = slices.Delete(f.taken, i, i+1)
	}
}
