package daemon

import (
	"context"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/backend/hostgw"
	"github.com/twillnet/twill/backend/vxlan"
	"github.com/twillnet/twill/backend/wireguard"
	"github.com/twillnet/twill/subnet"
)

var ext = dataplane.ExternalInterface{Name: "eth0", Index: 2, Addr: netip.MustParseAddr("198.18.0.1"),
	Prefix: netip.MustParsePrefix("198.18.0.0/24"), MTU: 1500}

func TestNew(t *testing.T) {
	h := &netlink.Handle{} // New makes no netlink call
	for _, tc := range []struct {
		cfg   subnet.BackendConfig
		check func(Backend) bool
	}{
		{subnet.BackendConfig{Type: subnet.BackendVXLAN, VNI: 1, Port: 8472}, func(b Backend) bool { _, ok := b.(*vxlan.Backend); return ok }},
		{subnet.BackendConfig{Type: subnet.BackendHostGW}, func(b Backend) bool { _, ok := b.(*hostgw.Backend); return ok }},
		{subnet.BackendConfig{Type: subnet.BackendAlloc}, func(b Backend) bool { return b != nil }},
	} {
		b, err := newBackend(tc.cfg, ext, h, nil, wireguard.Options{})
		if err != nil || !tc.check(b) {
			t.Errorf("New(%s) = %T, %v", tc.cfg.Type, b, err)
		}
	}
	if _, err := newBackend(subnet.BackendConfig{Type: "udp"}, ext, h, nil, wireguard.Options{}); err == nil {
		t.Error("unknown type accepted")
	}
	if _, err := newBackend(subnet.BackendConfig{Type: subnet.BackendAlloc}, ext, nil, nil, wireguard.Options{}); err == nil {
		t.Error("nil handle accepted")
	}
	bad := ext
	bad.Index = 0
	if _, err := newBackend(subnet.BackendConfig{Type: subnet.BackendVXLAN}, bad, h, nil, wireguard.Options{}); err == nil {
		t.Error("external interface without index accepted")
	}
}

func TestAlloc(t *testing.T) {
	ctx := context.Background()
	for cfgMTU, want := range map[int]int{0: 1500, 1400: 1400} {
		b, err := newBackend(subnet.BackendConfig{Type: subnet.BackendAlloc, MTU: cfgMTU}, ext, &netlink.Handle{}, nil, wireguard.Options{})
		if err != nil {
			t.Fatal(err)
		}
		data, mtu, err := b.Prepare(ctx)
		if err != nil || data != nil || mtu != want {
			t.Errorf("Prepare = %s, %d, %v; want no data, MTU %d", data, mtu, err, want)
		}
		if err := b.Reconcile(ctx, subnet.Lease{}, nil); err != nil {
			t.Error(err)
		}
		if err := b.Cleanup(ctx); err != nil {
			t.Error(err)
		}
	}
}

func TestHostGWMTU(t *testing.T) {
	b, err := newBackend(subnet.BackendConfig{Type: subnet.BackendHostGW, MTU: 1300}, ext, &netlink.Handle{}, nil, wireguard.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, mtu, err := b.Prepare(context.Background()); err != nil || mtu != 1300 {
		t.Errorf("Prepare MTU = %d, %v", mtu, err)
	}
}
