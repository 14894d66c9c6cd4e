package vxlan

import (
	"encoding/json"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/subnet"
)

func lease(sn, pub, mac string) subnet.Lease {
	data, _ := json.Marshal(map[string]any{"VNI": 1, "VtepMAC": mac})
	return subnet.Lease{Subnet: netip.MustParsePrefix(sn), Attrs: subnet.LeaseAttrs{
		PublicIP: netip.MustParseAddr(pub), BackendType: subnet.BackendVXLAN, BackendData: data}}
}

func TestDesired(t *testing.T) {
	const dev = 9
	ext := dataplane.ExternalInterface{Name: "eth0", Index: 2, Addr: netip.MustParseAddr("198.18.0.1"),
		Prefix: netip.MustParsePrefix("198.18.0.0/24"), MTU: 1500}
	own := lease("10.244.1.0/24", "198.18.0.1", "02:00:00:00:00:01")
	params := Params{Dev: dev, VNI: 1, Ext: ext}
	direct := params
	direct.DirectRouting = true

	withData := func(l subnet.Lease, data string) subnet.Lease { l.Attrs.BackendData = json.RawMessage(data); return l }
	ofType := func(l subnet.Lease, typ string) subnet.Lease { l.Attrs.BackendType = typ; return l }

	type entry struct{ route, neigh, fdb string }
	for _, tc := range []struct {
		name    string
		peers   []subnet.Lease
		params  Params
		want    map[string]entry // peer subnet -> its entries, rendered
		errPeer []string         // peers named in the error
	}{
		{name: "no peers", params: params, want: map[string]entry{}},
		{name: "three peers", params: params, peers: []subnet.Lease{
			lease("10.244.3.0/24", "198.19.0.3", "02:00:00:00:00:03"),
			lease("10.244.2.0/24", "198.18.0.2", "02:00:00:00:00:02"),
			lease("10.244.4.0/24", "198.19.0.4", "02:00:00:00:00:04"),
		}, want: map[string]entry{
			"10.244.2.0/24": {"10.244.2.0/24 via 10.244.2.0 dev 9 onlink", "10.244.2.0 lladdr 02:00:00:00:00:02 dev 9", "02:00:00:00:00:02 dst 198.18.0.2 dev 9"},
			"10.244.3.0/24": {"10.244.3.0/24 via 10.244.3.0 dev 9 onlink", "10.244.3.0 lladdr 02:00:00:00:00:03 dev 9", "02:00:00:00:00:03 dst 198.19.0.3 dev 9"},
			"10.244.4.0/24": {"10.244.4.0/24 via 10.244.4.0 dev 9 onlink", "10.244.4.0 lladdr 02:00:00:00:00:04 dev 9", "02:00:00:00:00:04 dst 198.19.0.4 dev 9"},
		}},
		{name: "own lease and other backend types are skipped", params: params, peers: []subnet.Lease{
			own, ofType(lease("10.244.2.0/24", "198.18.0.2", "02:00:00:00:00:02"), subnet.BackendHostGW),
		}, want: map[string]entry{}},
		{name: "direct routing for peers on the external network only", params: direct, peers: []subnet.Lease{
			lease("10.244.2.0/24", "198.18.0.2", "02:00:00:00:00:02"),
			lease("10.244.3.0/24", "198.19.0.3", "02:00:00:00:00:03"),
		}, want: map[string]entry{
			"10.244.2.0/24": {route: "10.244.2.0/24 via 198.18.0.2 dev 2"},
			"10.244.3.0/24": {"10.244.3.0/24 via 10.244.3.0 dev 9 onlink", "10.244.3.0 lladdr 02:00:00:00:00:03 dev 9", "02:00:00:00:00:03 dst 198.19.0.3 dev 9"},
		}},
		{name: "broken peers are named, the others programmed", params: params, peers: []subnet.Lease{
			lease("10.244.2.0/24", "198.18.0.2", "02:00:00:00:00:02"),
			withData(lease("10.244.3.0/24", "198.18.0.3", "02:00:00:00:00:03"), `not json`),
			withData(lease("10.244.4.0/24", "198.18.0.4", "02:00:00:00:00:04"), ``),
			withData(lease("10.244.5.0/24", "198.18.0.5", "02:00:00:00:00:05"), `{"VNI":2,"VtepMAC":"02:00:00:00:00:05"}`),
			lease("10.244.6.0/24", "198.18.0.6", "02:00:00:00:00:02"), // MAC of 10.244.2.0/24
			lease("10.244.1.0/25", "198.18.0.7", "02:00:00:00:00:07"), // overlaps own
			withData(lease("10.244.8.0/24", "198.18.0.8", "02:00:00:00:00:08"), `{"VNI":1}`),
		}, want: map[string]entry{
			"10.244.2.0/24": {"10.244.2.0/24 via 10.244.2.0 dev 9 onlink", "10.244.2.0 lladdr 02:00:00:00:00:02 dev 9", "02:00:00:00:00:02 dst 198.18.0.2 dev 9"},
		}, errPeer: []string{"10.244.3.0/24", "10.244.4.0/24", "10.244.5.0/24", "10.244.6.0/24", "10.244.1.0/25", "10.244.8.0/24"}},
		{name: "duplicate subnet: first wins", params: params, peers: []subnet.Lease{
			lease("10.244.2.0/24", "198.18.0.2", "02:00:00:00:00:02"),
			lease("10.244.2.0/24", "198.18.0.9", "02:00:00:00:00:09"),
		}, want: map[string]entry{
			"10.244.2.0/24": {"10.244.2.0/24 via 10.244.2.0 dev 9 onlink", "10.244.2.0 lladdr 02:00:00:00:00:02 dev 9", "02:00:00:00:00:02 dst 198.18.0.2 dev 9"},
		}, errPeer: []string{"10.244.2.0/24"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Desired(own, tc.peers, tc.params)
			got := map[string]entry{}
			for _, r := range s.Routes {
				e := got[r.Peer.String()]
				e.route = r.String()
				got[r.Peer.String()] = e
			}
			for _, n := range s.Neighs {
				e := got[n.Peer.String()]
				e.neigh = n.String()
				got[n.Peer.String()] = e
			}
			for _, f := range s.FDB {
				e := got[f.Peer.String()]
				e.fdb = f.String()
				got[f.Peer.String()] = e
			}
			if len(got) != len(tc.want) {
				t.Errorf("entries for %d peers, want %d: %v", len(got), len(tc.want), got)
			}
			for p, w := range tc.want {
				if got[p] != w {
					t.Errorf("peer %s:\n got %+v\nwant %+v", p, got[p], w)
				}
			}
			if len(tc.errPeer) == 0 {
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("no error")
			}
			var pe *dataplane.PeerError
			if !errors.As(err, &pe) {
				t.Errorf("error has no PeerError: %v", err)
			}
			for _, p := range tc.errPeer {
				if !strings.Contains(err.Error(), "peer "+p+":") {
					t.Errorf("error does not name peer %s:\n%v", p, err)
				}
			}
		})
	}
}

func TestDataRoundTrip(t *testing.T) {
	mac, _ := dataplane.ParseMAC("02:11:22:33:44:55")
	raw, err := json.Marshal(Data{VNI: 7, VtepMAC: mac})
	if err != nil {
		t.Fatal(err)
	}
	if string(raw) != `{"VNI":7,"VtepMAC":"02:11:22:33:44:55"}` {
		t.Errorf("BackendData = %s", raw)
	}
	d, err := ParseData(raw)
	if err != nil || d.VNI != 7 || d.VtepMAC != mac {
		t.Errorf("ParseData = %+v, %v", d, err)
	}
	for _, bad := range []string{``, `null`, `{}`, `{"VtepMAC":"zz"}`, `[1]`} {
		if _, err := ParseData(json.RawMessage(bad)); err == nil {
			t.Errorf("ParseData(%q) accepted", bad)
		}
	}
}

func TestNewMTU(t *testing.T) {
	ext := dataplane.ExternalInterface{Name: "eth0", Index: 2, Addr: netip.MustParseAddr("198.18.0.1"),
		Prefix: netip.MustParsePrefix("198.18.0.0/24"), MTU: 9000}
	for _, tc := range []struct {
		cfgMTU, want int
	}{{0, 8950}, {1400, 1350}} { // Backend.MTU is the outgoing MTU, as in flannel
		b, err := New(subnet.BackendConfig{Type: subnet.BackendVXLAN, MTU: tc.cfgMTU}, ext, nlHandle, nil)
		if err != nil {
			t.Fatal(err)
		}
		if b.mtu != tc.want || b.vni != 1 || b.port != 8472 || b.Device() != "twill.1" {
			t.Errorf("cfg MTU %d: mtu %d vni %d port %d dev %s", tc.cfgMTU, b.mtu, b.vni, b.port, b.Device())
		}
	}
	if _, err := New(subnet.BackendConfig{Type: subnet.BackendVXLAN}, ext, nil, nil); err == nil {
		t.Error("nil handle accepted")
	}
	ext.MTU = 600
	if _, err := New(subnet.BackendConfig{Type: subnet.BackendVXLAN}, ext, nlHandle, nil); err == nil {
		t.Error("MTU 550 accepted")
	}
	// Over IPv6 the tunnel costs 70 bytes.
	ext6 := dataplane.ExternalInterface{Name: "eth0", Index: 2, Addr: netip.MustParseAddr("fd00:198:18::1"),
		Prefix: netip.MustParsePrefix("fd00:198:18::/64"), MTU: 1500}
	for _, tc := range []struct{ cfgMTU, want int }{{0, 1430}, {9000, 8930}} {
		b, err := New(subnet.BackendConfig{Type: subnet.BackendVXLAN, MTU: tc.cfgMTU}, ext6, nlHandle, nil)
		if err != nil || b.mtu != tc.want || b.Device() != "twill-v6.1" {
			t.Errorf("IPv6, cfg MTU %d: %v, mtu %d, device %s; want %d", tc.cfgMTU, err, b.mtu, b.Device(), tc.want)
		}
	}
}

// nlHandle is a handle that is never used to talk to the kernel (New only
// keeps it).
var nlHandle = &netlink.Handle{}

// The fast path for twill's own encoding and encoding/json agree on every
// input: same Data, and an error from the fast path never hides one.
func FuzzParseData(f *testing.F) {
	for _, s := range []string{
		`{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}`, `{"VNI":4096,"VtepMAC":"02:42:AC:11:00:02"}`,
		`{"VNI":01,"VtepMAC":"aa:bb:cc:dd:ee:ff"}`, `{"VNI":1,"VtepMAC":"00:00:00:00:00:00"}`,
		`{"VNI":1,"VtepMAC":"aa-bb-cc-dd-ee-ff"}`, `{"VtepMAC":"aa:bb:cc:dd:ee:ff","VNI":1}`,
		`{"VNI":99999999,"VtepMAC":"aa:bb:cc:dd:ee:ff"}`, `{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"} `, `null`, ``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		fast, ok := parseCanonical(raw)
		if !ok {
			return
		}
		var slow Data
		if err := json.Unmarshal(raw, &slow); err != nil {
			t.Fatalf("%q: fast path accepted what encoding/json refuses: %v", raw, err)
		}
		if fast != slow {
			t.Fatalf("%q: fast path %+v, encoding/json %+v", raw, fast, slow)
		}
	})
}

// The IPv6 plane sees leases projected on IPv6 (subnet.Lease.Family): its
// entries use the IPv6 subnet, the IPv6 VTEP MAC and the IPv6 public
// address; DirectRouting works on the IPv6 on-link network; a lease of the
// other family is refused by name.
func TestDesiredIPv6(t *testing.T) {
	const dev = 9
	ext := dataplane.ExternalInterface{Name: "eth0", Index: 2, Addr: netip.MustParseAddr("fd00:198:18::1"),
		Prefix: netip.MustParsePrefix("fd00:198:18::/64"), MTU: 1500}
	own := lease("fd00:10:244:1::/64", "fd00:198:18::1", "02:00:00:00:06:01")
	peers := []subnet.Lease{
		lease("fd00:10:244:2::/64", "fd00:198:18::2", "02:00:00:00:06:02"),
		lease("fd00:10:244:3::/64", "fd00:198:19::3", "02:00:00:00:06:03"),
		lease("10.244.4.0/24", "198.18.0.4", "02:00:00:00:00:04"),
	}
	for _, direct := range []bool{false, true} {
		s, err := Desired(own, peers, Params{Dev: dev, VNI: 1, Ext: ext, DirectRouting: direct})
		var pe *dataplane.PeerError
		if !errors.As(err, &pe) || pe.Peer != netip.MustParsePrefix("10.244.4.0/24") || !strings.Contains(err.Error(), "not an IPv6 network address") {
			t.Fatalf("direct %v: err = %v, want the IPv4 lease refused", direct, err)
		}
		var routes, neighs, fdb []string
		for _, r := range s.Routes {
			routes = append(routes, r.String())
		}
		for _, n := range s.Neighs {
			neighs = append(neighs, n.String())
		}
		for _, f := range s.FDB {
			fdb = append(fdb, f.String())
		}
		slices.Sort(routes)
		slices.Sort(neighs)
		slices.Sort(fdb)
		want := [][]string{
			{"fd00:10:244:2::/64 via fd00:10:244:2:: dev 9 onlink", "fd00:10:244:3::/64 via fd00:10:244:3:: dev 9 onlink"},
			{"fd00:10:244:2:: lladdr 02:00:00:00:06:02 dev 9", "fd00:10:244:3:: lladdr 02:00:00:00:06:03 dev 9"},
			{"02:00:00:00:06:02 dst fd00:198:18::2 dev 9", "02:00:00:00:06:03 dst fd00:198:19::3 dev 9"},
		}
		if direct {
			// The peer on fd00:198:18::/64 is routed directly; the other is tunnelled.
			want = [][]string{
				{"fd00:10:244:2::/64 via fd00:198:18::2 dev 2", "fd00:10:244:3::/64 via fd00:10:244:3:: dev 9 onlink"},
				{"fd00:10:244:3:: lladdr 02:00:00:00:06:03 dev 9"},
				{"02:00:00:00:06:03 dst fd00:198:19::3 dev 9"},
			}
		}
		if got := [][]string{routes, neighs, fdb}; !slices.EqualFunc(got, want, slices.Equal) {
			t.Fatalf("direct %v:\ngot  %q\nwant %q", direct, got, want)
		}
	}
}
