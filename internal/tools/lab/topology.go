// Package lab builds twill's lab: simulated hosts in network namespaces on one
// machine, joined by an underlay bridge, with no link into the machine's own
// namespace, so no lab traffic can leave it.
//
//	underlay netns <prefix>u: bridge "underlay" 198.18.0.254/24, fd00:198:18::fe/64  (the "world")
//	     |   veth "h1" ... "hN" in the underlay, "eth0" in each host
//	host netns <prefix>h1 .. <prefix>hN: eth0 198.18.0.1 .. N /24 and
//	     fd00:198:18::1 .. ::N /64, default routes via the world's addresses
//
// IPv4 addresses come from 198.18.0.0/15, the range set aside for
// benchmarking networks; IPv6 addresses from a unique local range named
// after it. Every underlay has both families, whatever the pod network
// uses. The e2e tests use the same topology with their own name prefix.
package lab

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"strings"
	"time"
)

// Underlay is the network the lab's hosts share.
var Underlay = netip.MustParsePrefix("198.18.0.0/24")

// WorldAddr is the underlay namespace's own address: a router and an
// "outside" destination for masquerade tests.
var WorldAddr = netip.MustParseAddr("198.18.0.254")

// UnderlayV6 and WorldAddrV6 are the same for IPv6.
var (
	UnderlayV6  = netip.MustParsePrefix("fd00:198:18::/64")
	WorldAddrV6 = netip.MustParseAddr("fd00:198:18::fe")
)

// Topology names the namespaces of one lab.
type Topology struct {
	Prefix string // namespace name prefix, e.g. "twill-"
	Hosts  int
}

// UnderlayNS is the underlay namespace's name.
func (t Topology) UnderlayNS() string { return t.Prefix + "u" }

// HostNumbers are the hosts' numbers, 1 to Hosts.
func (t Topology) HostNumbers() []int {
	out := make([]int, t.Hosts)
	for i := range out {
		out[i] = i + 1
	}
	return out
}

// HostNS is host i's namespace name (i from 1).
func (t Topology) HostNS(i int) string { return fmt.Sprintf("%sh%d", t.Prefix, i) }

// HostAddr is host i's underlay address.
func (t Topology) HostAddr(i int) netip.Addr {
	a := Underlay.Addr().As4()
	a[3] = byte(i)
	return netip.AddrFrom4(a)
}

// HostAddrV6 is host i's IPv6 underlay address.
func (t Topology) HostAddrV6(i int) netip.Addr {
	a := UnderlayV6.Addr().As16()
	a[15] = byte(i)
	return netip.AddrFrom16(a)
}

// Up creates the namespaces and links. It fails if any already exist.
func (t Topology) Up(ctx context.Context) error {
	if t.Hosts < 1 || t.Hosts > 250 {
		return fmt.Errorf("lab: %d hosts: want 1 to 250", t.Hosts)
	}
	u := t.UnderlayNS()
	steps := [][]string{
		{"netns", "add", u},
		{"-n", u, "link", "set", "lo", "up"},
		{"-n", u, "link", "add", "underlay", "type", "bridge"},
		{"-n", u, "addr", "add", netip.PrefixFrom(WorldAddr, Underlay.Bits()).String(), "dev", "underlay"},
		// No duplicate address detection: the lab's addresses are unique
		// by construction and usable at once.
		{"-n", u, "addr", "add", netip.PrefixFrom(WorldAddrV6, UnderlayV6.Bits()).String(), "dev", "underlay", "nodad"},
		{"-n", u, "link", "set", "underlay", "up"},
	}
	for i := 1; i <= t.Hosts; i++ {
		steps = append(steps, t.hostSteps(i)...)
	}
	return runIP(ctx, steps)
}

// UpHost creates host i's namespace and its link to the underlay again, as
// they are after Up: a host that rebooted. The underlay must exist and the
// host's namespace must not.
func (t Topology) UpHost(ctx context.Context, i int) error {
	if i < 1 || i > t.Hosts {
		return fmt.Errorf("lab: no host h%d", i)
	}
	// The kernel dismantles a deleted namespace in the background; until it
	// has, the underlay end of the old link is still there.
	link := fmt.Sprintf("h%d", i)
	for {
		if _, err := IP(ctx, "-n", t.UnderlayNS(), "link", "show", link); err != nil {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the old link %s of h%d is still in the underlay: %w", link, i, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	return runIP(ctx, t.hostSteps(i))
}

func (t Topology) hostSteps(i int) [][]string {
	h, u := t.HostNS(i), t.UnderlayNS()
	return [][]string{
		{"netns", "add", h},
		{"-n", h, "link", "set", "lo", "up"},
		// Both ends are created in their namespaces: nothing touches ours.
		{"link", "add", "name", fmt.Sprintf("h%d", i), "netns", u, "type", "veth", "peer", "name", "eth0", "netns", h},
		{"-n", u, "link", "set", fmt.Sprintf("h%d", i), "master", "underlay", "up"},
		{"-n", h, "addr", "add", netip.PrefixFrom(t.HostAddr(i), Underlay.Bits()).String(), "dev", "eth0"},
		{"-n", h, "addr", "add", netip.PrefixFrom(t.HostAddrV6(i), UnderlayV6.Bits()).String(), "dev", "eth0", "nodad"},
		{"-n", h, "link", "set", "eth0", "up"},
		{"-n", h, "route", "add", "default", "via", WorldAddr.String()},
		{"-n", h, "-6", "route", "add", "default", "via", WorldAddrV6.String()},
	}
}

func runIP(ctx context.Context, steps [][]string) error {
	for _, s := range steps {
		if _, err := IP(ctx, s...); err != nil {
			return err
		}
	}
	return nil
}

// Down deletes every namespace of the topology that exists; deleting a
// namespace deletes its links. It returns the first error but tries all.
func (t Topology) Down(ctx context.Context) error {
	existing, err := ListNS(ctx)
	if err != nil {
		return err
	}
	var first error
	for _, name := range existing {
		if t.owns(name) {
			if _, err := IP(ctx, "netns", "del", name); err != nil && first == nil {
				first = err
			}
		}
	}
	return first
}

// owns reports whether a namespace name belongs to this topology.
func (t Topology) owns(name string) bool {
	rest, ok := strings.CutPrefix(name, t.Prefix)
	if !ok {
		return false
	}
	if rest == "u" {
		return true
	}
	if n, ok := strings.CutPrefix(rest, "h"); ok && n != "" && strings.Trim(n, "0123456789") == "" {
		return true
	}
	return false
}

// Exists reports whether any namespace of the topology exists.
func (t Topology) Exists(ctx context.Context) (bool, error) {
	names, err := ListNS(ctx)
	if err != nil {
		return false, err
	}
	for _, n := range names {
		if t.owns(n) {
			return true, nil
		}
	}
	return false, nil
}

// ListNS lists the named network namespaces.
func ListNS(ctx context.Context) ([]string, error) {
	out, err := IP(ctx, "netns", "list")
	if err != nil {
		return nil, err
	}
	var names []string
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			names = append(names, f[0])
		}
	}
	return names, nil
}

// IP runs iproute2's ip and returns its output; the error carries stderr.
func IP(ctx context.Context, args ...string) (string, error) {
	return run(ctx, "ip", args...)
}

// InNS runs a command inside a named namespace.
func InNS(ctx context.Context, ns string, name string, args ...string) (string, error) {
	return run(ctx, "ip", append([]string{"netns", "exec", ns, name}, args...)...)
}

func run(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}
