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
	if d, ok := parseCanonical(raw); ok {
		return d, nil
	}
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

// parseCanonical decodes exactly what twill itself publishes,
// {"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"} (json.Marshal of Data), without
// the reflection of encoding/json: a full pass decodes every peer's data, and
// at 5,000 peers encoding/json was half of the desired state's cost. Any
// other form goes through encoding/json, so both paths give the same result
// (FuzzParseData checks it).
func parseCanonical(raw []byte) (Data, bool) {
	const head, mid, tail = `{"VNI":`, `,"VtepMAC":"`, `"}`
	rest, ok := bytes.CutPrefix(raw, []byte(head))
	if !ok {
		return Data{}, false
	}
	vni, digits := 0, 0
	for digits < len(rest) && digits < 8 && rest[digits] >= '0' && rest[digits] <= '9' {
		vni = 10*vni + int(rest[digits]-'0')
		digits++
	}
	if digits == 0 || (digits > 1 && rest[0] == '0') {
		return Data{}, false
	}
	rest, ok = bytes.CutPrefix(rest[digits:], []byte(mid))
	if !ok || len(rest) != 17+len(tail) || string(rest[17:]) != tail {
		return Data{}, false
	}
	var d Data
	d.VNI = vni
	for i := range d.VtepMAC {
		hi, ok1 := unhex(rest[3*i])
		lo, ok2 := unhex(rest[3*i+1])
		if !ok1 || !ok2 || (i < 5 && rest[3*i+2] != ':') {
			return Data{}, false
		}
		d.VtepMAC[i] = hi<<4 | lo
	}
	if d.VtepMAC == (dataplane.MAC{}) {
		return Data{}, false // encoding/json's path has the error message for it
	}
	return d, true
}

func unhex(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10, true
	case c >= 'A' && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
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
	s := dataplane.NewStateFor(len(peers))
	sorted := slices.Clone(peers)
	slices.SortFunc(sorted, func(a, b subnet.Lease) int { return subnet.ComparePrefix(a.Subnet, b.Subnet) })
	var errs []error
	subnets := make(map[netip.Prefix]bool, len(peers))
	macs := make(map[dataplane.MAC]netip.Prefix, len(peers))
	for _, peer := range sorted {
		if peer.Attrs.BackendType != subnet.BackendVXLAN || peer.Subnet == own.Subnet {
			continue
		}
		e, err := p.Entries(own, peer)
		if err == nil && subnets[peer.Subnet] {
			err = errors.New("another lease for the same subnet was seen first")
		}
		if other, dup := macs[e.Neigh.MAC]; err == nil && e.Neigh.IP.IsValid() && dup {
			err = fmt.Errorf("VTEP MAC %s is already used by peer %s", e.Neigh.MAC, other)
		}
		if err != nil {
			errs = append(errs, &dataplane.PeerError{Peer: peer.Subnet, Err: err})
			continue
		}
		subnets[peer.Subnet] = true
		if e.Neigh.IP.IsValid() {
			macs[e.Neigh.MAC] = peer.Subnet
		}
		e.AddTo(s)
	}
	return s, errors.Join(errs...)
}

// Entries computes one VXLAN peer's entries (see Desired), checking what can
// be checked of the peer alone: a clash with another peer is Desired's to
// find.
func (p Params) Entries(own subnet.Lease, peer subnet.Lease) (dataplane.PeerEntries, error) {
	sn, v6 := peer.Subnet, p.Ext.IPv6()
	switch {
	case !sn.IsValid() || sn.Addr().Is6() != v6 || sn.Masked() != sn:
		return dataplane.PeerEntries{}, fmt.Errorf("subnet %v is not an %s network address", sn, subnet.FamilyName(v6))
	case own.Subnet.IsValid() && own.Subnet.Overlaps(sn):
		return dataplane.PeerEntries{}, fmt.Errorf("subnet overlaps this node's subnet %s", own.Subnet)
	case !peer.Attrs.PublicIP.IsValid() || peer.Attrs.PublicIP.Is6() != v6:
		return dataplane.PeerEntries{}, fmt.Errorf("public IP %v is not %s", peer.Attrs.PublicIP, subnet.FamilyName(v6))
	}
	if p.DirectRouting && p.Ext.Prefix.Contains(peer.Attrs.PublicIP) {
		return dataplane.PeerEntries{Route: dataplane.Route{Dst: sn, Gw: peer.Attrs.PublicIP, LinkIndex: p.Ext.Index, Peer: sn}}, nil
	}
	d, err := ParseData(peer.Attrs.BackendData)
	if err != nil {
		return dataplane.PeerEntries{}, err
	}
	if d.VNI != 0 && d.VNI != p.VNI {
		return dataplane.PeerEntries{}, fmt.Errorf("peer uses VNI %d, this node %d: the network config differs between nodes", d.VNI, p.VNI)
	}
	gw := sn.Addr()
	return dataplane.PeerEntries{
		Route: dataplane.Route{Dst: sn, Gw: gw, LinkIndex: p.Dev, Onlink: true, Peer: sn},
		Neigh: dataplane.Neigh{LinkIndex: p.Dev, IP: gw, MAC: d.VtepMAC, Permanent: true, Peer: sn},
		FDB:   dataplane.FDB{LinkIndex: p.Dev, MAC: d.VtepMAC, Dst: peer.Attrs.PublicIP, Peer: sn},
	}, nil
}
