package lab

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestHostCommand(t *testing.T) {
	l := New(Options{Dir: "/lab", Prefix: "x-", Hosts: 2, Backend: "vxlan"}, io.Discard, nil)
	if got := l.hostCommand(2, "twilld", "--a"); !slices.Equal(got, []string{"ip", "netns", "exec", "x-h2", "twilld", "--a"}) {
		t.Errorf("vxlan: %q", got)
	}
	l.Backend = "wireguard"
	got := l.hostCommand(2, "twilld", "--a")
	want := []string{"unshare", "--mount", "--propagation", "slave", "--", "sh", "-c", wgMountScript, "/lab/h2/wireguard", "ip", "netns", "exec", "x-h2", "twilld", "--a"}
	if !slices.Equal(got, want) {
		t.Errorf("wireguard: %q\nwant %q", got, want)
	}
}

func sameFile(a, b string) bool {
	var sa, sb syscall.Stat_t
	return syscall.Stat(a, &sa) == nil && syscall.Stat(b, &sb) == nil && sa.Dev == sb.Dev && sa.Ino == sb.Ino
}

// Each host of a wireguard lab sees its own folder at /run/wireguard (and
// /var/run/wireguard); a program spawned there keeps the pid written to its
// pid file; its wireguard-go processes are found by namespace, and by
// their view of the folder once the namespace is gone, and Down's sweep
// ends them.
func TestWireGuardView(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	for _, bin := range []string{"unshare", "ip", "sleep"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skip(bin + " not found")
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l := New(Options{Dir: t.TempDir(), Prefix: fmt.Sprintf("twl%d-", os.Getpid()%100000), Hosts: 2, Backend: "wireguard"}, io.Discard, nil)
	for i := 1; i <= 2; i++ {
		if _, err := IP(ctx, "netns", "add", l.Topology().HostNS(i)); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { IP(context.Background(), "netns", "del", l.Topology().HostNS(i)) })
		os.MkdirAll(l.WireGuardDir(i), 0o700)
		os.WriteFile(filepath.Join(l.WireGuardDir(i), fmt.Sprintf("marker-h%d", i)), nil, 0o600)
	}
	for i := 1; i <= 2; i++ {
		out, err := l.InHost(ctx, i, "ls", "/run/wireguard/", "/var/run/wireguard/")
		if err != nil {
			t.Fatal(err)
		}
		if f := strings.Fields(out); slices.Contains(f, fmt.Sprintf("marker-h%d", 3-i)) || strings.Count(out, fmt.Sprintf("marker-h%d", i)) != 2 {
			t.Errorf("h%d sees:\n%s", i, out)
		}
	}
	if _, err := os.Stat("/run/wireguard/marker-h1"); err == nil {
		t.Fatal("the bind mount leaked into the machine's /run/wireguard")
	}

	// A program named wireguard-go, spawned on h1 as twilld is.
	fake := filepath.Join(t.TempDir(), "wireguard-go")
	sleep, _ := exec.LookPath("sleep")
	data, err := os.ReadFile(sleep)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(fake, data, 0o755); err != nil {
		t.Fatal(err)
	}
	spawn := func() int {
		t.Helper()
		if err := l.spawnCmd("h1/fake", nil, l.hostCommand(1, fake, "60")); err != nil {
			t.Fatal(err)
		}
		pid, err := readPid(filepath.Join(l.hostDir(1), "fake.pid"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
		// unshare, sh and ip exec one after the other.
		err = poll(ctx, 5*time.Second, "the program to run", func() error {
			comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
			if strings.TrimSpace(string(comm)) != "wireguard-go" {
				return fmt.Errorf("pid %d is %q", pid, comm)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if !sameFile(fmt.Sprintf("/proc/%d/root/run/wireguard", pid), l.WireGuardDir(1)) {
			t.Error("the program does not see h1's folder at /run/wireguard")
		}
		if !sameFile(fmt.Sprintf("/proc/%d/ns/net", pid), "/run/netns/"+l.Topology().HostNS(1)) {
			t.Error("the program is not in h1's network namespace")
		}
		return pid
	}
	pid := spawn()
	if got, err := l.WireGuardPIDs(1); err != nil || !slices.Equal(got, []int{pid}) {
		t.Errorf("h1's wireguard-go: %v (%v), want [%d]", got, err, pid)
	}
	if got, _ := l.WireGuardPIDs(2); len(got) > 0 {
		t.Errorf("h2's wireguard-go: %v, want none", got)
	}
	if err := l.stopWireGuard(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.checkWireGuardGone(); err != nil {
		t.Fatal(err)
	}

	// Found by its view of the folder once the namespace is gone (the
	// process keeps the namespace itself).
	pid = spawn()
	if _, err := IP(ctx, "netns", "del", l.Topology().HostNS(1)); err != nil {
		t.Fatal(err)
	}
	if got, err := l.WireGuardPIDs(1); err != nil || !slices.Equal(got, []int{pid}) {
		t.Errorf("h1's wireguard-go after its namespace was deleted: %v (%v), want [%d]", got, err, pid)
	}
	if err := l.stopWireGuard(ctx); err != nil {
		t.Fatal(err)
	}
	if err := l.checkWireGuardGone(); err != nil {
		t.Fatal(err)
	}
}
