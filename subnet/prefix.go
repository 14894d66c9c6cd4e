package subnet

import (
	"encoding/binary"
	"net/netip"
)

// LastAddr is the highest address of p: the broadcast address of an IPv4
// subnet. It works for both families.
func LastAddr(p netip.Prefix) netip.Addr {
	hi, lo := split(p.Masked().Addr())
	hostBits := p.Addr().BitLen() - p.Bits()
	switch {
	case hostBits >= 64:
		lo = ^uint64(0)
		hi |= 1<<(hostBits-64) - 1
	default:
		lo |= 1<<hostBits - 1
	}
	return join(hi, lo, p.Addr().Is4())
}

// NextSubnet returns the subnet of the same size that follows p, and false
// when p is the last of its family.
func NextSubnet(p netip.Prefix) (netip.Prefix, bool) {
	hi, lo := split(p.Addr())
	hostBits := p.Addr().BitLen() - p.Bits()
	var carry uint64
	if hostBits >= 64 {
		hi, carry = addCarry(hi, 1<<(hostBits-64))
	} else {
		var c uint64
		lo, c = addCarry(lo, 1<<hostBits)
		hi, carry = addCarry(hi, c)
	}
	if carry != 0 || (p.Addr().Is4() && lo > 0xffffffff) {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(join(hi, lo, p.Addr().Is4()), p.Bits()), true
}

// split gives an address as a 128-bit number (an IPv4 address in the low
// 32 bits).
func split(a netip.Addr) (hi, lo uint64) {
	if a.Is4() {
		b := a.As4()
		return 0, uint64(binary.BigEndian.Uint32(b[:]))
	}
	b := a.As16()
	return binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])
}

func join(hi, lo uint64, v4 bool) netip.Addr {
	if v4 {
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], uint32(lo))
		return netip.AddrFrom4(b)
	}
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], hi)
	binary.BigEndian.PutUint64(b[8:], lo)
	return netip.AddrFrom16(b)
}

func addCarry(a, b uint64) (uint64, uint64) {
	s := a + b
	if s < a {
		return s, 1
	}
	return s, 0
}
