package masq

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"

	"github.com/twillnet/twill/internal/tools/testenv"
)

// inNetNS runs f in a fresh network namespace on a locked OS thread, so
// iptables (a child process of that thread) sees only the namespace's
// tables; the root namespace's rules are never touched.
func inNetNS(t *testing.T) func(f func() error) {
	t.Helper()
	testenv.RequireRoot(t)
	if _, err := exec.LookPath("iptables"); err != nil {
		if os.Getenv("TWILL_REQUIRE_ALL") == "1" {
			t.Fatalf("iptables not found (apt-get install -y iptables); TWILL_REQUIRE_ALL=1: this test must run")
		}
		t.Skip("iptables not found")
	}
	n, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		n.Close()
		_ = testutils.UnmountNS(n)
	})
	return func(f func() error) {
		t.Helper()
		if err := n.Do(func(ns.NetNS) error { return f() }); err != nil {
			t.Fatal(err)
		}
	}
}

func iptablesSave(t *testing.T, table string) string {
	t.Helper()
	out, err := exec.Command("iptables", "-t", table, "-S").CombinedOutput()
	if err != nil {
		t.Fatalf("iptables -t %s -S: %v: %s", table, err, out)
	}
	return string(out)
}

func TestKernelEnsureAndCleanup(t *testing.T) {
	do := inNetNS(t)
	ctx := context.Background()
	do(func() error {
		ipt, err := NewIPTables(false)
		if err != nil {
			return err
		}
		m, err := New(ipt, testCfg, nil)
		if err != nil {
			return err
		}
		if err := m.Ensure(ctx); err != nil {
			return err
		}
		nat, filter := iptablesSave(t, "nat"), iptablesSave(t, "filter")
		t.Logf("nat:\n%s\nfilter:\n%s", nat, filter)
		rf := ""
		if ipt.HasRandomFully() {
			rf = " --random-fully"
		}
		for _, want := range []string{
			`-A POSTROUTING -m comment --comment "twill: masquerade pod traffic leaving the cluster network" -j TWILL-POSTRTG`,
			"-A TWILL-POSTRTG -m mark --mark 0x4000/0x4000 -j RETURN\n" +
				"-A TWILL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN\n" +
				"-A TWILL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE" + rf + "\n" +
				"-A TWILL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.7.0/24 -j RETURN\n" +
				"-A TWILL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -j MASQUERADE" + rf + "\n",
		} {
			if !strings.Contains(nat, want) {
				t.Errorf("nat table lacks\n%s", want)
			}
		}
		for _, want := range []string{
			`-A FORWARD -m comment --comment "twill: accept traffic from and to the cluster network" -j TWILL-FWD`,
			"-A TWILL-FWD -s 10.244.0.0/16 -j ACCEPT\n-A TWILL-FWD -d 10.244.0.0/16 -j ACCEPT\n",
		} {
			if !strings.Contains(filter, want) {
				t.Errorf("filter table lacks\n%s", want)
			}
		}
		if strings.Contains(nat+filter, "-NEW") {
			t.Error("a -NEW chain is left")
		}

		// Nothing changes on a second pass.
		if err := m.Ensure(ctx); err != nil {
			return err
		}
		if iptablesSave(t, "nat") != nat || iptablesSave(t, "filter") != filter {
			t.Error("a second Ensure changed the rules")
		}

		// Hand edits are undone: a rule deleted, one added, the jump deleted.
		for _, args := range [][]string{
			{"-t", "nat", "-D", "TWILL-POSTRTG", "3"},
			{"-t", "filter", "-A", "TWILL-FWD", "-j", "DROP"},
			{"-t", "filter", "-D", "FORWARD", "1"},
		} {
			if out, err := exec.Command("iptables", args...).CombinedOutput(); err != nil {
				t.Fatalf("iptables %v: %v: %s", args, err, out)
			}
		}
		if err := m.Ensure(ctx); err != nil {
			return err
		}
		if got := iptablesSave(t, "nat"); got != nat {
			t.Errorf("nat not restored:\n%s", got)
		}
		if got := iptablesSave(t, "filter"); got != filter {
			t.Errorf("filter not restored:\n%s", got)
		}

		if err := m.Cleanup(ctx); err != nil {
			return err
		}
		if err := Cleanup(ctx, ipt); err != nil { // twice is fine
			return err
		}
		if got := iptablesSave(t, "nat") + iptablesSave(t, "filter"); strings.Contains(got, "TWILL") {
			t.Errorf("left after Cleanup:\n%s", got)
		}
		return nil
	})
}

func TestKernelEnableIPForward(t *testing.T) {
	do := inNetNS(t)
	do(func() error {
		// A new namespace starts with forwarding off.
		if err := os.WriteFile(IPForwardPath, []byte("0"), 0o644); err != nil {
			return err
		}
		if err := EnableIPForward(); err != nil {
			return err
		}
		b, err := os.ReadFile(IPForwardPath)
		if err != nil {
			return err
		}
		if strings.TrimSpace(string(b)) != "1" {
			t.Errorf("ip_forward = %q after EnableIPForward", b)
		}
		return nil
	})
}
