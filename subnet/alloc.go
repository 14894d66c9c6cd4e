package subnet

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
)

// ErrNoFreeSubnet means every subnet between SubnetMin and SubnetMax is leased.
var ErrNoFreeSubnet = errors.New("no free subnet")

// maxCandidates bounds the free subnets collected before one is picked, so a
// /8 cut into /30s costs a bounded walk.
const maxCandidates = 256

// PickFree chooses a free subnet in r; taken may hold subnets of both
// families. Among the first
// free subnets it picks one at random, so that nodes starting together rarely
// race for the same one (the datastore's create-if-absent settles any race).
func PickFree(r Range, taken map[netip.Prefix]bool, rnd *rand.Rand) (netip.Prefix, error) {
	var odd []netip.Prefix // leases of another size, left from an older SubnetLen
	for t := range taken {
		if t.Addr().Is6() == r.Network.Addr().Is6() && t.Bits() != r.SubnetLen {
			odd = append(odd, t)
		}
	}
	var free []netip.Prefix
	last := r.Last()
	for p := r.First(); ; {
		if !taken[p] && !overlapsAny(p, odd) {
			free = append(free, p)
			if len(free) == maxCandidates {
				break
			}
		}
		if p == last {
			break
		}
		next, ok := NextSubnet(p)
		if !ok {
			break
		}
		p = next
	}
	if len(free) == 0 {
		return netip.Prefix{}, fmt.Errorf("%w in %s between %s and %s (%d leased)",
			ErrNoFreeSubnet, r.Network, r.First(), last, len(taken))
	}
	if rnd == nil {
		return free[rand.IntN(len(free))], nil
	}
	return free[rnd.IntN(len(free))], nil
}

func overlapsAny(p netip.Prefix, list []netip.Prefix) bool {
	for _, t := range list {
		if t.Overlaps(p) {
			return true
		}
	}
	return false
}
