package dataplane

import (
	"context"
	"net/netip"

	"github.com/vishvananda/netlink"
)

// PeerEntries are the kernel entries of one peer: at most a route, a
// neighbour and an FDB entry (VXLAN has all three, VXLAN with direct routing
// and host-gw a route only). A zero field is an entry the peer does not have.
type PeerEntries struct {
	Route Route
	Neigh Neigh
	FDB   FDB
}

// AddTo puts the entries into s.
func (e PeerEntries) AddTo(s State) {
	if e.Route.Dst.IsValid() {
		s.Routes[e.Route.Key()] = e.Route
	}
	if e.Neigh.IP.IsValid() {
		s.Neighs[e.Neigh.IP] = e.Neigh
	}
	if e.FDB.MAC != (MAC{}) {
		s.FDB[e.FDB.Key()] = e.FDB
	}
}

// Programmed is what a backend's last successful full pass left in the
// kernel (its desired state, which the kernel then matched) kept up to date by
// the incremental updates since. An incremental update diffs a few peers'
// new entries against it instead of reading three kernel tables, so one
// peer's change costs a few netlink writes, not a pass over every peer.
//
// It is only trusted between two full passes: anything that makes it
// uncertain (a failed write, a peer that could not be programmed) clears it,
// and the next change then takes the full pass, which reads the kernel.
// Drift made behind twill's back (an entry deleted by hand) is not seen here;
// the full pass on the resync timer repairs it.
type Programmed struct {
	valid   bool
	own     netip.Prefix
	peers   map[netip.Prefix]PeerEntries
	foreign map[RouteKey]Route // routes of others seen by the full pass
}

// Reset records the outcome of a full pass that wrote desired without an
// error and read foreign routes as actual.Foreign.
func (p *Programmed) Reset(own netip.Prefix, desired State, foreign map[RouteKey]Route) {
	peers := make(map[netip.Prefix]PeerEntries, len(desired.Routes))
	for _, r := range desired.Routes {
		e := peers[r.Peer]
		e.Route = r
		peers[r.Peer] = e
	}
	for _, n := range desired.Neighs {
		e := peers[n.Peer]
		e.Neigh = n
		peers[n.Peer] = e
	}
	for _, f := range desired.FDB {
		e := peers[f.Peer]
		e.FDB = f
		peers[f.Peer] = e
	}
	*p = Programmed{valid: true, own: own, peers: peers, foreign: foreign}
}

// Invalidate forgets what was programmed: the next change needs a full pass.
func (p *Programmed) Invalidate() { *p = Programmed{} }

// Usable says whether an incremental update may build on the record: a full
// pass succeeded since the last failure, for the same own subnet.
func (p *Programmed) Usable(own netip.Prefix) bool { return p.valid && p.own == own }

// NeighMACOwner returns the peer whose neighbour entry holds mac, if any.
// It looks at every peer; an update calls it once per changed peer.
func (p *Programmed) NeighMACOwner(mac MAC) (netip.Prefix, bool) {
	for peer, e := range p.peers {
		if e.Neigh.IP.IsValid() && e.Neigh.MAC == mac {
			return peer, true
		}
	}
	return netip.Prefix{}, false
}

// Update moves the peers in next to the entries given there (a zero
// PeerEntries removes a peer's entries) and leaves every other peer alone.
// It writes only what differs from the record. A route where twill has none
// on record is created exclusively (NLM_F_EXCL), so a route someone else
// added since the last full pass is never replaced: it makes the write fail
// instead. The record follows the writes; on any error it is cleared.
// The returned plan is what was attempted.
func (p *Programmed) Update(ctx context.Context, h *netlink.Handle, next map[netip.Prefix]PeerEntries) (Plan, error) {
	desired, actual := NewState(), NewState()
	actual.Foreign = p.foreign
	for peer, e := range next {
		e.AddTo(desired)
		p.peers[peer].AddTo(actual)
	}
	plan := Diff(desired, actual)
	created := plan.SetRoutes[:0]
	for _, r := range plan.SetRoutes {
		if _, had := actual.Routes[r.Key()]; had {
			created = append(created, r)
			continue
		}
		plan.NewRoutes = append(plan.NewRoutes, r)
	}
	plan.SetRoutes = created
	if err := Apply(ctx, h, plan); err != nil {
		p.Invalidate()
		return plan, err
	}
	for peer, e := range next {
		if e == (PeerEntries{}) {
			delete(p.peers, peer)
		} else {
			p.peers[peer] = e
		}
	}
	return plan, nil
}
