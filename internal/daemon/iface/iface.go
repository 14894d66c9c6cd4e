// Package iface finds the underlay interface twilld sends peer traffic
// through: chosen by the operator (names or addresses, regular expressions,
// or an address to reach, as flannel's --iface, --iface-regex and
// --iface-can-reach), or the interface of the default route; and the node's
// address on it of each IP family the network uses.
package iface

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strings"

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

// Selector says how to choose the external interface, with flannel's flags
// and precedence: each of Names in order (an interface name, or an address
// of one), then each of Regexes in order (the first interface with an
// address it matches, else the first whose name it matches), then the
// interface of the route to CanReach; the first candidate with a usable
// address of every family asked for wins. With none of them set: the
// interface of the default route.
type Selector struct {
	Names    []string         // --iface, repeatable
	Regexes  []*regexp.Regexp // --iface-regex, repeatable
	CanReach netip.Addr       // --iface-can-reach
}

// Empty reports whether the selector names nothing: the default route then.
func (s Selector) Empty() bool {
	return len(s.Names) == 0 && len(s.Regexes) == 0 && !s.CanReach.IsValid()
}

// Resolve returns the external interface sel chooses. For each family asked
// for it takes the first global address of that family (the one a name
// such as --iface 10.0.0.5 gives, for its family); link-local, tentative
// and deprecated IPv6 addresses are passed over. When no candidate has a
// usable address of every family asked for, the error lists each one tried
// and why it was not taken.
func Resolve(ctx context.Context, h *netlink.Handle, sel Selector, v4, v6 bool) (Interface, error) {
	if sel.Empty() {
		link, err := defaultRouteLink(ctx, h, v6 && !v4)
		if err != nil {
			return Interface{}, err
		}
		return addresses(ctx, h, link, netip.Addr{}, v4, v6)
	}
	var tried []string
	fail := func(what string, err error) { tried = append(tried, fmt.Sprintf("%s: %v", what, err)) }
	for _, name := range sel.Names {
		link, want, err := byNameOrAddr(ctx, h, name)
		if err == nil {
			var out Interface
			if out, err = addresses(ctx, h, link, want, v4, v6); err == nil {
				return out, nil
			}
		}
		fail("--iface "+name, err)
	}
	if len(sel.Regexes) > 0 {
		links, err := netlinkx.Dump(ctx, "list interfaces", h.LinkList)
		if err != nil {
			return Interface{}, err
		}
		for _, re := range sel.Regexes {
			out, err := byRegex(ctx, h, links, re, v4, v6)
			if err == nil {
				return out, nil
			}
			fail("--iface-regex "+re.String(), err)
		}
	}
	if sel.CanReach.IsValid() {
		link, src, err := routeTo(h, sel.CanReach)
		if err == nil {
			var out Interface
			if out, err = addresses(ctx, h, link, src, v4, v6); err == nil {
				return out, nil
			}
		}
		fail("--iface-can-reach "+sel.CanReach.String(), err)
	}
	return Interface{}, fmt.Errorf("no interface to use for peer traffic; tried %s", strings.Join(tried, "; "))
}

// byNameOrAddr finds the interface an --iface value names: an address of
// it (then also the address to use for its family), or its name.
func byNameOrAddr(ctx context.Context, h *netlink.Handle, spec string) (netlink.Link, netip.Addr, error) {
	if addr, err := netip.ParseAddr(spec); err == nil {
		addr = addr.Unmap()
		link, err := linkWithAddr(ctx, h, addr)
		return link, addr, err
	}
	link, err := h.LinkByName(spec)
	if err != nil {
		return nil, netip.Addr{}, fmt.Errorf("no interface %q", spec)
	}
	return link, netip.Addr{}, nil
}

// byRegex returns the first interface, in the kernel's order, one of whose
// addresses re matches, else the first whose name it matches, among those
// with a usable address of every family asked for.
func byRegex(ctx context.Context, h *netlink.Handle, links []netlink.Link, re *regexp.Regexp, v4, v6 bool) (Interface, error) {
	var reasons []string
	for _, byName := range []bool{false, true} {
		for _, link := range links {
			name := link.Attrs().Name
			var want netip.Addr
			if byName {
				if !re.MatchString(name) {
					continue
				}
			} else {
				addrs, err := netlinkx.AddrList(ctx, h, link, netlink.FAMILY_ALL)
				if err != nil {
					return Interface{}, err
				}
				for _, a := range addrs {
					if ip, ok := netip.AddrFromSlice(a.IP); ok && re.MatchString(ip.Unmap().String()) {
						want = ip.Unmap()
						break
					}
				}
				if !want.IsValid() {
					continue
				}
			}
			out, err := addresses(ctx, h, link, want, v4, v6)
			if err == nil {
				return out, nil
			}
			reasons = append(reasons, err.Error())
		}
	}
	if len(reasons) == 0 {
		names := make([]string, 0, len(links))
		for _, l := range links {
			names = append(names, l.Attrs().Name)
		}
		return Interface{}, fmt.Errorf("matches no interface's address or name (interfaces: %s)", strings.Join(names, ", "))
	}
	return Interface{}, errors.New(strings.Join(reasons, "; "))
}

// routeTo returns the interface the kernel would send a packet to dst
// through (ip route get), and the source address it would give it.
func routeTo(h *netlink.Handle, dst netip.Addr) (netlink.Link, netip.Addr, error) {
	routes, err := h.RouteGet(dst.AsSlice())
	if err != nil {
		return nil, netip.Addr{}, fmt.Errorf("no route: %w", err)
	}
	if len(routes) == 0 || routes[0].LinkIndex <= 0 {
		return nil, netip.Addr{}, errors.New("no route through an interface")
	}
	link, err := h.LinkByIndex(routes[0].LinkIndex)
	if err != nil {
		return nil, netip.Addr{}, err
	}
	src, _ := netip.AddrFromSlice(routes[0].Src)
	return link, src.Unmap(), nil
}

// addresses returns link seen by each family asked for, through want for
// want's family when it is valid.
func addresses(ctx context.Context, h *netlink.Handle, link netlink.Link, want netip.Addr, v4, v6 bool) (Interface, error) {
	var out Interface
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
		var err error
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
