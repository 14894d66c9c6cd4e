package dataplane

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/twillnet/twill/internal/netlinkx"
)

// ReadActual reads the entries twill owns of one family (netlink.FAMILY_V4
// or FAMILY_V6): its routes in the main table (by RouteProtocol) plus, when
// dev is not 0, every unicast neighbour of the family and every FDB entry on
// the device with that index. Other routes in the main table are recorded in
// Foreign.
func ReadActual(ctx context.Context, h *netlink.Handle, family, dev int) (State, error) {
	s := NewState()
	routes, err := netlinkx.RouteList(ctx, h, family, &netlink.Route{}, 0)
	if err != nil {
		return s, err
	}
	for _, r := range routes {
		if r.Table != unix.RT_TABLE_MAIN && r.Table != 0 {
			continue
		}
		dst := prefixOf(r.Dst, family)
		if !dst.IsValid() {
			continue
		}
		rt := Route{Dst: dst, LinkIndex: r.LinkIndex, Metric: r.Priority, Onlink: r.Flags&int(netlink.FLAG_ONLINK) != 0}
		if family == netlink.FAMILY_V6 && rt.Metric == ipv6DefaultMetric {
			// The kernel gives an IPv6 route without a metric this one;
			// to twill they are the same route.
			rt.Metric = 0
		}
		if gw, ok := netip.AddrFromSlice(r.Gw); ok {
			rt.Gw = gw.Unmap()
		}
		if r.Protocol == RouteProtocol {
			s.Routes[rt.Key()] = rt
		} else {
			s.Foreign[rt.Key()] = rt
		}
	}
	if dev == 0 {
		return s, nil
	}
	neighs, err := netlinkx.NeighList(ctx, h, dev, family)
	if err != nil {
		return s, err
	}
	for _, n := range neighs {
		ip, ok := netip.AddrFromSlice(n.IP)
		if !ok || n.LinkIndex != dev || ip.IsMulticast() {
			// The kernel keeps entries of its own for multicast addresses
			// (IPv6: ff02::2, ff02::16, ... on every device); they are
			// not twill's.
			continue
		}
		e := Neigh{LinkIndex: dev, IP: ip.Unmap(), Permanent: n.State&netlink.NUD_PERMANENT != 0}
		e.MAC, _ = MACFrom(n.HardwareAddr) // an incomplete entry has none
		s.Neighs[e.IP] = e
	}
	fdb, err := netlinkx.NeighList(ctx, h, dev, unix.AF_BRIDGE)
	if err != nil {
		return s, err
	}
	for _, n := range fdb {
		if n.LinkIndex != dev || n.Flags&netlink.NTF_SELF == 0 {
			continue
		}
		e := FDB{LinkIndex: dev}
		e.MAC, _ = MACFrom(n.HardwareAddr)
		if ip, ok := netip.AddrFromSlice(n.IP); ok {
			e.Dst = ip.Unmap()
		}
		s.FDB[e.Key()] = e
	}
	return s, nil
}

// ipv6DefaultMetric is the metric the kernel gives an IPv6 route added
// without one (IP6_RT_PRIO_USER).
const ipv6DefaultMetric = 1024

func prefixOf(n *net.IPNet, family int) netip.Prefix {
	if n == nil { // the default route
		if family == netlink.FAMILY_V6 {
			return netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
		return netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones)
}

// Apply makes the changes of p through h. Writes come first (FDB, then
// neighbours, then routes, so a route never points at a MAC the kernel cannot
// reach yet), then removals (routes first, for the same reason).
//
// A failed call does not stop the others. The error joins one *PeerError per
// peer that failed (naming every entry of it that failed), one error per stale
// entry that could not be removed, and one per blocked route.
//
// The calls are made one after another: every route, neighbour and FDB change
// takes the kernel's RTNL lock, so several handles in goroutines measured no
// faster (see Documentation/backends.md). Each request is built just before
// it is sent, so a cold start's 15,000 writes never exist as requests at
// once (that was 6 MB of a 5,000-peer start's peak memory).
func Apply(ctx context.Context, h *netlink.Handle, p Plan) error {
	var failed []opError
	fail := func(peer netip.Prefix, what fmt.Stringer, verb string, err error) {
		failed = append(failed, opError{peer: peer, err: fmt.Errorf("%s %s: %w", verb, what, err)})
	}
	steps := []func() error{
		func() error {
			return each(ctx, p.SetFDB, func(f FDB) {
				if err := h.NeighSet(fdbRequest(f)); err != nil {
					fail(f.Peer, f, "set FDB entry", err)
				}
			})
		},
		func() error {
			return each(ctx, p.SetNeighs, func(n Neigh) {
				if err := h.NeighSet(neighRequest(n)); err != nil {
					fail(n.Peer, n, "set neighbour", err)
				}
			})
		},
		func() error {
			return each(ctx, p.SetRoutes, func(r Route) {
				if err := h.RouteReplace(routeRequest(r, true)); err != nil {
					fail(r.Peer, r, "set route", err)
				}
			})
		},
		func() error {
			return each(ctx, p.NewRoutes, func(r Route) {
				// Fails with EEXIST where the kernel has a route with this key.
				if err := h.RouteAdd(routeRequest(r, true)); err != nil {
					fail(r.Peer, r, "add route", err)
				}
			})
		},
		func() error {
			return each(ctx, p.DelRoutes, func(r Route) {
				if err := ignore(h.RouteDel(routeRequest(r, false)), unix.ESRCH); err != nil {
					fail(netip.Prefix{}, r, "remove stale route", err)
				}
			})
		},
		func() error {
			return each(ctx, p.DelNeighs, func(n Neigh) {
				req := neighRequest(n)
				req.HardwareAddr = nil
				if err := ignore(h.NeighDel(req), unix.ENOENT); err != nil {
					fail(netip.Prefix{}, n, "remove stale neighbour", err)
				}
			})
		},
		func() error {
			return each(ctx, p.DelFDB, func(f FDB) {
				if err := ignore(h.NeighDel(fdbRequest(f)), unix.ENOENT); err != nil {
					fail(netip.Prefix{}, f, "remove stale FDB entry", err)
				}
			})
		},
	}
	for _, step := range steps {
		if err := step(); err != nil {
			return fmt.Errorf("apply: %w", err)
		}
	}
	for _, r := range p.Blocked {
		failed = append(failed, opError{peer: r.Peer, err: fmt.Errorf(
			"route to %s: a route to the same destination with metric %d exists and was not made by twill; remove it and twill will add its own", r.Dst, r.Metric)})
	}
	return joinByPeer(failed)
}

// each calls write for every entry, checking ctx every 256 entries.
func each[E any](ctx context.Context, entries []E, write func(E)) error {
	for i, e := range entries {
		if i%256 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		write(e)
	}
	return nil
}

type opError struct {
	peer netip.Prefix
	err  error
}

// joinByPeer groups failures: "peer 10.244.3.0/24: set route ...: ...; set
// neighbour ...". Failures of stale entries (no peer) stay one per entry.
func joinByPeer(failed []opError) error {
	if len(failed) == 0 {
		return nil
	}
	var errs []error
	byPeer := map[netip.Prefix][]error{}
	var order []netip.Prefix
	for _, f := range failed {
		if !f.peer.IsValid() {
			errs = append(errs, f.err)
			continue
		}
		if _, seen := byPeer[f.peer]; !seen {
			order = append(order, f.peer)
		}
		byPeer[f.peer] = append(byPeer[f.peer], f.err)
	}
	for _, peer := range order {
		errs = append(errs, &PeerError{Peer: peer, Err: errors.Join(byPeer[peer]...)})
	}
	return errors.Join(errs...)
}

// PeerError says that entries for one peer could not be programmed.
type PeerError struct {
	Peer netip.Prefix // the peer's subnet
	Err  error
}

func (e *PeerError) Error() string { return fmt.Sprintf("peer %s: %v", e.Peer, e.Err) }

func (e *PeerError) Unwrap() error { return e.Err }

func routeRequest(r Route, set bool) *netlink.Route {
	nr := &netlink.Route{
		LinkIndex: r.LinkIndex,
		Dst:       ipNet(r.Dst),
		Protocol:  RouteProtocol,
		Table:     unix.RT_TABLE_MAIN,
		Priority:  r.Metric,
	}
	if r.Gw.IsValid() {
		nr.Gw = r.Gw.AsSlice()
	} else {
		nr.Scope = netlink.SCOPE_LINK // straight into a point-to-point device
	}
	if set && r.Onlink {
		nr.Flags = int(netlink.FLAG_ONLINK)
	}
	return nr
}

func neighRequest(n Neigh) *netlink.Neigh {
	return &netlink.Neigh{
		LinkIndex:    n.LinkIndex,
		Family:       familyOf(n.IP),
		State:        netlink.NUD_PERMANENT,
		IP:           n.IP.AsSlice(),
		HardwareAddr: n.MAC.HardwareAddr(),
	}
}

func fdbRequest(f FDB) *netlink.Neigh {
	nf := &netlink.Neigh{
		LinkIndex:    f.LinkIndex,
		Family:       unix.AF_BRIDGE,
		Flags:        netlink.NTF_SELF,
		State:        netlink.NUD_PERMANENT,
		HardwareAddr: f.MAC.HardwareAddr(),
	}
	if f.Dst.IsValid() {
		nf.IP = f.Dst.AsSlice()
	}
	return nf
}

// ignore treats the errno that means "already gone" as success: a removal
// that races with the kernel (the device was deleted) has reached its goal.
func ignore(err error, errno unix.Errno) error {
	if errors.Is(err, errno) {
		return nil
	}
	return err
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// EnsureAddr gives a tunnel device exactly one address of want's family:
// want. The kernel's IPv6 link-local address is left alone. An IPv6 address
// is added without duplicate address detection: nothing else on a tunnel
// device has it, and a tentative address could not be the source of the
// node's own traffic to pods for a second or two.
func EnsureAddr(ctx context.Context, h *netlink.Handle, link netlink.Link, want netip.Prefix) error {
	family := familyOf(want.Addr())
	addrs, err := netlinkx.AddrList(ctx, h, link, family)
	if err != nil {
		return err
	}
	name := link.Attrs().Name
	have := false
	var errs []error
	for _, a := range addrs {
		ip, _ := netip.AddrFromSlice(a.IP)
		ip = ip.Unmap()
		ones, _ := a.Mask.Size()
		if ip.Is6() && ip.IsLinkLocalUnicast() {
			continue
		}
		if netip.PrefixFrom(ip, ones) == want {
			have = true
			continue
		}
		if err := h.AddrDel(link, &a); err != nil {
			errs = append(errs, fmt.Errorf("remove stale address %s from %s: %w", a.IPNet, name, err))
		}
	}
	if !have {
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: want.Addr().AsSlice(), Mask: net.CIDRMask(want.Bits(), want.Addr().BitLen())}}
		if want.Addr().Is6() {
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := h.AddrReplace(link, addr); err != nil {
			errs = append(errs, fmt.Errorf("set address %s on %s: %w", want, name, err))
		}
	}
	return errors.Join(errs...)
}
