package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/backend/vxlan"
	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/subnet"
)

// batchLimit is the kernel's limit for a cold start: the same 3n entries
// twilld writes for n peers (FDB, then neighbours, then routes, twilld's
// order) written by iproute2 in batch mode, one netlink request per entry with
// no process start-up between them, into a fresh VXLAN device in a fresh
// namespace with twilld's device settings. In a dual-stack network it is the
// 6n entries: those of twill.1, then the same three kinds on a fresh
// twill-v6.1 over the namespace's IPv6 address (twilld programs the IPv4
// plane, then the IPv6 one).
type batchLimit struct {
	Total, FDB, Neigh, Route time.Duration
	// FDB6, Neigh6, Route6 are the IPv6 entries of a dual-stack limit.
	FDB6, Neigh6, Route6 time.Duration
	// NexthopRoute is a design alternative, not part of the limit: the same
	// (IPv4) routes each pointing at a nexthop object (`ip nexthop`, Linux
	// 5.3+), nexthops and routes together, written into another fresh
	// namespace. Not measured for a dual-stack limit.
	NexthopRoute time.Duration
}

func measureBatchLimit(ctx context.Context, h *Harness, n int, dual bool) (*batchLimit, error) {
	netns := h.cfg.Prefix + "lim"
	dir, err := writeBatchFiles(h, n, dual)
	if err != nil {
		return nil, err
	}
	l := &batchLimit{}
	err = inFreshDevice(ctx, netns, dual, func() error {
		type step struct {
			d          *time.Duration
			prog, file string
		}
		steps := []step{{&l.FDB, "bridge", "fdb"}, {&l.Neigh, "ip", "neigh"}, {&l.Route, "ip", "route"}}
		if dual {
			steps = append(steps, step{&l.FDB6, "bridge", "fdb6"}, step{&l.Neigh6, "ip", "neigh6"}, step{&l.Route6, "ip", "route6"})
		}
		for _, s := range steps {
			if err := timedRun(ctx, s.d, s.prog, "-n", netns, "-batch", filepath.Join(dir, s.file+".batch")); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	l.Total = l.FDB + l.Neigh + l.Route + l.FDB6 + l.Neigh6 + l.Route6
	if dual {
		return l, nil
	}
	err = inFreshDevice(ctx, netns, false, func() error {
		return timedRun(ctx, &l.NexthopRoute, "ip", "-n", netns, "-batch", filepath.Join(dir, "nexthop.batch"))
	})
	if err != nil {
		return nil, fmt.Errorf("routes via nexthop objects: %w", err)
	}
	return l, nil
}

// writeBatchFiles writes the iproute2 batch files for n peers, and for
// their IPv6 entries when dual, and returns their folder.
func writeBatchFiles(h *Harness, n int, dual bool) (string, error) {
	dev, dev6 := vxlan.DeviceName(subnet.DefaultVNI, false), vxlan.DeviceName(subnet.DefaultVNI, true)
	dir := filepath.Join(h.work, "limit")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	var fdb, neigh, route, nh, fdb6, neigh6, route6 strings.Builder
	for i := range n {
		p := peerAt(0, i)
		gw := p.Subnet.Addr()
		fmt.Fprintf(&fdb, "fdb replace %s dev %s dst %s self permanent\n", p.MAC, dev, p.PublicIP)
		fmt.Fprintf(&neigh, "neigh replace %s lladdr %s dev %s nud permanent\n", gw, p.MAC, dev)
		fmt.Fprintf(&route, "route replace %s via %s dev %s onlink proto 116\n", p.Subnet, gw, dev)
		fmt.Fprintf(&nh, "nexthop replace id %d via %s dev %s onlink proto 116\n", i+1, gw, dev)
		if dual {
			gw6 := p.IPv6Subnet.Addr()
			fmt.Fprintf(&fdb6, "fdb replace %s dev %s dst %s self permanent\n", p.MACv6, dev6, p.PublicIPv6)
			fmt.Fprintf(&neigh6, "neigh replace %s lladdr %s dev %s nud permanent\n", gw6, p.MACv6, dev6)
			fmt.Fprintf(&route6, "route replace %s via %s dev %s onlink proto 116\n", p.IPv6Subnet, gw6, dev6)
		}
	}
	for i := range n {
		fmt.Fprintf(&nh, "route replace %s nhid %d proto 116\n", peerAt(0, i).Subnet, i+1)
	}
	files := map[string]string{"fdb": fdb.String(), "neigh": neigh.String(), "route": route.String(), "nexthop": nh.String()}
	if dual {
		files["fdb6"], files["neigh6"], files["route6"] = fdb6.String(), neigh6.String(), route6.String()
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name+".batch"), []byte(body), 0o644); err != nil {
			return "", err
		}
	}
	return dir, nil
}

func timedRun(ctx context.Context, d *time.Duration, prog string, args ...string) error {
	cctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	start := time.Now()
	_, err := run(cctx, prog, args...)
	*d = time.Since(start)
	return err
}

// inFreshDevice makes namespace netns with an underlay and a VXLAN device
// as twilld makes it (and its IPv6 device over an IPv6 address of the
// underlay when dual), runs f, and deletes the namespace.
func inFreshDevice(ctx context.Context, netns string, dual bool, f func() error) error {
	dev, dev6 := vxlan.DeviceName(subnet.DefaultVNI, false), vxlan.DeviceName(subnet.DefaultVNI, true)
	setup := [][]string{
		{"netns", "add", netns},
		{"-n", netns, "link", "set", "lo", "up"},
		{"-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"},
		{"-n", netns, "addr", "add", "198.18.0.1/24", "dev", "eth0"},
		{"-n", netns, "link", "set", "eth0", "up"},
		{"-n", netns, "link", "set", "eth0p", "up"},
		{"-n", netns, "link", "add", dev, "type", "vxlan", "id", "1", "dstport", "8472", "local", "198.18.0.1", "dev", "eth0", "nolearning"},
		{"-n", netns, "link", "set", dev, "mtu", "1450", "up"},
		{"-n", netns, "addr", "add", "10.0.0.0/32", "dev", dev},
	}
	if dual {
		local := lab.Topology{}.HostAddrV6(1).String()
		setup = append(setup, [][]string{
			{"-n", netns, "addr", "add", local + "/64", "dev", "eth0", "nodad"},
			{"-n", netns, "link", "add", dev6, "type", "vxlan", "id", "1", "dstport", "8472", "local", local, "dev", "eth0", "nolearning"},
			{"-n", netns, "link", "set", dev6, "mtu", strconv.Itoa(1500 - vxlan.OverheadIPv6), "up"},
			{"-n", netns, "addr", "add", netip.PrefixFrom(benchNetworkV6.Addr(), 128).String(), "dev", dev6, "nodad"},
		}...)
	}
	// Empty the namespace before deleting it: the kernel tears a deleted
	// namespace down later, in a work queue that holds the RTNL lock, and
	// a teardown of thousands of entries would stall the next twilld's
	// first netlink calls (measured: 70-120 ms at 5,000 peers).
	defer func() {
		bg := context.Background()
		ipCmd(bg, "-n", netns, "link", "del", dev)
		if dual {
			ipCmd(bg, "-n", netns, "link", "del", dev6)
		}
		ipCmd(bg, "-n", netns, "nexthop", "flush")
		ipCmd(bg, "netns", "del", netns)
	}()
	for _, s := range setup {
		if _, err := ipCmd(ctx, s...); err != nil {
			return err
		}
	}
	return f()
}

// changeLimit is the kernel's limit for one peer change with n peers
// present: the three netlink writes of one peer (FDB, neighbour, route, as
// twilld orders them), or the three removals, made from this process over one
// netlink socket in a namespace that already holds n peers' entries.
type changeLimit struct {
	Add, NewIP, Remove []time.Duration
}

func measureChangeLimit(ctx context.Context, h *Harness, n, samples int) (*changeLimit, error) {
	nsName := h.cfg.Prefix + "lim"
	devName := vxlan.DeviceName(subnet.DefaultVNI, false)
	dir, err := writeBatchFiles(h, n, false)
	if err != nil {
		return nil, err
	}
	l := &changeLimit{}
	err = inFreshDevice(ctx, nsName, false, func() error {
		for _, f := range []struct{ prog, file string }{{"bridge", "fdb"}, {"ip", "neigh"}, {"ip", "route"}} {
			var d time.Duration
			if err := timedRun(ctx, &d, f.prog, "-n", nsName, "-batch", filepath.Join(dir, f.file+".batch")); err != nil {
				return err
			}
		}
		handle, err := netns.GetFromName(nsName)
		if err != nil {
			return err
		}
		defer handle.Close()
		nl, err := netlink.NewHandleAt(handle)
		if err != nil {
			return err
		}
		defer nl.Close()
		link, err := nl.LinkByName(devName)
		if err != nil {
			return err
		}
		dev := link.Attrs().Index
		for i := range samples {
			p := peerAt(1, i)
			fdb := &netlink.Neigh{LinkIndex: dev, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, State: netlink.NUD_PERMANENT,
				HardwareAddr: p.MAC.HardwareAddr(), IP: p.PublicIP.AsSlice()}
			neigh := &netlink.Neigh{LinkIndex: dev, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
				IP: p.Subnet.Addr().AsSlice(), HardwareAddr: p.MAC.HardwareAddr()}
			route := &netlink.Route{LinkIndex: dev, Dst: &net.IPNet{IP: p.Subnet.Addr().AsSlice(), Mask: net.CIDRMask(p.Subnet.Bits(), 32)},
				Gw: p.Subnet.Addr().AsSlice(), Flags: int(netlink.FLAG_ONLINK), Protocol: dataplane.RouteProtocol, Table: unix.RT_TABLE_MAIN}
			start := time.Now()
			if err := errors.Join(nl.NeighSet(fdb), nl.NeighSet(neigh), nl.RouteReplace(route)); err != nil {
				return fmt.Errorf("write one peer: %w", err)
			}
			l.Add = append(l.Add, time.Since(start))
			moved := *fdb
			moved.IP = netip.AddrFrom4([4]byte{198, 21, byte((i + 1) >> 8), byte(i + 1)}).AsSlice()
			start = time.Now()
			if err := nl.NeighSet(&moved); err != nil {
				return fmt.Errorf("move one peer: %w", err)
			}
			l.NewIP = append(l.NewIP, time.Since(start))
			fdb = &moved
			start = time.Now()
			if err := errors.Join(nl.RouteDel(route), nl.NeighDel(neigh), nl.NeighDel(fdb)); err != nil {
				return fmt.Errorf("remove one peer: %w", err)
			}
			l.Remove = append(l.Remove, time.Since(start))
		}
		return nil
	})
	return l, err
}
