package vxlan

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/subnet"
)

// Data is the BackendData a VXLAN node publishes with its lease:
// {"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}.
type Data struct {
	VNI     int           `json:"VNI"`
	VtepMAC dataplane.MAC `json:"VtepMAC"`
}

// ParseData decodes a peer's BackendData.
func ParseData(raw json.RawMessage) (Data, error) {
	var d Data
	if len(bytes.TrimSpace(raw)) == 0 || string(bytes.TrimSpace(raw)) == "null" {
		return d, errors.New("lease has no BackendData (VNI and VtepMAC)")
	}
	if err := json.Unmarshal(raw, &d); err != nil {
		return d, fmt.Errorf("BackendData %s: %w", raw, err)
	}
	if d.VtepMAC == (dataplane.MAC{}) {
		return d, fmt.Errorf("BackendData %s: no VtepMAC", raw)
	}
	return d, nil
}

// Params is what Desired needs besides the leases.
type Params struct {
	Dev           int // index of the VXLAN device
	VNI           int
	Ext           dataplane.ExternalInterface
	DirectRouting bool
}

// Desired computes the entries for the peers. Each VXLAN peer gets three:
//
//   - a permanent neighbour entry on the device: the peer subnet's network
//     address -> the peer's VTEP MAC, so the kernel never has to ARP over
//     the tunnel (nothing would answer: learning is off);
//   - an FDB entry on the device: the peer's VTEP MAC -> the peer's public
//     IP, which tells VXLAN where to send the encapsulated frame;
//   - a route: the peer subnet via the peer's network address, onlink, over
//     the device.
//
// With DirectRouting a peer whose public IP is on the external interface's
// network gets only a route to its subnet via that IP on the external
// interface: no encapsulation.
//
// Peers of another backend type and the own subnet are skipped. A peer that
// cannot be programmed (bad data, a subnet or MAC another peer already has)
// gets no entries and a *dataplane.PeerError in the joined error. Peers are
// taken in subnet order, so which of two clashing peers wins is stable.
func Desired(own subnet.Lease, peers []subnet.Lease, p Params) (dataplane.State, error) {
	s := dataplane.NewState()
	sorted := slices.Clone(peers)
	slices.SortFunc(sorted, func(a, b subnet.Lease) int { return subnet.ComparePrefix(a.Subnet, b.Subnet) })
	var errs []error
	subnets := map[netip.Prefix]bool{}
	macs := map[dataplane.MAC]netip.Prefix{}
	for _, peer := range sorted {
		if peer.Attrs.BackendType != subnet.BackendVXLAN || peer.Subnet == own.Subnet {
			continue
		}
		fail := func(format string, args ...any) {
			errs = append(errs, &dataplane.PeerError{Peer: peer.Subnet, Err: fmt.Errorf(format, args...)})
		}
		sn := peer.Subnet
		switch {
		case !sn.IsValid() || !sn.Addr().Is4() || sn.Masked() != sn:
			fail("subnet %v is not an IPv4 network address", sn)
			continue
		case own.Subnet.IsValid() && own.Subnet.Overlaps(sn):
			fail("subnet overlaps this node's subnet %s", own.Subnet)
			continue
		case subnets[sn]:
			fail("another lease for the same subnet was seen first")
			continue
		case !peer.Attrs.PublicIP.Is4():
			fail("public IP %v is not IPv4", peer.Attrs.PublicIP)
			continue
		}
		if p.DirectRouting && p.Ext.Prefix.Contains(peer.Attrs.PublicIP) {
			subnets[sn] = true
			s.Routes[dataplane.RouteKey{Dst: sn}] = dataplane.Route{
				Dst: sn, Gw: peer.Attrs.PublicIP, LinkIndex: p.Ext.Index, Peer: sn,
			}
			continue
		}
		d, err := ParseData(peer.Attrs.BackendData)
		if err != nil {
			fail("%w", err)
			continue
		}
		if d.VNI != 0 && d.VNI != p.VNI {
			fail("peer uses VNI %d, this node %d: the network config differs between nodes", d.VNI, p.VNI)
			continue
		}
		if other, dup := macs[d.VtepMAC]; dup {
			fail("VTEP MAC %s is already used by peer %s", d.VtepMAC, other)
			continue
		}
		subnets[sn], macs[d.VtepMAC] = true, sn
		gw := sn.Addr()
		s.Neighs[gw] = dataplane.Neigh{LinkIndex: p.Dev, IP: gw, MAC: d.VtepMAC, Permanent: true, Peer: sn}
		f := dataplane.FDB{LinkIndex: p.Dev, MAC: d.VtepMAC, Dst: peer.Attrs.PublicIP, Peer: sn}
		s.FDB[f.Key()] = f
		s.Routes[dataplane.RouteKey{Dst: sn}] = dataplane.Route{Dst: sn, Gw: gw, LinkIndex: p.Dev, Onlink: true, Peer: sn}
	}
	return s, errors.Join(errs...)
}
