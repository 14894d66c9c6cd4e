package e2e

import (
	"context"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/internal/tools/testenv"
	"github.com/twillnet/twill/subnet"
)

// Migration from flannel, node by node, in etcd mode (the network at
// flannel's prefix) and in Kubernetes mode (flannel's annotation prefix):
// h3 is made a flannel node (lab.MakeFlannelNode) beside
// two twill nodes, which program it from its flannel lease, and every pod
// reaches every other. Then h3 is switched to twilld while its pod and a pod
// on h1 ping each other every 50 ms: twilld takes over the lease (same
// subnet, same key) and adopts flannel.1 as it is (its MAC, neighbour and
// FDB entries, rewriting flannel's routes in place as its own), so the
// peers change nothing, and no ping is lost either way.
func TestMigrateFromFlannel(t *testing.T) {
	t.Run("etcd", func(t *testing.T) {
		testMigrateFromFlannel(t, lab.Options{Hosts: 3, PodsPerHost: 1, Backend: "vxlan", EtcdPrefix: "/coreos.com/network",
			DaemonArgs: []string{"--resync-interval", "1s"}})
	})
	t.Run("kube", func(t *testing.T) {
		testMigrateFromFlannel(t, lab.Options{Hosts: 3, PodsPerHost: 1, Backend: "vxlan", Datastore: "kube",
			KubeAPIServer: testenv.Tool(t, "kube-apiserver"), KubeAnnotationPrefix: "flannel.alpha.coreos.com", KubeMode: "annotations",
			DaemonArgs: []string{"--resync-interval", "1s"}})
	})
}

func testMigrateFromFlannel(t *testing.T, o lab.Options) {
	l := newLab(t, o)
	h3 := l.Topology().HostNS(3)
	env3 := hostEnv(t, l, 3)
	mac, err := l.MakeFlannelNode(ctxFor(t, time.Minute), 3)
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 2; i++ {
		waitFamilyEntries(t, l, i, false, 10*time.Second) // h3 from its flannel lease
	}
	requireMatrix(t, l)

	a, b := podsOn(l, 1)[0], podsOn(l, 3)[0]
	toFlannel := startPing(t, a.NS, b.Addr, 50*time.Millisecond)
	fromFlannel := startPing(t, b.NS, a.Addr, 50*time.Millisecond)
	time.Sleep(time.Second)
	// As the migration guide says: flannel's env file too, for flannel's
	// CNI plugin until the conflist is switched.
	flannelEnv := filepath.Join(l.HostDir(3), "flannel-subnet.env")
	if err := l.StartDaemon(3, "--flannel-subnet-file", flannelEnv); err != nil {
		t.Fatal(err)
	}
	// twilld adopts flannel.1 as it is (name, MAC, entries) and rewrites
	// flannel's routes in place as its own.
	peers := map[string]bool{}
	for j := 1; j <= 2; j++ {
		peers[hostEnv(t, l, j).Subnet.Masked().String()] = true
	}
	waitFor(t, "twilld to take h3 over", 15*time.Second, func() error {
		if out := ipn(t, h3, "link", "show"); !strings.Contains(out, "flannel.1") || strings.Contains(out, "twill.1") {
			return fmt.Errorf("links:\n%s", out)
		}
		if got := deviceMAC(t, h3, "flannel.1"); got != mac {
			return fmt.Errorf("flannel.1 has MAC %s, had %s", got, mac)
		}
		got := map[string]bool{}
		for _, line := range strings.Split(strings.TrimSpace(ipn(t, h3, "route", "show", "proto", "116", "dev", "flannel.1")), "\n") {
			if f := strings.Fields(line); len(f) > 0 {
				got[f[0]] = true
			}
		}
		if !maps.Equal(got, peers) {
			return fmt.Errorf("twill's routes on flannel.1: %v, want %v", got, peers)
		}
		if v, err := metricValue(h3, "twill_ready"); err != nil || v != 1 {
			return fmt.Errorf("twill_ready %v (%v)", v, err)
		}
		return nil
	})
	for _, kind := range []string{"fdb", "neigh", "device"} {
		if w := metric(t, h3, `twill_kernel_writes_total{family="ipv4",kind="`+kind+`"}`); w != 0 {
			t.Errorf("twilld wrote %v %s entries on h3; flannel's were already right", w, kind)
		}
	}
	time.Sleep(2 * time.Second)
	for _, p := range []struct {
		name string
		p    *pinger
	}{{"h1's pod to h3's", toFlannel}, {"h3's pod to h1's", fromFlannel}} {
		if st := p.p.finish(); st.Lost > 0 || st.Sent < 40 {
			t.Errorf("%s during the switch: %v", p.name, st)
		}
	}
	if env := hostEnv(t, l, 3); env.Subnet != env3.Subnet {
		t.Fatalf("h3's subnet changed from %s to %s", env3.Subnet, env.Subnet)
	}
	want := fmt.Sprintf("FLANNEL_NETWORK=%s\nFLANNEL_SUBNET=%s\nFLANNEL_MTU=%d\nFLANNEL_IPMASQ=%t\n", env3.Network, env3.Subnet, env3.MTU, env3.IPMasq)
	if got, err := os.ReadFile(flannelEnv); err != nil || string(got) != want {
		t.Fatalf("flannel's env file: %q (%v), want %q", got, err, want)
	}
	// The lease is twill's now, under the same key, with the same MAC (in
	// Kubernetes mode: the Node's annotations carry the same MAC).
	if l.Datastore == "kube" {
		if got := labLeases(t, l)[l.Topology().HostAddr(3)]; got != mac {
			t.Fatalf("h3 publishes VTEP MAC %s after the switch, flannel.1's is %s", got, mac)
		}
	} else {
		attrs := leaseValue(t, l, subnetsPrefix(l)+subnet.KeyName(env3.Subnet.Masked()))
		if data, _ := attrs["BackendData"].(map[string]any); attrs["NodeName"] != "h3" || data["VtepMAC"] != mac {
			t.Fatalf("h3's lease after the switch: %v", attrs)
		}
	}
	requireMatrix(t, l)
}

// `twillctl lab run --from-flannel`, as a user runs it: it exits 0 only if
// the flannel node and the twill nodes reach each other, and no ping is
// lost while the node switches to twilld.
func TestLabRunFromFlannel(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.Binary(t, "twilld")
	testenv.Binary(t, "twill")
	bin := testenv.Binary(t, "twillctl")
	prefix := nsPrefix()
	ctx := ctxFor(t, 3*time.Minute)
	out, err := exec.CommandContext(ctx, bin, "lab", "run", "--from-flannel", "--hosts", "3", "--dir", t.TempDir(), "--prefix", prefix,
		"--cni-bin-dir", testenv.CNIBinDir(t)).CombinedOutput()
	t.Cleanup(func() { lab.Topology{Prefix: prefix, Hosts: 3}.Down(context.Background()) })
	if err != nil {
		t.Fatalf("lab run --from-flannel: %v\n%s", err, out)
	}
	for _, want := range []string{"h3 is a flannel node", "0 lost", "PASS: h3 moved from flannel to twill; no ping lost"} {
		if !strings.Contains(string(out), want) {
			t.Fatalf("output lacks %q:\n%s", want, out)
		}
	}
}
