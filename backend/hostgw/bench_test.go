package hostgw_test

import (
	"context"
	"net/netip"
	"testing"

	"github.com/twillnet/twill/backend/backendtest"
	"github.com/twillnet/twill/backend/hostgw"
	"github.com/twillnet/twill/subnet"
)

const benchPeers = 5000

// hostGWPeers returns n peers with /24 subnets from 10.128.0.0/9 and public
// IPs in 198.18.0.0/17, all on the underlay.
func hostGWPeers(n int) []subnet.Lease {
	peers := make([]subnet.Lease, n)
	for i := range n {
		sn := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 128 + byte(i>>8), byte(i), 0}), 24)
		ip := netip.AddrFrom4([4]byte{198, 18, 1 + byte(i>>8), byte(i)})
		peers[i] = backendtest.HostGWPeer(sn.String(), ip.String())
	}
	return peers
}

func benchSetup(b *testing.B) *hostgw.Backend {
	b.Helper()
	_, h := backendtest.NetNS(b)
	ext := backendtest.Underlay(b, h, "ext0", netip.MustParsePrefix("198.18.0.1/17"))
	be, err := hostgw.New(subnet.BackendConfig{Type: subnet.BackendHostGW}, ext, h, nil)
	if err != nil {
		b.Fatal(err)
	}
	return be
}

// BenchmarkReconcile5000 is host-gw's cold start: 5,000 routes.
func BenchmarkReconcile5000(b *testing.B) {
	ctx, peers := context.Background(), hostGWPeers(benchPeers)
	for b.Loop() {
		b.StopTimer()
		be := benchSetup(b)
		b.StartTimer()
		if err := be.Reconcile(ctx, own, peers); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReconcile5000Steady is a resync with nothing to change.
func BenchmarkReconcile5000Steady(b *testing.B) {
	ctx, peers := context.Background(), hostGWPeers(benchPeers)
	be := benchSetup(b)
	if err := be.Reconcile(ctx, own, peers); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if err := be.Reconcile(ctx, own, peers); err != nil {
			b.Fatal(err)
		}
	}
}
