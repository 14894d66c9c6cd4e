// Package dataplane is what twill's backends share: the underlay interface,
// the kernel entries a backend wants (its desired state), the entries twill
// owns as read from the kernel (the actual state), the pure difference
// between the two, and applying that difference.
//
// # What twill owns
//
// twill never touches an entry it did not create, and it recognises its own
// entries without keeping any record of them:
//
//   - routes: every route twill installs carries the route protocol number
//     RouteProtocol (rtm_protocol, `proto 116` in `ip route`). A route in the
//     main table with that number is twill's, whatever its device; any other
//     route is someone else's and is only read to avoid overwriting it.
//   - neighbour and FDB entries: only those on twill's own VXLAN device.
//
// # Reconcile, do not replay
//
// A backend computes a State from the leases (a pure function, tested without
// a kernel), ReadActual reads what the kernel holds, Diff compares the two and
// Apply makes only the changes. Running it again right away finds nothing to
// do, so it is safe to run at start-up, after lease changes and on a timer:
// entries of peers that vanished while twilld was down are removed and
// entries deleted by hand come back.
package dataplane

import (
	"cmp"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"

	"github.com/vishvananda/netlink"
)

// RouteProtocol is the rtm_protocol value that marks twill's routes. The
// kernel's rtnetlink.h and iproute2's /etc/iproute2/rt_protos name 0-4 for the
// kernel itself and 8-18, 42, 99 and 186-192 for routing daemons (gated,
// zebra, bird, dhcp, keepalived, babel, openr, bgp, isis, ospf, rip, eigrp);
// FRR adds 190-198. 116 (ASCII "t") is named by none of them. Add the line
// "116 twill" to /etc/iproute2/rt_protos.d/twill.conf to see it by name.
const RouteProtocol netlink.RouteProtocol = 116

// ExternalInterface is the underlay interface twilld sends peer traffic through.
type ExternalInterface struct {
	Name  string
	Index int
	// Addr is the node's address on it of the family the backend serves:
	// the public IP it publishes and the VXLAN tunnel source.
	Addr netip.Addr
	// Prefix is the on-link network of Addr (e.g. 198.18.0.0/24). A peer
	// whose public IP is inside it is directly reachable: host-gw requires
	// it, VXLAN with DirectRouting uses a plain route for it.
	Prefix netip.Prefix
	MTU    int
}

// IPv6 says whether the interface is seen through its IPv6 address: the
// backend then programs the IPv6 pod network.
func (e ExternalInterface) IPv6() bool { return e.Addr.Is6() }

// Family is the netlink family of the interface's address.
func (e ExternalInterface) Family() int { return familyOf(e.Addr) }

func familyOf(a netip.Addr) int {
	if a.Is6() {
		return netlink.FAMILY_V6
	}
	return netlink.FAMILY_V4
}

// Validate checks the fields every backend relies on.
func (e ExternalInterface) Validate() error {
	switch {
	case e.Index <= 0:
		return fmt.Errorf("external interface %q: no interface index", e.Name)
	case !e.Addr.IsValid() || e.Addr.Is4In6():
		return fmt.Errorf("external interface %q: no address", e.Name)
	case !e.Prefix.IsValid() || e.Prefix.Addr().Is4() != e.Addr.Is4():
		return fmt.Errorf("external interface %q: on-link network %v is not of the family of its address %s", e.Name, e.Prefix, e.Addr)
	case !e.Prefix.Contains(e.Addr):
		return fmt.Errorf("external interface %q: address %s is outside its network %s", e.Name, e.Addr, e.Prefix)
	case e.MTU < 576:
		return fmt.Errorf("external interface %q: MTU %d is too small (or unknown)", e.Name, e.MTU)
	}
	return nil
}

// MAC is an Ethernet address; unlike net.HardwareAddr it is comparable, so it
// can key a map.
type MAC [6]byte

// ParseMAC parses "aa:bb:cc:dd:ee:ff".
func ParseMAC(s string) (MAC, error) {
	hw, err := net.ParseMAC(s)
	if err != nil {
		return MAC{}, err
	}
	m, ok := MACFrom(hw)
	if !ok {
		return MAC{}, fmt.Errorf("%q is not a 6-byte Ethernet address", s)
	}
	return m, nil
}

// MACFrom converts a 6-byte net.HardwareAddr.
func MACFrom(hw net.HardwareAddr) (MAC, bool) {
	var m MAC
	if len(hw) != len(m) {
		return m, false
	}
	copy(m[:], hw)
	return m, true
}

// HardwareAddr returns m as a net.HardwareAddr.
func (m MAC) HardwareAddr() net.HardwareAddr { return net.HardwareAddr(m[:]) }

func (m MAC) String() string { return m.HardwareAddr().String() }

// MarshalText and UnmarshalText give the colon form in JSON.
func (m MAC) MarshalText() ([]byte, error) { return []byte(m.String()), nil }

// UnmarshalText parses the colon form.
func (m *MAC) UnmarshalText(b []byte) error {
	v, err := ParseMAC(string(b))
	if err != nil {
		return err
	}
	*m = v
	return nil
}

// RouteKey is what makes a route unique in a table: a second route with
// the same destination and metric replaces the first.
type RouteKey struct {
	Dst    netip.Prefix
	Metric int
}

// Route is a unicast route in the main table.
type Route struct {
	Dst       netip.Prefix
	Gw        netip.Addr
	LinkIndex int
	Onlink    bool // the gateway is not on any connected network (VXLAN)
	Metric    int
	// Peer is the lease the entry serves, for error messages; zero for
	// entries read from the kernel. Not part of the comparison.
	Peer netip.Prefix
}

// Key returns the route's identity in its table.
func (r Route) Key() RouteKey { return RouteKey{r.Dst, r.Metric} }

func (r Route) same(o Route) bool {
	return r.Dst == o.Dst && r.Gw == o.Gw && r.LinkIndex == o.LinkIndex && r.Onlink == o.Onlink && r.Metric == o.Metric
}

func (r Route) String() string {
	s := fmt.Sprintf("%s via %s dev %d", r.Dst, r.Gw, r.LinkIndex)
	if r.Onlink {
		s += " onlink"
	}
	if r.Metric != 0 {
		s += fmt.Sprintf(" metric %d", r.Metric)
	}
	return s
}

// Neigh is a neighbour entry on a link (ARP for IPv4, NDP for IPv6).
type Neigh struct {
	LinkIndex int
	IP        netip.Addr
	MAC       MAC
	Permanent bool
	Peer      netip.Prefix // as Route.Peer
}

func (n Neigh) same(o Neigh) bool {
	return n.LinkIndex == o.LinkIndex && n.IP == o.IP && n.MAC == o.MAC && n.Permanent == o.Permanent
}

func (n Neigh) String() string { return fmt.Sprintf("%s lladdr %s dev %d", n.IP, n.MAC, n.LinkIndex) }

// FDBKey identifies a VXLAN forwarding database entry: a MAC and one remote.
type FDBKey struct {
	MAC MAC
	Dst netip.Addr
}

// FDB is a forwarding database entry of a VXLAN device: frames for MAC are
// sent in UDP to Dst.
type FDB struct {
	LinkIndex int
	MAC       MAC
	Dst       netip.Addr
	Peer      netip.Prefix // as Route.Peer
}

// Key returns the entry's identity.
func (f FDB) Key() FDBKey { return FDBKey{f.MAC, f.Dst} }

func (f FDB) String() string { return fmt.Sprintf("%s dst %s dev %d", f.MAC, f.Dst, f.LinkIndex) }

// State is a set of kernel entries: desired (from leases) or actual (from the
// kernel).
type State struct {
	Routes map[RouteKey]Route
	Neighs map[netip.Addr]Neigh // on one device, keyed by IP
	FDB    map[FDBKey]FDB
	// Foreign holds routes in the main table that twill did not make. Only an
	// actual state has them: Diff refuses to replace one of them.
	Foreign map[RouteKey]Route
}

// NewState returns an empty state.
func NewState() State { return NewStateFor(0) }

// NewStateFor returns an empty state with room for the entries of peers
// peers, so building a large desired state does not grow its maps step by
// step.
func NewStateFor(peers int) State {
	return State{
		Routes:  make(map[RouteKey]Route, peers),
		Neighs:  make(map[netip.Addr]Neigh, peers),
		FDB:     make(map[FDBKey]FDB, peers),
		Foreign: map[RouteKey]Route{},
	}
}

// Len counts twill's entries.
func (s State) Len() int { return len(s.Routes) + len(s.Neighs) + len(s.FDB) }

// Plan is the difference between a desired and an actual state: what to
// write and what to remove, each list in a stable order.
type Plan struct {
	SetFDB    []FDB
	SetNeighs []Neigh
	SetRoutes []Route
	// NewRoutes are routes to create where none may exist yet (an
	// incremental update, which has not read the table): the write fails
	// rather than replace a route twill did not make.
	NewRoutes []Route
	DelRoutes []Route
	DelNeighs []Neigh
	DelFDB    []FDB
	// Blocked are desired routes whose place is taken by a route twill did
	// not make; they are reported, not written.
	Blocked []Route
}

// Len counts the changes to make.
func (p Plan) Len() int {
	return len(p.SetFDB) + len(p.SetNeighs) + len(p.SetRoutes) + len(p.NewRoutes) + len(p.DelRoutes) + len(p.DelNeighs) + len(p.DelFDB)
}

// Diff compares desired with actual. An entry that is missing or differs is
// set (the kernel calls replace it in place); an entry of twill's that is not
// desired is deleted. Foreign routes are never in the plan.
func Diff(desired, actual State) Plan {
	var p Plan
	for k, r := range desired.Routes {
		if a, ok := actual.Routes[k]; ok && a.same(r) {
			continue
		}
		if _, taken := actual.Foreign[k]; taken {
			p.Blocked = append(p.Blocked, r)
			continue
		}
		p.SetRoutes = append(p.SetRoutes, r)
	}
	for k, r := range actual.Routes {
		if _, ok := desired.Routes[k]; !ok {
			p.DelRoutes = append(p.DelRoutes, r)
		}
	}
	for ip, n := range desired.Neighs {
		if a, ok := actual.Neighs[ip]; !ok || !a.same(n) {
			p.SetNeighs = append(p.SetNeighs, n)
		}
	}
	for ip, n := range actual.Neighs {
		if _, ok := desired.Neighs[ip]; !ok {
			p.DelNeighs = append(p.DelNeighs, n)
		}
	}
	for k, f := range desired.FDB {
		// FDB entries are keyed by what they hold, so present is equal.
		if _, ok := actual.FDB[k]; !ok {
			p.SetFDB = append(p.SetFDB, f)
		}
	}
	for k, f := range actual.FDB {
		if _, ok := desired.FDB[k]; !ok {
			p.DelFDB = append(p.DelFDB, f)
		}
	}
	sortRoutes(p.SetRoutes)
	sortRoutes(p.DelRoutes)
	sortRoutes(p.Blocked)
	sortNeighs(p.SetNeighs)
	sortNeighs(p.DelNeighs)
	sortFDB(p.SetFDB)
	sortFDB(p.DelFDB)
	return p
}

func sortRoutes(rs []Route) {
	slices.SortFunc(rs, func(a, b Route) int {
		if c := a.Dst.Addr().Compare(b.Dst.Addr()); c != 0 {
			return c
		}
		if c := cmp.Compare(a.Dst.Bits(), b.Dst.Bits()); c != 0 {
			return c
		}
		return cmp.Compare(a.Metric, b.Metric)
	})
}

func sortNeighs(ns []Neigh) {
	slices.SortFunc(ns, func(a, b Neigh) int { return a.IP.Compare(b.IP) })
}

func sortFDB(fs []FDB) {
	slices.SortFunc(fs, func(a, b FDB) int {
		if c := slices.Compare(a.MAC[:], b.MAC[:]); c != 0 {
			return c
		}
		return a.Dst.Compare(b.Dst)
	})
}

// Counters count what a backend wrote to the kernel since it was made: entries
// set or deleted, by kind, and devices created. The daemon compares them
// around a pass whose inputs did not change to count repairs of drift.
type Counters struct {
	Routes, FDB, Neighs, Devices uint64
	// Peers counts WireGuard peers configured or removed.
	Peers uint64
}

// Sub returns c minus o, kind by kind.
func (c Counters) Sub(o Counters) Counters {
	return Counters{Routes: c.Routes - o.Routes, FDB: c.FDB - o.FDB, Neighs: c.Neighs - o.Neighs, Devices: c.Devices - o.Devices, Peers: c.Peers - o.Peers}
}

// Tally keeps a backend's Counters; safe for concurrent use. Backends embed
// it, which gives them their Counters method.
type Tally struct {
	mu sync.Mutex
	c  Counters
}

// Applied counts the entries of an applied plan.
func (t *Tally) Applied(p Plan) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.c.Routes += uint64(len(p.SetRoutes) + len(p.NewRoutes) + len(p.DelRoutes))
	t.c.FDB += uint64(len(p.SetFDB) + len(p.DelFDB))
	t.c.Neighs += uint64(len(p.SetNeighs) + len(p.DelNeighs))
}

// DeviceCreated counts a device made.
func (t *Tally) DeviceCreated() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.c.Devices++
}

// PeersWritten counts WireGuard peers configured or removed.
func (t *Tally) PeersWritten(n int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.c.Peers += uint64(n)
}

// Counters returns the counts so far.
func (t *Tally) Counters() Counters {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.c
}
