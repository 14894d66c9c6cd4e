package etcd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/twillnet/twill/internal/tools/testenv"
	"github.com/twillnet/twill/subnet"
)

const testConfig = `{"Network":"10.244.0.0/16","Backend":{"Type":"alloc"}}`

func testLog(t *testing.T) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

type fixture struct {
	endpoint string
	cli      *clientv3.Client
	reg      *Registry
	cfg      *subnet.Config
}

func newFixture(t *testing.T, config string) *fixture {
	t.Helper()
	ep := testenv.Etcd(t)
	cli := testenv.EtcdClient(t, ep)
	reg := NewRegistry(cli, DefaultPrefix, testLog(t))
	cfg, err := reg.SetConfig(context.Background(), []byte(config))
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{endpoint: ep, cli: cli, reg: reg, cfg: cfg}
}

func attrs(ip string) subnet.LeaseAttrs {
	return subnet.LeaseAttrs{PublicIP: netip.MustParseAddr(ip), BackendType: "alloc"}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestConfigRoundTripInEtcd(t *testing.T) {
	f := newFixture(t, testConfig)
	ctx := ctxT(t)
	got, err := f.reg.Config(ctx)
	if err != nil || got.Network != netip.MustParsePrefix("10.244.0.0/16") {
		t.Fatalf("Config = %+v, %v", got, err)
	}
	// An invalid config is refused and the stored one is untouched.
	if _, err := f.reg.SetConfig(ctx, []byte(`{"Network":"10.244.0.0/33"}`)); err == nil {
		t.Fatal("invalid config accepted")
	}
	raw, err := f.reg.RawConfig(ctx)
	if err != nil || string(raw) != testConfig {
		t.Fatalf("stored config changed: %q, %v", raw, err)
	}
	empty := NewRegistry(f.cli, "/other", nil)
	if _, err := empty.Config(ctx); !errors.Is(err, ErrNoConfig) {
		t.Fatalf("err = %v, want ErrNoConfig", err)
	}
}

func TestFiftyConcurrentAcquiresAreDistinct(t *testing.T) {
	f := newFixture(t, `{"Network":"10.244.0.0/16","SubnetMin":"10.244.0.0","SubnetMax":"10.244.63.0","Backend":{"Type":"alloc"}}`)
	ctx := ctxT(t)
	const n = 50
	var wg sync.WaitGroup
	got := make([]netip.Prefix, n)
	errs := make([]error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Each node has its own client, as real nodes do.
			cli := testenv.EtcdClient(t, f.endpoint)
			reg := NewRegistry(cli, DefaultPrefix, nil)
			a, err := reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: attrs(fmt.Sprintf("198.18.1.%d", i+1)), TTL: time.Minute})
			if err == nil {
				got[i] = a.Subnet
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	seen := map[netip.Prefix]int{}
	for i, p := range got {
		if errs[i] != nil {
			t.Fatalf("node %d: %v", i, errs[i])
		}
		if prev, dup := seen[p]; dup {
			t.Fatalf("nodes %d and %d both got %s", prev, i, p)
		}
		seen[p] = i
		if !f.cfg.Range(false).Contains(p) {
			t.Fatalf("node %d got %s outside the range", i, p)
		}
	}
	leases, _, err := f.reg.Leases(ctx)
	if err != nil || len(leases) != n {
		t.Fatalf("etcd holds %d leases (%v), want %d", len(leases), err, n)
	}
}

func TestExhaustionIsAClearError(t *testing.T) {
	f := newFixture(t, `{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.3.0","Backend":{"Type":"alloc"}}`)
	ctx := ctxT(t)
	for i := 1; i <= 3; i++ {
		if _, err := f.reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: attrs(fmt.Sprintf("198.18.0.%d", i)), TTL: time.Minute}); err != nil {
			t.Fatal(err)
		}
	}
	_, err := f.reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: attrs("198.18.0.9"), TTL: time.Minute})
	if !errors.Is(err, subnet.ErrNoFreeSubnet) {
		t.Fatalf("err = %v, want ErrNoFreeSubnet", err)
	}
	t.Logf("exhaustion error: %v", err)
}

func TestRestartReusesSubnet(t *testing.T) {
	f := newFixture(t, testConfig)
	ctx := ctxT(t)
	first, err := f.reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: attrs("198.18.0.1"), TTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	// Same public IP: the lease is taken over, onto a new etcd lease.
	again, err := f.reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: attrs("198.18.0.1"), TTL: time.Minute})
	if err != nil || again.Subnet != first.Subnet || !again.Reused {
		t.Fatalf("restart got %+v, %v; want %s reused", again, err, first.Subnet)
	}
	if again.EtcdLease == first.EtcdLease {
		t.Fatal("restart kept the old etcd lease")
	}
	// The old etcd lease was revoked without taking the key with it.
	l, err := f.reg.Lease(ctx, first.Subnet)
	if err != nil || l.EtcdLease != again.EtcdLease {
		t.Fatalf("lease after takeover: %+v, %v", l, err)
	}

	// A node whose lease is gone but whose env file names a free subnet gets it back.
	prev := netip.MustParsePrefix("10.244.200.0/24")
	a, err := f.reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: attrs("198.18.0.2"), TTL: time.Minute, Previous: prev})
	if err != nil || a.Subnet != prev {
		t.Fatalf("previous subnet: got %+v, %v", a, err)
	}
	// ...but not when another node holds it.
	b, err := f.reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: attrs("198.18.0.3"), TTL: time.Minute, Previous: prev})
	if err != nil || b.Subnet == prev {
		t.Fatalf("taken previous subnet: got %+v, %v", b, err)
	}
}

func TestTTLExpiryFreesSubnet(t *testing.T) {
	f := newFixture(t, `{"Network":"10.244.0.0/16","SubnetMin":"10.244.5.0","SubnetMax":"10.244.5.0","Backend":{"Type":"alloc"}}`)
	ctx := ctxT(t)
	a, err := f.reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: attrs("198.18.0.1"), TTL: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: attrs("198.18.0.2"), TTL: time.Minute}); !errors.Is(err, subnet.ErrNoFreeSubnet) {
		t.Fatalf("second node while the first holds the only subnet: %v", err)
	}
	// Nobody keeps it alive: etcd drops the key when the TTL runs out.
	waitFor(t, "lease to expire", 20*time.Second, func() bool {
		_, err := f.reg.Lease(ctx, a.Subnet)
		return errors.Is(err, ErrLeaseNotFound)
	})
	b, err := f.reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: attrs("198.18.0.2"), TTL: time.Minute})
	if err != nil || b.Subnet != a.Subnet {
		t.Fatalf("after expiry: %+v, %v", b, err)
	}
}

func TestMalformedLeasesAreSkipped(t *testing.T) {
	f := newFixture(t, `{"Network":"10.244.0.0/16","SubnetMin":"10.244.0.0","SubnetMax":"10.244.63.0","Backend":{"Type":"alloc"}}`)
	ctx := ctxT(t)
	bad := map[string]string{
		"not-a-subnet":   `{"PublicIP":"198.18.0.7","BackendType":"alloc"}`,
		"10.244.9.0-24":  `{garbage`,
		"10.244.10.0-24": `{"BackendType":"alloc"}`,
		"10.244.11.5-24": `{"PublicIP":"198.18.0.8","BackendType":"alloc"}`,
	}
	for k, v := range bad {
		if _, err := f.cli.Put(ctx, f.reg.SubnetsPrefix()+k, v); err != nil {
			t.Fatal(err)
		}
	}
	good, err := f.reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: attrs("198.18.0.1"), TTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	leases, _, err := f.reg.Leases(ctx)
	if err != nil || len(leases) != 1 || leases[0].Subnet != good.Subnet {
		t.Fatalf("Leases = %+v, %v; want only %s", leases, err, good.Subnet)
	}
	// Allocation still works and never hands out a subnet whose key exists, even a malformed one.
	for i := 0; i < 40; i++ {
		a, err := f.reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: attrs(fmt.Sprintf("198.18.0.%d", 20+i)), TTL: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		if a.Subnet == netip.MustParsePrefix("10.244.9.0/24") || a.Subnet == netip.MustParsePrefix("10.244.10.0/24") {
			t.Fatalf("handed out %s whose key holds garbage", a.Subnet)
		}
	}
}

func TestAddressChangeKeepsSubnetByNodeName(t *testing.T) {
	f := newFixture(t, testConfig)
	ctx := ctxT(t)
	a := attrs("198.18.0.3")
	a.NodeName = "h3"
	first, err := f.reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: a, TTL: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	// The node comes back with a new address; its env file names its subnet.
	b := attrs("198.18.0.13")
	b.NodeName = "h3"
	again, err := f.reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: b, TTL: time.Minute, Previous: first.Subnet})
	if err != nil || again.Subnet != first.Subnet {
		t.Fatalf("after the address change: %+v, %v; want %s", again, err, first.Subnet)
	}
	l, err := f.reg.Lease(ctx, first.Subnet)
	if err != nil || l.Attrs.PublicIP != netip.MustParseAddr("198.18.0.13") {
		t.Fatalf("lease not updated in place: %+v, %v", l, err)
	}
	// Without the node name as evidence, a taken previous subnet is not taken over.
	c := attrs("198.18.0.14")
	c.NodeName = "other"
	other, err := f.reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: c, TTL: time.Minute, Previous: first.Subnet})
	if err != nil || other.Subnet == first.Subnet {
		t.Fatalf("another node took %s: %+v, %v", first.Subnet, other, err)
	}
}

func TestSamePublicIPOnTwoNodesIsRefused(t *testing.T) {
	f := newFixture(t, testConfig)
	ctx := ctxT(t)
	a := attrs("198.18.0.5")
	a.NodeName = "n1"
	if _, err := f.reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: a, TTL: time.Minute}); err != nil {
		t.Fatal(err)
	}
	b := attrs("198.18.0.5")
	b.NodeName = "n2"
	_, err := f.reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: b, TTL: time.Minute})
	if !errors.Is(err, ErrPublicIPInUse) || !strings.Contains(err.Error(), `leased to node "n1"`) {
		t.Fatalf("err = %v, want ErrPublicIPInUse naming n1", err)
	}
	leases, _, _ := f.reg.Leases(ctx)
	if len(leases) != 1 || leases[0].Attrs.NodeName != "n1" {
		t.Fatalf("leases after the refusal: %+v", leases)
	}
}

// A node whose lease is in flannel's dual-stack form (a flanneld that ran
// there before) takes its subnet over as twill's IPv4 lease, and the old key
// goes in the same transaction; operators find a dual-stack lease by its
// IPv4 subnet.
func TestDualStackLeaseIsTakenOver(t *testing.T) {
	f := newFixture(t, testConfig)
	ctx := ctxT(t)
	dualKey := f.reg.SubnetsPrefix() + "10.244.9.0-24&fd00:10:244:9::-64"
	if _, err := f.cli.Put(ctx, dualKey, `{"PublicIP":"198.18.0.9","PublicIPv6":"fd00:198:18::9","BackendType":"alloc"}`); err != nil {
		t.Fatal(err)
	}
	l, err := f.reg.Lease(ctx, netip.MustParsePrefix("10.244.9.0/24"))
	if err != nil || l.IPv6Subnet != netip.MustParsePrefix("fd00:10:244:9::/64") || l.Attrs.PublicIPv6 != netip.MustParseAddr("fd00:198:18::9") {
		t.Fatalf("the dual-stack lease read by its IPv4 subnet: %+v, %v", l, err)
	}
	a, err := f.reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: attrs("198.18.0.9"), TTL: time.Minute})
	if err != nil || a.Subnet != netip.MustParsePrefix("10.244.9.0/24") || !a.Reused {
		t.Fatalf("acquire: %+v, %v; want 10.244.9.0/24 taken over", a, err)
	}
	resp, err := f.cli.Get(ctx, f.reg.SubnetsPrefix(), clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, kv := range resp.Kvs {
		keys = append(keys, string(kv.Key))
	}
	if len(keys) != 1 || keys[0] != f.reg.SubnetKey(a.Subnet) {
		t.Fatalf("keys after the takeover: %v, want only %s", keys, f.reg.SubnetKey(a.Subnet))
	}
}

func dualAttrs(i int) subnet.LeaseAttrs {
	return subnet.LeaseAttrs{PublicIP: netip.MustParseAddr(fmt.Sprintf("198.18.1.%d", i)), PublicIPv6: netip.MustParseAddr(fmt.Sprintf("fd00:198:18::%d", i)), BackendType: "alloc"}
}

// Dual-stack nodes starting together each get one key in flannel's form
// holding a subnet of each family, and no two share either subnet: the
// IPv6 subnet, in the middle of the key, is guarded by the transaction too.
// The IPv6 range is smaller than the IPv4 one, so IPv6 collisions would
// show first.
func TestConcurrentDualStackAcquiresAreDistinct(t *testing.T) {
	f := newFixture(t, `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","IPv6SubnetMax":"fd00:10:244:20::","Backend":{"Type":"alloc"}}`)
	ctx := ctxT(t)
	const n = 30
	var wg sync.WaitGroup
	got := make([]*Acquired, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			reg := NewRegistry(testenv.EtcdClient(t, f.endpoint), DefaultPrefix, nil)
			got[i], errs[i] = reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: dualAttrs(i + 1), TTL: time.Minute})
		}()
	}
	wg.Wait()
	seen := map[netip.Prefix]int{}
	for i, a := range got {
		if errs[i] != nil {
			t.Fatalf("node %d: %v", i, errs[i])
		}
		for _, p := range []netip.Prefix{a.Subnet, a.IPv6Subnet} {
			if prev, dup := seen[p]; dup {
				t.Fatalf("nodes %d and %d both got %s", prev, i, p)
			}
			seen[p] = i
		}
		if !f.cfg.Range(false).Contains(a.Subnet) || !f.cfg.Range(true).Contains(a.IPv6Subnet) {
			t.Fatalf("node %d got %s and %s, outside the ranges", i, a.Subnet, a.IPv6Subnet)
		}
	}
	leases, _, err := f.reg.Leases(ctx)
	if err != nil || len(leases) != n {
		t.Fatalf("etcd holds %d leases (%v), want %d", len(leases), err, n)
	}
	for _, l := range leases {
		if want := f.reg.SubnetsPrefix() + subnet.LeaseKeyName(l.Subnet, l.IPv6Subnet); l.Key != want || !strings.Contains(l.Key, "&fd00:10:244:") {
			t.Fatalf("key %s, want %s", l.Key, want)
		}
	}
}

// A node keeps its subnets across restarts; when the network gains IPv6,
// the node keeps its IPv4 subnet and its key grows an IPv6 part in the same
// transaction; IPv6-only leases are "0.0.0.0-0&<v6>" keys, found by their
// IPv6 subnet.
func TestDualStackLeaseLifecycle(t *testing.T) {
	f := newFixture(t, testConfig)
	ctx := ctxT(t)
	v4only, err := f.reg.Acquire(ctx, AcquireRequest{Config: f.cfg, Attrs: dualAttrs(1), TTL: time.Minute})
	if err != nil || v4only.IPv6Subnet.IsValid() {
		t.Fatalf("IPv4-only acquire: %+v, %v", v4only, err)
	}
	dual, err := subnet.ParseConfig([]byte(`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"alloc"}}`))
	if err != nil {
		t.Fatal(err)
	}
	a, err := f.reg.Acquire(ctx, AcquireRequest{Config: dual, Attrs: dualAttrs(1), TTL: time.Minute})
	if err != nil || a.Subnet != v4only.Subnet || !a.IPv6Subnet.IsValid() {
		t.Fatalf("after enabling IPv6: %+v, %v; want %s kept and an IPv6 subnet", a, err, v4only.Subnet)
	}
	keysAre := func(want ...string) {
		t.Helper()
		resp, err := f.cli.Get(ctx, f.reg.SubnetsPrefix(), clientv3.WithPrefix(), clientv3.WithKeysOnly())
		if err != nil {
			t.Fatal(err)
		}
		var keys []string
		for _, kv := range resp.Kvs {
			keys = append(keys, strings.TrimPrefix(string(kv.Key), f.reg.SubnetsPrefix()))
		}
		if strings.Join(keys, " ") != strings.Join(want, " ") {
			t.Fatalf("keys %v, want %v", keys, want)
		}
	}
	keysAre(a.Name())
	again, err := f.reg.Acquire(ctx, AcquireRequest{Config: dual, Attrs: dualAttrs(1), TTL: time.Minute})
	if err != nil || again.Subnet != a.Subnet || again.IPv6Subnet != a.IPv6Subnet || !again.Reused {
		t.Fatalf("restart: %+v, %v; want the same two subnets", again, err)
	}
	keysAre(a.Name())
	if l, err := f.reg.Lease(ctx, a.IPv6Subnet); err != nil || l.Subnet != a.Subnet {
		t.Fatalf("lease by its IPv6 subnet: %+v, %v", l, err)
	}

	v6only, err := subnet.ParseConfig([]byte(`{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"alloc"}}`))
	if err != nil {
		t.Fatal(err)
	}
	attrs6 := dualAttrs(2)
	attrs6.PublicIP = netip.IPv4Unspecified()
	b, err := f.reg.Acquire(ctx, AcquireRequest{Config: v6only, Attrs: attrs6, TTL: time.Minute})
	if err != nil || b.Subnet.IsValid() || !b.IPv6Subnet.IsValid() || b.IPv6Subnet == a.IPv6Subnet {
		t.Fatalf("IPv6-only acquire: %+v, %v", b, err)
	}
	if !strings.HasPrefix(b.Name(), "0.0.0.0-0&fd00:10:244:") {
		t.Fatalf("IPv6-only key name %s", b.Name())
	}
	b2, err := f.reg.Acquire(ctx, AcquireRequest{Config: v6only, Attrs: attrs6, TTL: time.Minute})
	if err != nil || b2.IPv6Subnet != b.IPv6Subnet {
		t.Fatalf("IPv6-only restart: %+v, %v; want %s again", b2, err, b.IPv6Subnet)
	}
	if err := f.reg.DeleteLease(ctx, b.IPv6Subnet); err != nil {
		t.Fatal(err)
	}
	keysAre(a.Name())
}
