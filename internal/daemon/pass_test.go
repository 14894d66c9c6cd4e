package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/internal/daemon/masq"
	"github.com/twillnet/twill/subnet"
)

// The daemon's choice between a full pass and an update of the changed
// peers, with a backend and a lease manager that only record what they are
// asked. That the kernel ends up right either way is the backends' tests'
// and the e2e tests' to show.

type recordingBackend struct {
	calls     []string // "full N" or "update +a,b -c"
	decline   bool     // Update declines
	updateErr error
	writes    uint64 // what the next Reconcile pretends to write
	counters  dataplane.Counters
	failFull  error // what Reconcile returns
}

func (b *recordingBackend) Prepare(context.Context) (json.RawMessage, int, error) {
	return nil, 1450, nil
}
func (b *recordingBackend) Cleanup(context.Context) error { return nil }
func (b *recordingBackend) Counters() dataplane.Counters  { return b.counters }

func (b *recordingBackend) Reconcile(_ context.Context, _ subnet.Lease, peers []subnet.Lease) error {
	b.calls = append(b.calls, fmt.Sprintf("full %d", len(peers)))
	b.counters.Routes += b.writes
	b.writes = 0
	return b.failFull
}

func (b *recordingBackend) Update(_ context.Context, _ subnet.Lease, changed []subnet.Lease, removed []netip.Prefix) (bool, error) {
	if b.decline {
		return false, nil
	}
	var add, del []string
	for _, l := range changed {
		add = append(add, l.Subnet.String())
	}
	for _, p := range removed {
		del = append(del, p.String())
	}
	slices.Sort(add)
	slices.Sort(del)
	b.calls = append(b.calls, fmt.Sprintf("update +%v -%v", add, del))
	return true, b.updateErr
}

// testDaemon returns a daemon for the IPv4 network 10.244.0.0/16 with one
// plane, on be.
func testDaemon(mgr leaseManager, be Backend) *daemon {
	network := netip.MustParsePrefix("10.244.0.0/16")
	d := &daemon{c: Config{ResyncInterval: time.Hour}, cfg: &subnet.Config{EnableIPv4: true, Network: network, SubnetLen: 24, Backend: subnet.BackendConfig{Type: "vxlan"}},
		mgr: mgr, met: newMetrics(), hl: &health{}, log: slog.New(slog.DiscardHandler), mtu: 1450}
	d.planes = []*plane{{d: d, be: be, policy: subnet.PeerPolicy{Network: network}}}
	return d
}

type staticLeases struct {
	own    subnet.Lease
	peers  []subnet.Lease
	runErr error // Run returns it at once; nil: Run waits for its context
}

func (m *staticLeases) Acquire(context.Context) (subnet.Lease, error) { return m.own, nil }
func (m *staticLeases) Own() subnet.Lease                             { return m.own }
func (m *staticLeases) Peers() ([]subnet.Lease, bool)                 { return slices.Clone(m.peers), true }
func (m *staticLeases) Changed() <-chan struct{}                      { return nil }
func (m *staticLeases) Run(ctx context.Context) error {
	if m.runErr != nil {
		return m.runErr
	}
	<-ctx.Done()
	return nil
}
func (m *staticLeases) Release(context.Context) error { return nil }

func TestPassChoosesUpdateOrFull(t *testing.T) {
	mk := func(sn, ip string) subnet.Lease {
		return subnet.Lease{Subnet: netip.MustParsePrefix(sn), Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr(ip), BackendType: "vxlan"}}
	}
	own := mk("10.244.1.0/24", "198.18.0.1")
	mgr := &staticLeases{own: own, peers: []subnet.Lease{mk("10.244.2.0/24", "198.18.0.2"), mk("10.244.3.0/24", "198.18.0.3")}}
	be := &recordingBackend{}
	d := testDaemon(mgr, be)
	d.envLease = own
	ctx := context.Background()
	step := func(name string, full bool, want ...string) {
		t.Helper()
		be.calls = nil
		d.pass(ctx, full)
		if !slices.Equal(be.calls, want) {
			t.Fatalf("%s: backend calls %q, want %q", name, be.calls, want)
		}
	}

	step("a change before any full pass", false, "full 2")
	mgr.peers = append(mgr.peers, mk("10.244.4.0/24", "198.18.0.4"))
	step("peer added", false, "update +[10.244.4.0/24] -[]")
	mgr.peers[0] = mk("10.244.2.0/24", "198.18.0.22")
	mgr.peers = mgr.peers[:2]
	step("one changed, one removed", false, "update +[10.244.2.0/24] -[10.244.4.0/24]")
	step("nothing changed", false)
	if v := counter(t, d.met.incrementals); v != 2 {
		t.Errorf("twill_reconcile_incremental_total = %v, want 2", v)
	}

	// A lease FilterPeers would skip: the full pass decides, and while a
	// skipped lease is there every change takes it.
	mgr.peers = append(mgr.peers, mk("10.244.3.0/25", "198.18.0.9"))
	step("an overlapping lease", false, "full 2")
	mgr.peers = append(mgr.peers, mk("10.244.5.0/24", "198.18.0.5"))
	step("a change beside a skipped lease", false, "full 3")
	mgr.peers = slices.DeleteFunc(mgr.peers, func(l subnet.Lease) bool { return l.Subnet.Bits() == 25 })
	step("the skipped lease gone", false, "full 3")
	mgr.peers = append(mgr.peers, mk("10.244.6.0/24", "198.18.0.6"))
	step("incremental again", false, "update +[10.244.6.0/24] -[]")

	// Two peers on one known subnet (Kubernetes: two Nodes, one podCIDR),
	// one of the others gone meanwhile: the full pass decides the winner.
	mgr.peers = []subnet.Lease{mgr.peers[0], mgr.peers[1], mk("10.244.2.0/24", "198.18.0.77"), mgr.peers[3]}
	step("a duplicate subnet", false, "full 3") // one of the two skipped
	mgr.peers = slices.Delete(mgr.peers, 2, 3)
	step("the duplicate gone", false, "full 3")
	mgr.peers = append(mgr.peers, mk("10.244.9.0/24", "198.18.0.9"))
	step("incremental again after the duplicate", false, "update +[10.244.9.0/24] -[]")

	// The own lease changed: full.
	mgr.own = mk("10.244.1.0/24", "198.18.0.100")
	step("own public IP changed", false, "full 4")

	// The backend declines or fails: the full pass follows at once.
	mgr.peers = append(mgr.peers, mk("10.244.7.0/24", "198.18.0.7"))
	be.decline = true
	step("backend declines", false, "full 5")
	be.decline = false
	be.updateErr = errors.New("netlink said no")
	mgr.peers = append(mgr.peers, mk("10.244.8.0/24", "198.18.0.8"))
	step("update fails", false, "update +[10.244.8.0/24] -[]", "full 6")
	be.updateErr = nil

	// More changes than maxIncremental: one full pass.
	for i := range maxIncremental + 1 {
		mgr.peers = append(mgr.peers, mk(fmt.Sprintf("10.244.%d.0/24", 20+i), fmt.Sprintf("198.18.1.%d", i)))
	}
	step("a large burst", false, fmt.Sprintf("full %d", 6+maxIncremental+1))

	// The resync tick is a full pass; with nothing changed, its writes are repairs.
	be.writes = 3
	step("resync", true, fmt.Sprintf("full %d", 6+maxIncremental+1))
	var m dto.Metric
	if err := d.met.repairs.WithLabelValues("route", "ipv4").Write(&m); err != nil || m.GetCounter().GetValue() != 3 {
		t.Errorf("route repairs = %v (%v), want 3", m.GetCounter().GetValue(), err)
	}
}

func counter(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// The node is ready (twill_ready, /readyz) once a pass has programmed the
// datapath, not when the env file is written: a node whose first pass fails
// stays not ready until one succeeds.
func TestReadyAfterTheFirstGoodPass(t *testing.T) {
	own := subnet.Lease{Subnet: netip.MustParsePrefix("10.244.1.0/24"), Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("198.18.0.1"), BackendType: "vxlan"}}
	be := &recordingBackend{failFull: errors.New("route 10.244.2.0/24: file exists")}
	hl := &health{notReady: "acquiring a lease"}
	d := testDaemon(&staticLeases{own: own}, be)
	d.c.SubnetFile, d.hl = filepath.Join(t.TempDir(), "subnet.env"), hl
	if err := d.writeEnv(own); err != nil {
		t.Fatal(err)
	}
	if r := hl.reason(); r != "programming the datapath" || gauge(t, d.met.ready) != 0 {
		t.Fatalf("after the env file: /readyz reason %q, twill_ready %v; want not ready", r, gauge(t, d.met.ready))
	}
	d.pass(context.Background(), true)
	if r := hl.reason(); r == "" || gauge(t, d.met.ready) != 0 {
		t.Fatalf("after a failed pass: /readyz reason %q, twill_ready %v; want not ready", r, gauge(t, d.met.ready))
	}
	be.failFull = nil
	d.pass(context.Background(), true)
	if r := hl.reason(); r != "" || gauge(t, d.met.ready) != 1 {
		t.Fatalf("after a good pass: /readyz reason %q, twill_ready %v; want ready", r, gauge(t, d.met.ready))
	}
}

// A lease manager that fails ends the daemon's run with its error (twilld
// exits and is restarted); one that stops because twilld stops does not.
func TestRunEndsWithTheLeaseManagersError(t *testing.T) {
	own := subnet.Lease{Subnet: netip.MustParsePrefix("10.244.1.0/24"), Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("198.18.0.1"), BackendType: "vxlan"}}
	newDaemon := func(mgr leaseManager) *daemon {
		d := testDaemon(mgr, &recordingBackend{})
		d.envLease = own
		return d
	}
	err := newDaemon(&staticLeases{own: own, runErr: errors.New("watch compacted beyond recovery")}).run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "watch compacted beyond recovery") {
		t.Fatalf("run = %v, want the lease manager's error", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- newDaemon(&staticLeases{own: own}).run(ctx) }()
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("run after the context ended = %v, want nil", err)
	}
}

// A dual-stack daemon runs one plane per family, each seeing the leases
// projected on its family: a change of a peer's IPv6 subnet touches only
// the IPv6 plane, a peer without IPv6 only the IPv4 one, and the node is
// ready only once both planes had a good pass.
func TestDualStackPlanes(t *testing.T) {
	mk := func(i int, v6 bool) subnet.Lease {
		l := subnet.Lease{Subnet: netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", i)),
			Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr(fmt.Sprintf("198.18.0.%d", i)), BackendType: "vxlan", BackendData: json.RawMessage(`{"v":4}`)}}
		if v6 {
			l.IPv6Subnet = netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%d::/64", i))
			l.Attrs.PublicIPv6 = netip.MustParseAddr(fmt.Sprintf("fd00:198:18::%d", i))
			l.Attrs.BackendV6Data = json.RawMessage(`{"v":6}`)
		}
		return l
	}
	own := mk(1, true)
	mgr := &staticLeases{own: own, peers: []subnet.Lease{mk(2, true), mk(3, true)}}
	be4, be6 := &recordingBackend{failFull: errors.New("not yet")}, &recordingBackend{}
	d := testDaemon(mgr, be4)
	d.cfg.EnableIPv6, d.cfg.IPv6Network, d.cfg.IPv6SubnetLen = true, netip.MustParsePrefix("fd00:10:244::/56"), 64
	d.planes = append(d.planes, &plane{d: d, v6: true, be: be6, policy: subnet.PeerPolicy{Network: d.cfg.IPv6Network}})
	d.c.SubnetFile = filepath.Join(t.TempDir(), "subnet.env")
	if err := d.writeEnv(own); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	step := func(name string, full bool, want4, want6 []string) {
		t.Helper()
		be4.calls, be6.calls = nil, nil
		d.pass(ctx, full)
		if !slices.Equal(be4.calls, want4) || !slices.Equal(be6.calls, want6) {
			t.Fatalf("%s: IPv4 backend calls %q, IPv6 %q; want %q and %q", name, be4.calls, be6.calls, want4, want6)
		}
	}
	step("first pass, IPv4 fails", true, []string{"full 2"}, []string{"full 2"})
	if gauge(t, d.met.ready) != 0 {
		t.Fatal("ready although the IPv4 plane failed")
	}
	be4.failFull = nil
	step("second pass", true, []string{"full 2"}, []string{"full 2"})
	if gauge(t, d.met.ready) != 1 {
		t.Fatal("not ready after both planes succeeded")
	}
	moved := mk(2, true)
	moved.IPv6Subnet = netip.MustParsePrefix("fd00:10:244:22::/64")
	mgr.peers[0] = moved
	step("a peer's IPv6 subnet changed", false, nil, []string{"update +[fd00:10:244:22::/64] -[fd00:10:244:2::/64]"})
	mgr.peers = append(mgr.peers, mk(4, false))
	step("a peer without IPv6", false, []string{"update +[10.244.4.0/24] -[]"}, nil)
	mgr.peers[1].Attrs.BackendV6Data = json.RawMessage(`{"v":66}`)
	step("a peer's IPv6 backend data changed", false, nil, []string{"update +[fd00:10:244:3::/64] -[]"})

	env, err := subnet.ReadEnv(d.c.SubnetFile)
	if err != nil || env.Subnet.String() != "10.244.1.1/24" || env.IPv6Subnet.String() != "fd00:10:244:1::1/64" {
		t.Fatalf("env file = %+v, %v", env, err)
	}
}

// fakeKeeper is a masq.Keeper that records what it was asked to keep.
type fakeKeeper struct {
	err    error
	drift  bool // the next Ensure finds the rules changed by hand
	have   []masq.Config
	writes [2]uint64
}

func (k *fakeKeeper) Ensure(_ context.Context, cfgs []masq.Config) error {
	if k.err != nil {
		return k.err
	}
	if k.drift || !slices.Equal(cfgs, k.have) {
		for _, c := range cfgs {
			if c.Network.Addr().Is6() {
				k.writes[1]++
			} else {
				k.writes[0]++
			}
		}
	}
	k.drift, k.have = false, slices.Clone(cfgs)
	return nil
}

func (k *fakeKeeper) Writes(v6 bool) uint64 {
	if v6 {
		return k.writes[1]
	}
	return k.writes[0]
}

// Rules that cannot be written keep the node not ready and count as failed
// passes; once written, what a later pass writes for the same subnet is a
// repair, and what it writes for a new subnet is not.
func TestMasqueradeRulesInThePass(t *testing.T) {
	own := subnet.Lease{Subnet: netip.MustParsePrefix("10.244.1.0/24"), Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("198.18.0.1"), BackendType: "vxlan"}}
	mgr := &staticLeases{own: own}
	d := testDaemon(mgr, &recordingBackend{})
	k := &fakeKeeper{err: errors.New("nf_tables: operation not supported")}
	d.rules, d.rulesMode, d.hl = k, masq.ModeNFTables, &health{notReady: "programming the datapath"}
	repairs := func() float64 { return counter(t, d.met.repairs.WithLabelValues("nftables", "ipv4")) }

	d.pass(context.Background(), true)
	if gauge(t, d.met.ready) != 0 || counter(t, d.met.reconciles.WithLabelValues("error")) != 1 {
		t.Fatalf("rules failing: twill_ready %v, failed passes %v; want not ready, 1", gauge(t, d.met.ready), counter(t, d.met.reconciles.WithLabelValues("error")))
	}
	k.err = nil
	d.pass(context.Background(), true)
	if gauge(t, d.met.ready) != 1 || k.writes[0] != 1 || repairs() != 0 {
		t.Fatalf("rules written: twill_ready %v, writes %d, repairs %v; want ready, 1, 0", gauge(t, d.met.ready), k.writes[0], repairs())
	}
	want := []masq.Config{{Network: netip.MustParsePrefix("10.244.0.0/16"), Subnet: own.Subnet}}
	if !slices.Equal(k.have, want) {
		t.Fatalf("rules kept for %v, want %v", k.have, want)
	}
	k.drift = true
	d.pass(context.Background(), true)
	if repairs() != 1 {
		t.Fatalf("drift repaired: repairs %v, want 1", repairs())
	}
	mgr.own.Subnet = netip.MustParsePrefix("10.244.9.0/24") // a new lease: the rules follow, at once
	d.pass(context.Background(), false)
	if k.have[0].Subnet != mgr.own.Subnet || repairs() != 1 {
		t.Fatalf("after the subnet changed: rules for %v, repairs %v; want %v, 1", k.have[0].Subnet, repairs(), mgr.own.Subnet)
	}
}
