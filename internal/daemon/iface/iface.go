// Package iface finds the underlay interface twilld sends peer traffic
// through: named by the operator (by name or by one of its addresses), or the
// interface of the default route.
package iface

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"

	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/internal/netlinkx"
)

// Resolve returns the external interface for spec: an interface name, an IPv4
// address of one, or "" for the interface of the IPv4 default route. Its
// address is the first global IPv4 address, or the one spec names.
func Resolve(ctx context.Context, h *netlink.Handle, spec string) (dataplane.ExternalInterface, error) {
	var ext dataplane.ExternalInterface
	var link netlink.Link
	var want netip.Addr
	var err error
	switch addr, perr := netip.ParseAddr(spec); {
	case spec == "":
		if link, err = defaultRouteLink(ctx, h); err != nil {
			return ext, err
		}
	case perr == nil:
		want = addr
		if link, err = linkWithAddr(ctx, h, addr); err != nil {
			return ext, err
		}
	default:
		if link, err = h.LinkByName(spec); err != nil {
			return ext, fmt.Errorf("interface %q: %w", spec, err)
		}
	}
	attrs := link.Attrs()
	addrs, err := netlinkx.AddrList(ctx, h, link, netlink.FAMILY_V4)
	if err != nil {
		return ext, err
	}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP.To4())
		if !ok || !ip.IsGlobalUnicast() && !ip.IsPrivate() {
			continue
		}
		if want.IsValid() && ip != want {
			continue
		}
		ones, _ := a.Mask.Size()
		ext = dataplane.ExternalInterface{Name: attrs.Name, Index: attrs.Index, Addr: ip, Prefix: netip.PrefixFrom(ip, ones).Masked(), MTU: attrs.MTU}
		return ext, nil
	}
	return ext, fmt.Errorf("interface %s has no usable IPv4 address", attrs.Name)
}

func defaultRouteLink(ctx context.Context, h *netlink.Handle) (netlink.Link, error) {
	routes, err := netlinkx.Dump(ctx, "list routes", func() ([]netlink.Route, error) { return h.RouteList(nil, netlink.FAMILY_V4) })
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
	return nil, errors.New("no IPv4 default route; name the interface with --iface")
}

func isZeroMask(m net.IPMask) bool {
	ones, _ := m.Size()
	return ones == 0
}

func linkWithAddr(ctx context.Context, h *netlink.Handle, want netip.Addr) (netlink.Link, error) {
	addrs, err := netlinkx.Dump(ctx, "list addresses", func() ([]netlink.Addr, error) { return h.AddrList(nil, netlink.FAMILY_V4) })
	if err != nil {
		return nil, err
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok && ip == want {
			return h.LinkByIndex(a.LinkIndex)
		}
	}
	return nil, fmt.Errorf("no interface has the address %s", want)
}
