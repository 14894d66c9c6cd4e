package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/backend/wireguard"
	"github.com/twillnet/twill/internal/daemon/masq"
	"github.com/twillnet/twill/internal/netlinkx"
	"github.com/twillnet/twill/subnet"
)

// Cleanup removes what twilld made in this network namespace: VXLAN devices
// named twill.* and twill-v6.*, the WireGuard devices twill-wg and
// twill-wg-v6 (a wireguard-go daemon exits with its device), routes of both families with twill's route
// protocol, twill's iptables and ip6tables chains and its nftables table
// (both modes: the node may have switched). It needs neither the datastore
// nor the network config, so it works on a node whose config is gone. The
// lease is left alone.
func Cleanup(ctx context.Context, log *slog.Logger) error {
	h, err := netlink.NewHandle()
	if err != nil {
		return fmt.Errorf("open netlink: %w", err)
	}
	defer h.Close()
	var errs []error
	links, err := netlinkx.LinkList(ctx, h)
	if err != nil {
		return err
	}
	for _, l := range links {
		name := l.Attrs().Name
		_, vx := l.(*netlink.Vxlan)
		if vx && (strings.HasPrefix(name, "twill.") || strings.HasPrefix(name, "twill-v6.")) || name == wireguard.DeviceName(false) || name == wireguard.DeviceName(true) {
			if err := h.LinkDel(l); err != nil {
				errs = append(errs, fmt.Errorf("delete %s: %w", l.Attrs().Name, err))
			} else {
				log.Info("deleted device", "name", l.Attrs().Name)
			}
		}
	}
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := netlinkx.Dump(ctx, "list routes", func() ([]netlink.Route, error) {
			// Table 0 with RT_FILTER_TABLE lists every table.
			return h.RouteListFiltered(family, &netlink.Route{Protocol: dataplane.RouteProtocol, Table: unix.RT_TABLE_UNSPEC},
				netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
		})
		if err != nil {
			return err
		}
		if err := deleteRoutes(h, routes); err != nil {
			errs = append(errs, err)
		}
		log.Info("deleted twill's routes", "family", subnet.FamilyName(family == netlink.FAMILY_V6), "count", len(routes))
	}
	for _, v6 := range []bool{false, true} {
		name := map[bool]string{false: "iptables", true: "ip6tables"}[v6]
		ipt, err := masq.NewIPTables(v6)
		if err != nil {
			log.Info(name+" not available; nothing of it to remove", "err", err)
			continue
		}
		switch removed, err := masq.Cleanup(ctx, ipt); {
		case err != nil:
			errs = append(errs, err)
		case removed:
			log.Info("deleted twill's " + name + " chains")
		}
	}
	switch removed, err := masq.CleanupNFTables(ctx); {
	case err != nil:
		errs = append(errs, err)
	case removed:
		log.Info("deleted twill's nftables table", "table", "inet "+masq.NFTablesTable)
	}
	return errors.Join(errs...)
}

// deleteRoutes deletes routes; one that is gone already (ESRCH: deleted
// meanwhile, or with its device) is no failure.
func deleteRoutes(h *netlink.Handle, routes []netlink.Route) error {
	var errs []error
	for _, r := range routes {
		if err := h.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("delete route %s: %w", r.Dst, err))
		}
	}
	return errors.Join(errs...)
}
