package masq

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func TestChooseMode(t *testing.T) {
	yes, no := true, false
	has := func(names ...string) func(string) (string, error) {
		return func(name string) (string, error) {
			for _, n := range names {
				if n == name {
					return "/usr/sbin/" + name, nil
				}
			}
			return "", errors.New("not found")
		}
	}
	v4, dual := []bool{false}, []bool{false, true}
	for _, tc := range []struct {
		name     string
		enable   *bool
		families []bool
		lookPath func(string) (string, error)
		want     Mode
		why      string
	}{
		{"true wins over an installed iptables", &yes, v4, has("iptables", "ip6tables"), ModeNFTables, "EnableNFTables is true"},
		{"false wins over a missing iptables", &no, v4, has(), ModeIPTables, "EnableNFTables is false"},
		{"not set, iptables installed", nil, v4, has("iptables"), ModeIPTables, "iptables is installed"},
		{"not set, no iptables", nil, v4, has(), ModeNFTables, "iptables is not installed"},
		{"not set, dual-stack without ip6tables", nil, dual, has("iptables"), ModeNFTables, "ip6tables is not installed"},
		{"not set, IPv4 network needs no ip6tables", nil, v4, has("iptables"), ModeIPTables, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mode, why := ChooseMode(tc.enable, tc.families, tc.lookPath)
			if mode != tc.want || !strings.Contains(why, tc.why) {
				t.Errorf("ChooseMode = %s (%q), want %s (%q)", mode, why, tc.want, tc.why)
			}
		})
	}
}

// IPTablesRules keeps one Manager per family and carries the writes of a
// replaced one over, so the count never goes back.
func TestIPTablesRulesFollowsTheSubnet(t *testing.T) {
	ctx := context.Background()
	v4, v6 := newFake(), newFake()
	r := NewIPTablesRules(v4, v6, nil)
	if err := r.Ensure(ctx, []Config{testCfg, testCfg6}); err != nil {
		t.Fatal(err)
	}
	w4, w6 := r.Writes(false), r.Writes(true)
	if w4 == 0 || w6 == 0 {
		t.Fatalf("writes after the first Ensure: %d, %d", w4, w6)
	}
	if err := r.Ensure(ctx, []Config{testCfg, testCfg6}); err != nil {
		t.Fatal(err)
	}
	if r.Writes(false) != w4 || r.Writes(true) != w6 {
		t.Fatalf("a second Ensure wrote: %d, %d", r.Writes(false)-w4, r.Writes(true)-w6)
	}
	moved := testCfg
	moved.Subnet = netip.MustParsePrefix("10.244.9.0/24")
	if err := r.Ensure(ctx, []Config{moved, testCfg6}); err != nil {
		t.Fatal(err)
	}
	if r.Writes(false) <= w4 || r.Writes(true) != w6 {
		t.Fatalf("after the IPv4 subnet moved: writes %d -> %d, IPv6 %d -> %d", w4, r.Writes(false), w6, r.Writes(true))
	}
	if !strings.Contains(strings.Join(v4.chains["nat/"+NATChain], "\n"), "10.244.9.0/24") {
		t.Fatalf("IPv4 nat chain after the move:\n%s", strings.Join(v4.chains["nat/"+NATChain], "\n"))
	}
	if err := r.Ensure(ctx, []Config{testCfg, testCfg}); err == nil || !strings.Contains(err.Error(), "two IPv4 networks") {
		t.Fatalf("two IPv4 configs: %v", err)
	}
	if err := NewIPTablesRules(v4, nil, nil).Ensure(ctx, []Config{testCfg6}); err == nil {
		t.Fatal("an IPv6 config without an ip6tables handle was accepted")
	}
}
