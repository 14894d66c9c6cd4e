package subnet

import (
	"errors"
	"math/rand/v2"
	"net/netip"
	"testing"
)

func mustConfig(t *testing.T, s string) *Config {
	t.Helper()
	c, err := ParseConfig([]byte(s))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestPickFreeFillsRangeThenFails(t *testing.T) {
	c := mustConfig(t, `{"Network":"10.5.0.0/16","SubnetMin":"10.5.10.0","SubnetMax":"10.5.19.0"}`)
	taken := map[netip.Prefix]bool{}
	rnd := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 10; i++ {
		p, err := PickFree(c.Range(false), taken, rnd)
		if err != nil {
			t.Fatalf("pick %d: %v", i, err)
		}
		if taken[p] {
			t.Fatalf("picked %s twice", p)
		}
		if !c.Range(false).Contains(p) || p.Addr().As4()[2] < 10 || p.Addr().As4()[2] > 19 {
			t.Fatalf("picked %s outside SubnetMin..SubnetMax", p)
		}
		taken[p] = true
	}
	if _, err := PickFree(c.Range(false), taken, rnd); !errors.Is(err, ErrNoFreeSubnet) {
		t.Fatalf("full range: err = %v, want ErrNoFreeSubnet", err)
	}
}

func TestPickFreeAlignmentAndOddLeases(t *testing.T) {
	c := mustConfig(t, `{"Network":"10.6.0.0/24","SubnetLen":26}`)
	// A /25 left from an older SubnetLen covers the first two /26s.
	taken := map[netip.Prefix]bool{netip.MustParsePrefix("10.6.0.0/25"): true}
	seen := map[netip.Prefix]bool{}
	for i := 0; i < 200; i++ {
		p, err := PickFree(c.Range(false), taken, nil)
		if err != nil {
			t.Fatal(err)
		}
		if p.Bits() != 26 || p.Masked() != p {
			t.Fatalf("picked unaligned %s", p)
		}
		seen[p] = true
	}
	want := map[netip.Prefix]bool{netip.MustParsePrefix("10.6.0.128/26"): true, netip.MustParsePrefix("10.6.0.192/26"): true}
	if len(seen) != len(want) {
		t.Fatalf("picked %v, want exactly %v", seen, want)
	}
	for p := range seen {
		if !want[p] {
			t.Fatalf("picked %s, which overlaps the /25", p)
		}
	}
}

func TestPickFreeWholeIPv4Space(t *testing.T) {
	// The walk stops at the end of the address space without wrapping.
	c := mustConfig(t, `{"Network":"255.255.255.0/24","SubnetLen":30}`)
	taken := map[netip.Prefix]bool{}
	for i := 0; i < 63; i++ { // 64 /30s, the first not handed out
		p, err := PickFree(c.Range(false), taken, nil)
		if err != nil {
			t.Fatalf("pick %d: %v", i, err)
		}
		taken[p] = true
	}
	if _, err := PickFree(c.Range(false), taken, nil); !errors.Is(err, ErrNoFreeSubnet) {
		t.Fatalf("err = %v", err)
	}
}

func TestKeyName(t *testing.T) {
	p := netip.MustParsePrefix("10.244.7.0/24")
	if got := KeyName(p); got != "10.244.7.0-24" {
		t.Fatalf("KeyName = %q", got)
	}
	for _, s := range []string{"10.244.7.0-24", "10.244.7.0/24"} {
		got, err := ParseKeyName(s)
		if err != nil || got != p {
			t.Errorf("ParseKeyName(%q) = %v, %v", s, got, err)
		}
	}
	for _, bad := range []string{"", "10.244.7.1-24", "10.244.7.0", "x-24", "10.244.7.0-33", "10.244.7.0-", "fd00::-64", "10.244.7.1/24"} {
		if _, err := ParseKeyName(bad); err == nil {
			t.Errorf("ParseKeyName(%q) accepted", bad)
		}
	}
}

func TestParseLeaseAttrs(t *testing.T) {
	a, err := ParseLeaseAttrs([]byte(`{"PublicIP":"198.18.0.2","BackendType":"vxlan","BackendData":{"VtepMAC":"aa:bb:cc:dd:ee:ff"}}`))
	if err != nil || a.PublicIP != netip.MustParseAddr("198.18.0.2") || a.BackendType != "vxlan" {
		t.Fatalf("got %+v, %v", a, err)
	}
	for _, bad := range []string{``, `{}`, `{"PublicIP":"x","BackendType":"vxlan"}`, `{"PublicIP":"198.18.0.2"}`, `{"PublicIP":"fd00::1","BackendType":"vxlan"}`, `[1,2]`} {
		if _, err := ParseLeaseAttrs([]byte(bad)); err == nil {
			t.Errorf("ParseLeaseAttrs(%q) accepted", bad)
		}
	}
	big := make([]byte, MaxLeaseValueSize+1)
	if _, err := ParseLeaseAttrs(big); err == nil {
		t.Error("oversize value accepted")
	}
}

func BenchmarkPickFree5000(b *testing.B) {
	c, _ := ParseConfig([]byte(`{"Network":"10.0.0.0/8"}`))
	taken := map[netip.Prefix]bool{}
	for i := 0; i < 5000; i++ {
		p, _ := PickFree(c.Range(false), taken, nil)
		taken[p] = true
	}
	b.ResetTimer()
	for b.Loop() {
		if _, err := PickFree(c.Range(false), taken, nil); err != nil {
			b.Fatal(err)
		}
	}
}
