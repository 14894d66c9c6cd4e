package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"

	"github.com/vishvananda/netlink"

	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/backend/hostgw"
	"github.com/twillnet/twill/backend/vxlan"
	"github.com/twillnet/twill/backend/wireguard"
	"github.com/twillnet/twill/subnet"
)

// The Backend seam is defined here, where it is consumed. Backends are
// level-triggered: Reconcile is given the whole picture (own lease and every
// peer) each time, reads what the kernel holds of twill's and changes only
// the difference, so it runs at start-up, on a timer and whenever an Update
// cannot decide alone, and the kernel converges whatever happened in between
// (peers gone while twilld was down, entries deleted by hand, a failed call
// last time). The desired-state functions (vxlan.Desired, hostgw.Desired)
// and the diff (dataplane.Diff) are pure and tested without a kernel;
// package dataplane explains how twill recognises its own entries.

// Backend programs the datapath of one network on this node. Its methods
// must not run concurrently: twilld runs one pass at a time.
type Backend interface {
	// Prepare creates or adopts the device before the lease is acquired.
	// It returns the BackendData to publish with the lease (vxlan:
	// {"VNI":1,"VtepMAC":"..."}; none for host-gw and alloc) and the MTU
	// pods must use.
	Prepare(ctx context.Context) (data json.RawMessage, mtu int, err error)
	// Reconcile makes the kernel equal the desired state for the own lease
	// and the peers (the caller leaves the own lease out of peers; peers of
	// another backend type are skipped). It re-creates the device and its
	// address if they vanished, writes only what differs, and returns a
	// joined error naming each peer that failed after programming all the
	// others.
	Reconcile(ctx context.Context, own subnet.Lease, peers []subnet.Lease) error
	// Update programs the change of a few peers since the last Reconcile or
	// Update without reading the kernel: changed are the leases added or
	// changed, removed the subnets of the leases gone. It builds on what the
	// last successful Reconcile wrote and leaves every other peer's entries
	// alone, so its cost does not grow with the number of peers. It returns
	// false, having written nothing, when it cannot decide from those peers
	// alone (no successful Reconcile since the last failure, another own
	// subnet, a changed peer that cannot be programmed or clashes with
	// another): the caller then runs Reconcile. After an error the next
	// Update declines too.
	Update(ctx context.Context, own subnet.Lease, changed []subnet.Lease, removed []netip.Prefix) (bool, error)
	// Cleanup removes everything the backend made: device, routes.
	Cleanup(ctx context.Context) error
	// Counters returns what the backend has written to the kernel so far.
	Counters() dataplane.Counters
}

// newBackend returns the backend cfg.Type names, chosen by an explicit
// switch (no registry); wg are the node's WireGuard settings. h is a netlink handle in the
// namespace to program (netlink.NewHandle() for twilld's own; tests use
// netlink.NewHandleAt). The backend does not close it.
func newBackend(cfg subnet.BackendConfig, ext dataplane.ExternalInterface, h *netlink.Handle, log *slog.Logger, wg wireguard.Options) (Backend, error) {
	if h == nil {
		return nil, errors.New("backend: no netlink handle")
	}
	switch cfg.Type {
	case subnet.BackendVXLAN:
		return vxlan.New(cfg, ext, h, log)
	case subnet.BackendHostGW:
		return hostgw.New(cfg, ext, h, log)
	case subnet.BackendWireGuard:
		return wireguard.New(cfg, ext, h, log, wg)
	case subnet.BackendAlloc:
		return newAlloc(cfg, ext)
	default:
		return nil, fmt.Errorf("backend: unknown type %q (known: %s, %s, %s, %s)", cfg.Type, subnet.BackendVXLAN, subnet.BackendHostGW, subnet.BackendWireGuard, subnet.BackendAlloc)
	}
}

// alloc only leases subnets; something else (or nothing) carries the traffic.
type alloc struct{ mtu int }

func newAlloc(cfg subnet.BackendConfig, ext dataplane.ExternalInterface) (*alloc, error) {
	mtu := cfg.MTU
	if mtu == 0 {
		mtu = ext.MTU
	}
	if mtu < 576 {
		return nil, fmt.Errorf("alloc backend: MTU %d is too small (or the external interface's is unknown)", mtu)
	}
	return &alloc{mtu: mtu}, nil
}

func (a *alloc) Prepare(ctx context.Context) (json.RawMessage, int, error) {
	return nil, a.mtu, ctx.Err()
}

func (a *alloc) Reconcile(ctx context.Context, _ subnet.Lease, _ []subnet.Lease) error {
	return ctx.Err()
}

func (a *alloc) Update(ctx context.Context, _ subnet.Lease, _ []subnet.Lease, _ []netip.Prefix) (bool, error) {
	return true, ctx.Err()
}

func (a *alloc) Cleanup(ctx context.Context) error { return ctx.Err() }

func (a *alloc) Counters() dataplane.Counters { return dataplane.Counters{} }
