package lab

import (
	"context"
	"fmt"
	"io"
	"strings"
	"syscall"
	"text/tabwriter"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/backend/wireguard"
	"github.com/twillnet/twill/internal/netlinkx"
)

// HostCounts is what twill programmed on one host, both families together.
type HostCounts struct {
	Routes, FDB, Neigh int
	// Peers counts the peers of the WireGuard devices.
	Peers  int
	Device string // the VXLAN or WireGuard devices, if any, comma-separated
}

// Counts reads host i's twill routes of both families (by twill's route
// protocol), the FDB and permanent neighbour entries on its VXLAN devices
// (twill's, or flanneld's), and the peers of its WireGuard devices (twill-wg
// and twill-wg-v6, read with WG).
func (l *Lab) Counts(ctx context.Context, i int) (HostCounts, error) {
	var c HostCounts
	handle, err := netns.GetFromName(l.Topology().HostNS(i))
	if err != nil {
		return c, fmt.Errorf("open namespace of h%d: %w", i, err)
	}
	defer handle.Close()
	h, err := netlink.NewHandleAt(handle)
	if err != nil {
		return c, err
	}
	defer h.Close()
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := netlinkx.Dump(ctx, "list routes", func() ([]netlink.Route, error) {
			return h.RouteListFiltered(family, &netlink.Route{Protocol: dataplane.RouteProtocol, Table: 254}, netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
		})
		if err != nil {
			return c, err
		}
		c.Routes += len(routes)
	}
	links, err := netlinkx.LinkList(ctx, h)
	if err != nil {
		return c, err
	}
	for _, link := range links {
		name := link.Attrs().Name
		if name == wireguard.DeviceName(false) || name == wireguard.DeviceName(true) {
			// A kernel device, or wireguard-go's tun device: one that wg
			// cannot read (its wireguard-go gone) is marked, not counted.
			if c.Device != "" {
				c.Device += ","
			}
			c.Device += name
			n, err := l.wgPeers(ctx, i, name)
			if err != nil {
				c.Device += "(unreadable)"
			}
			c.Peers += n
			continue
		}
		// twill's devices, and flanneld's (a flannel node of the lab, or one
		// twilld adopted).
		v4 := strings.HasPrefix(name, "twill.") || strings.HasPrefix(name, "flannel.")
		v6 := strings.HasPrefix(name, "twill-v6.") || strings.HasPrefix(name, "flannel-v6.")
		if _, ok := link.(*netlink.Vxlan); !ok || !v4 && !v6 {
			continue
		}
		family := netlink.FAMILY_V4
		if v6 {
			family = netlink.FAMILY_V6
		}
		if c.Device != "" {
			c.Device += ","
		}
		c.Device += link.Attrs().Name
		idx := link.Attrs().Index
		fdb, err := netlinkx.Dump(ctx, "list fdb", func() ([]netlink.Neigh, error) { return h.NeighList(idx, syscall.AF_BRIDGE) })
		if err != nil {
			return c, err
		}
		for _, n := range fdb {
			if n.IP != nil && !n.IP.IsUnspecified() {
				c.FDB++
			}
		}
		neigh, err := netlinkx.Dump(ctx, "list neighbours", func() ([]netlink.Neigh, error) { return h.NeighList(idx, family) })
		if err != nil {
			return c, err
		}
		for _, n := range neigh {
			if n.State&netlink.NUD_PERMANENT != 0 {
				c.Neigh++
			}
		}
	}
	return c, nil
}

// Status prints the leases and each host's datapath entry counts.
func (l *Lab) Status(ctx context.Context, w io.Writer) error {
	if l.Datastore == "kube" {
		if err := l.kubeStatus(ctx, w); err != nil {
			return err
		}
	} else {
		out, err := l.Ctl(ctx, "leases", "list")
		if err != nil {
			return err
		}
		fmt.Fprintf(w, "leases (etcd %s):\n%s\n", EtcdURL(), out)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	if l.isWireGuard() {
		fmt.Fprintln(tw, "HOST\tNAMESPACE\tUNDERLAY\tDEVICE\tROUTES\tWG PEERS\tPODS")
	} else {
		fmt.Fprintln(tw, "HOST\tNAMESPACE\tUNDERLAY\tDEVICE\tROUTES\tFDB\tNEIGHBOURS\tPODS")
	}
	for i := 1; i <= l.Hosts; i++ {
		c, err := l.Counts(ctx, i)
		if err != nil {
			return err
		}
		pods := 0
		for _, p := range l.Pods {
			if p.Host == i {
				pods++
			}
		}
		dev := c.Device
		if dev == "" {
			dev = "-"
		}
		if l.isWireGuard() {
			fmt.Fprintf(tw, "h%d\t%s\t%s\t%s\t%d\t%d\t%d\n", i, l.Topology().HostNS(i), l.Topology().HostAddr(i), dev, c.Routes, c.Peers, pods)
			continue
		}
		fmt.Fprintf(tw, "h%d\t%s\t%s\t%s\t%d\t%d\t%d\t%d\n", i, l.Topology().HostNS(i), l.Topology().HostAddr(i), dev, c.Routes, c.FDB, c.Neigh, pods)
	}
	return tw.Flush()
}
