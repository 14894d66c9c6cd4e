package wireguard_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/twillnet/twill/backend/backendtest"
	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/backend/wireguard"
	"github.com/twillnet/twill/subnet"
)

// The kernel tests run two nodes in network namespaces joined by a veth
// pair. This machine's kernel may have no WireGuard, and then the backend
// runs wireguard-go, as twilld would: the test needs it installed.

// node is one side: its namespace, handle, backend and lease.
type node struct {
	ns    ns.NetNS
	h     *netlink.Handle
	ext   dataplane.ExternalInterface
	be    *wireguard.Backend
	lease subnet.Lease
	key   string // its key file
}

// in runs f in the node's namespace on a locked thread: wireguard-go, run
// by the backend, makes its device in the namespace of the thread.
func (n *node) in(t *testing.T, f func() error) {
	t.Helper()
	if err := n.ns.Do(func(ns.NetNS) error { return f() }); err != nil {
		t.Fatal(err)
	}
}

// deviceName is unique per test process: wireguard-go's control sockets
// share one folder on the machine with any twilld running here.
func deviceName(side string) string { return fmt.Sprintf("twtwg%d%s", os.Getpid()%100000, side) }

func requireWireGuard(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("wireguard-go"); err != nil {
		if os.Getenv("TWILL_REQUIRE_ALL") == "1" {
			t.Fatal("wireguard-go not found (apt-get install wireguard-go); TWILL_REQUIRE_ALL=1: this test must run")
		}
		t.Skip("wireguard-go not found")
	}
}

// twoNodes makes nodes a (198.18.0.1, 10.244.1.0/24) and b (198.18.0.2,
// 10.244.2.0/24) with their devices prepared, and removes the devices when
// the test ends.
func twoNodes(t *testing.T, cfg subnet.BackendConfig) (*node, *node) {
	t.Helper()
	requireWireGuard(t)
	nsA, hA := backendtest.NetNS(t)
	nsB, hB := backendtest.NetNS(t)
	attrs := netlink.NewLinkAttrs()
	attrs.Name, attrs.MTU = "ext0", 1500
	if err := hA.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: "ext0", PeerNamespace: netlink.NsFd(nsB.Fd())}); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	mk := func(side string, n ns.NetNS, h *netlink.Handle, addr, sn string) *node {
		link, err := h.LinkByName("ext0")
		if err != nil {
			t.Fatal(err)
		}
		a := netip.MustParsePrefix(addr)
		if err := h.AddrAdd(link, &netlink.Addr{IPNet: &net.IPNet{IP: a.Addr().AsSlice(), Mask: net.CIDRMask(24, 32)}}); err != nil {
			t.Fatal(err)
		}
		if err := h.LinkSetUp(link); err != nil {
			t.Fatal(err)
		}
		ext := dataplane.ExternalInterface{Name: "ext0", Index: link.Attrs().Index, Addr: a.Addr(), Prefix: a.Masked(), MTU: 1500}
		nd := &node{ns: n, h: h, ext: ext, key: filepath.Join(dir, side, "wireguard.key")}
		nd.be = newBackend(t, nd, cfg, side)
		nd.lease = subnet.Lease{Subnet: netip.MustParsePrefix(sn), Attrs: subnet.LeaseAttrs{PublicIP: a.Addr(), BackendType: subnet.BackendWireGuard}}
		nd.in(t, func() error {
			data, mtu, err := nd.be.Prepare(context.Background())
			if err != nil {
				return err
			}
			if mtu != 1500-wireguard.OverheadIPv4 {
				return fmt.Errorf("pod MTU %d, want %d", mtu, 1500-wireguard.OverheadIPv4)
			}
			nd.lease.Attrs.BackendData = data
			return nil
		})
		t.Cleanup(func() {
			nd.in(t, func() error { return nd.be.Cleanup(context.Background()) })
			// wireguard-go exits after its device is gone, and removes its
			// control socket then: the next test's device has the same name.
			sock := "/var/run/wireguard/" + nd.be.Device() + ".sock"
			for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
				if _, err := os.Stat(sock); err != nil {
					return
				}
			}
			t.Errorf("wireguard-go of %s still runs 10 s after its device was removed", nd.be.Device())
		})
		return nd
	}
	return mk("a", nsA, hA, "198.18.0.1/24", "10.244.1.0/24"), mk("b", nsB, hB, "198.18.0.2/24", "10.244.2.0/24")
}

func newBackend(t *testing.T, nd *node, cfg subnet.BackendConfig, side string) *wireguard.Backend {
	t.Helper()
	be, err := wireguard.New(cfg, nd.ext, nd.h, nil, wireguard.Options{KeyFile: nd.key, Device: deviceName(side)})
	if err != nil {
		t.Fatal(err)
	}
	return be
}

var wgConfig = subnet.BackendConfig{Type: subnet.BackendWireGuard, ListenPort: 51820, ListenPortV6: 51821, Mode: "separate"}

// ping sends a few echoes from the node's namespace; bounded.
// ping reports whether one of up to 10 pings (1 s each) gets its answer: the
// first packet to a peer waits for the handshake, which wireguard-go on a
// loaded machine (`make test` runs packages side by side) may take over a
// second to finish.
func (n *node) ping(t *testing.T, to string) error {
	var err error
	n.in(t, func() error {
		for range 10 {
			var out []byte
			out, err = exec.Command("ping", "-c", "1", "-W", "1", to).CombinedOutput()
			if err == nil {
				return nil
			}
			err = fmt.Errorf("ping %s, 10 tries: %w\n%s", to, err, out)
		}
		return nil
	})
	return err
}

func devicePeers(t *testing.T, name string) []wgtypes.Peer {
	t.Helper()
	c, err := wgctrl.New()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	d, err := c.Device(name)
	if err != nil {
		t.Fatal(err)
	}
	return d.Peers
}

// Two nodes reach each other's device address through WireGuard; each holds
// one peer (key, endpoint, allowed IP) and one route; a second pass writes
// nothing; a peer removed or given a wrong endpoint behind twill's back is
// put right and counted; a new key of the peer is followed; Cleanup leaves
// no device and no wireguard-go.
func TestKernelReconcileAndRepair(t *testing.T) {
	a, b := twoNodes(t, wgConfig)
	ctx := context.Background()
	pass := func(n, peer *node) {
		t.Helper()
		n.in(t, func() error { return n.be.Reconcile(ctx, n.lease, []subnet.Lease{n.lease, peer.lease}) })
	}
	pass(a, b)
	pass(b, a)
	if err := a.ping(t, "10.244.2.0"); err != nil {
		t.Fatalf("a to b's device through WireGuard: %v", err)
	}
	peers := devicePeers(t, a.be.Device())
	if len(peers) != 1 || peers[0].PublicKey != b.be.PublicKey() || peers[0].Endpoint.String() != "198.18.0.2:51820" ||
		len(peers[0].AllowedIPs) != 1 || peers[0].AllowedIPs[0].String() != "10.244.2.0/24" {
		t.Fatalf("a's peers: %+v", peers)
	}
	if rs := backendtest.Routes(t, a.h); len(rs) != 1 || rs[0].Dst.String() != "10.244.2.0/24" || rs[0].Scope != netlink.SCOPE_LINK {
		t.Fatalf("a's routes: %+v", rs)
	}
	before := a.be.Counters()
	pass(a, b)
	if w := a.be.Counters().Sub(before); w != (dataplane.Counters{}) {
		t.Fatalf("a second pass wrote %+v", w)
	}

	// Drift: the peer removed, then a wrong endpoint.
	c, err := wgctrl.New()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, drift := range []wgtypes.PeerConfig{
		{PublicKey: b.be.PublicKey(), Remove: true},
		{PublicKey: b.be.PublicKey(), UpdateOnly: true, Endpoint: &net.UDPAddr{IP: net.IPv4(198, 18, 0, 9), Port: 51820}},
	} {
		if err := c.ConfigureDevice(a.be.Device(), wgtypes.Config{Peers: []wgtypes.PeerConfig{drift}}); err != nil {
			t.Fatal(err)
		}
		before := a.be.Counters()
		pass(a, b)
		if w := a.be.Counters().Sub(before); w.Peers != 1 {
			t.Fatalf("repairing %+v wrote %+v, want one peer", drift, w)
		}
		if p := devicePeers(t, a.be.Device()); len(p) != 1 || p[0].Endpoint.String() != "198.18.0.2:51820" {
			t.Fatalf("after repairing %+v: %+v", drift, p)
		}
	}

	// b gets a new key (its key file removed, the backend made again): a
	// follows through Update, and the old key is no peer any more.
	old := b.be.PublicKey()
	b.in(t, func() error { return b.be.Cleanup(ctx) })
	if err := os.Remove(b.key); err != nil {
		t.Fatal(err)
	}
	b.be = newBackend(t, b, wgConfig, "b")
	b.in(t, func() error {
		data, _, err := b.be.Prepare(ctx)
		b.lease.Attrs.BackendData = data
		return err
	})
	if b.be.PublicKey() == old {
		t.Fatal("a new key file gave the old key")
	}
	pass(b, a)
	a.in(t, func() error {
		ok, err := a.be.Update(ctx, a.lease, []subnet.Lease{b.lease}, nil)
		if !ok || err != nil {
			return fmt.Errorf("Update = %v, %v", ok, err)
		}
		return nil
	})
	if p := devicePeers(t, a.be.Device()); len(p) != 1 || p[0].PublicKey != b.be.PublicKey() {
		t.Fatalf("a's peers after b's new key: %+v", p)
	}
	if err := a.ping(t, "10.244.2.0"); err != nil {
		t.Fatalf("a to b after b's new key: %v", err)
	}

	// Removed through Update: no peer, no route.
	a.in(t, func() error {
		ok, err := a.be.Update(ctx, a.lease, nil, []netip.Prefix{b.lease.Subnet})
		if !ok || err != nil {
			return fmt.Errorf("Update = %v, %v", ok, err)
		}
		return nil
	})
	if p := devicePeers(t, a.be.Device()); len(p) != 0 {
		t.Fatalf("a's peers after b left: %+v", p)
	}
	if rs := backendtest.Routes(t, a.h); len(rs) != 0 {
		t.Fatalf("a's routes after b left: %+v", rs)
	}

	// Cleanup: no device, and wireguard-go gone with its socket.
	a.in(t, func() error { return a.be.Cleanup(ctx) })
	if _, err := a.h.LinkByName(a.be.Device()); err == nil {
		t.Fatal("the device is still there after Cleanup")
	}
	backendtest.WaitFor(t, 5*time.Second, func() error {
		if _, err := os.Stat("/var/run/wireguard/" + a.be.Device() + ".sock"); err == nil {
			return fmt.Errorf("wireguard-go's socket for %s is still there", a.be.Device())
		}
		return nil
	})
}

// A restart finds the device as it was (the wireguard-go daemon outlives
// the backend that started it) and writes nothing; the key is read back,
// not made anew.
func TestKernelRestartKeepsTheDevice(t *testing.T) {
	a, b := twoNodes(t, wgConfig)
	ctx := context.Background()
	a.in(t, func() error { return a.be.Reconcile(ctx, a.lease, []subnet.Lease{b.lease}) })
	b.in(t, func() error { return b.be.Reconcile(ctx, b.lease, []subnet.Lease{a.lease}) })
	key := a.be.PublicKey()

	again := newBackend(t, a, wgConfig, "a")
	a.in(t, func() error {
		data, _, err := again.Prepare(ctx)
		if err != nil {
			return err
		}
		var d wireguard.Data
		if err := json.Unmarshal(data, &d); err != nil || d.PublicKey != key.String() || d.Port != 51820 {
			return fmt.Errorf("BackendData after the restart %s (%v), want key %s and port 51820", data, err, key)
		}
		return again.Reconcile(ctx, a.lease, []subnet.Lease{b.lease})
	})
	if w := again.Counters(); w != (dataplane.Counters{}) {
		t.Fatalf("the restarted backend wrote %+v", w)
	}
	if err := a.ping(t, "10.244.2.0"); err != nil {
		t.Fatal(err)
	}
}

// A key file that is not a key, or that others can read, stops Prepare
// with an error that names the file and does not show its content; the
// file is left as it was.
func TestKeyFileErrors(t *testing.T) {
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage.key")
	if err := os.WriteFile(garbage, []byte("not-a-key-but-a-secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := wireguard.LoadOrCreateKey(garbage); err == nil || !strings.Contains(err.Error(), garbage) || strings.Contains(err.Error(), "not-a-key-but-a-secret") {
		t.Fatalf("garbage key file: %v", err)
	}
	if b, _ := os.ReadFile(garbage); string(b) != "not-a-key-but-a-secret\n" {
		t.Fatalf("the garbage key file was changed: %q", b)
	}
	key, _ := wgtypes.GeneratePrivateKey()
	open := filepath.Join(dir, "open.key")
	if err := os.WriteFile(open, []byte(key.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := wireguard.LoadOrCreateKey(open); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("world-readable key file: %v", err)
	}
	fresh := filepath.Join(dir, "sub", "wireguard.key")
	k1, created, err := wireguard.LoadOrCreateKey(fresh)
	if err != nil || !created {
		t.Fatalf("new key file: %v, %v", created, err)
	}
	if fi, err := os.Stat(fresh); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("new key file mode: %v, %v", fi.Mode(), err)
	}
	k2, created, err := wireguard.LoadOrCreateKey(fresh)
	if err != nil || created || k2 != k1 {
		t.Fatalf("reading the key back: created %v, same %v, %v", created, k2 == k1, err)
	}
}

// A device made again (here: deleted by hand, then repaired) starts a
// handshake with every peer itself, so peers that still hold a session with
// the old device learn the new one at once instead of after their own
// timeout. The test sends no traffic after the repair: only the backend's
// prompt can cause the handshake.
func TestKernelRecreatedDevicePromptsHandshakes(t *testing.T) {
	a, b := twoNodes(t, wgConfig)
	ctx := context.Background()
	a.in(t, func() error { return a.be.Reconcile(ctx, a.lease, []subnet.Lease{b.lease}) })
	b.in(t, func() error { return b.be.Reconcile(ctx, b.lease, []subnet.Lease{a.lease}) })
	if err := a.ping(t, "10.244.2.0"); err != nil {
		t.Fatal(err)
	}
	handshake := func() time.Time {
		for _, p := range devicePeers(t, b.be.Device()) {
			if p.PublicKey == a.be.PublicKey() {
				return p.LastHandshakeTime
			}
		}
		t.Fatal("b has no peer for a")
		return time.Time{}
	}
	if handshake().IsZero() {
		t.Fatal("no handshake after the ping")
	}
	before := time.Now()
	link, err := a.h.LinkByName(a.be.Device())
	if err != nil {
		t.Fatal(err)
	}
	if err := a.h.LinkDel(link); err != nil {
		t.Fatal(err)
	}
	backendtest.WaitFor(t, 5*time.Second, func() error {
		if _, err := os.Stat("/var/run/wireguard/" + a.be.Device() + ".sock"); err == nil {
			return errors.New("the old wireguard-go is still there")
		}
		return nil
	})
	created := a.be.Counters().Devices
	a.in(t, func() error { return a.be.Reconcile(ctx, a.lease, []subnet.Lease{b.lease}) })
	if a.be.Counters().Devices != created+1 {
		t.Fatalf("the device was not made again: %+v", a.be.Counters())
	}
	backendtest.WaitFor(t, 5*time.Second, func() error {
		if h := handshake(); !h.After(before) {
			return fmt.Errorf("b's last handshake with a is %s, before the repair at %s", h, before)
		}
		return nil
	})
}
