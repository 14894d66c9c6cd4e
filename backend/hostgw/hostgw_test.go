package hostgw

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/subnet"
)

func peer(sn, pub string) subnet.Lease {
	return subnet.Lease{Subnet: netip.MustParsePrefix(sn), Attrs: subnet.LeaseAttrs{
		PublicIP: netip.MustParseAddr(pub), BackendType: subnet.BackendHostGW}}
}

func TestDesired(t *testing.T) {
	ext := dataplane.ExternalInterface{Name: "eth0", Index: 2, Addr: netip.MustParseAddr("198.18.0.1"),
		Prefix: netip.MustParsePrefix("198.18.0.0/24"), MTU: 1500}
	own := peer("10.244.1.0/24", "198.18.0.1")
	vx := peer("10.244.9.0/24", "198.18.0.9")
	vx.Attrs.BackendType = subnet.BackendVXLAN
	for _, tc := range []struct {
		name        string
		peers       []subnet.Lease
		want        []string // routes
		errPeers    []string
		unreachable bool
	}{
		{name: "none"},
		{name: "two peers on the network", peers: []subnet.Lease{peer("10.244.3.0/24", "198.18.0.3"), peer("10.244.2.0/24", "198.18.0.2")},
			want: []string{"10.244.2.0/24 via 198.18.0.2 dev 2", "10.244.3.0/24 via 198.18.0.3 dev 2"}},
		{name: "own and other types skipped", peers: []subnet.Lease{own, vx}},
		{name: "peer off the network is named, others programmed",
			peers:    []subnet.Lease{peer("10.244.2.0/24", "198.18.0.2"), peer("10.244.3.0/24", "203.0.113.3")},
			want:     []string{"10.244.2.0/24 via 198.18.0.2 dev 2"},
			errPeers: []string{"10.244.3.0/24"}, unreachable: true},
		{name: "peer claiming our address", peers: []subnet.Lease{peer("10.244.2.0/24", "198.18.0.1")}, errPeers: []string{"10.244.2.0/24"}},
		{name: "overlap with own", peers: []subnet.Lease{peer("10.244.0.0/16", "198.18.0.2")}, errPeers: []string{"10.244.0.0/16"}},
		{name: "duplicate subnet", peers: []subnet.Lease{peer("10.244.2.0/24", "198.18.0.2"), peer("10.244.2.0/24", "198.18.0.3")},
			want: []string{"10.244.2.0/24 via 198.18.0.2 dev 2"}, errPeers: []string{"10.244.2.0/24"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Desired(own, tc.peers, ext)
			var got []string
			for _, r := range dataplane.Diff(s, dataplane.NewState()).SetRoutes {
				got = append(got, r.String())
			}
			if strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
				t.Errorf("routes:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
			if len(tc.errPeers) == 0 {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			for _, p := range tc.errPeers {
				if err == nil || !strings.Contains(err.Error(), "peer "+p+":") {
					t.Errorf("error does not name %s: %v", p, err)
				}
			}
			if tc.unreachable && !errors.Is(err, ErrUnreachable) {
				t.Errorf("error is not ErrUnreachable: %v", err)
			}
		})
	}
}
