package wireguard

import (
	"net/netip"
	"sync"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/twillnet/twill/subnet"
)

// Modes of the Backend.Mode option (flannel's): a device per family, or
// one device for both families whose peers are reached over IPv4, over
// IPv6, or over the family auto picks per peer.
const (
	ModeSeparate = subnet.WireGuardModeSeparate
	ModeAuto     = "auto"
	ModeIPv4     = "ipv4"
	ModeIPv6     = "ipv6"
)

// Joint is the one device of the single-device modes (auto, ipv4, ipv6),
// which the IPv4 and the IPv6 backend program together. Each pass of a
// family's backend gives that family's peers; the device gets one peer per
// key, allowed the subnets of both families and reached at the endpoint the
// mode picks. Until a family has given its peers (the first pass after a
// start), what the device holds for that family is kept, so a restart
// takes nothing away from the other family.
type Joint struct {
	mode string

	mu    sync.Mutex
	parts [2]map[wgtypes.Key]Peer // per family; nil until its first pass
	own   [2]netip.Addr           // this node's public IPs, for auto
}

// NewJoint returns the shared state of a single-device mode.
func NewJoint(mode string) *Joint { return &Joint{mode: mode} }

// want records a family's peers and returns the peers the device must
// hold, given what it holds (have).
func (j *Joint) want(v6 bool, ownIP netip.Addr, peers map[wgtypes.Key]Peer, have map[wgtypes.Key]Peer) map[wgtypes.Key]Peer {
	i := familyIndex(v6)
	j.parts[i], j.own[i] = peers, ownIP
	out := make(map[wgtypes.Key]Peer, len(peers))
	for fam, part := range j.parts {
		if part == nil {
			// Not given yet: keep what the device holds of this family.
			for k, h := range have {
				if h.odd || !h.Subnets[fam].IsValid() {
					continue
				}
				p, ok := out[k]
				if !ok {
					p = Peer{Key: k, PSK: h.PSK, Keepalive: h.Keepalive}
				}
				p.Subnets[fam] = h.Subnets[fam]
				if !p.Endpoint.IsValid() || h.Endpoint.Addr().Is6() == (fam == 1) {
					p.Endpoint = j.pick(p.Endpoint, h.Endpoint)
				}
				out[k] = p
			}
			continue
		}
		for k, w := range part {
			p := out[k]
			p.Key, p.PSK, p.Keepalive = k, w.PSK, w.Keepalive
			p.Subnets[fam] = w.Subnets[fam]
			p.Endpoint = j.pick(p.Endpoint, w.Endpoint)
			out[k] = p
		}
	}
	return out
}

// pick chooses between two candidate endpoints of a peer (either may be
// zero) by the mode: ipv4 and ipv6 take their family's when there is one;
// auto takes IPv4 unless the peer's IPv4 is private and its IPv6 is
// public while this node has a public IPv6 too, as flannel does.
func (j *Joint) pick(a, b netip.AddrPort) netip.AddrPort {
	if !a.IsValid() {
		return b
	}
	if !b.IsValid() {
		return a
	}
	v4, v6 := a, b
	if a.Addr().Is6() {
		v4, v6 = b, a
	}
	switch j.mode {
	case ModeIPv6:
		return v6
	case ModeAuto:
		if v4.Addr().IsPrivate() && !v6.Addr().IsPrivate() && j.own[1].IsValid() && !j.own[1].IsPrivate() {
			return v6
		}
	}
	return v4
}
