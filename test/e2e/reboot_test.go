package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/twillnet/twill/internal/tools/lab"
)

// dirNames lists a directory's file names, without the ones skip rejects.
func dirNames(t *testing.T, dir string, skip func(string) bool) []string {
	t.Helper()
	des, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []string
	for _, de := range des {
		if !skip(de.Name()) {
			out = append(out, de.Name())
		}
	}
	slices.Sort(out)
	return out
}

// reservations are the addresses host-local holds on host i: its store
// also keeps a lock and the last address it gave, which are not.
func reservations(t *testing.T, l *lab.Lab, i int) []string {
	return dirNames(t, filepath.Join(l.HostDir(i), "ipam", "twill"), func(n string) bool {
		return n == "lock" || strings.HasPrefix(n, "last_reserved_ip.")
	})
}

// deviceMAC is the MAC of a device in a namespace.
func deviceMAC(t *testing.T, netns, dev string) string {
	t.Helper()
	var links []struct{ Address string }
	if err := json.Unmarshal([]byte(ipn(t, netns, "-j", "link", "show", dev)), &links); err != nil || len(links) != 1 {
		t.Fatalf("link %s in %s: %v", dev, netns, err)
	}
	return links[0].Address
}

// stateFiles are the twill CNI plugin's state files on host i.
func stateFiles(t *testing.T, l *lab.Lab, i int) []string {
	return dirNames(t, filepath.Join(l.HostDir(i), "cni-state", "twill"), func(string) bool { return false })
}

// Fault 8. A host reboots: its namespace (devices, routes, iptables) and its
// pods' namespaces are gone, /run is cleared (the env file with it), /var/lib
// is kept (the CNI plugin's state and host-local's store). twilld starts on
// the same subnet, the runtime adds the pods again under new sandbox IDs,
// and GC releases what the old pods held, so no address leaks and the
// plugin's state and host-local's store agree.
func TestRebootedHost(t *testing.T) {
	const pods = 3
	l := newLab(t, lab.Options{Hosts: 2, PodsPerHost: pods, Backend: "vxlan", IPMasq: true})
	ctx := ctxFor(t, 2*time.Minute)
	env := hostEnv(t, l, 1)
	old := podsOn(l, 1)
	mac := deviceMAC(t, l.Topology().HostNS(1), "twill.1")
	if r := reservations(t, l, 1); len(r) != pods {
		t.Fatalf("host-local holds %v before the reboot, want %d addresses", r, pods)
	}

	// Power off.
	if err := l.KillDaemon(ctx, 1); err != nil {
		t.Fatal(err)
	}
	for _, p := range old {
		if _, err := lab.IP(ctx, "netns", "del", p.NS); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := lab.IP(ctx, "netns", "del", l.Topology().HostNS(1)); err != nil {
		t.Fatal(err)
	}
	removeFile(t, l.EnvFile(1))
	l.Pods = slices.DeleteFunc(l.Pods, func(p lab.Pod) bool { return p.Host == 1 })

	// Boot: the network comes up, then twilld, then the pods.
	if err := l.Topology().UpHost(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if err := l.StartDaemon(1); err != nil {
		t.Fatal(err)
	}
	if again := hostEnv(t, l, 1); again != env {
		t.Fatalf("after the reboot h1 has %+v, before %+v", again, env)
	}
	waitCounts(t, l, 1, expected("vxlan", 1), 15*time.Second)
	// The device made again carries the VTEP MAC h1 published before, so
	// h2 had nothing to learn.
	if again := deviceMAC(t, l.Topology().HostNS(1), "twill.1"); again != mac {
		t.Errorf("h1's VTEP MAC changed from %s to %s across the reboot", mac, again)
	}
	var fresh []lab.Pod
	for j := 1; j <= pods; j++ {
		p, err := l.AddPod(ctx, 1, fmt.Sprintf("h1-p%d-boot2", j))
		if err != nil {
			t.Fatal(err)
		}
		fresh = append(fresh, p)
	}
	// Until GC runs, what the old pods held is still reserved.
	if r := reservations(t, l, 1); len(r) != 2*pods {
		t.Fatalf("host-local holds %v after the pods were added again, want the %d old and new addresses", r, 2*pods)
	}
	if err := l.GC(ctx, 1, fresh); err != nil {
		t.Fatalf("CNI GC: %v", err)
	}

	var wantIPs, wantState []string
	for _, p := range fresh {
		wantIPs = append(wantIPs, p.Addr.String())
		wantState = append(wantState, p.Name+"@eth0")
	}
	slices.Sort(wantIPs)
	slices.Sort(wantState)
	if got := reservations(t, l, 1); !slices.Equal(got, wantIPs) {
		t.Errorf("host-local holds %v after GC, want the new pods' %v", got, wantIPs)
	}
	if got := stateFiles(t, l, 1); !slices.Equal(got, wantState) {
		t.Errorf("twill's state after GC %v, want %v", got, wantState)
	}
	seen := map[string]string{}
	for _, p := range l.Pods {
		if other, dup := seen[p.Addr.String()]; dup {
			t.Errorf("%s and %s share %s", p.Name, other, p.Addr)
		}
		seen[p.Addr.String()] = p.Name
	}
	requireMatrix(t, l)
}
