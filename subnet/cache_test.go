package subnet

import (
	"net/netip"
	"testing"
)

func signalled(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// Every subscriber sees each burst of changes once, a write that changes
// nothing a node programs wakes nobody, and Peers leaves the own lease out.
func TestCacheSignalsEverySubscriber(t *testing.T) {
	c := NewCache()
	a, b := c.Subscribe(), c.Subscribe()
	l := Lease{Subnet: netip.MustParsePrefix("10.244.2.0/24"), Attrs: LeaseAttrs{PublicIP: netip.MustParseAddr("198.18.0.2"), BackendType: "vxlan"}}
	own := Lease{Subnet: netip.MustParsePrefix("10.244.1.0/24"), Attrs: LeaseAttrs{PublicIP: netip.MustParseAddr("198.18.0.1"), BackendType: "vxlan"}}
	c.Apply(Change{Key: "h2", Lease: &l}, Change{Key: "h1", Lease: &own})
	if !signalled(a) || !signalled(b) {
		t.Fatal("a subscriber missed a change")
	}
	if signalled(a) {
		t.Fatal("one burst signalled twice")
	}
	renamed := l
	renamed.Attrs.NodeName = "h2"
	if c.Apply(Change{Key: "h2", Lease: &renamed}) || signalled(a) {
		t.Fatal("a change of the node name alone woke the subscribers")
	}
	if got, _ := c.Get("h2"); got.Attrs.NodeName != "h2" {
		t.Fatal("the new value was not stored")
	}
	moved := l
	moved.Attrs.PublicIP = netip.MustParseAddr("198.18.0.22")
	if !c.Apply(Change{Key: "h2", Lease: &moved}) || !signalled(b) {
		t.Fatal("a new public IP was not signalled")
	}
	peers, synced := c.Peers("h1")
	if synced || len(peers) != 1 || peers[0].Subnet != l.Subnet {
		t.Fatalf("Peers = %v, %v; want only h2's, not synced", peers, synced)
	}
	if c.Apply(Change{Key: "gone"}) {
		t.Fatal("deleting an absent key is a change")
	}
	c.MarkSynced()
	if _, synced := c.Peers(""); !synced || !signalled(a) {
		t.Fatal("MarkSynced did not mark or signal")
	}
}
