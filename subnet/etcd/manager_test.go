package etcd

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/twillnet/twill/internal/tools/embedetcd"
	"github.com/twillnet/twill/internal/tools/testenv"
	"github.com/twillnet/twill/subnet"
)

// runManager acquires and runs a manager until the test ends.
func runManager(t *testing.T, reg *Registry, req AcquireRequest) *Manager {
	t.Helper()
	m := NewManager(reg, req)
	ctx, cancel := context.WithCancel(context.Background())
	if _, err := m.Acquire(ctx); err != nil {
		cancel()
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); m.Run(ctx) }()
	t.Cleanup(func() { cancel(); wg.Wait() })
	return m
}

func peerSet(m *Manager) map[netip.Prefix]netip.Addr {
	peers, _ := m.Peers()
	out := map[netip.Prefix]netip.Addr{}
	for _, p := range peers {
		out[p.Subnet] = p.Attrs.PublicIP
	}
	return out
}

func TestDeletedLeaseIsReacquired(t *testing.T) {
	f := newFixture(t, testConfig)
	ctx := ctxT(t)
	m := runManager(t, f.reg, AcquireRequest{Config: f.cfg, Attrs: attrs("198.18.0.1"), TTL: time.Minute})
	first := m.Own()
	if err := f.reg.DeleteLease(ctx, first.Subnet); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the lease to be re-acquired", 15*time.Second, func() bool {
		own := m.Own()
		if own == first {
			return false
		}
		l, err := f.reg.Lease(ctx, own.Subnet)
		return err == nil && l.EtcdLease == own.EtcdLease
	})
	if got := m.Own().Subnet; got != first.Subnet {
		t.Fatalf("re-acquired %s, want the same free subnet %s", got, first.Subnet)
	}
	// The etcd lease the deleted key was attached to is revoked, not left
	// to hold nothing until its TTL runs out.
	waitFor(t, "the old etcd lease to be revoked", 5*time.Second, func() bool {
		ttl, err := f.cli.TimeToLive(ctx, first.EtcdLease)
		return err == nil && ttl.TTL == -1
	})
}

// Leases carry their etcd create revision, from the listing and from the
// watch alike: an overlapping key written later is the one peers skip.
func TestLeasesCarryTheirClaimOrder(t *testing.T) {
	f := newFixture(t, testConfig)
	ctx := ctxT(t)
	a := runManager(t, f.reg, AcquireRequest{Config: f.cfg, Attrs: attrs("198.18.0.1"), TTL: time.Minute})
	b := runManager(t, f.reg, AcquireRequest{Config: f.cfg, Attrs: attrs("198.18.0.2"), TTL: time.Minute})
	var peer subnet.Lease
	waitFor(t, "a to see b", 10*time.Second, func() bool {
		peers, _ := a.Peers()
		if len(peers) == 1 {
			peer = peers[0]
		}
		return len(peers) == 1
	})
	resp, err := f.cli.Get(ctx, f.reg.SubnetKey(b.Own().Subnet))
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("read b's key: %v", err)
	}
	if peer.Claimed == 0 || peer.Claimed != resp.Kvs[0].CreateRevision {
		t.Fatalf("watched lease claims %d, the key's create revision is %d", peer.Claimed, resp.Kvs[0].CreateRevision)
	}
	listed, _, err := f.reg.Leases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range listed {
		if l.Subnet == b.Own().Subnet && l.Claimed != resp.Kvs[0].CreateRevision {
			t.Fatalf("listed lease claims %d, want %d", l.Claimed, resp.Kvs[0].CreateRevision)
		}
	}
}

func TestExpiredLeaseIsReacquired(t *testing.T) {
	f := newFixture(t, testConfig)
	ctx := ctxT(t)
	m := runManager(t, f.reg, AcquireRequest{Config: f.cfg, Attrs: attrs("198.18.0.1"), TTL: 30 * time.Second})
	first := m.Own()
	// Revoking the etcd lease is what expiry does: the key goes and keep-alive ends.
	if _, err := f.cli.Revoke(ctx, first.EtcdLease); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the lease to be re-acquired", 15*time.Second, func() bool {
		own := m.Own()
		if own == first {
			return false
		}
		_, err := f.reg.Lease(ctx, own.Subnet)
		return err == nil
	})
	if got := m.Own().Subnet; got != first.Subnet {
		t.Fatalf("re-acquired %s, want %s", got, first.Subnet)
	}
}

func TestManagersSeeEachOther(t *testing.T) {
	f := newFixture(t, testConfig)
	ctx := ctxT(t)
	a := runManager(t, f.reg, AcquireRequest{Config: f.cfg, Attrs: attrs("198.18.0.1"), TTL: time.Minute})
	b := runManager(t, NewRegistry(testenv.EtcdClient(t, f.endpoint), DefaultPrefix, nil), AcquireRequest{Config: f.cfg, Attrs: attrs("198.18.0.2"), TTL: time.Minute})
	waitFor(t, "a to see b", 10*time.Second, func() bool { return peerSet(a)[b.Own().Subnet] == netip.MustParseAddr("198.18.0.2") })
	waitFor(t, "b to see a", 10*time.Second, func() bool { return peerSet(b)[a.Own().Subnet] == netip.MustParseAddr("198.18.0.1") })
	if len(peerSet(a)) != 1 {
		t.Fatalf("a's peers = %v, want only b", peerSet(a))
	}
	// A burst of changes reaches a consumer as few signals, and the content comes from the cache.
	for i := 0; i < 100; i++ {
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(100 + i), 0}), 24)
		if _, err := f.cli.Put(ctx, f.reg.SubnetKey(p), `{"PublicIP":"198.18.9.9","BackendType":"alloc"}`); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "a to see 101 peers", 10*time.Second, func() bool { return len(peerSet(a)) == 101 })
	if err := f.reg.DeleteLease(ctx, b.Own().Subnet); err != nil {
		t.Fatal(err)
	}
	// b re-acquires; a sees b's lease go and come back.
	waitFor(t, "b's lease back in a's view", 15*time.Second, func() bool {
		return peerSet(a)[b.Own().Subnet] == netip.MustParseAddr("198.18.0.2")
	})
}

// The watch survives etcd going away: it resumes from the last revision when
// etcd comes back, so changes made meanwhile are seen exactly once.
func TestWatchResumesAfterEtcdRestart(t *testing.T) {
	dir := t.TempDir()
	ctx := ctxT(t)
	srv, err := embedetcd.Start(ctx, embedetcd.Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	ep := srv.Endpoint
	u := ep[len("http://127.0.0.1:"):]
	var clientPort int
	for _, c := range u {
		clientPort = clientPort*10 + int(c-'0')
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			srv.Close()
		}
	})
	cli := testenv.EtcdClient(t, ep)
	reg := NewRegistry(cli, DefaultPrefix, testLog(t))
	put := func(i int) {
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i), 0}), 24)
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if _, err := cli.Put(pctx, reg.SubnetKey(p), `{"PublicIP":"198.18.0.1","BackendType":"alloc"}`); err != nil {
			t.Fatal(err)
		}
	}
	cache := NewLeaseCache()
	wctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { reg.Watch(wctx, cache); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	put(1)
	waitFor(t, "first lease", 10*time.Second, func() bool { return cache.Len() == 1 })

	srv.Close()
	stopped = true
	srv, err = embedetcd.Start(ctx, embedetcd.Options{Dir: dir, ClientPort: clientPort})
	if err != nil {
		t.Fatal(err)
	}
	stopped = false
	put(2)
	put(3)
	if _, err := cli.Delete(ctx, reg.SubnetKey(netip.MustParsePrefix("10.244.1.0/24"))); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "changes after restart", 20*time.Second, func() bool {
		_, ok1 := cachedLease(cache, netip.MustParsePrefix("10.244.1.0/24"))
		_, ok2 := cachedLease(cache, netip.MustParsePrefix("10.244.2.0/24"))
		_, ok3 := cachedLease(cache, netip.MustParsePrefix("10.244.3.0/24"))
		return !ok1 && ok2 && ok3
	})
}

// A watch whose revision was compacted away lists again instead of missing changes.
func TestWatchRelistsAfterCompaction(t *testing.T) {
	f := newFixture(t, testConfig)
	ctx := ctxT(t)
	cache := NewLeaseCache()
	run := func() (stop func()) {
		wctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { f.reg.Watch(wctx, cache); close(done) }()
		return func() { cancel(); <-done }
	}
	stop := run()
	a := subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("198.18.0.1"), BackendType: "alloc"}
	if _, err := f.reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: a, TTL: time.Minute}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "one lease", 10*time.Second, func() bool { return cache.Len() == 1 })
	stop()
	// While nobody watches: a new lease, the old one gone, history compacted.
	leases, _, _ := f.reg.Leases(ctx)
	if err := f.reg.DeleteLease(ctx, leases[0].Subnet); err != nil {
		t.Fatal(err)
	}
	b, err := f.reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: attrs("198.18.0.2"), TTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := f.cli.Get(ctx, "x")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.cli.Compact(ctx, resp.Header.Revision, clientv3.WithCompactPhysical()); err != nil {
		t.Fatal(err)
	}
	stop = run()
	defer stop()
	waitFor(t, "cache to match etcd after compaction", 10*time.Second, func() bool {
		l, _ := cache.Peers("")
		return len(l) == 1 && l[0].Subnet == b.Subnet
	})
}

// Events of one watch response are applied in order: a lease written and
// deleted in the same response is gone, one deleted and written again stays.
func TestCacheAppliesEventsInOrder(t *testing.T) {
	c := NewLeaseCache()
	a, b := netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("10.244.2.0/24")
	la := subnet.Lease{Subnet: a, Attrs: attrs("198.18.0.1")}
	lb := subnet.Lease{Subnet: b, Attrs: attrs("198.18.0.2")}
	ka, kb := subnet.KeyName(a), subnet.KeyName(b)
	c.apply(5, []subnet.Change{{Key: kb, Lease: &lb}})
	c.apply(6, []subnet.Change{{Key: ka, Lease: &la}, {Key: ka}, {Key: kb}, {Key: kb, Lease: &lb}})
	if _, ok := cachedLease(c, a); ok {
		t.Error("a lease written then deleted in one response is still cached")
	}
	if _, ok := cachedLease(c, b); !ok {
		t.Error("a lease deleted then written again in one response is missing")
	}
	if c.Revision() != 6 {
		t.Errorf("revision %d, want 6", c.Revision())
	}
}

// A reservation, a lease's value put again without an etcd lease (as
// flannel's reservations are made), is taken by the node with its public IP
// and stays a reservation: the node writes its attributes to it but attaches
// no TTL, follows it like any lease, and does not delete it on release.
func TestReservationStaysAReservation(t *testing.T) {
	f := newFixture(t, testConfig)
	ctx := ctxT(t)
	reserved := netip.MustParsePrefix("10.244.77.0/24")
	if _, err := f.cli.Put(ctx, f.reg.SubnetKey(reserved), `{"PublicIP":"198.18.0.7","BackendType":"alloc"}`); err != nil {
		t.Fatal(err)
	}
	a := attrs("198.18.0.7")
	a.NodeName = "h7"
	m := runManager(t, f.reg, AcquireRequest{Config: f.cfg, Attrs: a, TTL: 2 * time.Second})
	own := m.Own()
	if own.Subnet != reserved || !own.Reservation() {
		t.Fatalf("acquired %s (reservation %v), want the reserved %s", own.Subnet, own.Reservation(), reserved)
	}
	// Well past the TTL the node asked for: the key is still there, with no
	// etcd lease and the node's attributes, and the node still holds it.
	time.Sleep(3 * time.Second)
	l, err := f.reg.Lease(ctx, reserved)
	if err != nil {
		t.Fatal(err)
	}
	if l.EtcdLease != clientv3.NoLease || l.Attrs.NodeName != "h7" {
		t.Fatalf("reserved key now has etcd lease %x and node %q; want none and h7", int64(l.EtcdLease), l.Attrs.NodeName)
	}
	if got := m.Own(); got != own {
		t.Fatalf("the manager re-acquired (%s) while holding a reservation", got.Subnet)
	}
	if err := m.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := f.reg.Lease(ctx, reserved); err != nil {
		t.Fatalf("the reservation is gone after release: %v", err)
	}
}

// A peer change reaches the daemon's signal at once even while the manager
// is not holding a lease: here it lost its lease and cannot acquire another
// (every subnet is taken), and a peer's public IP changes meanwhile.
func TestPeerChangeSignalledWhileReacquiring(t *testing.T) {
	// Three subnets are handed out (the first of the /22 is not).
	f := newFixture(t, `{"Network":"10.244.0.0/22","SubnetLen":24,"Backend":{"Type":"alloc"}}`)
	ctx := ctxT(t)
	m := runManager(t, f.reg, AcquireRequest{Config: f.cfg, Attrs: attrs("198.18.0.1"), TTL: time.Minute})
	own := m.Own().Subnet
	var others []netip.Prefix
	for _, s := range []string{"10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"} {
		if p := netip.MustParsePrefix(s); p != own {
			others = append(others, p)
		}
	}
	other := others[0]
	for i, p := range others {
		if _, err := f.cli.Put(ctx, f.reg.SubnetKey(p), fmt.Sprintf(`{"PublicIP":"198.18.0.%d","BackendType":"alloc"}`, 20+i)); err != nil {
			t.Fatal(err)
		}
	}
	// Another node's value on the own key: the lease is lost, and with both
	// subnets taken the manager keeps retrying.
	if _, err := f.cli.Put(ctx, f.reg.SubnetKey(own), `{"PublicIP":"198.18.0.3","BackendType":"alloc"}`); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the lease to be lost", 10*time.Second, func() bool { return m.Stats().Losses == 1 })
	time.Sleep(500 * time.Millisecond) // into the retry loop
	for len(m.Changed()) > 0 {
		<-m.Changed()
	}
	if _, err := f.cli.Put(ctx, f.reg.SubnetKey(other), `{"PublicIP":"198.18.0.4","BackendType":"alloc"}`); err != nil {
		t.Fatal(err)
	}
	select {
	case <-m.Changed():
	case <-time.After(3 * time.Second): // the retry loop waits 5 s between attempts
		t.Fatal("no change signal for a peer change during re-acquisition")
	}
	if got := peerSet(m)[other]; got != netip.MustParseAddr("198.18.0.4") { // was .20
		t.Fatalf("peer %s has public IP %v, want 198.18.0.4", other, got)
	}
}

// cachedLease is the IPv4 lease on p in the cache, if any.
func cachedLease(c *LeaseCache, p netip.Prefix) (subnet.Lease, bool) { return c.Get(subnet.KeyName(p)) }
