package daemon

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/vishvananda/netns"

	"github.com/twillnet/twill/internal/tools/testenv"
)

// Both states of a real network namespace: its bridge-nf-call settings at 0
// and at 1 (they are per namespace; the module is loaded on the test machines,
// as on any node that runs kube-proxy).
func TestKernelBridgeNetfilter(t *testing.T) {
	testenv.RequireRoot(t)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	ns, err := netns.New() // and enters it, on this thread only
	if err != nil {
		t.Fatal(err)
	}
	defer func() { netns.Set(orig); ns.Close() }()
	if _, err := os.Stat("/proc/sys/net/bridge"); err != nil {
		t.Fatalf("br_netfilter is not loaded on this machine (modprobe br_netfilter): %v", err)
	}
	set := func(key, v string) {
		t.Helper()
		if err := os.WriteFile("/proc/sys/net/bridge/"+key, []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	set("bridge-nf-call-iptables", "0")
	set("bridge-nf-call-ip6tables", "1")
	if st := checkBridgeNetfilter(false); st.ok || !strings.Contains(st.reason, "net.bridge.bridge-nf-call-iptables is 0") || !strings.Contains(st.reason, "sysctl -w net.bridge.bridge-nf-call-iptables=1") {
		t.Errorf("IPv4 with the setting at 0: %+v", st)
	}
	if st := checkBridgeNetfilter(true); !st.ok {
		t.Errorf("IPv6 with the setting at 1: %+v", st)
	}
	set("bridge-nf-call-iptables", "1")
	if st := checkBridgeNetfilter(false); !st.ok {
		t.Errorf("IPv4 with the setting at 1: %+v", st)
	}
}

// The daemon's view: without the module (a /proc/sys without net/bridge),
// then with the setting off, then on: the gauge follows at each full pass,
// and the log warns once per reason and says when it is fixed.
func TestBridgeNetfilterGaugeAndLog(t *testing.T) {
	dir := t.TempDir()
	old := procSys
	procSys = dir
	t.Cleanup(func() { procSys = old })
	var logs bytes.Buffer
	d := testDaemon(&staticLeases{}, nil)
	d.log = slog.New(slog.NewTextHandler(&logs, nil))
	gauge := func() float64 {
		var m dto.Metric
		if err := d.met.brNetfilter.WithLabelValues("ipv4").Write(&m); err != nil {
			t.Fatal(err)
		}
		return m.GetGauge().GetValue()
	}

	d.checkBridges()
	d.checkBridges()
	if g := gauge(); g != 0 {
		t.Errorf("gauge without the module: %v", g)
	}
	if n := strings.Count(logs.String(), "br_netfilter module is not loaded"); n != 1 {
		t.Errorf("warned %d times in two passes without the module, want once:\n%s", n, logs.String())
	}
	bridge := filepath.Join(dir, "net", "bridge")
	if err := os.MkdirAll(bridge, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bridge, "bridge-nf-call-iptables"), []byte("0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	d.checkBridges()
	if g := gauge(); g != 0 || !strings.Contains(logs.String(), "bridge-nf-call-iptables is 0") {
		t.Errorf("setting off: gauge %v, log:\n%s", g, logs.String())
	}
	if err := os.WriteFile(filepath.Join(bridge, "bridge-nf-call-iptables"), []byte("1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	d.checkBridges()
	if g := gauge(); g != 1 || !strings.Contains(logs.String(), "passes netfilter again") {
		t.Errorf("setting on: gauge %v, log:\n%s", g, logs.String())
	}
}
