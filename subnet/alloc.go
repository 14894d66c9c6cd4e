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

// PickFree chooses a free subnet in the leasable range of cfg. Among the first
// free subnets it picks one at random, so that nodes starting together rarely
// race for the same one (the datastore's create-if-absent settles any race).
func PickFree(cfg *Config, taken map[netip.Prefix]bool, rnd *rand.Rand) (netip.Prefix, error) {
	var odd []netip.Prefix // leases of another size, left from an older SubnetLen
	for t := range taken {
		if t.Bits() != cfg.SubnetLen {
			odd = append(odd, t)
		}
	}
	var free []netip.Prefix
	last := cfg.LastSubnet()
	for p := cfg.FirstSubnet(); ; {
		if !taken[p] && !overlapsAny(p, odd) {
			free = append(free, p)
			if len(free) == maxCandidates {
				break
			}
		}
		if p == last {
			break
		}
		next, ok := nextSubnet(p)
		if !ok {
			break
		}
		p = next
	}
	if len(free) == 0 {
		return netip.Prefix{}, fmt.Errorf("%w in %s between %s and %s (%d leased)",
			ErrNoFreeSubnet, cfg.Network, cfg.FirstSubnet(), last, len(taken))
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

// nextSubnet returns the subnet of the same size that follows p.
func nextSubnet(p netip.Prefix) (netip.Prefix, bool) {
	a := p.Addr().As4()
	v := uint64(a[0])<<24 | uint64(a[1])<<16 | uint64(a[2])<<8 | uint64(a[3])
	v += uint64(1) << (32 - p.Bits())
	if v > 0xffffffff {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), p.Bits()), true
}
