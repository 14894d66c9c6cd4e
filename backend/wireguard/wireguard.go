// Package wireguard is the wireguard backend: pod traffic between nodes
// goes through a WireGuard device, encrypted and authenticated, in UDP
// datagrams between the nodes' public IPs.
//
// Each IP family has a device of its own (flannel's "separate" mode):
// twill-wg over the IPv4 underlay and twill-wg-v6 over the IPv6 one. The
// device carries the first address of the node's subnet, so the node's own
// traffic to pods elsewhere has a source its peers accept. Every other node
// is a WireGuard peer (its public key from its lease, its public IP and
// listen port as endpoint, its subnet as the only allowed IP) with a route
// of its subnet into the device. Peers and routes are desired state, diffed
// and repaired like the vxlan backend's entries.
//
// The device is made through netlink where the kernel has WireGuard, and by
// wireguard-go (the userspace implementation) where it has not. Either way
// it is configured through wgctrl, and outlives twilld: wireguard-go runs
// as a daemon of its own, so a restart of twilld drops no packet.
package wireguard

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/internal/netlinkx"
	"github.com/twillnet/twill/subnet"
)

// What WireGuard adds to a packet: the outer IPv4 (20) or IPv6 (40)
// header, UDP (8) and WireGuard's own header and authentication tag (32).
const (
	OverheadIPv4 = 60
	OverheadIPv6 = 80
)

// DeviceName is the device of a family: twill-wg, or twill-wg-v6 for IPv6.
func DeviceName(v6 bool) string {
	if v6 {
		return "twill-wg-v6"
	}
	return "twill-wg"
}

// Options are this node's own settings, beside the network config's.
type Options struct {
	// KeyFile holds the private key (DefaultKeyFile when empty).
	KeyFile string
	// Device replaces DeviceName(v6): for tests that run beside a twilld
	// on the same machine (wireguard-go's control sockets are named after
	// the device, in one folder for the whole machine).
	Device string
	// Joint is shared by the two families' backends in the single-device
	// modes (Backend.Mode auto, ipv4, ipv6); nil in separate mode.
	Joint *Joint
}

// Backend programs one family's WireGuard device, peers and routes.
type Backend struct {
	v6        bool
	name      string
	port      int
	mtu       int // the device's and the pods'
	keyFile   string
	psk       wgtypes.Key
	keepalive time.Duration
	ext       dataplane.ExternalInterface
	h         *netlink.Handle
	log       *slog.Logger

	key    wgtypes.Key // private; loaded by Prepare
	client *wgctrl.Client
	fresh  bool   // the device was made since the last good pass: prompt handshakes
	joint  *Joint // the single device of both families; nil: a device per family

	dataplane.Tally

	// For Update: what the last full pass left, kept current.
	prog  dataplane.Programmed  // routes
	peers map[netip.Prefix]Peer // the programmed peers by subnet; nil: none trusted
	link  int                   // the device's index then
}

// New checks the configuration. h is a netlink handle in the namespace to
// program; the device is made by Prepare.
func New(cfg subnet.BackendConfig, ext dataplane.ExternalInterface, h *netlink.Handle, log *slog.Logger, opt Options) (*Backend, error) {
	if err := ext.Validate(); err != nil {
		return nil, fmt.Errorf("wireguard backend: %w", err)
	}
	if h == nil {
		return nil, errors.New("wireguard backend: no netlink handle")
	}
	v6 := ext.IPv6()
	b := &Backend{v6: v6, name: DeviceName(v6), port: cfg.ListenPort, keyFile: opt.KeyFile,
		keepalive: time.Duration(cfg.PersistentKeepaliveInterval) * time.Second, ext: ext, h: h, log: log, joint: opt.Joint}
	if v6 && b.joint == nil {
		b.port = cfg.ListenPortV6
	}
	if b.joint != nil {
		b.name = DeviceName(false) // one device, on ListenPort, for both
	}
	if opt.Device != "" {
		b.name = opt.Device
	}
	if b.keyFile == "" {
		b.keyFile = DefaultKeyFile
	}
	if cfg.PSK != "" {
		psk, err := wgtypes.ParseKey(cfg.PSK)
		if err != nil {
			return nil, errors.New("wireguard backend: Backend.PSK is not a WireGuard key")
		}
		b.psk = psk
	}
	outer := cfg.MTU
	if outer == 0 {
		outer = ext.MTU
	}
	b.mtu = outer - OverheadIPv4
	if v6 && b.joint == nil || b.joint != nil && b.joint.mode != ModeIPv4 {
		// Over IPv6, or possibly so (the single device of modes auto and
		// ipv6 reaches peers over either family).
		b.mtu = outer - OverheadIPv6
	}
	if b.mtu < 576 {
		return nil, fmt.Errorf("wireguard backend: pod MTU %d is too small (outgoing MTU %d, external interface %s's %d)", b.mtu, outer, ext.Name, ext.MTU)
	}
	if b.log == nil {
		b.log = slog.New(slog.DiscardHandler)
	}
	b.log = b.log.With("backend", subnet.BackendWireGuard, "device", b.name)
	return b, nil
}

// Device is the name of the backend's device.
func (b *Backend) Device() string { return b.name }

// PublicKey is this node's public key (after Prepare).
func (b *Backend) PublicKey() wgtypes.Key { return b.key.PublicKey() }

// Prepare loads (or makes) the node's key, makes or adopts the device and
// returns the lease's BackendData: the public key and the listen port.
func (b *Backend) Prepare(ctx context.Context) (json.RawMessage, int, error) {
	key, created, err := LoadOrCreateKey(b.keyFile)
	if err != nil {
		return nil, 0, fmt.Errorf("wireguard backend: %w", err)
	}
	b.key = key
	if created {
		b.log.Info("made a new WireGuard key", "file", b.keyFile, "public-key", key.PublicKey().String())
	}
	if b.client == nil {
		if b.client, err = wgctrl.New(); err != nil {
			return nil, 0, fmt.Errorf("wireguard backend: open wgctrl: %w", err)
		}
	}
	if _, _, err := b.ensureDevice(ctx); err != nil {
		return nil, 0, err
	}
	data, err := json.Marshal(Data{PublicKey: key.PublicKey().String(), Port: uint16(b.port)})
	return data, b.mtu, err
}

// ensureDevice makes the device when it is missing (or cannot be
// configured), then gives it the key, the port, the MTU and the up state
// where it has others. It returns the link and the device as WireGuard
// reported it (its peers are current; its key and port may have been set
// since), so that a pass reads neither twice.
func (b *Backend) ensureDevice(ctx context.Context) (netlink.Link, *wgtypes.Device, error) {
	link, err := netlinkx.LinkByName(ctx, b.h, b.name)
	if err != nil && !netlinkx.IsNotFound(err) {
		return nil, nil, fmt.Errorf("wireguard backend: %w", err)
	}
	var dev *wgtypes.Device
	if err == nil {
		if dev, err = b.client.Device(b.name); err != nil {
			// A device of this name that WireGuard does not know: a tun
			// device whose wireguard-go died, or someone else's.
			b.log.Warn("the device is not a working WireGuard device; making it again", "type", link.Type(), "err", err)
			if err := b.h.LinkDel(link); err != nil {
				return nil, nil, fmt.Errorf("wireguard backend: delete %s: %w", b.name, err)
			}
			link = nil
		}
	} else {
		link = nil
	}
	if link == nil {
		if link, err = b.createDevice(ctx); err != nil {
			return nil, nil, err
		}
		b.DeviceCreated()
		b.fresh = true
		if dev, err = b.client.Device(b.name); err != nil {
			return nil, nil, fmt.Errorf("wireguard backend: configure %s: %w", b.name, err)
		}
	}
	if dev.PrivateKey != b.key || dev.ListenPort != b.port {
		if dev.PrivateKey != b.key && dev.PrivateKey != (wgtypes.Key{}) {
			b.log.Warn("the device had another private key; setting this node's", "public-key", b.key.PublicKey().String())
		}
		port := b.port
		if err := b.client.ConfigureDevice(b.name, wgtypes.Config{PrivateKey: &b.key, ListenPort: &port}); err != nil {
			return nil, nil, fmt.Errorf("wireguard backend: set the key and listen port %d of %s: %w", b.port, b.name, err)
		}
	}
	changed := false
	// The single device of both families takes the smaller of their MTUs.
	if link.Attrs().MTU != b.mtu && (b.joint == nil || link.Attrs().MTU > b.mtu) {
		if err := b.h.LinkSetMTU(link, b.mtu); err != nil {
			return nil, nil, fmt.Errorf("wireguard backend: set the MTU of %s to %d: %w", b.name, b.mtu, err)
		}
		changed = true
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		if err := b.h.LinkSetUp(link); err != nil {
			return nil, nil, fmt.Errorf("wireguard backend: set %s up: %w", b.name, err)
		}
		changed = true
	}
	if changed {
		if link, err = netlinkx.LinkByName(ctx, b.h, b.name); err != nil {
			return nil, nil, err
		}
	}
	return link, dev, nil
}

// createDevice makes the device in the kernel, or with wireguard-go when
// the kernel has no WireGuard.
func (b *Backend) createDevice(ctx context.Context) (netlink.Link, error) {
	attrs := netlink.NewLinkAttrs()
	attrs.Name, attrs.MTU = b.name, b.mtu
	err := b.h.LinkAdd(&netlink.Wireguard{LinkAttrs: attrs})
	switch {
	case err == nil:
		b.log.Info("created device", "implementation", "kernel")
	case errors.Is(err, unix.EOPNOTSUPP):
		if err := b.startUserspace(ctx); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("wireguard backend: create %s: %w", b.name, err)
	}
	link, err := netlinkx.LinkByName(ctx, b.h, b.name)
	if err != nil {
		return nil, fmt.Errorf("wireguard backend: read back %s: %w", b.name, err)
	}
	return link, nil
}

// startUserspace runs wireguard-go for the device. wireguard-go makes the
// tun device and its control socket, then leaves a daemon of its own
// behind and exits: the daemon outlives twilld, and exits when the device
// is deleted.
func (b *Backend) startUserspace(ctx context.Context) error {
	path, err := exec.LookPath("wireguard-go")
	if err != nil {
		return fmt.Errorf("wireguard backend: the kernel has no WireGuard (creating a wireguard device is not supported) and wireguard-go is not installed: load the kernel module or install wireguard-go")
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, b.name)
	// Its own session, so that a signal to twilld's process group does not
	// reach the daemon; without LOG_LEVEL the daemon's output goes nowhere
	// rather than into a pipe of twilld's.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Env = slices.DeleteFunc(os.Environ(), func(e string) bool { return strings.HasPrefix(e, "LOG_LEVEL=") })
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("wireguard backend: wireguard-go %s: %w: %s", b.name, err, strings.TrimSpace(string(out)))
	}
	b.log.Info("created device", "implementation", "wireguard-go", "program", path)
	return nil
}

// Reconcile makes the device, its address, its peers and the routes equal
// the desired state for the own lease and the peers.
func (b *Backend) Reconcile(ctx context.Context, own subnet.Lease, peers []subnet.Lease) error {
	b.peers = nil
	b.prog.Invalidate()
	if !own.Subnet.IsValid() || own.Subnet.Addr().Is6() != b.v6 {
		return fmt.Errorf("wireguard backend: own subnet %v is not %s", own.Subnet, subnet.FamilyName(b.v6))
	}
	link, dev, err := b.ensureDevice(ctx)
	if err != nil {
		return err
	}
	addrErr := dataplane.EnsureAddr(ctx, b.h, link, netip.PrefixFrom(own.Subnet.Masked().Addr(), own.Subnet.Addr().BitLen()))
	wantPeers, wantRoutes, peerErr := Desired(own, peers, b.settings(link.Attrs().Index))
	have := make(map[wgtypes.Key]Peer, len(dev.Peers))
	for _, p := range dev.Peers {
		have[p.PublicKey] = peerFromDevice(p)
	}
	devicePeers := wantPeers
	if b.joint != nil {
		b.joint.mu.Lock()
		defer b.joint.mu.Unlock()
		devicePeers = b.joint.want(b.v6, b.ext.Addr, wantPeers, have)
	}
	changes := diffPeers(devicePeers, have)
	var peersErr error
	if len(changes) > 0 {
		peersErr = b.client.ConfigureDevice(b.name, wgtypes.Config{Peers: changes})
		if peersErr != nil {
			peersErr = fmt.Errorf("configure peers of %s: %w", b.name, peersErr)
		} else {
			b.PeersWritten(len(changes))
		}
	}
	actual, err := dataplane.ReadActual(ctx, b.h, b.ext.Family(), 0)
	if err != nil {
		return errors.Join(addrErr, peersErr, fmt.Errorf("wireguard backend: read kernel state: %w", err))
	}
	plan := dataplane.Diff(wantRoutes, actual)
	if plan.Len() > 0 || len(changes) > 0 {
		b.log.Info("reconciling", "peers", len(wantPeers), "peer-writes", len(changes), "route-writes", plan.Len())
	}
	applyErr := dataplane.Apply(ctx, b.h, plan)
	b.Applied(plan)
	if err := errors.Join(addrErr, peerErr, peersErr, applyErr); err != nil {
		return fmt.Errorf("wireguard backend: reconcile: %w", err)
	}
	b.prog.Reset(own.Subnet, wantRoutes, actual.Foreign)
	b.link = link.Attrs().Index
	if b.fresh {
		b.prompt(wantPeers)
		b.fresh = false
	}
	if b.joint != nil {
		return nil // Update declines: a change is a full pass (see Update)
	}
	b.peers = make(map[netip.Prefix]Peer, len(wantPeers))
	for _, p := range wantPeers {
		b.peers[p.Subnet(b.v6)] = p
	}
	return nil
}

// prompt sends one empty UDP datagram into the device towards every peer
// (to the first address of its subnet, the peer's device address, port 9),
// so that the device starts a handshake with each at once. A peer that had
// a session with this node's earlier device (the same key: a device made
// again after a crash of wireguard-go or a repair) would otherwise go on
// sending on that session, which the new device cannot read, until its own
// timeout some 15 s later. The datagrams themselves are dropped by the
// peers; nothing waits for them.
func (b *Backend) prompt(peers map[wgtypes.Key]Peer) {
	c, err := net.ListenUDP("udp", nil)
	if err != nil {
		b.log.Warn("prompting handshakes", "err", err)
		return
	}
	defer c.Close()
	for _, p := range peers {
		if sn := p.Subnet(b.v6); sn.IsValid() {
			_, _ = c.WriteToUDPAddrPort(nil, netip.AddrPortFrom(sn.Addr(), 9))
		}
	}
}

func (b *Backend) settings(link int) settings {
	return settings{v6: b.v6, ownKey: b.key.PublicKey(), ownPort: uint16(b.port), psk: b.psk, keepalive: b.keepalive, link: link}
}

// Update programs the peers and routes of a few changed leases on top of
// the last full pass (see the Backend interface in internal/daemon). It
// declines, writing nothing, when a changed lease cannot be programmed or
// its key is another programmed peer's, and always for the single device
// of both families, whose peers join what both families' passes give.
func (b *Backend) Update(ctx context.Context, own subnet.Lease, changed []subnet.Lease, removed []netip.Prefix) (bool, error) {
	if b.peers == nil || !b.prog.Usable(own.Subnet) {
		return false, nil
	}
	s := b.settings(b.link)
	next := make(map[netip.Prefix]Peer, len(changed)) // zero: the subnet has no peer any more
	for _, sn := range removed {
		next[sn] = Peer{}
	}
	for _, l := range changed {
		if l.Attrs.BackendType != subnet.BackendWireGuard || l.Subnet == own.Subnet {
			next[l.Subnet] = Peer{}
			continue
		}
		p, err := peerOf(own, l, s)
		if err != nil {
			return false, nil
		}
		next[l.Subnet] = p
	}
	// The keys after the update, to tell a removal from a key moving to
	// another subnet, and to refuse a key two subnets would share.
	owner := make(map[wgtypes.Key]netip.Prefix, len(b.peers))
	for sn, p := range b.peers {
		if _, moving := next[sn]; !moving {
			owner[p.Key] = sn
		}
	}
	for sn, p := range next {
		if p == (Peer{}) {
			continue
		}
		if _, dup := owner[p.Key]; dup {
			return false, nil // the full pass reports the clash
		}
		owner[p.Key] = sn
	}
	var changes []wgtypes.PeerConfig
	routes := make(map[netip.Prefix]dataplane.PeerEntries, len(next))
	for sn, p := range next {
		old, had := b.peers[sn]
		if p == (Peer{}) {
			if _, stays := owner[old.Key]; had && !stays {
				changes = append(changes, wgtypes.PeerConfig{PublicKey: old.Key, Remove: true})
			}
			routes[sn] = dataplane.PeerEntries{}
			continue
		}
		if !had || old != p {
			if had && old.Key != p.Key {
				if _, stays := owner[old.Key]; !stays {
					changes = append(changes, wgtypes.PeerConfig{PublicKey: old.Key, Remove: true})
				}
			}
			changes = append(changes, peerConfig(p))
		}
		routes[sn] = dataplane.PeerEntries{Route: routeOf(p, b.v6, b.link)}
	}
	if len(changes) > 0 {
		if err := b.client.ConfigureDevice(b.name, wgtypes.Config{Peers: changes}); err != nil {
			b.peers = nil
			b.prog.Invalidate()
			return true, fmt.Errorf("wireguard backend: update peers of %s: %w", b.name, err)
		}
		b.PeersWritten(len(changes))
	}
	plan, err := b.prog.Update(ctx, b.h, routes)
	b.Applied(plan)
	if err != nil {
		b.peers = nil
		return true, fmt.Errorf("wireguard backend: update: %w", err)
	}
	for sn, p := range next {
		if p == (Peer{}) {
			delete(b.peers, sn)
		} else {
			b.peers[sn] = p
		}
	}
	return true, nil
}

// Cleanup deletes the device (wireguard-go exits with it; the kernel drops
// its routes) and every route twill made of the family.
func (b *Backend) Cleanup(ctx context.Context) error {
	b.peers = nil
	b.prog.Invalidate()
	var errs []error
	link, err := netlinkx.LinkByName(ctx, b.h, b.name)
	switch {
	case err == nil:
		if err := b.h.LinkDel(link); err != nil {
			errs = append(errs, fmt.Errorf("delete %s: %w", b.name, err))
		}
	case !netlinkx.IsNotFound(err):
		errs = append(errs, err)
	}
	actual, err := dataplane.ReadActual(ctx, b.h, b.ext.Family(), 0)
	if err == nil {
		err = dataplane.Apply(ctx, b.h, dataplane.Diff(dataplane.NewState(), actual))
	}
	if err := errors.Join(append(errs, err)...); err != nil {
		return fmt.Errorf("wireguard backend: cleanup: %w", err)
	}
	return nil
}
