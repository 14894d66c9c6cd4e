// Package iface finds the underlay interface twilld sends peer traffic
// through: named by the operator (by name or by one of its addresses), or the
// interface of the default route; and the node's address on it of each IP
// family the network uses.
package iface

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/internal/netlinkx"
	"github.com/twillnet/twill/subnet"
)

// Interface is the external interface as each family sees it: V4 carries
// its IPv4 address, V6 its IPv6 address. A family not asked for is zero.
type Interface struct {
	V4, V6 dataplane.ExternalInterface
}

// Get returns the view of the family v6 says.
func (i Interface) Get(v6 bool) dataplane.ExternalInterface {
	if v6 {
		return i.V6
	}
	return i.V4
}

// Resolve returns the external interface for spec: an interface name, an
// address of one (IPv4 or IPv6), or "" for the interface of the default
// route (IPv4's when v4 is asked for, else IPv6's). For each family asked
// for it takes the first global address of that family (the one spec
// names, for its family); link-local, tentative and deprecated IPv6
// addresses are passed over. An interface without an address of a family
// asked for is an error that says so.
func Resolve(ctx context.Context, h *netlink.Handle, spec string, v4, v6 bool) (Interface, error) {
	var out Interface
	var link netlink.Link
	var want netip.Addr
	var err error
	switch addr, perr := netip.ParseAddr(spec); {
	case spec == "":
		if link, err = defaultRouteLink(ctx, h, v6 && !v4); err != nil {
			return out, err
		}
	case perr == nil:
		want = addr.Unmap()
		if link, err = linkWithAddr(ctx, h, want); err != nil {
			return out, err
		}
	default:
		if link, err = h.LinkByName(spec); err != nil {
			return out, fmt.Errorf("interface %q: %w", spec, err)
		}
	}
	for _, fam := range []struct {
		asked, v6 bool
		to        *dataplane.ExternalInterface
	}{{v4, false, &out.V4}, {v6, true, &out.V6}} {
		if !fam.asked {
			continue
		}
		named := netip.Addr{}
		if want.IsValid() && want.Is6() == fam.v6 {
			named = want
		}
		if *fam.to, err = address(ctx, h, link, fam.v6, named); err != nil {
			return out, err
		}
	}
	return out, nil
}

// address returns link seen through its first usable address of one family,
// or through want when it is valid.
func address(ctx context.Context, h *netlink.Handle, link netlink.Link, v6 bool, want netip.Addr) (dataplane.ExternalInterface, error) {
	attrs := link.Attrs()
	family := netlink.FAMILY_V4
	if v6 {
		family = netlink.FAMILY_V6
	}
	addrs, err := netlinkx.AddrList(ctx, h, link, family)
	if err != nil {
		return dataplane.ExternalInterface{}, err
	}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		ip = ip.Unmap()
		if !ok || ip.Is6() != v6 || !ip.IsGlobalUnicast() && !ip.IsPrivate() {
			continue
		}
		if v6 && a.Flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DADFAILED|unix.IFA_F_DEPRECATED|unix.IFA_F_TEMPORARY) != 0 && ip != want {
			continue
		}
		if want.IsValid() && ip != want {
			continue
		}
		ones, _ := a.Mask.Size()
		return dataplane.ExternalInterface{Name: attrs.Name, Index: attrs.Index, Addr: ip, Prefix: netip.PrefixFrom(ip, ones).Masked(), MTU: attrs.MTU}, nil
	}
	if v6 {
		return dataplane.ExternalInterface{}, fmt.Errorf("interface %s has no usable IPv6 address (global scope, not tentative or deprecated), which the network config's EnableIPv6 needs: add one, or choose another interface with --iface", attrs.Name)
	}
	return dataplane.ExternalInterface{}, fmt.Errorf("interface %s has no usable IPv4 address", attrs.Name)
}

func defaultRouteLink(ctx context.Context, h *netlink.Handle, v6 bool) (netlink.Link, error) {
	family := netlink.FAMILY_V4
	if v6 {
		family = netlink.FAMILY_V6
	}
	routes, err := netlinkx.Dump(ctx, "list routes", func() ([]netlink.Route, error) { return h.RouteList(nil, family) })
	if err != nil {
		return nil, err
	}
	for _, r := range routes {
		if (r.Dst == nil || r.Dst.IP.IsUnspecified() && isZeroMask(r.Dst.Mask)) && r.LinkIndex > 0 {
			link, err := h.LinkByIndex(r.LinkIndex)
			if err != nil {
				return nil, fmt.Errorf("interface of the default route: %w", err)
			}
			return link, nil
		}
	}
	return nil, fmt.Errorf("no %s default route; name the interface with --iface", subnet.FamilyName(v6))
}

func isZeroMask(m net.IPMask) bool {
	ones, _ := m.Size()
	return ones == 0
}

func linkWithAddr(ctx context.Context, h *netlink.Handle, want netip.Addr) (netlink.Link, error) {
	addrs, err := netlinkx.Dump(ctx, "list addresses", func() ([]netlink.Addr, error) { return h.AddrList(nil, netlink.FAMILY_ALL) })
	if err != nil {
		return nil, err
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() == want {
			return h.LinkByIndex(a.LinkIndex)
		}
	}
	return nil, errors.New("no interface has the address " + want.String())
}
