package masq

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"

	"github.com/twillnet/twill/internal/tools/testenv"
)

// The kernel tests run the real iptables and ip6tables, in network
// namespaces of their own: the root namespace's rules are never touched.
// Inside a namespace (on another goroutine) they report with t.Errorf and
// return errors; t.Fatal is only called on the test's goroutine.

// requirePrograms skips (or, under `make test`, fails) a test when a program
// it runs is missing.
func requirePrograms(t *testing.T, names ...string) {
	t.Helper()
	for _, name := range names {
		if _, err := exec.LookPath(name); err != nil {
			if os.Getenv("TWILL_REQUIRE_ALL") == "1" {
				t.Fatalf("%s not found (apt-get install -y iptables iproute2); TWILL_REQUIRE_ALL=1: this test must run", name)
			}
			t.Skipf("%s not found", name)
		}
	}
}

// newNetNS makes a network namespace that is removed when the test ends,
// whether it passes or not; everything inside (veths, rules) goes with it.
func newNetNS(t *testing.T) ns.NetNS {
	t.Helper()
	testenv.RequireRoot(t)
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		n.Close()
		_ = testutils.UnmountNS(n)
	})
	return n
}

// inNetNS returns a function that runs f in a fresh network namespace on a
// locked OS thread, so iptables (a child process of that thread) and /proc/sys/net
// see only the namespace's own; an error from f fails the test.
func inNetNS(t *testing.T, programs ...string) func(f func() error) {
	t.Helper()
	testenv.RequireRoot(t)
	requirePrograms(t, programs...)
	n := newNetNS(t)
	return func(f func() error) {
		t.Helper()
		doIn(t, n, f)
	}
}

// doIn runs f in n on a locked OS thread and fails the test if f fails.
func doIn(t *testing.T, n ns.NetNS, f func() error) {
	t.Helper()
	if err := n.Do(func(ns.NetNS) error { return f() }); err != nil {
		t.Fatal(err)
	}
}

// cmdTimeout bounds every program a kernel test runs.
const cmdTimeout = 30 * time.Second

func run(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// tables is what `iptables -S` prints for the nat and filter tables.
type tables struct{ nat, filter string }

func saveTables(v6 bool) (tables, error) {
	nat, err := run(iptablesProgram(v6), "-t", "nat", "-S")
	if err != nil {
		return tables{}, err
	}
	filter, err := run(iptablesProgram(v6), "-t", "filter", "-S")
	return tables{nat, filter}, err
}

// checkTables says how tb differs from twill's chains holding nat and fwd
// (rule specs as masq_test.go writes them) with the jumps to them at the
// top of the built-in chains, and only those, and no -NEW chain.
func checkTables(tb tables, nat, fwd []string, randomFully bool) error {
	block := func(chain string, rules []string) string {
		var b strings.Builder
		for _, r := range rules {
			if !randomFully {
				r = strings.TrimSuffix(r, " --random-fully")
			}
			b.WriteString("-A " + chain + " " + r + "\n")
		}
		return b.String()
	}
	var problems []string
	for _, c := range []struct{ table, got, want string }{
		{"nat", tb.nat, `-A POSTROUTING -m comment --comment "twill: masquerade pod traffic leaving the cluster network" -j TWILL-POSTRTG` + "\n"},
		{"nat", tb.nat, block(NATChain, nat)},
		{"filter", tb.filter, `-A FORWARD -m comment --comment "twill: accept traffic from and to the cluster network" -j TWILL-FWD` + "\n"},
		{"filter", tb.filter, block(ForwardChain, fwd)},
	} {
		if !strings.Contains(c.got, c.want) {
			problems = append(problems, fmt.Sprintf("%s table lacks\n%s", c.table, c.want))
		}
	}
	if n := strings.Count(tb.nat, "-A TWILL-POSTRTG "); n != len(nat) {
		problems = append(problems, fmt.Sprintf("nat table has %d rules in TWILL-POSTRTG, want %d", n, len(nat)))
	}
	if n := strings.Count(tb.filter, "-A TWILL-FWD "); n != len(fwd) {
		problems = append(problems, fmt.Sprintf("filter table has %d rules in TWILL-FWD, want %d", n, len(fwd)))
	}
	if strings.Contains(tb.nat+tb.filter, newSuffix) {
		problems = append(problems, "a -NEW chain is left")
	}
	if problems != nil {
		return fmt.Errorf("%s\nnat:\n%s\nfilter:\n%s", strings.Join(problems, "\n"), tb.nat, tb.filter)
	}
	return nil
}

// ensureWrites runs Ensure and says how many writes it made.
func ensureWrites(ctx context.Context, m *Manager) (uint64, error) {
	before := m.Writes()
	err := m.Ensure(ctx)
	return m.Writes() - before, err
}

func TestKernelEnsureAndCleanup(t *testing.T) {
	for _, fam := range families {
		t.Run(fam.name, func(t *testing.T) {
			v6 := fam.cfg.Network.Addr().Is6()
			prog := iptablesProgram(v6)
			do := inNetNS(t, prog)
			ctx := context.Background()
			do(func() error {
				ipt, err := NewIPTables(v6)
				if err != nil {
					return err
				}
				m, err := New(ipt, fam.cfg, nil)
				if err != nil {
					return err
				}
				if err := m.Ensure(ctx); err != nil {
					return err
				}
				want, err := saveTables(v6)
				if err != nil {
					return err
				}
				t.Logf("%s -t nat -S:\n%s\n%s -t filter -S:\n%s", prog, want.nat, prog, want.filter)
				// The rules are printed exactly as Rules writes them, so
				// no rendering has to be learnt.
				if err := checkTables(want, fam.nat, fam.fwd, ipt.HasRandomFully()); err != nil {
					return err
				}

				// Nothing changes on a second pass.
				if n, err := ensureWrites(ctx, m); err != nil || n != 0 {
					t.Errorf("a second Ensure made %d writes (err %v), want 0", n, err)
				}
				if got, err := saveTables(v6); err != nil || got != want {
					t.Errorf("a second Ensure changed the rules (err %v):\n%+v", err, got)
				}

				// Each hand edit is undone by one write, counted in Writes.
				for _, edit := range [][]string{
					{"-t", "nat", "-D", NATChain, "3"}, // the MASQUERADE of pod traffic
					{"-t", "filter", "-A", ForwardChain, "-j", "DROP"},
					{"-t", "filter", "-D", "FORWARD", "1"}, // the jump
				} {
					if _, err := run(prog, edit...); err != nil {
						return err
					}
					n, err := ensureWrites(ctx, m)
					if err != nil {
						return err
					}
					if n != 1 {
						t.Errorf("after %s %v: Ensure made %d writes, want 1", prog, edit, n)
					}
					got, err := saveTables(v6)
					if err != nil {
						return err
					}
					if got != want {
						t.Errorf("after %s %v the rules are not restored:\nnat:\n%s\nfilter:\n%s", prog, edit, got.nat, got.filter)
					}
				}

				if err := m.Cleanup(ctx); err != nil {
					return err
				}
				if removed, err := Cleanup(ctx, ipt); err != nil || removed { // twice is fine
					return fmt.Errorf("a second Cleanup: removed %v, %v", removed, err)
				}
				got, err := saveTables(v6)
				if err != nil {
					return err
				}
				if strings.Contains(got.nat+got.filter, "TWILL") {
					t.Errorf("left after Cleanup:\n%s%s", got.nat, got.filter)
				}
				return nil
			})
		})
	}
}

// A dual-stack node runs an IPv4 and an IPv6 Manager in one namespace: each
// keeps its own family's tables, and neither's writes, repairs or cleanup
// touch the other's.
func TestKernelDualStackSideBySide(t *testing.T) {
	do := inNetNS(t, "iptables", "ip6tables")
	ctx := context.Background()
	do(func() error {
		ipt4, err := NewIPTables(false)
		if err != nil {
			return err
		}
		ipt6, err := NewIPTables(true)
		if err != nil {
			return err
		}
		// Real handles know their family.
		if _, err := New(ipt6, testCfg, nil); err == nil {
			t.Error("New accepted an IPv4 network on an ip6tables handle")
		}
		if _, err := New(ipt4, testCfg6, nil); err == nil {
			t.Error("New accepted an IPv6 network on an iptables handle")
		}
		m4, err := New(ipt4, testCfg, nil)
		if err != nil {
			return err
		}
		m6, err := New(ipt6, testCfg6, nil)
		if err != nil {
			return err
		}
		for _, m := range []*Manager{m4, m6} {
			if err := m.Ensure(ctx); err != nil {
				return err
			}
		}
		want4, err := saveTables(false)
		if err != nil {
			return err
		}
		want6, err := saveTables(true)
		if err != nil {
			return err
		}
		if err := checkTables(want4, wantNAT, wantFWD, ipt4.HasRandomFully()); err != nil {
			t.Errorf("iptables: %v", err)
		}
		if err := checkTables(want6, wantNAT6, wantFWD6, ipt6.HasRandomFully()); err != nil {
			t.Errorf("ip6tables: %v", err)
		}
		if s := want4.nat + want4.filter; strings.Contains(s, "fd00:") {
			t.Errorf("IPv6 addresses in iptables:\n%s", s)
		}
		if s := want6.nat + want6.filter; strings.Contains(s, "10.244.") || strings.Contains(s, "224.0.0.0") {
			t.Errorf("IPv4 addresses in ip6tables:\n%s", s)
		}

		// check says whether both families hold what they should, and
		// that Ensure of m made the writes wanted (and the other nothing).
		check := func(what string, m *Manager, wantWrites uint64, w4, w6 tables) error {
			for _, other := range []*Manager{m4, m6} {
				n, err := ensureWrites(ctx, other)
				if err != nil {
					return err
				}
				want := uint64(0)
				if other == m {
					want = wantWrites
				}
				if n != want {
					t.Errorf("%s: Ensure of the %s Manager made %d writes, want %d", what, familyName(other == m6), n, want)
				}
			}
			got4, err := saveTables(false)
			if err != nil {
				return err
			}
			got6, err := saveTables(true)
			if err != nil {
				return err
			}
			if got4 != w4 {
				t.Errorf("%s: iptables changed:\n%s%s", what, got4.nat, got4.filter)
			}
			if got6 != w6 {
				t.Errorf("%s: ip6tables changed:\n%s%s", what, got6.nat, got6.filter)
			}
			return nil
		}
		if err := check("steady", nil, 0, want4, want6); err != nil {
			return err
		}
		// Drift in one family is repaired there and costs the other nothing.
		if _, err := run("ip6tables", "-t", "nat", "-D", NATChain, "2"); err != nil {
			return err
		}
		if err := check("IPv6 rule deleted", m6, 1, want4, want6); err != nil {
			return err
		}
		if _, err := run("iptables", "-t", "filter", "-D", ForwardChain, "1"); err != nil {
			return err
		}
		if err := check("IPv4 rule deleted", m4, 1, want4, want6); err != nil {
			return err
		}

		// Cleaning up one family leaves the other alone.
		if removed, err := Cleanup(ctx, ipt6); err != nil || !removed {
			return fmt.Errorf("Cleanup of IPv6: removed %v, %v", removed, err)
		}
		got6, err := saveTables(true)
		if err != nil {
			return err
		}
		if strings.Contains(got6.nat+got6.filter, "TWILL") {
			t.Errorf("ip6tables after Cleanup:\n%s%s", got6.nat, got6.filter)
		}
		if err := check("IPv6 cleaned up, IPv4 kept", m6, 2, want4, want6); err != nil { // two chains rewritten
			return err
		}
		if !IPTablesMayHoldChains(false) {
			t.Error("IPTablesMayHoldChains(IPv4) is false while twill's chains are there")
		}
		for _, ipt := range []IPTables{ipt4, ipt6} {
			if _, err := Cleanup(ctx, ipt); err != nil {
				return err
			}
		}
		if legacy, _ := os.ReadFile("/proc/net/ip_tables_names"); len(legacy) == 0 && IPTablesMayHoldChains(false) {
			t.Error("IPTablesMayHoldChains(IPv4) is true after Cleanup, with iptables-nft")
		}
		for _, v6 := range []bool{false, true} {
			got, err := saveTables(v6)
			if err != nil {
				return err
			}
			if strings.Contains(got.nat+got.filter, "TWILL") {
				t.Errorf("%s after Cleanup:\n%s%s", iptablesProgram(v6), got.nat, got.filter)
			}
		}
		return nil
	})
}

func TestKernelEnableForward(t *testing.T) {
	for _, tc := range []struct {
		name   string
		path   string
		enable func() error
		// also lists sysctls the write must turn on with it.
		also []string
	}{
		{"IPv4", IPForwardPath, EnableIPForward, nil},
		// Writing "all" turns forwarding on for every interface and for
		// interfaces made later, as EnableIPv6Forward's comment says.
		{"IPv6", IPv6ForwardPath, EnableIPv6Forward, []string{
			"/proc/sys/net/ipv6/conf/lo/forwarding",
			"/proc/sys/net/ipv6/conf/default/forwarding",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := os.Stat(tc.path); os.IsNotExist(err) && tc.name == "IPv6" {
				t.Skip("no IPv6 in this kernel (ipv6.disable=1)")
			}
			do := inNetNS(t)
			do(func() error {
				// A new namespace starts with forwarding off; make sure.
				for _, p := range append([]string{tc.path}, tc.also...) {
					if err := os.WriteFile(p, []byte("0"), 0o644); err != nil {
						return err
					}
				}
				for range 2 { // the second finds it on and writes nothing
					if err := tc.enable(); err != nil {
						return err
					}
				}
				for _, p := range append([]string{tc.path}, tc.also...) {
					b, err := os.ReadFile(p)
					if err != nil {
						return err
					}
					if strings.TrimSpace(string(b)) != "1" {
						t.Errorf("%s = %q after enabling", p, b)
					}
				}
				return nil
			})
		})
	}
}
