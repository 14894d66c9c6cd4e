package bench

import (
	"testing"

	"github.com/twillnet/twill/backend/wireguard"
	"github.com/twillnet/twill/subnet"
)

// TestFakeWireGuardPeers checks that the fake wireguard leases are what
// twilld reads: the backend type, flannel's BackendData with a valid public
// key and the port, and a key per peer, distinct across series.
func TestFakeWireGuardPeers(t *testing.T) {
	seen := map[string]bool{}
	for series := range 2 {
		for i := range 5000 {
			p := peerAt(series, i)
			a, err := subnet.ParseLeaseAttrs([]byte(p.valueFor(subnet.BackendWireGuard, false)))
			if err != nil {
				t.Fatalf("peer %d/%d: value: %v", series, i, err)
			}
			key, port, err := wireguard.ParseData(a.BackendData)
			if err != nil || a.BackendType != subnet.BackendWireGuard || key.String() != p.WGKey || port != subnet.DefaultWireGuardPort || a.PublicIP != p.PublicIP {
				t.Fatalf("peer %d/%d: value %s: type %q, key %v, port %d, %v", series, i, p.valueFor(subnet.BackendWireGuard, false), a.BackendType, key, port, err)
			}
			if seen[p.WGKey] {
				t.Fatalf("peer %d/%d: key %s is used twice", series, i, p.WGKey)
			}
			seen[p.WGKey] = true
		}
	}
	if v := peerAt(0, 0).valueFor("", false); v != peerAt(0, 0).value(false) {
		t.Errorf("the vxlan value changed: %s", v)
	}
}
