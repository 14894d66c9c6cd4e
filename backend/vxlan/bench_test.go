package vxlan_test

import (
	"context"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/twillnet/twill/backend/backendtest"
	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/backend/vxlan"
	"github.com/twillnet/twill/subnet"
)

const benchPeers = 5000

func benchSetup(b testing.TB) (*vxlan.Backend, *netlink.Handle, subnet.Lease, []subnet.Lease) {
	b.Helper()
	_, h := backendtest.NetNS(b)
	ext := backendtest.Underlay(b, h, "ext0", netip.MustParsePrefix("198.18.0.1/24"))
	be, err := vxlan.New(subnet.BackendConfig{Type: subnet.BackendVXLAN, VNI: 1, Port: 8472}, ext, h, nil)
	if err != nil {
		b.Fatal(err)
	}
	if _, _, err := be.Prepare(context.Background()); err != nil {
		b.Fatal(err)
	}
	own := subnet.Lease{Subnet: netip.MustParsePrefix("10.0.1.0/24"), Attrs: subnet.LeaseAttrs{PublicIP: ext.Addr, BackendType: subnet.BackendVXLAN}}
	return be, h, own, backendtest.ManyVXLANPeers(benchPeers)
}

// BenchmarkReconcile5000 is the cold start: 5,000 peers appear at once in a
// fresh namespace, 15,000 entries to write.
func BenchmarkReconcile5000(b *testing.B) {
	ctx := context.Background()
	for b.Loop() {
		b.StopTimer()
		be, h, own, peers := benchSetup(b)
		b.StartTimer()
		if err := be.Reconcile(ctx, own, peers); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if got := len(backendtest.Routes(b, h)); got != benchPeers {
			b.Fatalf("%d routes, want %d", got, benchPeers)
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(3*benchPeers), "entries")
}

// BenchmarkReconcile5000Steady is the resync pass: 5,000 peers programmed,
// nothing to change. It costs three dumps and the diff.
func BenchmarkReconcile5000Steady(b *testing.B) {
	ctx := context.Background()
	be, h, own, peers := benchSetup(b)
	if err := be.Reconcile(ctx, own, peers); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if err := be.Reconcile(ctx, own, peers); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	dev, err := h.LinkByName(be.Device())
	if err != nil {
		b.Fatal(err)
	}
	actual, err := dataplane.ReadActual(ctx, h, netlink.FAMILY_V4, dev.Attrs().Index)
	if err != nil {
		b.Fatal(err)
	}
	if actual.Len() != 3*benchPeers {
		b.Fatalf("%d entries, want %d", actual.Len(), 3*benchPeers)
	}
}
