package wireguard

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/subnet"
)

// Data is the BackendData (or BackendV6Data) of a wireguard lease, in
// flannel's form: the node's public key and the device's listen port.
// flannel before 0.20 wrote no Port; a lease without one is reached on this
// node's own listen port, as flannel does.
type Data struct {
	PublicKey string
	Port      uint16 `json:",omitempty"`
}

// ParseData reads a lease's BackendData.
func ParseData(raw json.RawMessage) (wgtypes.Key, uint16, error) {
	var d Data
	if err := json.Unmarshal(raw, &d); err != nil {
		return wgtypes.Key{}, 0, fmt.Errorf("backend data %s: %w", raw, err)
	}
	k, err := wgtypes.ParseKey(d.PublicKey)
	if err != nil {
		return wgtypes.Key{}, 0, fmt.Errorf("backend data: PublicKey %q: %w", d.PublicKey, err)
	}
	return k, d.Port, nil
}

// Peer is one WireGuard peer of the device: a node, reached at Endpoint,
// whose pods (its subnets: the allowed IPs) are behind it.
type Peer struct {
	Key      wgtypes.Key
	Endpoint netip.AddrPort
	// Subnets are the allowed IPs: the IPv4 subnet first, then the IPv6
	// one; zero where the peer has none on this device. A device per
	// family has one of them, the single device of the other modes both.
	Subnets   [2]netip.Prefix
	PSK       wgtypes.Key // zero: none
	Keepalive time.Duration
	// odd marks a peer read from the device with allowed IPs twill never
	// sets (more than one per family): no wanted peer equals it.
	odd bool
}

// Subnet is the peer's subnet of a family.
func (p Peer) Subnet(v6 bool) netip.Prefix { return p.Subnets[familyIndex(v6)] }

func familyIndex(v6 bool) int {
	if v6 {
		return 1
	}
	return 0
}

// settings are what Desired needs to know of this node.
type settings struct {
	v6        bool
	ownKey    wgtypes.Key // this node's public key
	ownPort   uint16      // for a lease that gives no port
	psk       wgtypes.Key
	keepalive time.Duration
	link      int // the device's index, for the routes
}

// Desired computes the peers and routes for the leases: one peer and one
// route (its subnet into the device) per wireguard lease. Leases of another
// backend and the own subnet are skipped; a lease that cannot be served (no
// or a bad key, a key another lease has, this node's key, no public IP of
// the family) gets a *dataplane.PeerError in the joined error.
func Desired(own subnet.Lease, leases []subnet.Lease, s settings) (map[wgtypes.Key]Peer, dataplane.State, error) {
	peers := make(map[wgtypes.Key]Peer, len(leases))
	routes := dataplane.NewStateFor(len(leases))
	sorted := slices.Clone(leases)
	slices.SortFunc(sorted, func(a, b subnet.Lease) int { return subnet.ComparePrefix(a.Subnet, b.Subnet) })
	var errs []error
	for _, l := range sorted {
		if l.Attrs.BackendType != subnet.BackendWireGuard || l.Subnet == own.Subnet {
			continue
		}
		p, err := peerOf(own, l, s)
		if err == nil {
			if other, dup := peers[p.Key]; dup {
				err = fmt.Errorf("public key %s is also the key of the lease for %s, seen first", p.Key, other.Subnet(s.v6))
			}
		}
		if err != nil {
			errs = append(errs, &dataplane.PeerError{Peer: l.Subnet, Err: err})
			continue
		}
		peers[p.Key] = p
		r := routeOf(p, s.v6, s.link)
		routes.Routes[r.Key()] = r
	}
	return peers, routes, errors.Join(errs...)
}

// peerOf is one lease's peer, checked as far as the lease alone allows. The
// lease is the family's view (subnet.Lease.Family): an IPv6 peer's public
// IP and key are in PublicIP and BackendData.
func peerOf(own, l subnet.Lease, s settings) (Peer, error) {
	sn, ip := l.Subnet, l.Attrs.PublicIP
	data := l.Attrs.BackendData
	switch {
	case !sn.IsValid() || sn.Addr().Is6() != s.v6 || sn.Masked() != sn:
		return Peer{}, fmt.Errorf("subnet %v is not an %s network address", sn, subnet.FamilyName(s.v6))
	case own.Subnet.IsValid() && own.Subnet.Overlaps(sn):
		return Peer{}, fmt.Errorf("subnet overlaps this node's subnet %s", own.Subnet)
	case !ip.IsValid() || ip.Is6() != s.v6 || ip.IsUnspecified():
		return Peer{}, fmt.Errorf("no %s public IP (%v)", subnet.FamilyName(s.v6), ip)
	}
	key, port, err := ParseData(data)
	if err != nil {
		return Peer{}, err
	}
	if key == s.ownKey {
		return Peer{}, fmt.Errorf("public key %s is this node's own: do two nodes share a key file?", key)
	}
	if port == 0 {
		port = s.ownPort
	}
	p := Peer{Key: key, Endpoint: netip.AddrPortFrom(ip, port), PSK: s.psk, Keepalive: s.keepalive}
	p.Subnets[familyIndex(s.v6)] = sn
	return p, nil
}

// routeOf is the route of a peer's subnet of a family into the device.
// WireGuard picks the peer by the destination address among the allowed
// IPs; the route only brings the packet to the device.
func routeOf(p Peer, v6 bool, link int) dataplane.Route {
	sn := p.Subnet(v6)
	return dataplane.Route{Dst: sn, LinkIndex: link, Peer: sn}
}

// peerFromDevice reads a peer as the device reports it.
func peerFromDevice(p wgtypes.Peer) Peer {
	out := Peer{Key: p.PublicKey, PSK: p.PresharedKey, Keepalive: p.PersistentKeepaliveInterval}
	if p.Endpoint != nil {
		out.Endpoint = p.Endpoint.AddrPort()
		out.Endpoint = netip.AddrPortFrom(out.Endpoint.Addr().Unmap(), out.Endpoint.Port())
	}
	for _, a := range p.AllowedIPs {
		ip, _ := netip.AddrFromSlice(a.IP)
		ip = ip.Unmap()
		ones, _ := a.Mask.Size()
		i := familyIndex(ip.Is6())
		if out.Subnets[i].IsValid() {
			out.odd = true
		}
		out.Subnets[i] = netip.PrefixFrom(ip, ones)
	}
	return out
}

// diffPeers returns the peer configs that make the device's peers (have)
// equal want: changed or missing peers set, their allowed IPs replaced;
// peers not wanted removed.
func diffPeers(want, have map[wgtypes.Key]Peer) []wgtypes.PeerConfig {
	var out []wgtypes.PeerConfig
	for _, k := range sortedKeys(want) {
		if w := want[k]; have[k] != w {
			out = append(out, peerConfig(w))
		}
	}
	for _, k := range sortedKeys(have) {
		if _, ok := want[k]; !ok {
			out = append(out, wgtypes.PeerConfig{PublicKey: k, Remove: true})
		}
	}
	return out
}

func peerConfig(p Peer) wgtypes.PeerConfig {
	psk, keepalive := p.PSK, p.Keepalive
	return wgtypes.PeerConfig{
		PublicKey:                   p.Key,
		PresharedKey:                &psk, // a zero key clears one
		Endpoint:                    endpoint(p.Endpoint),
		PersistentKeepaliveInterval: &keepalive,
		ReplaceAllowedIPs:           true,
		AllowedIPs:                  allowedIPs(p),
	}
}

func endpoint(a netip.AddrPort) *net.UDPAddr {
	if !a.IsValid() {
		return nil // none known: the device keeps what it has
	}
	return net.UDPAddrFromAddrPort(a)
}

func allowedIPs(p Peer) []net.IPNet {
	var out []net.IPNet
	for _, sn := range p.Subnets {
		if sn.IsValid() {
			out = append(out, net.IPNet{IP: sn.Addr().AsSlice(), Mask: net.CIDRMask(sn.Bits(), sn.Addr().BitLen())})
		}
	}
	return out
}

func sortedKeys(m map[wgtypes.Key]Peer) []wgtypes.Key {
	keys := make([]wgtypes.Key, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b wgtypes.Key) int { return slices.Compare(a[:], b[:]) })
	return keys
}
