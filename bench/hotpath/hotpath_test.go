package hotpath

import (
	"net/netip"
	"testing"

	"github.com/twillnet/twill/backend/backendtest"
	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/backend/vxlan"
	"github.com/twillnet/twill/subnet"
)

const peers = 5000

var (
	own    = subnet.Lease{Subnet: netip.MustParsePrefix("10.0.1.0/24"), Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("198.18.0.1"), BackendType: subnet.BackendVXLAN}}
	params = vxlan.Params{Dev: 7, VNI: 1, Ext: dataplane.ExternalInterface{Name: "eth0", Index: 2,
		Addr: netip.MustParseAddr("198.18.0.1"), Prefix: netip.MustParsePrefix("198.18.0.0/24"), MTU: 1500}}
)

// kernelView is desired as ReadActual would return it once programmed: the
// same entries without the Peer annotations.
func kernelView(desired dataplane.State) dataplane.State {
	s := dataplane.NewState()
	for k, r := range desired.Routes {
		r.Peer = netip.Prefix{}
		s.Routes[k] = r
	}
	for k, n := range desired.Neighs {
		n.Peer = netip.Prefix{}
		s.Neighs[k] = n
	}
	for k, f := range desired.FDB {
		f.Peer = netip.Prefix{}
		s.FDB[k] = f
	}
	return s
}

// BenchmarkDesired5000 is vxlan.Desired for 5,000 peers: sort, check, and
// decode each peer's BackendData.
func BenchmarkDesired5000(b *testing.B) {
	ls := backendtest.ManyVXLANPeers(peers)
	for b.Loop() {
		if _, err := vxlan.Desired(own, ls, params); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDiff5000Steady is dataplane.Diff with nothing to change.
func BenchmarkDiff5000Steady(b *testing.B) {
	desired, err := vxlan.Desired(own, backendtest.ManyVXLANPeers(peers), params)
	if err != nil {
		b.Fatal(err)
	}
	actual := kernelView(desired)
	for b.Loop() {
		if p := dataplane.Diff(desired, actual); p.Len() != 0 {
			b.Fatalf("%d changes, want 0", p.Len())
		}
	}
}

// BenchmarkPass5000OneAdded is the user-space part of the pass that follows
// one new peer among 5,000: desired state, then the diff (3 entries to set).
func BenchmarkPass5000OneAdded(b *testing.B) {
	ls := backendtest.ManyVXLANPeers(peers + 1)
	desired, err := vxlan.Desired(own, ls[:peers], params)
	if err != nil {
		b.Fatal(err)
	}
	actual := kernelView(desired)
	for b.Loop() {
		d, err := vxlan.Desired(own, ls, params)
		if err != nil {
			b.Fatal(err)
		}
		if p := dataplane.Diff(d, actual); p.Len() != 3 {
			b.Fatalf("%d changes, want 3", p.Len())
		}
	}
}

// BenchmarkParseLeaseAttrs is decoding one stored lease value, done for
// every key of the listing at start and for every watch event.
func BenchmarkParseLeaseAttrs(b *testing.B) {
	v := []byte(`{"PublicIP":"198.19.0.7","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:62:00:00:00:07"},"NodeName":"node-7"}`)
	for b.Loop() {
		if _, err := subnet.ParseLeaseAttrs(v); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkParseVXLANData is decoding one peer's BackendData, done for every
// peer on every pass by vxlan.Desired.
func BenchmarkParseVXLANData(b *testing.B) {
	raw := []byte(`{"VNI":1,"VtepMAC":"02:62:00:00:00:07"}`)
	for b.Loop() {
		if _, err := vxlan.ParseData(raw); err != nil {
			b.Fatal(err)
		}
	}
}
