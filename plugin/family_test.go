package plugin

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
)

// oldStateFile is a state file as the IPv4-only plugin wrote it, before the
// IPv6 fields existed.
const oldStateFile = `{
  "version": 1,
  "network": "net1",
  "containerID": "c1",
  "ifName": "eth0",
  "env": {
    "network": "10.244.0.0/16",
    "subnet": "10.244.7.1/24",
    "mtu": 1400,
    "ipMasq": true
  },
  "delegate": {"type": "bridge", "cniVersion": "1.0.0", "name": "net1", "bridge": "cni0"}
}
`

func TestStateEnvRecordFamilies(t *testing.T) {
	s, _ := NewStore(t.TempDir(), "net1")
	for name, env := range map[string]EnvRecord{"IPv4": recordEnv(testEnv), "dual-stack": recordEnv(dualEnv), "IPv6": recordEnv(v6Env)} {
		st := &State{ContainerID: "c1", IfName: "eth0", Env: env, Delegate: []byte(`{"type":"bridge"}`)}
		if err := s.Save(st); err != nil {
			t.Fatal(err)
		}
		got, err := s.Load("c1", "eth0")
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if got.Env != env {
			t.Errorf("%s: loaded env %+v, saved %+v", name, got.Env, env)
		}
	}
	if got := recordEnv(v6Env); got.Network != "" || got.Subnet != "" || got.IPv6Subnet != "fd00:10:244:7::1/64" || got.IPv6Network != "fd00:10:244::/48" {
		t.Errorf("IPv6-only record %+v", got)
	}
	// The previous plugin's file reads as a record without IPv6.
	path, _ := s.Path("c1", "eth0")
	if err := os.WriteFile(path, []byte(oldStateFile), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := s.Load("c1", "eth0")
	if err != nil {
		t.Fatalf("old state file: %v", err)
	}
	if got.Env != recordEnv(testEnv) {
		t.Errorf("old state file env %+v, want %+v (what the IPv4 node records today)", got.Env, recordEnv(testEnv))
	}
	for name, env := range map[string]string{
		"no family":       `{"mtu":1400}`,
		"bad IPv6 subnet": `{"subnet":"10.244.7.1/24","ipv6Subnet":"fd00::1/129","mtu":1400}`,
	} {
		data := strings.Replace(oldStateFile, `{
    "network": "10.244.0.0/16",
    "subnet": "10.244.7.1/24",
    "mtu": 1400,
    "ipMasq": true
  }`, env, 1)
		if data == oldStateFile {
			t.Fatal("test bug: env not replaced")
		}
		os.WriteFile(path, []byte(data), 0o600)
		if _, err := s.Load("c1", "eth0"); !errors.Is(err, ErrCorruptState) {
			t.Errorf("%s: Load error %v, want ErrCorruptState", name, err)
		}
	}
}

// TestCheckFamilies: CHECK compares the subnets of both families with the
// env file, and reads a state file of the previous plugin.
func TestCheckFamilies(t *testing.T) {
	prev := `"prevResult":{"cniVersion":"1.1.0","ips":[{"address":"10.244.7.9/24"},{"address":"fd00:10:244:7::9/64"}]}`
	settled := func() ([]byte, error) { return nil, os.ErrNotExist }

	t.Run("dual-stack pod", func(t *testing.T) {
		f := newFixture(t)
		f.p.ifInet6 = settled
		f.writeEnv(dualEnv)
		if err := f.p.Add(f.args("c1", f.conf("1.1.0", ""))); err != nil {
			t.Fatal(err)
		}
		if err := f.p.Check(f.args("c1", f.conf("1.1.0", prev))); err != nil {
			t.Fatal(err)
		}
		changed := dualEnv
		changed.IPv6Subnet = netip.MustParsePrefix("fd00:10:244:8::1/64")
		f.writeEnv(changed)
		err := f.p.Check(f.args("c1", f.conf("1.1.0", prev)))
		wantCode(t, err, types.ErrInternal)
		if want := "added with subnet 10.244.7.1/24, IPv6 subnet fd00:10:244:7::1/64, mtu 1400; the env file now has subnet 10.244.7.1/24, IPv6 subnet fd00:10:244:8::1/64, mtu 1400"; !strings.Contains(err.Error(), want) {
			t.Errorf("CHECK after an IPv6 subnet change: %v, want %q", err, want)
		}
		// The node lost IPv6: the pod's IPv6 address is stale.
		f.writeEnv(testEnv)
		if err := f.p.Check(f.args("c1", f.conf("1.1.0", prev))); err == nil || !strings.Contains(err.Error(), "IPv6 subnet none") {
			t.Errorf("CHECK after the node lost IPv6: %v", err)
		}
		sameVerbs(t, f.exec.verbs(), "bridge ADD", "bridge CHECK")
	})

	t.Run("IPv6-only pod", func(t *testing.T) {
		f := newFixture(t)
		f.p.ifInet6 = settled
		f.writeEnv(v6Env)
		if err := f.p.Add(f.args("c1", f.conf("1.1.0", ""))); err != nil {
			t.Fatal(err)
		}
		st, err := (&Store{DataDir: f.dataDir, Network: "net1"}).Load("c1", "eth0")
		if err != nil {
			t.Fatal(err)
		}
		if st.Env.Subnet != "" || st.Env.IPv6Subnet != "fd00:10:244:7::1/64" {
			t.Errorf("saved env %+v", st.Env)
		}
		if err := f.p.Check(f.args("c1", f.conf("1.1.0", prev))); err != nil {
			t.Fatal(err)
		}
		f.writeEnv(dualEnv) // the node gained IPv4
		if err := f.p.Check(f.args("c1", f.conf("1.1.0", prev))); err == nil || !strings.Contains(err.Error(), "added with subnet none, IPv6 subnet") {
			t.Errorf("CHECK after the node gained IPv4: %v", err)
		}
	})

	t.Run("state of the previous plugin", func(t *testing.T) {
		f := newFixture(t)
		if err := os.MkdirAll(f.dataDir+"/net1", 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f.statePath("c1"), []byte(oldStateFile), 0o600); err != nil {
			t.Fatal(err)
		}
		// The node is as it was: CHECK passes as before.
		if err := f.p.Check(f.args("c1", f.conf("1.1.0", prev))); err != nil {
			t.Fatalf("CHECK of an old state file on an unchanged node: %v", err)
		}
		// The node became dual-stack after the pod was added: the pod has
		// no IPv6 address, so it is reported as any pod of a changed node.
		f.writeEnv(dualEnv)
		err := f.p.Check(f.args("c1", f.conf("1.1.0", prev)))
		wantCode(t, err, types.ErrInternal)
		if !strings.Contains(err.Error(), "the node's subnet or MTU changed since the pod was added; recreate the pod") ||
			!strings.Contains(err.Error(), "added with subnet 10.244.7.1/24, IPv6 subnet none") {
			t.Errorf("CHECK of an old state file after IPv6 came: %v", err)
		}
		// DEL undoes the old ADD with its saved config.
		if err := f.p.Del(f.args("c1", f.conf("1.1.0", ""))); err != nil {
			t.Fatal(err)
		}
		sameVerbs(t, f.exec.verbs(), "bridge CHECK", "bridge DEL")
		if got := f.exec.calls[1].conf["bridge"]; got != "cni0" {
			t.Errorf("DEL config %v, want the saved one", f.exec.calls[1].conf)
		}
	})
}

// ifInet6 lines: the bridge (index 5) with the gateway and a link-local
// address, a veth (index 7) and lo.
func ifInet6(gwFlags, llFlags int) []byte {
	return fmt.Appendf(nil, "00000000000000000000000000000001 01 80 10 80       lo\n"+
		"fd000010024400070000000000000001 05 40 00 %02x     cni0\n"+
		"fe8000000000000018b5acfffe2425d3 05 40 20 %02x     cni0\n"+
		"fe80000000000000442b98fffe094938 07 40 20 c0 vetheb892a1c\n", gwFlags, llFlags)
}

func TestSettleGateway(t *testing.T) {
	gw := netip.MustParseAddr("fd00:10:244:7::1")
	const (
		permanent = 0x80
		tentative = 0xc0 // permanent|tentative
		dadFailed = 0xc8 // permanent|tentative|dadfailed
	)
	seq := func(steps ...[]byte) (func() ([]byte, error), *atomic.Int32) {
		var n atomic.Int32
		return func() ([]byte, error) {
			i := int(n.Add(1)) - 1
			return steps[min(i, len(steps)-1)], nil
		}, &n
	}
	ctx := func(d time.Duration) context.Context {
		c, cancel := context.WithTimeout(context.Background(), d)
		t.Cleanup(cancel)
		return c
	}

	// Settled already: one read.
	read, n := seq(ifInet6(permanent, permanent))
	if err := settleGateway(ctx(time.Second), gw, read); err != nil || n.Load() != 1 {
		t.Errorf("settled gateway: %v after %d reads, want nil after 1", err, n.Load())
	}
	// Gateway, then link-local, leave DAD: wait for both. The veth's
	// tentative link-local is on another interface and does not count.
	read, n = seq(ifInet6(tentative, tentative), ifInet6(permanent, tentative), ifInet6(permanent, tentative), ifInet6(permanent, permanent))
	if err := settleGateway(ctx(5*time.Second), gw, read); err != nil || n.Load() != 4 {
		t.Errorf("gateway in DAD: %v after %d reads, want nil after 4", err, n.Load())
	}
	// Still tentative at the deadline.
	read, _ = seq(ifInet6(tentative, permanent))
	start := time.Now()
	err := settleGateway(ctx(100*time.Millisecond), gw, read)
	if !errors.Is(err, errGatewayTentative) || !strings.Contains(err.Error(), "the IPv6 gateway fd00:10:244:7::1 on cni0 is still tentative") {
		t.Errorf("gateway stuck in DAD: %v", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("gave up after %v, the deadline was 100ms", d)
	}
	// Failed DAD: no wait, an error.
	read, n = seq(ifInet6(dadFailed, permanent))
	if err := settleGateway(ctx(time.Second), gw, read); err == nil || !strings.Contains(err.Error(), "failed duplicate address detection") || n.Load() != 1 {
		t.Errorf("gateway failed DAD: %v after %d reads", err, n.Load())
	}
	// A failed link-local is not waited for.
	read, _ = seq(ifInet6(permanent, dadFailed))
	if err := settleGateway(ctx(time.Second), gw, read); err != nil {
		t.Errorf("link-local failed DAD: %v", err)
	}
	// No gateway on any interface (isGateway false): nothing to wait for.
	read, n = seq(ifInet6(tentative, tentative))
	if err := settleGateway(ctx(time.Second), netip.MustParseAddr("fd00:10:244:8::1"), read); err != nil || n.Load() != 1 {
		t.Errorf("absent gateway: %v after %d reads", err, n.Load())
	}
	// No IPv6 in the kernel.
	if err := settleGateway(ctx(time.Second), gw, func() ([]byte, error) { return nil, os.ErrNotExist }); err != nil {
		t.Errorf("no /proc/net/if_inet6: %v", err)
	}
	// Garbage is an error, not a pass.
	if err := settleGateway(ctx(time.Second), gw, func() ([]byte, error) { return []byte("fd00 1 2\n"), nil }); err == nil {
		t.Error("unparsable /proc/net/if_inet6 accepted")
	}
	// The real file of this namespace parses.
	if data, err := os.ReadFile(procIfInet6); err == nil {
		if _, err := parseIfInet6(data); err != nil {
			t.Errorf("%s: %v", procIfInet6, err)
		}
	}
}

// TestAddWaitsForTheIPv6Gateway: ADD returns only once the bridge's IPv6
// gateway has left DAD, and rolls back when it cannot be used.
func TestAddWaitsForTheIPv6Gateway(t *testing.T) {
	f := newFixture(t)
	f.writeEnv(dualEnv)
	var reads atomic.Int32
	f.p.ifInet6 = func() ([]byte, error) {
		if reads.Add(1) < 3 {
			return ifInet6(0xc0, 0xc0), nil
		}
		return ifInet6(0x80, 0x80), nil
	}
	if err := f.p.Add(f.args("c1", f.conf("1.1.0", ""))); err != nil {
		t.Fatal(err)
	}
	if reads.Load() != 3 {
		t.Errorf("ADD returned after %d reads of if_inet6, want 3 (two tentative, one settled)", reads.Load())
	}
	if f.out.Len() == 0 {
		t.Error("no result printed")
	}

	// An IPv4-only node does not look.
	reads.Store(0)
	f.writeEnv(testEnv)
	if err := f.p.Add(f.args("c2", f.conf("1.1.0", ""))); err != nil {
		t.Fatal(err)
	}
	if reads.Load() != 0 {
		t.Errorf("IPv4-only ADD read if_inet6 %d times", reads.Load())
	}

	// The gateway failed DAD: ADD fails and is undone.
	f.writeEnv(dualEnv)
	f.p.ifInet6 = func() ([]byte, error) { return ifInet6(0xc8, 0x80), nil }
	f.exec.calls = nil
	err := f.p.Add(f.args("c3", f.conf("1.1.0", "")))
	wantCode(t, err, types.ErrInternal)
	if !strings.Contains(err.Error(), "failed duplicate address detection") {
		t.Errorf("error %v", err)
	}
	sameVerbs(t, f.exec.verbs(), "bridge ADD", "bridge DEL")
	if f.stateExists("c3") {
		t.Error("state left after a rolled-back ADD")
	}
}
