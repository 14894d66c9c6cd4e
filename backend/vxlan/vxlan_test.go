package vxlan_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/twillnet/twill/backend/backendtest"
	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/backend/vxlan"
	"github.com/twillnet/twill/subnet"
)

// env is one fresh namespace with an underlay ext0 (198.18.0.1/24) and a
// VXLAN backend for it.
type env struct {
	t   *testing.T
	h   *netlink.Handle
	ext dataplane.ExternalInterface
	cfg subnet.BackendConfig
	be  *vxlan.Backend
	own subnet.Lease
}

func newEnv(t *testing.T, cfg subnet.BackendConfig) *env {
	_, h := backendtest.NetNS(t)
	ext := backendtest.Underlay(t, h, "ext0", netip.MustParsePrefix("198.18.0.1/24"))
	cfg.Type = subnet.BackendVXLAN
	e := &env{t: t, h: h, ext: ext, cfg: cfg,
		own: subnet.Lease{Subnet: netip.MustParsePrefix("10.244.1.0/24"), Attrs: subnet.LeaseAttrs{PublicIP: ext.Addr, BackendType: subnet.BackendVXLAN}}}
	e.be = e.newBackend()
	return e
}

func (e *env) newBackend() *vxlan.Backend {
	e.t.Helper()
	be, err := vxlan.New(e.cfg, e.ext, e.h, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	return be
}

func (e *env) prepare() vxlan.Data {
	e.t.Helper()
	raw, mtu, err := e.be.Prepare(context.Background())
	if err != nil {
		e.t.Fatalf("Prepare: %v", err)
	}
	want := 1450
	if e.cfg.MTU != 0 {
		want = e.cfg.MTU - vxlan.Overhead
	}
	if mtu != want {
		e.t.Errorf("Prepare MTU = %d, want %d", mtu, want)
	}
	d, err := vxlan.ParseData(raw)
	if err != nil {
		e.t.Fatalf("Prepare BackendData %s: %v", raw, err)
	}
	return d
}

func (e *env) reconcile(peers []subnet.Lease) {
	e.t.Helper()
	if err := e.be.Reconcile(context.Background(), e.own, peers); err != nil {
		e.t.Fatalf("Reconcile: %v", err)
	}
}

func (e *env) dev() *netlink.Vxlan {
	e.t.Helper()
	l, err := e.h.LinkByName(e.be.Device())
	if err != nil {
		e.t.Fatalf("device: %v", err)
	}
	vx, ok := l.(*netlink.Vxlan)
	if !ok {
		e.t.Fatalf("%s is a %s", e.be.Device(), l.Type())
	}
	return vx
}

// expect checks that the kernel holds exactly one route, neighbour and FDB
// entry per VXLAN peer (direct: peers routed via ext0 instead), that the
// device is as configured, and that another pass has nothing to do.
func (e *env) expect(peers []subnet.Lease, direct ...subnet.Lease) {
	e.t.Helper()
	vx := e.dev()
	dev := vx.Index
	if vx.Flags&net.FlagUp == 0 {
		e.t.Errorf("device is down")
	}
	addrs, err := e.h.AddrList(vx, netlink.FAMILY_V4)
	if err != nil || len(addrs) != 1 || addrs[0].IPNet.String() != "10.244.1.0/32" {
		e.t.Errorf("device addresses %v (%v), want exactly 10.244.1.0/32", addrs, err)
	}
	routes := map[string]string{}
	for _, r := range backendtest.Routes(e.t, e.h) {
		routes[r.Dst.String()] = fmt.Sprintf("via %s dev %d onlink=%t", r.Gw, r.LinkIndex, r.Flags&int(netlink.FLAG_ONLINK) != 0)
	}
	neighs := map[string]string{}
	for _, n := range backendtest.Neighs(e.t, e.h, dev) {
		neighs[n.IP.String()] = fmt.Sprintf("%s permanent=%t", n.HardwareAddr, n.State == netlink.NUD_PERMANENT)
	}
	fdb := map[string]string{}
	for _, f := range backendtest.FDB(e.t, e.h, dev) {
		fdb[f.HardwareAddr.String()] = fmt.Sprintf("dst %s self=%t permanent=%t", f.IP, f.Flags&netlink.NTF_SELF != 0, f.State == netlink.NUD_PERMANENT)
	}
	if len(routes) != len(peers)+len(direct) || len(neighs) != len(peers) || len(fdb) != len(peers) {
		e.t.Errorf("kernel holds %d routes, %d neighbours, %d FDB entries; want %d, %d, %d\nroutes %v\nneighs %v\nfdb %v",
			len(routes), len(neighs), len(fdb), len(peers)+len(direct), len(peers), len(peers), routes, neighs, fdb)
	}
	for _, p := range peers {
		d, err := vxlan.ParseData(p.Attrs.BackendData)
		if err != nil {
			e.t.Fatal(err)
		}
		gw := p.Subnet.Addr().String()
		if got, want := routes[p.Subnet.String()], fmt.Sprintf("via %s dev %d onlink=true", gw, dev); got != want {
			e.t.Errorf("route to %s: %q, want %q", p.Subnet, got, want)
		}
		if got, want := neighs[gw], d.VtepMAC.String()+" permanent=true"; got != want {
			e.t.Errorf("neighbour %s: %q, want %q", gw, got, want)
		}
		if got, want := fdb[d.VtepMAC.String()], fmt.Sprintf("dst %s self=true permanent=true", p.Attrs.PublicIP); got != want {
			e.t.Errorf("FDB %s: %q, want %q", d.VtepMAC, got, want)
		}
	}
	for _, p := range direct {
		if got, want := routes[p.Subnet.String()], fmt.Sprintf("via %s dev %d onlink=false", p.Attrs.PublicIP, e.ext.Index); got != want {
			e.t.Errorf("direct route to %s: %q, want %q", p.Subnet, got, want)
		}
	}
	// Level-triggered: what was just applied reads back as nothing to do.
	all := append(append([]subnet.Lease{}, peers...), direct...)
	desired, err := vxlan.Desired(e.own, all, vxlan.Params{Dev: dev, VNI: vx.VxlanId, Ext: e.ext, DirectRouting: e.cfg.DirectRouting})
	if err != nil {
		e.t.Fatal(err)
	}
	actual, err := dataplane.ReadActual(context.Background(), e.h, netlink.FAMILY_V4, dev)
	if err != nil {
		e.t.Fatal(err)
	}
	if plan := dataplane.Diff(desired, actual); plan.Len() != 0 {
		e.t.Errorf("a second pass would change %d entries: %+v", plan.Len(), plan)
	}
}

var threePeers = []subnet.Lease{
	backendtest.VXLANPeer("10.244.2.0/24", "198.18.0.2", "02:77:00:00:00:02"),
	backendtest.VXLANPeer("10.244.3.0/24", "198.18.0.3", "02:77:00:00:00:03"),
	backendtest.VXLANPeer("10.244.4.0/24", "198.19.0.4", "02:77:00:00:00:04"),
}

func TestPrepareAndReconcile(t *testing.T) {
	e := newEnv(t, subnet.BackendConfig{VNI: 1, Port: 8472})
	d := e.prepare()
	vx := e.dev()
	if d.VNI != 1 || d.VtepMAC.String() != vx.HardwareAddr.String() {
		t.Errorf("BackendData %+v, device MAC %s", d, vx.HardwareAddr)
	}
	if vx.VxlanId != 1 || vx.Port != 8472 || !vx.SrcAddr.Equal(e.ext.Addr.AsSlice()) || vx.VtepDevIndex != e.ext.Index || vx.Learning || vx.MTU != 1450 {
		t.Errorf("device: VNI %d port %d local %s parent %d learning %t MTU %d", vx.VxlanId, vx.Port, vx.SrcAddr, vx.VtepDevIndex, vx.Learning, vx.MTU)
	}
	e.reconcile(threePeers)
	e.expect(threePeers)
	e.reconcile(threePeers) // a no-op pass is fine too
	e.expect(threePeers)
}

func TestReconcileWithoutPrepare(t *testing.T) {
	e := newEnv(t, subnet.BackendConfig{VNI: 1, Port: 8472})
	e.reconcile(threePeers)
	e.expect(threePeers)
}

func TestConfiguredPortVNIAndMTU(t *testing.T) {
	// Backend.MTU is the outgoing packets' MTU, as in flannel: the device
	// gets it minus the 50 bytes of VXLAN over IPv4.
	e := newEnv(t, subnet.BackendConfig{VNI: 4096, Port: 4789, MTU: 1400})
	d := e.prepare()
	vx := e.dev()
	if e.be.Device() != "twill.4096" || vx.VxlanId != 4096 || vx.Port != 4789 || vx.MTU != 1350 || d.VNI != 4096 {
		t.Errorf("device %s: VNI %d port %d MTU %d; data %+v", vx.Name, vx.VxlanId, vx.Port, vx.MTU, d)
	}
}

func TestHandDeletedEntriesComeBack(t *testing.T) {
	e := newEnv(t, subnet.BackendConfig{VNI: 1, Port: 8472})
	published := e.prepare().VtepMAC
	e.reconcile(threePeers)
	dev := e.dev()

	victim := threePeers[1]
	mac, _ := vxlan.ParseData(victim.Attrs.BackendData)
	ipn := &net.IPNet{IP: victim.Subnet.Addr().AsSlice(), Mask: net.CIDRMask(24, 32)}
	if err := e.h.RouteDel(&netlink.Route{Dst: ipn, LinkIndex: dev.Index}); err != nil {
		t.Fatalf("delete route: %v", err)
	}
	if err := e.h.NeighDel(&netlink.Neigh{LinkIndex: dev.Index, Family: netlink.FAMILY_V4, IP: victim.Subnet.Addr().AsSlice()}); err != nil {
		t.Fatalf("delete neighbour: %v", err)
	}
	if err := e.h.NeighDel(&netlink.Neigh{LinkIndex: dev.Index, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF,
		HardwareAddr: mac.VtepMAC.HardwareAddr(), IP: victim.Attrs.PublicIP.AsSlice()}); err != nil {
		t.Fatalf("delete FDB entry: %v", err)
	}
	if n := len(backendtest.Routes(t, e.h)); n != 2 {
		t.Fatalf("%d routes after deleting one", n)
	}
	e.reconcile(threePeers)
	e.expect(threePeers)

	// The address, the up flag and the MAC.
	addrs, _ := e.h.AddrList(dev, netlink.FAMILY_V4)
	for _, a := range addrs {
		if err := e.h.AddrDel(dev, &a); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.h.LinkSetDown(dev); err != nil {
		t.Fatal(err)
	}
	if err := e.h.LinkSetHardwareAddr(dev, net.HardwareAddr{2, 0xee, 0, 0, 0, 1}); err != nil {
		t.Fatal(err)
	}
	e.reconcile(threePeers)
	e.expect(threePeers)
	if got := e.dev().HardwareAddr.String(); got != published.String() {
		t.Errorf("MAC changed by hand stays %s, published %s", got, published)
	}

	// The device itself: it comes back with the MAC peers know.
	if err := e.h.LinkDel(dev); err != nil {
		t.Fatalf("delete device: %v", err)
	}
	backendtest.WaitFor(t, 5e9, func() error {
		if n := len(backendtest.Routes(t, e.h)); n != 0 {
			return fmt.Errorf("%d routes still there after the device went", n)
		}
		return nil
	})
	e.reconcile(threePeers)
	e.expect(threePeers)
	again := e.dev()
	if again.Index == dev.Index {
		t.Errorf("device index %d unchanged: was it deleted?", again.Index)
	}
	if again.HardwareAddr.String() != published.String() {
		t.Errorf("re-created device has MAC %s, published %s", again.HardwareAddr, published)
	}
}

func TestPeerRemoved(t *testing.T) {
	e := newEnv(t, subnet.BackendConfig{VNI: 1, Port: 8472})
	e.prepare()
	e.reconcile(threePeers)
	e.reconcile(threePeers[:2])
	e.expect(threePeers[:2])
	e.reconcile(nil)
	e.expect(nil)
}

func TestPeerChangesInPlace(t *testing.T) {
	e := newEnv(t, subnet.BackendConfig{VNI: 1, Port: 8472})
	e.prepare()
	e.reconcile(threePeers)
	routesBefore := backendtest.Routes(t, e.h)

	changed := []subnet.Lease{
		threePeers[0],
		backendtest.VXLANPeer("10.244.3.0/24", "198.18.0.33", "02:77:00:00:00:03"), // moved host
		backendtest.VXLANPeer("10.244.4.0/24", "198.19.0.4", "02:77:00:00:00:44"),  // new VTEP MAC
	}
	e.reconcile(changed)
	e.expect(changed)
	if got := backendtest.Routes(t, e.h); len(got) != len(routesBefore) {
		t.Errorf("routes %d -> %d", len(routesBefore), len(got))
	}
}

func TestOtherRoutesAndEntriesUntouched(t *testing.T) {
	e := newEnv(t, subnet.BackendConfig{VNI: 1, Port: 8472})
	e.prepare()
	e.reconcile(nil)
	dev := e.dev()
	cidr := func(s string) *net.IPNet { _, n, _ := net.ParseCIDR(s); return n }
	foreign := []*netlink.Route{
		{Dst: cidr("10.99.0.0/24"), LinkIndex: dev.Index, Scope: netlink.SCOPE_LINK, Protocol: unix.RTPROT_STATIC}, // on twill's device
		{Dst: cidr("10.98.0.0/24"), Gw: net.ParseIP("198.18.0.254"), LinkIndex: e.ext.Index},                       // elsewhere, proto boot
		{Dst: cidr("10.244.4.0/24"), Gw: net.ParseIP("198.18.0.254"), LinkIndex: e.ext.Index},                      // a peer's subnet
	}
	for _, r := range foreign {
		if err := e.h.RouteAdd(r); err != nil {
			t.Fatalf("add %s: %v", r, err)
		}
	}
	extNeigh := &netlink.Neigh{LinkIndex: e.ext.Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
		IP: net.ParseIP("198.18.0.77"), HardwareAddr: net.HardwareAddr{2, 0x55, 0, 0, 0, 1}}
	if err := e.h.NeighAdd(extNeigh); err != nil {
		t.Fatal(err)
	}

	err := e.be.Reconcile(context.Background(), e.own, threePeers)
	var pe *dataplane.PeerError
	if !errors.As(err, &pe) || pe.Peer.String() != "10.244.4.0/24" || !strings.Contains(err.Error(), "not made by twill") {
		t.Fatalf("want an error naming peer 10.244.4.0/24 for the foreign route in its way, got %v", err)
	}
	e.reconcile(threePeers[:2])
	e.reconcile(nil)
	if err := e.be.Cleanup(context.Background()); err != nil {
		t.Fatal(err)
	}
	all := backendtest.AllRoutes(t, e.h)
	for _, want := range []string{"10.98.0.0/24", "10.244.4.0/24"} {
		found := false
		for _, r := range all {
			found = found || (r.Dst != nil && r.Dst.String() == want && r.Gw.String() == "198.18.0.254")
		}
		if !found {
			t.Errorf("foreign route to %s is gone: %v", want, all)
		}
	}
	if _, err := e.h.NeighList(e.ext.Index, netlink.FAMILY_V4); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, n := range backendtest.Neighs(t, e.h, e.ext.Index) {
		found = found || n.IP.String() == "198.18.0.77"
	}
	if !found {
		t.Error("the neighbour entry on ext0 is gone")
	}
}

func TestForeignRouteOnDeviceSurvivesReconcile(t *testing.T) {
	e := newEnv(t, subnet.BackendConfig{VNI: 1, Port: 8472})
	e.prepare()
	e.reconcile(threePeers)
	dev := e.dev()
	_, dst, _ := net.ParseCIDR("10.99.0.0/24")
	if err := e.h.RouteAdd(&netlink.Route{Dst: dst, LinkIndex: dev.Index, Scope: netlink.SCOPE_LINK}); err != nil {
		t.Fatal(err)
	}
	e.reconcile(threePeers[:1])
	e.expect(threePeers[:1])
	rs, err := e.h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: dst}, netlink.RT_FILTER_DST)
	if err != nil || len(rs) != 1 {
		t.Errorf("foreign route on %s: %v, %v", dev.Name, rs, err)
	}
}

func addDevice(t *testing.T, h *netlink.Handle, vx *netlink.Vxlan) *netlink.Vxlan {
	t.Helper()
	if err := h.LinkAdd(vx); err != nil {
		t.Fatalf("create %s by hand: %v", vx.Name, err)
	}
	l, err := h.LinkByName(vx.Name)
	if err != nil {
		t.Fatal(err)
	}
	return l.(*netlink.Vxlan)
}

func handMade(e *env, mod func(*netlink.Vxlan)) *netlink.Vxlan {
	attrs := netlink.NewLinkAttrs()
	attrs.Name, attrs.MTU = "twill.1", 1450
	attrs.HardwareAddr = net.HardwareAddr{2, 0xaa, 0, 0, 0, 1}
	vx := &netlink.Vxlan{LinkAttrs: attrs, VxlanId: 1, Port: 8472, SrcAddr: e.ext.Addr.AsSlice(), VtepDevIndex: e.ext.Index}
	if mod != nil {
		mod(vx)
	}
	return addDevice(e.t, e.h, vx)
}

func TestCompatibleDeviceIsAdopted(t *testing.T) {
	e := newEnv(t, subnet.BackendConfig{VNI: 1, Port: 8472})
	old := handMade(e, func(vx *netlink.Vxlan) { vx.MTU = 1300 })
	d := e.prepare()
	now := e.dev()
	if now.Index != old.Index {
		t.Errorf("device re-created (index %d -> %d)", old.Index, now.Index)
	}
	if d.VtepMAC.String() != "02:aa:00:00:00:01" || now.HardwareAddr.String() != "02:aa:00:00:00:01" {
		t.Errorf("MAC not kept: published %s, device %s", d.VtepMAC, now.HardwareAddr)
	}
	if now.MTU != 1450 {
		t.Errorf("MTU %d, want 1450", now.MTU)
	}
}

func TestIncompatibleDeviceIsRecreated(t *testing.T) {
	for name, mod := range map[string]func(e *env, vx *netlink.Vxlan){
		"port":     func(_ *env, vx *netlink.Vxlan) { vx.Port = 4789 },
		"VNI":      func(_ *env, vx *netlink.Vxlan) { vx.VxlanId = 7 },
		"local":    func(_ *env, vx *netlink.Vxlan) { vx.SrcAddr = net.ParseIP("198.18.0.9").To4() },
		"learning": func(_ *env, vx *netlink.Vxlan) { vx.Learning = true },
		"parent": func(e *env, vx *netlink.Vxlan) {
			other := backendtest.Underlay(e.t, e.h, "ext1", netip.MustParsePrefix("198.18.1.1/24"))
			vx.VtepDevIndex = other.Index
		},
	} {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t, subnet.BackendConfig{VNI: 1, Port: 8472})
			old := handMade(e, func(vx *netlink.Vxlan) { mod(e, vx) })
			e.prepare()
			now := e.dev()
			if now.Index == old.Index {
				t.Fatalf("incompatible device (%s) was adopted", name)
			}
			if now.VxlanId != 1 || now.Port != 8472 || !now.SrcAddr.Equal(e.ext.Addr.AsSlice()) || now.VtepDevIndex != e.ext.Index || now.Learning {
				t.Errorf("re-created device: VNI %d port %d local %s parent %d learning %t", now.VxlanId, now.Port, now.SrcAddr, now.VtepDevIndex, now.Learning)
			}
			e.reconcile(threePeers)
			e.expect(threePeers)
		})
	}
}

func TestNotAVXLANDeviceIsLeftAlone(t *testing.T) {
	e := newEnv(t, subnet.BackendConfig{VNI: 1, Port: 8472})
	attrs := netlink.NewLinkAttrs()
	attrs.Name = "twill.1"
	if err := e.h.LinkAdd(&netlink.Veth{LinkAttrs: attrs, PeerName: "twill.1p"}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := e.be.Prepare(context.Background()); err == nil || !strings.Contains(err.Error(), "not VXLAN") {
		t.Fatalf("Prepare over a veth called twill.1: %v", err)
	}
	if l, err := e.h.LinkByName("twill.1"); err != nil || l.Type() != "veth" {
		t.Errorf("twill.1 is now %v (%v)", l, err)
	}
}

func TestDirectRouting(t *testing.T) {
	e := newEnv(t, subnet.BackendConfig{VNI: 1, Port: 8472, DirectRouting: true})
	e.prepare()
	// threePeers[0:2] are on 198.18.0.0/24 with ext0; threePeers[2] is not.
	e.reconcile(threePeers)
	e.expect(threePeers[2:], threePeers[:2]...)

	// A peer that leaves the L2 network goes back to the tunnel, in place.
	moved := []subnet.Lease{threePeers[0], backendtest.VXLANPeer("10.244.3.0/24", "198.19.0.3", "02:77:00:00:00:03"), threePeers[2]}
	e.reconcile(moved)
	e.expect(moved[1:], moved[0])
}

func TestCleanup(t *testing.T) {
	e := newEnv(t, subnet.BackendConfig{VNI: 1, Port: 8472, DirectRouting: true})
	e.prepare()
	e.reconcile(threePeers)
	for range 2 { // idempotent
		if err := e.be.Cleanup(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.h.LinkByName("twill.1"); err == nil {
		t.Error("device still there")
	}
	if rs := backendtest.Routes(t, e.h); len(rs) != 0 {
		t.Errorf("twill routes left: %v", rs)
	}
}

func TestPeerErrorsDoNotStopOthers(t *testing.T) {
	e := newEnv(t, subnet.BackendConfig{VNI: 1, Port: 8472})
	e.prepare()
	bad := backendtest.VXLANPeer("10.244.9.0/24", "198.18.0.9", "02:77:00:00:00:09")
	bad.Attrs.BackendData = json.RawMessage(`{"VNI":1}`)
	err := e.be.Reconcile(context.Background(), e.own, append([]subnet.Lease{bad}, threePeers...))
	if err == nil || !strings.Contains(err.Error(), "peer 10.244.9.0/24") {
		t.Fatalf("want an error naming 10.244.9.0/24, got %v", err)
	}
	e.expect(threePeers)
}

func (e *env) update(changed []subnet.Lease, removed ...string) (bool, error) {
	e.t.Helper()
	var gone []netip.Prefix
	for _, r := range removed {
		gone = append(gone, netip.MustParsePrefix(r))
	}
	return e.be.Update(context.Background(), e.own, changed, gone)
}

// Update programs a few peers on top of a full pass, and the kernel ends up
// exactly as a full pass would leave it.
func TestUpdateMatchesAFullPass(t *testing.T) {
	e := newEnv(t, subnet.BackendConfig{VNI: 1, Port: 8472})
	e.prepare()
	if ok, err := e.update(threePeers[:1]); ok || err != nil {
		t.Fatalf("Update before any Reconcile: %t, %v; want a refusal", ok, err)
	}
	if n := len(backendtest.Routes(t, e.h)); n != 0 {
		t.Fatalf("a refused Update wrote %d routes", n)
	}
	e.reconcile(threePeers[:2])
	before := e.be.Counters()

	added := threePeers[2]
	moved := backendtest.VXLANPeer("10.244.3.0/24", "198.18.0.33", "02:77:00:00:00:03")
	for _, step := range []struct {
		name    string
		changed []subnet.Lease
		removed []string
		want    []subnet.Lease
		writes  uint64
	}{
		{"peer added", []subnet.Lease{added}, nil, []subnet.Lease{threePeers[0], threePeers[1], added}, 3},
		{"new public IP", []subnet.Lease{moved}, nil, []subnet.Lease{threePeers[0], moved, added}, 2}, // new FDB entry, old one removed
		{"peer removed", nil, []string{"10.244.2.0/24"}, []subnet.Lease{moved, added}, 3},
		{"same again", []subnet.Lease{moved}, nil, []subnet.Lease{moved, added}, 0},
	} {
		ok, err := e.update(step.changed, step.removed...)
		if !ok || err != nil {
			t.Fatalf("%s: Update = %t, %v", step.name, ok, err)
		}
		e.expect(step.want)
		w := e.be.Counters().Sub(before)
		if got := w.Routes + w.Neighs + w.FDB; got != step.writes {
			t.Errorf("%s: %d kernel writes (%+v), want %d", step.name, got, w, step.writes)
		}
		before = e.be.Counters()
	}
}

func TestUpdateDeclinesWhatOnlyAFullPassDecides(t *testing.T) {
	e := newEnv(t, subnet.BackendConfig{VNI: 1, Port: 8472})
	e.prepare()
	e.reconcile(threePeers)
	for _, tc := range []struct {
		name  string
		peers []subnet.Lease
	}{
		{"MAC of another peer", []subnet.Lease{backendtest.VXLANPeer("10.244.9.0/24", "198.18.0.9", "02:77:00:00:00:02")}},
		{"two new peers, one MAC", []subnet.Lease{
			backendtest.VXLANPeer("10.244.9.0/24", "198.18.0.9", "02:77:00:00:00:99"),
			backendtest.VXLANPeer("10.244.8.0/24", "198.18.0.8", "02:77:00:00:00:99")}},
		{"no backend data", []subnet.Lease{{Subnet: netip.MustParsePrefix("10.244.9.0/24"),
			Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("198.18.0.9"), BackendType: subnet.BackendVXLAN}}}},
	} {
		if ok, err := e.update(tc.peers); ok || err != nil {
			t.Errorf("%s: Update = %t, %v; want a refusal", tc.name, ok, err)
		}
	}
	e.expect(threePeers)

	// A MAC handed from a removed peer to a new one in the same update is fine.
	heir := backendtest.VXLANPeer("10.244.9.0/24", "198.18.0.9", "02:77:00:00:00:02")
	if ok, err := e.update([]subnet.Lease{heir}, "10.244.2.0/24"); !ok || err != nil {
		t.Fatalf("MAC handed over: Update = %t, %v", ok, err)
	}
	e.expect([]subnet.Lease{heir, threePeers[1], threePeers[2]})

	// A failed full pass leaves nothing to build on.
	bad := append([]subnet.Lease{{Subnet: netip.MustParsePrefix("10.244.7.0/24"),
		Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("198.18.0.7"), BackendType: subnet.BackendVXLAN}}}, threePeers...)
	if err := e.be.Reconcile(context.Background(), e.own, bad); err == nil {
		t.Fatal("Reconcile with a peer without backend data succeeded")
	}
	if ok, err := e.update(nil, "10.244.3.0/24"); ok || err != nil {
		t.Errorf("Update after a failed Reconcile = %t, %v; want a refusal", ok, err)
	}
}

// A route someone else added since the last full pass is not replaced: the
// update fails, and the next update declines until a full pass ran.
func TestUpdateNeverReplacesAForeignRoute(t *testing.T) {
	e := newEnv(t, subnet.BackendConfig{VNI: 1, Port: 8472})
	e.prepare()
	e.reconcile(threePeers[:2])
	_, dst, _ := net.ParseCIDR("10.244.4.0/24")
	if err := e.h.RouteAdd(&netlink.Route{Dst: dst, Gw: net.ParseIP("198.18.0.254"), LinkIndex: e.ext.Index}); err != nil {
		t.Fatal(err)
	}
	ok, err := e.update(threePeers[2:])
	if !ok || !errors.Is(err, unix.EEXIST) {
		t.Fatalf("Update over a foreign route = %t, %v; want an EEXIST error", ok, err)
	}
	rs, err := e.h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: dst}, netlink.RT_FILTER_DST)
	if err != nil || len(rs) != 1 || rs[0].Protocol == dataplane.RouteProtocol || !rs[0].Gw.Equal(net.ParseIP("198.18.0.254")) {
		t.Errorf("the foreign route was touched: %+v (%v)", rs, err)
	}
	if ok, err := e.update(nil, "10.244.2.0/24"); ok || err != nil {
		t.Errorf("Update after a failed one = %t, %v; want a refusal", ok, err)
	}
}
