package masq

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/coreos/go-iptables/iptables"
)

// fakeIPT is an in-memory iptables with the behaviour masq relies on: builtin
// chains exist, a chain that is jumped to cannot be deleted, renaming a chain
// renames the jumps to it, -S prints "-N CHAIN" then the rules.
type fakeIPT struct {
	chains      map[string][]string // "table/chain" -> rule specs, joined by spaces
	randomFully bool
	// render turns a spec into what `-S` prints, to mimic an iptables
	// whose output differs from how twill writes the rule.
	render func(string) string
	writes []string // every mutating call, for idempotence checks
	failOn string   // a write whose description contains this fails
}

func newFake() *fakeIPT {
	return &fakeIPT{chains: map[string][]string{
		"nat/POSTROUTING":       {"-j KUBE-POSTROUTING"},
		"nat/KUBE-POSTROUTING":  {},
		"filter/FORWARD":        {"-j DOCKER-FORWARD"},
		"filter/DOCKER-FORWARD": {},
	}, randomFully: true}
}

func key(table, chain string) string { return table + "/" + chain }

func (f *fakeIPT) write(format string, args ...any) error {
	w := fmt.Sprintf(format, args...)
	f.writes = append(f.writes, w)
	if f.failOn != "" && strings.Contains(w, f.failOn) {
		return fmt.Errorf("fake failure: %s", w)
	}
	return nil
}

func (f *fakeIPT) ChainExists(table, chain string) (bool, error) {
	_, ok := f.chains[key(table, chain)]
	return ok, nil
}

func (f *fakeIPT) ClearChain(table, chain string) error {
	if err := f.write("-t %s -F/-N %s", table, chain); err != nil {
		return err
	}
	f.chains[key(table, chain)] = []string{}
	return nil
}

func (f *fakeIPT) referenced(table, chain string) bool {
	for k, rules := range f.chains {
		if !strings.HasPrefix(k, table+"/") {
			continue
		}
		for _, r := range rules {
			if strings.HasSuffix(r, "-j "+chain) {
				return true
			}
		}
	}
	return false
}

func (f *fakeIPT) ClearAndDeleteChain(table, chain string) error {
	if _, ok := f.chains[key(table, chain)]; !ok {
		return nil
	}
	if err := f.write("-t %s -F -X %s", table, chain); err != nil {
		return err
	}
	if f.referenced(table, chain) {
		return fmt.Errorf("iptables: Too many links: chain %s is jumped to", chain)
	}
	delete(f.chains, key(table, chain))
	return nil
}

func (f *fakeIPT) RenameChain(table, oldChain, newChain string) error {
	if err := f.write("-t %s -E %s %s", table, oldChain, newChain); err != nil {
		return err
	}
	rules, ok := f.chains[key(table, oldChain)]
	if !ok {
		return fmt.Errorf("no chain %s", oldChain)
	}
	if _, taken := f.chains[key(table, newChain)]; taken {
		return fmt.Errorf("chain %s exists", newChain)
	}
	delete(f.chains, key(table, oldChain))
	f.chains[key(table, newChain)] = rules
	for k, rs := range f.chains {
		for i, r := range rs {
			if strings.HasSuffix(r, "-j "+oldChain) {
				f.chains[k][i] = strings.TrimSuffix(r, oldChain) + newChain
			}
		}
	}
	return nil
}

func (f *fakeIPT) List(table, chain string) ([]string, error) {
	rules, ok := f.chains[key(table, chain)]
	if !ok {
		return nil, fmt.Errorf("iptables: No chain/target/match by that name")
	}
	out := []string{"-N " + chain}
	for _, r := range rules {
		if f.render != nil {
			r = f.render(r)
		}
		out = append(out, "-A "+chain+" "+r)
	}
	return out, nil
}

func (f *fakeIPT) Exists(table, chain string, spec ...string) (bool, error) {
	rules, ok := f.chains[key(table, chain)]
	if !ok {
		return false, fmt.Errorf("no chain %s", chain)
	}
	return slices.Contains(rules, strings.Join(spec, " ")), nil
}

func (f *fakeIPT) target(table string, spec []string) error {
	if i := slices.Index(spec, "-j"); i >= 0 && i+1 < len(spec) {
		t := spec[i+1]
		if t != "RETURN" && t != "ACCEPT" && t != "MASQUERADE" && f.chains[key(table, t)] == nil {
			return fmt.Errorf("Couldn't load target `%s'", t)
		}
	}
	return nil
}

func (f *fakeIPT) Insert(table, chain string, pos int, spec ...string) error {
	if err := f.write("-t %s -I %s %d %s", table, chain, pos, strings.Join(spec, " ")); err != nil {
		return err
	}
	if err := f.target(table, spec); err != nil {
		return err
	}
	k := key(table, chain)
	f.chains[k] = slices.Insert(f.chains[k], pos-1, strings.Join(spec, " "))
	return nil
}

func (f *fakeIPT) Append(table, chain string, spec ...string) error {
	if err := f.write("-t %s -A %s %s", table, chain, strings.Join(spec, " ")); err != nil {
		return err
	}
	if err := f.target(table, spec); err != nil {
		return err
	}
	k := key(table, chain)
	f.chains[k] = append(f.chains[k], strings.Join(spec, " "))
	return nil
}

func (f *fakeIPT) Delete(table, chain string, spec ...string) error {
	if err := f.write("-t %s -D %s %s", table, chain, strings.Join(spec, " ")); err != nil {
		return err
	}
	k := key(table, chain)
	i := slices.Index(f.chains[k], strings.Join(spec, " "))
	if i < 0 {
		return errors.New("Bad rule (does a matching rule exist in that chain?)")
	}
	f.chains[k] = slices.Delete(f.chains[k], i, i+1)
	return nil
}

func (f *fakeIPT) HasRandomFully() bool { return f.randomFully }

var testCfg = Config{Network: netip.MustParsePrefix("10.244.0.0/16"), Subnet: netip.MustParsePrefix("10.244.7.0/24")}

const (
	natJump = "-m comment --comment twill: masquerade pod traffic leaving the cluster network -j TWILL-POSTRTG"
	fwdJump = "-m comment --comment twill: accept traffic from and to the cluster network -j TWILL-FWD"
)

var wantNAT = []string{
	"-m mark --mark 0x4000/0x4000 -j RETURN",
	"-s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN",
	"-s 10.244.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully",
	"! -s 10.244.0.0/16 -d 10.244.7.0/24 -j RETURN",
	"! -s 10.244.0.0/16 -d 10.244.0.0/16 -j MASQUERADE --random-fully",
}

var wantFWD = []string{"-s 10.244.0.0/16 -j ACCEPT", "-d 10.244.0.0/16 -j ACCEPT"}

// The IPv6 half of a dual-stack node: a /56 network, a /64 per node.
var testCfg6 = Config{Network: netip.MustParsePrefix("fd00:10:244::/56"), Subnet: netip.MustParsePrefix("fd00:10:244:7::/64")}

var wantNAT6 = []string{
	"-m mark --mark 0x4000/0x4000 -j RETURN",
	"-s fd00:10:244::/56 -d fd00:10:244::/56 -j RETURN",
	"-s fd00:10:244::/56 ! -d ff00::/8 -j MASQUERADE --random-fully",
	"! -s fd00:10:244::/56 -d fd00:10:244:7::/64 -j RETURN",
	"! -s fd00:10:244::/56 -d fd00:10:244::/56 -j MASQUERADE --random-fully",
}

var wantFWD6 = []string{"-s fd00:10:244::/56 -j ACCEPT", "-d fd00:10:244::/56 -j ACCEPT"}

// families are the two Managers of a dual-stack node, for tests that run
// the same way for both.
var families = []struct {
	name     string
	cfg      Config
	nat, fwd []string
}{
	{"IPv4", testCfg, wantNAT, wantFWD},
	{"IPv6", testCfg6, wantNAT6, wantFWD6},
}

// protoFake is a fake that, like *iptables.IPTables, says which family it
// runs.
type protoFake struct {
	*fakeIPT
	proto iptables.Protocol
}

func (p protoFake) Proto() iptables.Protocol { return p.proto }

func checkRules(t *testing.T, f *fakeIPT, nat, fwd []string) {
	t.Helper()
	if got := f.chains["nat/TWILL-POSTRTG"]; !slices.Equal(got, nat) {
		t.Errorf("TWILL-POSTRTG:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(nat, "\n"))
	}
	if got := f.chains["filter/TWILL-FWD"]; !slices.Equal(got, fwd) {
		t.Errorf("TWILL-FWD:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(fwd, "\n"))
	}
	if got := f.chains["nat/POSTROUTING"]; !slices.Equal(got, []string{natJump, "-j KUBE-POSTROUTING"}) {
		t.Errorf("POSTROUTING: %q", got)
	}
	if got := f.chains["filter/FORWARD"]; !slices.Equal(got, []string{fwdJump, "-j DOCKER-FORWARD"}) {
		t.Errorf("FORWARD: %q", got)
	}
	for k := range f.chains {
		if strings.HasSuffix(k, newSuffix) {
			t.Errorf("left over chain %s", k)
		}
	}
}

func ensure(t *testing.T, m *Manager) {
	t.Helper()
	if err := m.Ensure(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestEnsure(t *testing.T) {
	for _, fam := range families {
		t.Run(fam.name, func(t *testing.T) {
			f := newFake()
			m, err := New(f, fam.cfg, nil)
			if err != nil {
				t.Fatal(err)
			}
			ensure(t, m)
			checkRules(t, f, fam.nat, fam.fwd)
			if m.Writes() != 2 { // two chains, each written with its jump
				t.Errorf("Writes() = %d after the first Ensure, want 2", m.Writes())
			}

			f.writes = nil
			ensure(t, m)
			if len(f.writes) != 0 {
				t.Errorf("second Ensure wrote: %q", f.writes)
			}
			if m.Writes() != 2 {
				t.Errorf("Writes() = %d after a second Ensure, want still 2", m.Writes())
			}
		})
	}
}

func TestRulesIPv6(t *testing.T) {
	for _, randomFully := range []bool{true, false} {
		var nat, fwd []string
		for _, r := range Rules(testCfg6, randomFully) {
			switch {
			case r.Table == "nat" && r.Chain == NATChain:
				nat = append(nat, strings.Join(r.Spec, " "))
			case r.Table == "filter" && r.Chain == ForwardChain:
				fwd = append(fwd, strings.Join(r.Spec, " "))
			default:
				t.Errorf("rule in an unexpected place: %s %s", r.Table, r)
			}
		}
		want := wantNAT6
		if !randomFully {
			want = nil
			for _, r := range wantNAT6 {
				want = append(want, strings.TrimSuffix(r, " --random-fully"))
			}
		}
		if !slices.Equal(nat, want) {
			t.Errorf("randomFully=%v: nat:\n%s\nwant:\n%s", randomFully, strings.Join(nat, "\n"), strings.Join(want, "\n"))
		}
		if !slices.Equal(fwd, wantFWD6) {
			t.Errorf("randomFully=%v: filter: %q", randomFully, fwd)
		}
		if all := strings.Join(nat, "\n"); strings.Contains(all, "224.0.0.0") || strings.Contains(all, "10.244") {
			t.Errorf("IPv4 address in IPv6 rules:\n%s", all)
		}
	}
}

func TestEnsureRepairs(t *testing.T) {
	for _, tc := range []struct {
		name   string
		tamper func(f *fakeIPT)
	}{
		{"rule deleted", func(f *fakeIPT) { f.chains["nat/TWILL-POSTRTG"] = slices.Delete(f.chains["nat/TWILL-POSTRTG"], 2, 3) }},
		{"rule added", func(f *fakeIPT) {
			f.chains["filter/TWILL-FWD"] = append(f.chains["filter/TWILL-FWD"], "-s 0.0.0.0/0 -j ACCEPT")
		}},
		{"rules reordered", func(f *fakeIPT) {
			r := f.chains["nat/TWILL-POSTRTG"]
			r[1], r[2] = r[2], r[1]
		}},
		{"chain flushed", func(f *fakeIPT) { f.chains["nat/TWILL-POSTRTG"] = []string{} }},
		{"jump deleted", func(f *fakeIPT) { f.chains["nat/POSTROUTING"] = []string{"-j KUBE-POSTROUTING"} }},
		{"everything deleted", func(f *fakeIPT) {
			f.chains["nat/POSTROUTING"] = []string{"-j KUBE-POSTROUTING"}
			f.chains["filter/FORWARD"] = []string{"-j DOCKER-FORWARD"}
			delete(f.chains, "nat/TWILL-POSTRTG")
			delete(f.chains, "filter/TWILL-FWD")
		}},
		{"interrupted rewrite left a -NEW chain", func(f *fakeIPT) {
			f.chains["nat/TWILL-POSTRTG-NEW"] = []string{"-j RETURN"}
			f.chains["nat/POSTROUTING"] = append([]string{strings.TrimSuffix(natJump, "TWILL-POSTRTG") + "TWILL-POSTRTG-NEW"}, f.chains["nat/POSTROUTING"]...)
			f.chains["nat/TWILL-POSTRTG"] = []string{}
		}},
	} {
		for _, fam := range families {
			t.Run(fam.name+"/"+tc.name, func(t *testing.T) {
				f := newFake()
				m, _ := New(f, fam.cfg, nil)
				ensure(t, m)
				before := m.Writes()
				tc.tamper(f)
				ensure(t, m)
				checkRules(t, f, fam.nat, fam.fwd)
				if m.Writes() == before {
					t.Error("the repair is not counted in Writes()")
				}
			})
		}
	}
}

func TestNetworkChangeReplacesRules(t *testing.T) {
	f := newFake()
	m, _ := New(f, testCfg, nil)
	ensure(t, m)
	m2, _ := New(f, Config{Network: netip.MustParsePrefix("10.50.0.0/16"), Subnet: netip.MustParsePrefix("10.50.3.0/24")}, nil)
	ensure(t, m2)
	checkRules(t, f, []string{
		"-m mark --mark 0x4000/0x4000 -j RETURN",
		"-s 10.50.0.0/16 -d 10.50.0.0/16 -j RETURN",
		"-s 10.50.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully",
		"! -s 10.50.0.0/16 -d 10.50.3.0/24 -j RETURN",
		"! -s 10.50.0.0/16 -d 10.50.0.0/16 -j MASQUERADE --random-fully",
	}, []string{"-s 10.50.0.0/16 -j ACCEPT", "-d 10.50.0.0/16 -j ACCEPT"})
}

func TestNoRandomFully(t *testing.T) {
	for _, fam := range families {
		f := newFake()
		f.randomFully = false
		m, _ := New(f, fam.cfg, nil)
		ensure(t, m)
		masquerades := 0
		for _, r := range f.chains["nat/TWILL-POSTRTG"] {
			if strings.Contains(r, "random-fully") {
				t.Errorf("%s: --random-fully used although unsupported: %s", fam.name, r)
			}
			if strings.HasSuffix(r, "-j MASQUERADE") {
				masquerades++
			}
		}
		if masquerades != 2 {
			t.Errorf("%s: %d MASQUERADE rules, want 2: %q", fam.name, masquerades, f.chains["nat/TWILL-POSTRTG"])
		}
	}
}

// An iptables that prints rules differently from how twill writes them costs
// one rewrite, not one per Ensure.
func TestOtherRenderingIsLearnt(t *testing.T) {
	f := newFake()
	f.render = func(s string) string { return strings.ReplaceAll(s, "-j", "--jump") }
	m, _ := New(f, testCfg, nil)
	ensure(t, m)
	f.writes = nil
	ensure(t, m)
	ensure(t, m)
	if len(f.writes) != 0 {
		t.Errorf("Ensure keeps rewriting: %q", f.writes)
	}
	f.chains["filter/TWILL-FWD"] = f.chains["filter/TWILL-FWD"][:1] // still repaired
	ensure(t, m)
	checkRules(t, f, wantNAT, wantFWD)
}

func TestEnsureReportsFailure(t *testing.T) {
	for _, fam := range families {
		t.Run(fam.name, func(t *testing.T) {
			f := newFake()
			f.failOn = "-A TWILL-FWD-NEW"
			m, _ := New(f, fam.cfg, nil)
			err := m.Ensure(context.Background())
			if err == nil || !strings.Contains(err.Error(), "filter TWILL-FWD") {
				t.Fatalf("want an error naming filter TWILL-FWD, got %v", err)
			}
			// The nat chain was still done.
			if got := f.chains["nat/TWILL-POSTRTG"]; !slices.Equal(got, fam.nat) {
				t.Errorf("nat chain: %q", got)
			}
		})
	}
}

func TestCleanup(t *testing.T) {
	for _, fam := range families {
		t.Run(fam.name, func(t *testing.T) {
			f := newFake()
			m, _ := New(f, fam.cfg, nil)
			ensure(t, m)
			f.chains["nat/TWILL-POSTRTG-NEW"] = []string{}
			for range 2 {
				if err := m.Cleanup(context.Background()); err != nil {
					t.Fatal(err)
				}
			}
			want := newFake().chains
			if len(f.chains) != len(want) {
				t.Errorf("chains left: %v", f.chains)
			}
			for k, rules := range want {
				if !slices.Equal(f.chains[k], rules) {
					t.Errorf("%s: %q, want %q", k, f.chains[k], rules)
				}
			}
			ensure(t, m) // usable again
			checkRules(t, f, fam.nat, fam.fwd)
		})
	}
}

func TestNewValidates(t *testing.T) {
	p := netip.MustParsePrefix
	for _, cfg := range []Config{
		{},
		{Network: p("10.244.0.0/16")},
		{Network: p("10.244.0.1/16"), Subnet: p("10.244.7.0/24")},
		{Network: p("10.244.0.0/16"), Subnet: p("10.245.7.0/24")},
		{Network: p("10.244.0.0/16"), Subnet: p("10.0.0.0/8")},
		{Network: p("fd00:10:244::/56")},
		{Network: p("fd00:10:244::1/56"), Subnet: p("fd00:10:244:7::/64")},        // host bits
		{Network: p("fd00:10:244::/56"), Subnet: p("fd00:10:244:7::1/64")},        // host bits
		{Network: p("fd00:10:244::/56"), Subnet: p("fd00:10:245:7::/64")},         // outside
		{Network: p("fd00:10:244::/56"), Subnet: p("fd00:10::/48")},               // larger
		{Network: p("10.244.0.0/16"), Subnet: p("fd00:10:244:7::/64")},            // families differ
		{Network: p("fd00:10:244::/56"), Subnet: p("10.244.7.0/24")},              // families differ
		{Network: p("::ffff:10.244.0.0/112"), Subnet: p("::ffff:10.244.7.0/120")}, // IPv4-mapped
	} {
		if _, err := New(newFake(), cfg, nil); err == nil {
			t.Errorf("New(%+v) accepted", cfg)
		}
	}
	for _, cfg := range []Config{
		testCfg,
		testCfg6,
		{Network: p("fd00::/64"), Subnet: p("fd00::/80")},
		{Network: p("fd00::/64"), Subnet: p("fd00::/64")},
	} {
		if _, err := New(newFake(), cfg, nil); err != nil {
			t.Errorf("New(%+v): %v", cfg, err)
		}
	}
}

// A Config of one family on a handle of the other would write rules the
// program refuses (or, for an IPv4 network given to ip6tables, cannot
// parse); New says so instead, naming both families.
func TestNewRefusesOtherFamilyHandle(t *testing.T) {
	for _, tc := range []struct {
		proto   iptables.Protocol
		cfg     Config
		wantErr string
	}{
		{iptables.ProtocolIPv4, testCfg, ""},
		{iptables.ProtocolIPv6, testCfg6, ""},
		{iptables.ProtocolIPv4, testCfg6, "is IPv6 but the iptables handle is for IPv4"},
		{iptables.ProtocolIPv6, testCfg, "is IPv4 but the iptables handle is for IPv6"},
	} {
		_, err := New(protoFake{newFake(), tc.proto}, tc.cfg, nil)
		switch {
		case tc.wantErr == "" && err != nil:
			t.Errorf("New(%v on proto %d): %v", tc.cfg.Network, tc.proto, err)
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("New(%v on proto %d) = %v, want an error with %q", tc.cfg.Network, tc.proto, err, tc.wantErr)
		}
	}
}

func TestEnableSysctl(t *testing.T) {
	p := filepath.Join(t.TempDir(), "ip_forward")
	if err := os.WriteFile(p, []byte("0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := enableSysctl(p); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); strings.TrimSpace(string(b)) != "1" {
		t.Errorf("sysctl = %q", b)
	}
	if err := enableSysctl(filepath.Join(t.TempDir(), "missing")); err == nil {
		t.Error("missing sysctl accepted")
	}
}
