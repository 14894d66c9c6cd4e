// Package hostgw is the host-gw backend: no encapsulation, each node routes
// the other nodes' pod subnets via their public IPs.
//
// It needs every node on one L2 network (the external interface's on-link
// network): the next hop of a route must be directly reachable. A peer
// outside that network cannot be served and is reported by name; the other
// peers are still programmed. Use the vxlan backend with DirectRouting to get
// plain routes where possible and a tunnel elsewhere.
package hostgw

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"

	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/subnet"
)

// ErrUnreachable marks a peer whose public IP is not on the external
// interface's network.
var ErrUnreachable = errors.New("not directly reachable")

// Desired computes one route per host-gw peer: the peer's subnet via its
// public IP on the external interface. Peers of another backend type and the
// own subnet are skipped; a peer that cannot be served gets a
// *dataplane.PeerError in the joined error.
func Desired(own subnet.Lease, peers []subnet.Lease, ext dataplane.ExternalInterface) (dataplane.State, error) {
	s := dataplane.NewStateFor(len(peers))
	sorted := slices.Clone(peers)
	slices.SortFunc(sorted, func(a, b subnet.Lease) int { return subnet.ComparePrefix(a.Subnet, b.Subnet) })
	var errs []error
	for _, peer := range sorted {
		if peer.Attrs.BackendType != subnet.BackendHostGW || peer.Subnet == own.Subnet {
			continue
		}
		r, err := route(own, peer, ext)
		if err == nil && s.Routes[r.Key()].Dst.IsValid() {
			err = errors.New("another lease for the same subnet was seen first")
		}
		if err != nil {
			errs = append(errs, &dataplane.PeerError{Peer: peer.Subnet, Err: err})
			continue
		}
		s.Routes[r.Key()] = r
	}
	return s, errors.Join(errs...)
}

// route is one peer's route, checked as far as the peer alone allows.
func route(own, peer subnet.Lease, ext dataplane.ExternalInterface) (dataplane.Route, error) {
	sn, ip, v6 := peer.Subnet, peer.Attrs.PublicIP, ext.IPv6()
	switch {
	case !sn.IsValid() || sn.Addr().Is6() != v6 || sn.Masked() != sn:
		return dataplane.Route{}, fmt.Errorf("subnet %v is not an %s network address", sn, subnet.FamilyName(v6))
	case own.Subnet.IsValid() && own.Subnet.Overlaps(sn):
		return dataplane.Route{}, fmt.Errorf("subnet overlaps this node's subnet %s", own.Subnet)
	case !ip.IsValid() || ip.Is6() != v6:
		return dataplane.Route{}, fmt.Errorf("public IP %v is not %s", ip, subnet.FamilyName(v6))
	case ip == ext.Addr:
		return dataplane.Route{}, fmt.Errorf("public IP %s is this node's own address", ip)
	case !ext.Prefix.Contains(ip):
		return dataplane.Route{}, fmt.Errorf("public IP %s is %w from %s: host-gw needs every node on one L2 network, and %s is outside %s (the network of %s); use the vxlan backend (DirectRouting routes directly where it can)",
			ip, ErrUnreachable, ext.Name, ip, ext.Prefix, ext.Name)
	}
	return dataplane.Route{Dst: sn, Gw: ip, LinkIndex: ext.Index, Peer: sn}, nil
}

// Backend programs host-gw routes.
type Backend struct {
	mtu int
	ext dataplane.ExternalInterface
	h   *netlink.Handle
	log *slog.Logger

	dataplane.Tally // what was written to the kernel

	prog dataplane.Programmed // for Update: what the last full pass left, kept current
}

// New checks the configuration. h is a netlink handle in the namespace to
// program.
func New(cfg subnet.BackendConfig, ext dataplane.ExternalInterface, h *netlink.Handle, log *slog.Logger) (*Backend, error) {
	if err := ext.Validate(); err != nil {
		return nil, fmt.Errorf("host-gw backend: %w", err)
	}
	if h == nil {
		return nil, errors.New("host-gw backend: no netlink handle")
	}
	b := &Backend{mtu: cfg.MTU, ext: ext, h: h, log: log}
	if b.mtu == 0 {
		b.mtu = ext.MTU
	}
	if b.log == nil {
		b.log = slog.New(slog.DiscardHandler)
	}
	b.log = b.log.With("backend", subnet.BackendHostGW, "family", subnet.FamilyName(ext.IPv6()))
	return b, nil
}

// Prepare has no device to make; pods use the external interface's MTU (or
// the configured one).
func (b *Backend) Prepare(ctx context.Context) (json.RawMessage, int, error) {
	return nil, b.mtu, ctx.Err()
}

// Reconcile makes twill's routes equal one route per peer.
func (b *Backend) Reconcile(ctx context.Context, own subnet.Lease, peers []subnet.Lease) error {
	desired, peerErr := Desired(own, peers, b.ext)
	actual, err := dataplane.ReadActual(ctx, b.h, b.ext.Family(), 0)
	if err != nil {
		return fmt.Errorf("host-gw backend: read kernel state: %w", err)
	}
	plan := dataplane.Diff(desired, actual)
	if plan.Len() > 0 {
		b.log.Info("reconciling", "peers", len(peers), "routes", len(desired.Routes), "set", len(plan.SetRoutes), "remove", len(plan.DelRoutes))
	}
	applyErr := dataplane.Apply(ctx, b.h, plan)
	b.Applied(plan)
	if err := errors.Join(peerErr, applyErr); err != nil {
		b.prog.Invalidate()
		return fmt.Errorf("host-gw backend: reconcile: %w", err)
	}
	b.prog.Reset(own.Subnet, desired, actual.Foreign)
	return nil
}

// Update programs the routes of a few changed peers on top of the last full
// pass (see the Backend interface in internal/daemon). It declines, writing
// nothing, when a changed peer cannot be programmed.
func (b *Backend) Update(ctx context.Context, own subnet.Lease, changed []subnet.Lease, removed []netip.Prefix) (bool, error) {
	if !b.prog.Usable(own.Subnet) {
		return false, nil
	}
	next := make(map[netip.Prefix]dataplane.PeerEntries, len(changed)+len(removed))
	for _, sn := range removed {
		next[sn] = dataplane.PeerEntries{}
	}
	for _, peer := range changed {
		if peer.Attrs.BackendType != subnet.BackendHostGW || peer.Subnet == own.Subnet {
			next[peer.Subnet] = dataplane.PeerEntries{}
			continue
		}
		r, err := route(own, peer, b.ext)
		if err != nil {
			return false, nil
		}
		next[peer.Subnet] = dataplane.PeerEntries{Route: r}
	}
	plan, err := b.prog.Update(ctx, b.h, next)
	b.Applied(plan)
	if err != nil {
		return true, fmt.Errorf("host-gw backend: update: %w", err)
	}
	return true, nil
}

// Cleanup removes every route twill made.
func (b *Backend) Cleanup(ctx context.Context) error {
	b.prog.Invalidate()
	actual, err := dataplane.ReadActual(ctx, b.h, b.ext.Family(), 0)
	if err == nil {
		err = dataplane.Apply(ctx, b.h, dataplane.Diff(dataplane.NewState(), actual))
	}
	if err != nil {
		return fmt.Errorf("host-gw backend: cleanup: %w", err)
	}
	return nil
}
