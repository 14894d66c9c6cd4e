package plugin_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/twillnet/twill/internal/tools/testenv"
	"github.com/twillnet/twill/plugin"
)

// TestPodLifecycle is the life of 20 pods on one node, driven through libcni
// the way a runtime does: ADD (one by one, then in parallel), connectivity,
// CHECK, DEL, and DEL again.
func TestCNIPodLifecycle(t *testing.T) {
	n := newNode(t, defaultEnv)
	list := n.confList("1.1.0")
	lo, err := libcni.ConfFromBytes([]byte(`{"cniVersion":"1.1.0","name":"lo","type":"loopback"}`))
	if err != nil {
		t.Fatal(err)
	}

	pods := make([]*pod, 20)
	for i := range pods {
		pods[i] = n.newPod(fmt.Sprintf("ctr-%02d", i))
	}
	addOne := func(p *pod) error {
		if err := n.inHost(func() error {
			_, err := n.cni.AddNetwork(ctx(t), lo, n.rt(p))
			return err
		}); err != nil {
			return fmt.Errorf("loopback ADD %s: %w", p.id, err)
		}
		if _, err := n.add(list, p); err != nil {
			return fmt.Errorf("ADD %s: %w", p.id, err)
		}
		return nil
	}
	for _, p := range pods[:10] {
		if err := addOne(p); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	errs := make([]error, 10)
	for i, p := range pods[10:] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = addOne(p)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}

	t.Run("addresses", func(t *testing.T) {
		node := n.env.Subnet.Masked()
		seen := map[netip.Addr]string{}
		for _, p := range pods {
			if !node.Contains(p.ip.Addr()) || p.ip.Bits() != node.Bits() {
				t.Errorf("%s got %s, outside the node subnet %s", p.id, p.ip, node)
			}
			if p.ip.Addr() == n.env.Subnet.Addr() {
				t.Errorf("%s got the gateway address %s", p.id, p.ip)
			}
			if other, dup := seen[p.ip.Addr()]; dup {
				t.Errorf("%s and %s both got %s", p.id, other, p.ip.Addr())
			}
			seen[p.ip.Addr()] = p.id
			if p.gw != n.env.Subnet.Addr() {
				t.Errorf("%s gateway %s, want %s", p.id, p.gw, n.env.Subnet.Addr())
			}
			assertPodNetwork(t, n, p)
		}
		if got := n.reservations(); len(got) != len(pods) {
			t.Errorf("host-local holds %d reservations, want %d: %v", len(got), len(pods), got)
		}
		if got := n.stateFiles(); len(got) != len(pods) {
			t.Errorf("twill holds %d state files, want %d: %v", len(got), len(pods), got)
		}
		assertBridge(t, n)
	})

	t.Run("ping", func(t *testing.T) {
		// A control: an address nobody has must not answer, so a pass
		// below means the pods really reach each other.
		if err := pingTries(pods[0], netip.MustParseAddr("10.244.7.250"), 1); err == nil {
			t.Fatal("ping to an unassigned address succeeded")
		}
		for i, a := range pods {
			if err := ping(a, n.env.Subnet.Addr()); err != nil {
				t.Errorf("%s cannot reach the gateway: %v", a.id, err)
			}
			for j, b := range pods {
				if i != j {
					if err := ping(a, b.ip.Addr()); err != nil {
						t.Errorf("%s cannot reach %s: %v", a.id, b.id, err)
					}
				}
			}
		}
	})

	t.Run("check", func(t *testing.T) {
		for _, p := range pods {
			if err := n.check(list, p); err != nil {
				t.Errorf("CHECK %s: %v", p.id, err)
			}
		}
		// The node's MTU changed under a running pod: CHECK says so.
		changed := n.env
		changed.MTU = 1300
		n.writeEnv(changed)
		if err := n.check(list, pods[0]); err == nil {
			t.Error("CHECK passed after TWILL_MTU changed")
		}
		n.writeEnv(n.env)
		// Someone deletes a pod's interface by hand.
		victim := pods[3]
		if err := victim.ns.Do(func(ns.NetNS) error {
			l, err := netlink.LinkByName("eth0")
			if err != nil {
				return err
			}
			return netlink.LinkDel(l)
		}); err != nil {
			t.Fatal(err)
		}
		if err := n.check(list, victim); err == nil {
			t.Errorf("CHECK %s passed after its veth was deleted", victim.id)
		}
		if err := n.check(list, pods[4]); err != nil {
			t.Errorf("CHECK %s (untouched): %v", pods[4].id, err)
		}
	})

	t.Run("del", func(t *testing.T) {
		// One pod's namespace is already gone when DEL comes.
		pods[5].removeNS()
		for _, p := range pods {
			if err := n.del(list, p); err != nil {
				t.Errorf("DEL %s: %v", p.id, err)
			}
		}
		// Nothing of twill's is left: the network's state directory is
		// empty (no state files, no temp files).
		if got := n.stateFiles(); len(got) != 0 {
			t.Errorf("twill state left after DEL: %v", got)
		}
		// host-local keeps only its lock and last_reserved_ip files.
		if got := n.reservations(); len(got) != 0 {
			t.Errorf("host-local reservations left after DEL: %v", got)
		}
		for _, p := range pods {
			if p.ns == nil {
				continue
			}
			if err := p.ns.Do(func(ns.NetNS) error {
				_, err := netlink.LinkByName("eth0")
				return err
			}); err == nil {
				t.Errorf("%s still has eth0 after DEL", p.id)
			}
		}
		for _, p := range pods {
			if err := n.del(list, p); err != nil {
				t.Errorf("second DEL %s: %v", p.id, err)
			}
		}
	})
}

// assertPodNetwork checks the pod's side: address, MTU, the route to the
// cluster network through the gateway.
func assertPodNetwork(t *testing.T, n *node, p *pod) {
	t.Helper()
	err := p.ns.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		if l.Attrs().MTU != n.env.MTU {
			t.Errorf("%s eth0 mtu %d, want %d", p.id, l.Attrs().MTU, n.env.MTU)
		}
		addrs, err := retryDump(func() ([]netlink.Addr, error) { return netlink.AddrList(l, netlink.FAMILY_V4) })
		if err != nil {
			return err
		}
		if len(addrs) != 1 || addrs[0].IPNet.String() != p.ip.String() {
			t.Errorf("%s eth0 addresses %v, want %s", p.id, addrs, p.ip)
		}
		routes, err := retryDump(func() ([]netlink.Route, error) { return netlink.RouteList(l, netlink.FAMILY_V4) })
		if err != nil {
			return err
		}
		found := false
		for _, r := range routes {
			if r.Dst != nil && r.Dst.String() == n.env.Network.String() && r.Gw.String() == n.env.Subnet.Addr().String() {
				found = true
			}
		}
		if !found {
			t.Errorf("%s has no route to %s via %s: %v", p.id, n.env.Network, n.env.Subnet.Addr(), routes)
		}
		return nil
	})
	if err != nil {
		t.Errorf("%s: %v", p.id, err)
	}
}

// assertBridge checks the host side: cni0 with the gateway address and MTU.
func assertBridge(t *testing.T, n *node) {
	t.Helper()
	err := n.inHost(func() error {
		l, err := netlink.LinkByName("cni0")
		if err != nil {
			return err
		}
		if l.Attrs().MTU != n.env.MTU {
			t.Errorf("cni0 mtu %d, want %d", l.Attrs().MTU, n.env.MTU)
		}
		addrs, err := retryDump(func() ([]netlink.Addr, error) { return netlink.AddrList(l, netlink.FAMILY_V4) })
		if err != nil {
			return err
		}
		if len(addrs) != 1 || addrs[0].IPNet.String() != n.env.Subnet.String() {
			t.Errorf("cni0 addresses %v, want %s", addrs, n.env.Subnet)
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}

// ping sends one echo request from inside the pod. The first packet of a
// pair waits for ARP, so it gets three tries of one second.
func ping(from *pod, to netip.Addr) error { return pingTries(from, to, 3) }

func pingTries(from *pod, to netip.Addr, tries int) error {
	var err error
	for range tries {
		err = from.ns.Do(func(ns.NetNS) error {
			out, err := exec.Command("ping", "-c1", "-W1", "-n", to.String()).CombinedOutput()
			if err != nil {
				return fmt.Errorf("%v: %s", err, out)
			}
			return nil
		})
		if err == nil {
			return nil
		}
	}
	return err
}

// TestGC: a runtime that lost track of half its pods lists the other half as
// valid; twill's GC releases exactly the stale half's state and addresses.
func TestCNIGC(t *testing.T) {
	n := newNode(t, defaultEnv)
	list := n.confList("1.1.0")
	pods := make([]*pod, 8)
	for i := range pods {
		pods[i] = n.newPod(fmt.Sprintf("gc-%d", i))
		if _, err := n.add(list, pods[i]); err != nil {
			t.Fatal(err)
		}
	}
	valid, stale := pods[:4], pods[4:]
	var attachments []types.GCAttachment
	for _, p := range valid {
		attachments = append(attachments, types.GCAttachment{ContainerID: p.id, IfName: "eth0"})
	}
	// libcni first DELs the stale attachments it has cached; a runtime with
	// an empty cache (restarted, cache wiped) leaves all of it to the
	// plugins' GC, which is what this tests.
	forgetful := libcni.NewCNIConfigWithCacheDir(n.path, t.TempDir(), nil)
	if err := n.inHost(func() error {
		return forgetful.GCNetworkList(ctx(t), list, &libcni.GCArgs{ValidAttachments: attachments})
	}); err != nil {
		t.Fatal(err)
	}

	var wantState, wantIPs []string
	for _, p := range valid {
		wantState = append(wantState, netName+"/"+p.id+"@eth0")
		wantIPs = append(wantIPs, p.ip.Addr().String())
	}
	if got := n.stateFiles(); !slices.Equal(got, wantState) {
		t.Errorf("state after GC %v, want %v", got, wantState)
	}
	got := n.reservations()
	var gotIPs []string
	for ip := range got {
		gotIPs = append(gotIPs, ip)
	}
	slices.Sort(gotIPs)
	slices.Sort(wantIPs)
	if !slices.Equal(gotIPs, wantIPs) {
		t.Errorf("host-local reservations after GC %v, want those of the valid pods %v", got, wantIPs)
	}
	for _, p := range valid {
		if err := n.check(list, p); err != nil {
			t.Errorf("CHECK %s after GC: %v", p.id, err)
		}
	}

	// The runtime's own GC (with its cache) DELs the stale ones: their
	// state is already gone, so twill rebuilds the config from the env file
	// and the bridge removes their veths.
	if err := n.inHost(func() error {
		return n.cni.GCNetworkList(ctx(t), list, &libcni.GCArgs{ValidAttachments: attachments})
	}); err != nil {
		t.Fatal(err)
	}
	for _, p := range stale {
		if err := p.ns.Do(func(ns.NetNS) error {
			_, err := netlink.LinkByName("eth0")
			return err
		}); err == nil {
			t.Errorf("%s still has eth0 after the runtime's GC", p.id)
		}
	}
	for _, p := range valid {
		if err := n.del(list, p); err != nil {
			t.Errorf("DEL %s: %v", p.id, err)
		}
	}
	if s, r := n.stateFiles(), n.reservations(); len(s)+len(r) != 0 {
		t.Errorf("left after DEL: state %v, reservations %v", s, r)
	}
}

// TestStatus: STATUS is "plugin not available" (50) until twilld has written a
// readable env file.
func TestCNIStatus(t *testing.T) {
	n := newNode(t, defaultEnv)
	list := n.confList("1.1.0")
	status := func() error {
		return n.inHost(func() error { return n.cni.GetStatusNetworkList(ctx(t), list) })
	}
	if err := status(); err != nil {
		t.Fatalf("STATUS with the env file: %v", err)
	}
	os.Remove(n.envFile)
	assertCode(t, status(), types.ErrPluginNotAvailable)
	os.WriteFile(n.envFile, []byte("TWILL_NETWORK=10.244.0.0/16\nTWILL_SUBNET=10.9.0.1/24\nTWILL_MTU=1400\nTWILL_IPMASQ=true\n"), 0o644)
	assertCode(t, status(), types.ErrPluginNotAvailable)
	n.writeEnv(defaultEnv)
	if err := status(); err != nil {
		t.Fatalf("STATUS after the env file is back: %v", err)
	}
}

func assertCode(t *testing.T, err error, code uint) {
	t.Helper()
	var te *types.Error
	if !errors.As(err, &te) {
		t.Fatalf("error %v, want a CNI error with code %d", err, code)
	}
	if te.Code != code {
		t.Fatalf("code %d (%v), want %d", te.Code, te, code)
	}
}

// TestEveryVersion runs ADD, CHECK and DEL with every cniVersion the plugin
// claims; CHECK only exists from 0.4.0 on.
func TestCNIEveryVersion(t *testing.T) {
	n := newNode(t, defaultEnv)
	info, err := n.cni.GetVersionInfo(ctx(t), "twill")
	if err != nil {
		t.Fatal(err)
	}
	if got := info.SupportedVersions(); !slices.Equal(got, plugin.SupportedVersions) {
		t.Errorf("VERSION says %v, want %v", got, plugin.SupportedVersions)
	}
	for i, v := range plugin.SupportedVersions {
		t.Run(v, func(t *testing.T) {
			list := n.confList(v)
			p := n.newPod(fmt.Sprintf("ver-%d", i))
			res, err := n.add(list, p)
			if err != nil {
				t.Fatal(err)
			}
			if res.Version() != v {
				t.Errorf("result version %s, want %s", res.Version(), v)
			}
			if _, err := current.NewResultFromResult(res); err != nil {
				t.Fatal(err)
			}
			if !n.env.Subnet.Masked().Contains(p.ip.Addr()) {
				t.Errorf("address %s outside %s", p.ip, n.env.Subnet.Masked())
			}
			assertPodNetwork(t, n, p)
			err = n.check(list, p)
			if hasCheck, _ := version.GreaterThanOrEqualTo(v, "0.4.0"); !hasCheck {
				if !errors.Is(err, libcni.ErrorCheckNotSupp) {
					t.Errorf("CHECK at %s: %v, want ErrorCheckNotSupp", v, err)
				}
			} else if err != nil {
				t.Errorf("CHECK: %v", err)
			}
			if err := n.del(list, p); err != nil {
				t.Fatal(err)
			}
			if s, r := n.stateFiles(), n.reservations(); len(s)+len(r) != 0 {
				t.Errorf("left after DEL: state %v, reservations %v", s, r)
			}
		})
	}
}

// retryDump repeats a netlink dump that the kernel interrupted because the
// table changed under it (the reason the plugins have pkg/netlinksafe, which
// this module cannot import without a new dependency).
func retryDump[T any](dump func() ([]T, error)) ([]T, error) {
	var out []T
	var err error
	for range 5 {
		out, err = dump()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return out, err
		}
	}
	return out, err
}

// TestCNIDeployConflist runs the example from deploy/ (paths moved into the
// test's directory): the pod gets a default route via the bridge
// (isDefaultGateway), portmap installs and removes a port mapping.
func TestCNIDeployConflist(t *testing.T) {
	n := newNode(t, defaultEnv)
	raw, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), "deploy", "10-twill.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	var conf map[string]any
	if err := json.Unmarshal(raw, &conf); err != nil {
		t.Fatal(err)
	}
	plugins := conf["plugins"].([]any)
	if len(plugins) != 2 || plugins[0].(map[string]any)["type"] != "twill" || plugins[1].(map[string]any)["type"] != "portmap" {
		t.Fatalf("deploy conflist plugins %v, want twill then portmap", plugins)
	}
	tw := plugins[0].(map[string]any)
	tw["subnetFile"], tw["dataDir"] = n.envFile, n.dataDir
	tw["ipam"] = map[string]any{"dataDir": n.ipamDir}
	conf["name"] = netName
	raw, _ = json.Marshal(conf)
	list, err := libcni.NetworkConfFromBytes(raw)
	if err != nil {
		t.Fatal(err)
	}
	p := n.newPod("deploy-0")
	rt := n.rt(p)
	rt.CapabilityArgs = map[string]any{"portMappings": []map[string]any{{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}}}
	if err := n.inHost(func() error {
		_, err := n.cni.AddNetworkList(ctx(t), list, rt)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := p.ns.Do(func(ns.NetNS) error {
		routes, err := retryDump(func() ([]netlink.Route, error) { return netlink.RouteList(nil, netlink.FAMILY_V4) })
		if err != nil {
			return err
		}
		for _, r := range routes {
			if (r.Dst == nil || r.Dst.String() == "0.0.0.0/0") && r.Gw.String() == n.env.Subnet.Addr().String() {
				return nil
			}
		}
		return fmt.Errorf("no default route via %s: %v", n.env.Subnet.Addr(), routes)
	}); err != nil {
		t.Error(err)
	}
	if err := n.inHost(func() error { return n.cni.CheckNetworkList(ctx(t), list, rt) }); err != nil {
		t.Errorf("CHECK: %v", err)
	}
	if !strings.Contains(n.firewall(), "18080") {
		t.Errorf("portmap left no rule for host port 18080 in the node's namespace:\n%s", n.firewall())
	}
	if err := n.inHost(func() error { return n.cni.DelNetworkList(ctx(t), list, rt) }); err != nil {
		t.Fatal(err)
	}
	if fw := n.firewall(); strings.Contains(fw, "18080") {
		t.Errorf("portmap rule for host port 18080 left after DEL:\n%s", fw)
	}
	if s, r := n.stateFiles(), n.reservations(); len(s)+len(r) != 0 {
		t.Errorf("left after DEL: state %v, reservations %v", s, r)
	}
}

// firewall dumps the node namespace's iptables and nftables rules (portmap
// uses one or the other, depending on what the host has).
func (n *node) firewall() string {
	var out strings.Builder
	n.inHost(func() error {
		for _, argv := range [][]string{{"iptables-save"}, {"nft", "list", "ruleset"}} {
			if b, err := exec.Command(argv[0], argv[1:]...).Output(); err == nil {
				out.Write(b)
			}
		}
		return nil
	})
	return out.String()
}
