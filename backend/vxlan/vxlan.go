// Package vxlan is twill's default backend: pod traffic to another node is
// wrapped in VXLAN (UDP, port 8472 by default) and sent to that node's public
// IP.
//
// # Design
//
// One device, twill.<VNI>, with learning off: the kernel never floods or
// learns, twill tells it everything. Per peer it holds exactly three entries
// (see Desired): a route to the peer's subnet via the peer's network address
// (onlink), a permanent neighbour entry mapping that address to the peer's
// VTEP MAC, and an FDB entry mapping the MAC to the peer's public IP. The
// route makes the kernel send the packet to the device with the peer's
// network address as next hop; the neighbour entry gives the inner
// destination MAC without ARP; the FDB entry gives the outer destination IP.
// Three entries, all known in advance, no miss notifications and no daemon in
// the packet path.
//
// The device keeps its MAC across restarts (a compatible device is adopted),
// because peers hold that MAC in their neighbour and FDB entries. When the
// device has to be recreated (deleted by hand, or incompatible with the
// config) it is given the MAC published in the lease again.
package vxlan

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"

	"github.com/vishvananda/netlink"

	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/internal/netlinkx"
	"github.com/twillnet/twill/subnet"
)

// Overhead is what VXLAN over IPv4 adds to a frame: outer IPv4 (20), UDP (8),
// VXLAN (8) and the inner Ethernet header (14). Over IPv6 the outer header
// is 40 bytes, so OverheadIPv6 is 70.
const (
	Overhead     = 50
	OverheadIPv6 = 70
)

// DeviceName returns the name of the device for vni: twill.<VNI> for the
// IPv4 pod network, twill-v6.<VNI> for the IPv6 one (flannel's names are
// flannel.<VNI> and flannel-v6.<VNI>).
func DeviceName(vni int, v6 bool) string {
	if v6 {
		return fmt.Sprintf("twill-v6.%d", vni)
	}
	return fmt.Sprintf("twill.%d", vni)
}

// Backend programs VXLAN for one family of one network: the family of the
// external interface's address, which is both the pod traffic's family and
// the underlay's (IPv4 pods over IPv4, IPv6 pods over IPv6, as flannel
// does).
type Backend struct {
	v6            bool
	vni, port     int
	mtu           int
	directRouting bool
	ext           dataplane.ExternalInterface
	h             *netlink.Handle
	log           *slog.Logger

	mu      sync.Mutex
	mac     dataplane.MAC // the VTEP MAC: the device's since the first Prepare or Reconcile
	adopted string        // flanneld's device, when twill took it over (see Prepare)
	// published looks up the MAC the node published before (PublishedMAC).
	published func() (dataplane.MAC, bool)

	dataplane.Tally // what was written to the kernel

	prog dataplane.Programmed // for Update: what the last full pass left, kept current
	dev  int                  // the device's index at the last full pass
}

// New checks the configuration. h is a netlink handle in the namespace to
// program. Nothing is created before Prepare.
func New(cfg subnet.BackendConfig, ext dataplane.ExternalInterface, h *netlink.Handle, log *slog.Logger) (*Backend, error) {
	if err := ext.Validate(); err != nil {
		return nil, fmt.Errorf("vxlan backend: %w", err)
	}
	if h == nil {
		return nil, errors.New("vxlan backend: no netlink handle")
	}
	b := &Backend{v6: ext.IPv6(), vni: cfg.VNI, port: cfg.Port, directRouting: cfg.DirectRouting, ext: ext, h: h, log: log}
	if b.vni == 0 {
		b.vni = subnet.DefaultVNI
	}
	if b.port == 0 {
		b.port = subnet.DefaultVXLANPort
	}
	if b.vni < 1 || b.vni > 1<<24-1 {
		return nil, fmt.Errorf("vxlan backend: VNI %d is out of range", b.vni)
	}
	// Backend.MTU is flannel's: the MTU of the packets that leave the node,
	// tunnel headers included (default: the external interface's). Pods
	// and the device get that minus the overhead.
	outer := cfg.MTU
	if outer == 0 {
		outer = ext.MTU
	}
	b.mtu = outer - Overhead
	if b.v6 {
		b.mtu = outer - OverheadIPv6
	}
	if b.mtu < 576 {
		return nil, fmt.Errorf("vxlan backend: pod MTU %d is too small (outgoing MTU %d, external interface %s's %d)", b.mtu, outer, ext.Name, ext.MTU)
	}
	if b.log == nil {
		b.log = slog.New(slog.DiscardHandler)
	}
	b.log = b.log.With("backend", subnet.BackendVXLAN, "device", b.Device())
	return b, nil
}

// Device returns the name of the VXLAN device: twill's, or flanneld's when
// twill adopted it (see Prepare).
func (b *Backend) Device() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.adopted != "" {
		return b.adopted
	}
	return DeviceName(b.vni, b.v6)
}

// hostBits is the length of the device address's prefix: one address.
func (b *Backend) hostBits() int { return b.ext.Addr.BitLen() }

// FlannelDeviceName is the name flanneld gives its device for vni, of the
// IPv4 or IPv6 family: flannel.<VNI>, flannel-v6.<VNI>.
func FlannelDeviceName(vni int, v6 bool) string {
	if v6 {
		return fmt.Sprintf("flannel-v6.%d", vni)
	}
	return fmt.Sprintf("flannel.%d", vni)
}

// PublishedMAC gives the backend a way to learn the VTEP MAC this node
// published before (its lease or Node from before a reboot), so that a
// device twill has to make carries the MAC peers know. It is asked only
// then: when neither twill's device nor flanneld's is there and no MAC is
// known yet, so a restart that finds its device costs no datastore read.
func (b *Backend) PublishedMAC(f func() (dataplane.MAC, bool)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.published = f
}

// Prepare creates the device, or adopts a compatible one left by an earlier
// run (keeping its MAC), and returns the BackendData to publish and the MTU
// pods must use.
//
// A node migrating from flannel has flanneld's device (flannel.<VNI>) with
// the same VNI and port, which the kernel does not allow twice. When it is
// compatible (what flanneld makes by default is) and twill's own device does
// not exist, twill adopts it as it is: same name, same MAC, same entries, so
// the switch of daemons changes nothing in the kernel and no packet is lost;
// the peers, which know that MAC, change nothing either. A flanneld device
// twill cannot use is deleted when twill's is created.
func (b *Backend) Prepare(ctx context.Context) (json.RawMessage, int, error) {
	if pred, err := b.predecessor(ctx); err != nil {
		return nil, 0, err
	} else if pred != nil && b.incompatible(pred) == "" {
		b.mu.Lock()
		b.adopted = pred.Name
		b.mu.Unlock()
		b.log.Info("adopting flannel's device", "flannel-device", pred.Name, "mac", pred.HardwareAddr.String())
	}
	link, err := b.ensureDevice(ctx)
	if err != nil {
		return nil, 0, err
	}
	mac, _ := dataplane.MACFrom(link.HardwareAddr)
	data, err := json.Marshal(Data{VNI: b.vni, VtepMAC: mac})
	if err != nil {
		return nil, 0, fmt.Errorf("vxlan backend: encode BackendData: %w", err)
	}
	return data, b.mtu, nil
}

// Reconcile makes the kernel hold exactly the entries for own and peers
// (leases of this backend's family, see subnet.Lease.Family): device
// (re-created if gone, with the published MAC), its address (the own
// subnet's network address, /32 or /128), and per peer the route, neighbour
// and FDB entries. Only differences are written.
func (b *Backend) Reconcile(ctx context.Context, own subnet.Lease, peers []subnet.Lease) error {
	if !own.Subnet.IsValid() || own.Subnet.Addr().Is6() != b.v6 {
		return fmt.Errorf("vxlan backend: reconcile: own lease has no %s subnet (%v)", subnet.FamilyName(b.v6), own.Subnet)
	}
	link, err := b.ensureDevice(ctx)
	if err != nil {
		return err
	}
	dev := link.Attrs().Index
	addrErr := dataplane.EnsureAddr(ctx, b.h, link, netip.PrefixFrom(own.Subnet.Masked().Addr(), b.hostBits()))
	desired, peerErr := Desired(own, peers, Params{Dev: dev, VNI: b.vni, Ext: b.ext, DirectRouting: b.directRouting})
	actual, err := dataplane.ReadActual(ctx, b.h, b.ext.Family(), dev)
	if err != nil {
		return errors.Join(addrErr, fmt.Errorf("vxlan backend: read kernel state: %w", err))
	}
	b.mu.Lock()
	adopted := b.adopted != ""
	b.mu.Unlock()
	if adopted {
		// flanneld's routes to the peers on its device, which twill now
		// owns, carry another protocol: they are rewritten in place as
		// twill's (a replace, so no packet misses its route).
		for k := range desired.Routes {
			if f, ok := actual.Foreign[k]; ok && f.LinkIndex == dev {
				delete(actual.Foreign, k)
			}
		}
	}
	plan := dataplane.Diff(desired, actual)
	if n := plan.Len(); n > 0 {
		b.log.Info("reconciling", "peers", len(peers), "entries", desired.Len(), "set", len(plan.SetRoutes)+len(plan.SetNeighs)+len(plan.SetFDB),
			"remove", len(plan.DelRoutes)+len(plan.DelNeighs)+len(plan.DelFDB))
	}
	applyErr := dataplane.Apply(ctx, b.h, plan)
	b.Applied(plan)
	if err := errors.Join(addrErr, peerErr, applyErr); err != nil {
		b.prog.Invalidate()
		return fmt.Errorf("vxlan backend: reconcile: %w", err)
	}
	b.prog.Reset(own.Subnet, desired, actual.Foreign)
	b.dev = dev
	return nil
}

// Update programs the changes of a few peers on top of the last full pass
// (see the Backend interface in internal/daemon). It declines, writing
// nothing, when a changed peer cannot be programmed or takes a VTEP MAC
// another peer holds: only a full pass can tell which of two clashing peers
// wins.
func (b *Backend) Update(ctx context.Context, own subnet.Lease, changed []subnet.Lease, removed []netip.Prefix) (bool, error) {
	if !b.prog.Usable(own.Subnet) {
		return false, nil
	}
	p := Params{Dev: b.dev, VNI: b.vni, Ext: b.ext, DirectRouting: b.directRouting}
	next := make(map[netip.Prefix]dataplane.PeerEntries, len(changed)+len(removed))
	for _, sn := range removed {
		next[sn] = dataplane.PeerEntries{}
	}
	for _, peer := range changed {
		if peer.Attrs.BackendType != subnet.BackendVXLAN || peer.Subnet == own.Subnet {
			next[peer.Subnet] = dataplane.PeerEntries{}
			continue
		}
		e, err := p.Entries(own, peer)
		if err != nil {
			return false, nil
		}
		next[peer.Subnet] = e
	}
	// A VTEP MAC must stay with one peer, counting the peers left as they are.
	owners := make(map[dataplane.MAC]netip.Prefix, len(next))
	for sn, e := range next {
		if !e.Neigh.IP.IsValid() {
			continue
		}
		if _, dup := owners[e.Neigh.MAC]; dup {
			return false, nil
		}
		owners[e.Neigh.MAC] = sn
	}
	for mac, sn := range owners {
		if other, held := b.prog.NeighMACOwner(mac); held && other != sn {
			if _, changing := next[other]; !changing {
				return false, nil
			}
		}
	}
	plan, err := b.prog.Update(ctx, b.h, next)
	b.Applied(plan)
	if err != nil {
		return true, fmt.Errorf("vxlan backend: update: %w", err)
	}
	return true, nil
}

// Cleanup removes twill's routes of the backend's family and the device
// (which takes its neighbour and FDB entries with it).
func (b *Backend) Cleanup(ctx context.Context) error {
	b.prog.Invalidate()
	actual, err := dataplane.ReadActual(ctx, b.h, b.ext.Family(), 0)
	if err != nil {
		return fmt.Errorf("vxlan backend: cleanup: %w", err)
	}
	errs := []error{dataplane.Apply(ctx, b.h, dataplane.Diff(dataplane.NewState(), actual))}
	link, err := netlinkx.LinkByName(ctx, b.h, b.Device())
	switch {
	case netlinkx.IsNotFound(err):
	case err != nil:
		errs = append(errs, err)
	default:
		if _, ok := link.(*netlink.Vxlan); ok {
			if err := b.h.LinkDel(link); err != nil {
				errs = append(errs, fmt.Errorf("delete %s: %w", b.Device(), err))
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("vxlan backend: cleanup: %w", err)
	}
	return nil
}

// ensureDevice returns the VXLAN device, up, with the configured MTU and the
// published MAC, creating or re-creating it as needed.
func (b *Backend) ensureDevice(ctx context.Context) (*netlink.Vxlan, error) {
	h, name := b.h, b.Device()
	b.mu.Lock()
	known, published := b.mac, b.published
	b.mu.Unlock()
	mac := known
	link, err := netlinkx.LinkByName(ctx, h, name)
	var vx *netlink.Vxlan
	switch {
	case netlinkx.IsNotFound(err):
		b.mu.Lock()
		adopted := b.adopted
		b.adopted = "" // an adopted device that is gone is replaced by twill's own
		b.mu.Unlock()
		if adopted != "" {
			name = b.Device()
		}
		pred, perr := b.predecessor(ctx)
		switch {
		case perr != nil:
			return nil, perr
		case pred != nil:
			if mac == (dataplane.MAC{}) {
				mac, _ = dataplane.MACFrom(pred.HardwareAddr)
			}
			if err := h.LinkDel(pred); err != nil {
				return nil, fmt.Errorf("vxlan backend: replace flannel's %s: %w", pred.Name, err)
			}
			b.log.Warn("replaced flannel's device, which twill cannot use as it is", "flannel-device", pred.Name, "reason", b.incompatible(pred), "mac", mac)
		case mac == (dataplane.MAC{}) && published != nil:
			if m, ok := published(); ok {
				mac = m
				b.log.Info("creating the device with the MAC published before", "mac", mac)
			}
		}
	case err != nil:
		return nil, fmt.Errorf("vxlan backend: %w", err)
	default:
		var ok bool
		if vx, ok = link.(*netlink.Vxlan); !ok {
			return nil, fmt.Errorf("vxlan backend: %s exists and is a %s device, not VXLAN; twill leaves it alone: remove it or choose another VNI", name, link.Type())
		}
		if why := b.incompatible(vx); why != "" {
			b.log.Warn("re-creating incompatible device", "reason", why)
			if mac == (dataplane.MAC{}) {
				mac, _ = dataplane.MACFrom(vx.HardwareAddr)
			}
			if err := h.LinkDel(vx); err != nil {
				return nil, fmt.Errorf("vxlan backend: delete incompatible %s (%s): %w", name, why, err)
			}
			vx = nil
			b.mu.Lock()
			b.adopted = "" // made again, it is twill's own
			b.mu.Unlock()
			name = b.Device()
		}
	}
	if vx == nil {
		vx, err = b.createDevice(ctx, mac)
		if err != nil {
			return nil, err
		}
		b.DeviceCreated()
	}
	if vx.MTU != b.mtu {
		if err := h.LinkSetMTU(vx, b.mtu); err != nil {
			return nil, fmt.Errorf("vxlan backend: set MTU of %s to %d: %w", name, b.mtu, err)
		}
	}
	if have, _ := dataplane.MACFrom(vx.HardwareAddr); mac != (dataplane.MAC{}) && have != mac {
		// Changed by hand: peers know the published MAC.
		if err := h.LinkSetHardwareAddr(vx, mac.HardwareAddr()); err != nil {
			return nil, fmt.Errorf("vxlan backend: restore MAC %s of %s: %w", mac, name, err)
		}
		vx.HardwareAddr = mac.HardwareAddr()
	}
	if vx.Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(vx); err != nil {
			return nil, fmt.Errorf("vxlan backend: set %s up: %w", name, err)
		}
	}
	if mac == (dataplane.MAC{}) || mac != known {
		// From now on this is the MAC peers know; keep it if the device
		// has to be made again.
		mac, _ = dataplane.MACFrom(vx.HardwareAddr)
		b.mu.Lock()
		b.mac = mac
		b.mu.Unlock()
	}
	return vx, nil
}

// predecessor returns flanneld's device of this family when it has twill's
// VNI and port (the kernel refuses a second device with both) and twill's
// own device does not exist, else nil.
func (b *Backend) predecessor(ctx context.Context) (*netlink.Vxlan, error) {
	if _, err := netlinkx.LinkByName(ctx, b.h, DeviceName(b.vni, b.v6)); err == nil {
		return nil, nil
	} else if !netlinkx.IsNotFound(err) {
		return nil, fmt.Errorf("vxlan backend: %w", err)
	}
	link, err := netlinkx.LinkByName(ctx, b.h, FlannelDeviceName(b.vni, b.v6))
	switch {
	case netlinkx.IsNotFound(err):
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("vxlan backend: %w", err)
	}
	if vx, ok := link.(*netlink.Vxlan); ok && vx.VxlanId == b.vni && vx.Port == b.port {
		return vx, nil
	}
	return nil, nil
}

// incompatible says why an existing device cannot be adopted, or "".
func (b *Backend) incompatible(vx *netlink.Vxlan) string {
	local, _ := netip.AddrFromSlice(vx.SrcAddr)
	switch {
	case vx.VxlanId != b.vni:
		return fmt.Sprintf("VNI %d, want %d", vx.VxlanId, b.vni)
	case vx.Port != b.port:
		return fmt.Sprintf("UDP port %d, want %d", vx.Port, b.port)
	case local.Unmap() != b.ext.Addr:
		return fmt.Sprintf("local address %v, want %s", vx.SrcAddr, b.ext.Addr)
	case vx.VtepDevIndex != b.ext.Index:
		return fmt.Sprintf("parent interface index %d, want %d (%s)", vx.VtepDevIndex, b.ext.Index, b.ext.Name)
	case vx.Learning:
		return "learning is on"
	case vx.FlowBased:
		return "it is an external (flow-based) device"
	case len(vx.Group) > 0 && !vx.Group.IsUnspecified():
		return fmt.Sprintf("it has a multicast group or remote %s", vx.Group)
	}
	return ""
}

func (b *Backend) createDevice(ctx context.Context, mac dataplane.MAC) (*netlink.Vxlan, error) {
	h, name := b.h, b.Device()
	attrs := netlink.NewLinkAttrs()
	attrs.Name, attrs.MTU = name, b.mtu
	if mac != (dataplane.MAC{}) {
		attrs.HardwareAddr = mac.HardwareAddr()
	}
	want := &netlink.Vxlan{
		LinkAttrs:    attrs,
		VxlanId:      b.vni,
		VtepDevIndex: b.ext.Index,
		SrcAddr:      b.ext.Addr.AsSlice(),
		Port:         b.port,
		Learning:     false,
	}
	if err := h.LinkAdd(want); err != nil {
		return nil, fmt.Errorf("vxlan backend: create %s (VNI %d, port %d, local %s, dev %s): %w", name, b.vni, b.port, b.ext.Addr, b.ext.Name, err)
	}
	link, err := netlinkx.LinkByName(ctx, h, name)
	if err != nil {
		return nil, fmt.Errorf("vxlan backend: read back %s: %w", name, err)
	}
	vx, ok := link.(*netlink.Vxlan)
	if !ok {
		return nil, fmt.Errorf("vxlan backend: %s was created but reads back as %s", name, link.Type())
	}
	b.log.Info("created device", "index", vx.Index, "mac", vx.HardwareAddr.String(), "mtu", vx.MTU)
	return vx, nil
}
