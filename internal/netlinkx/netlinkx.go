// Package netlinkx is the one way twill reads kernel state over netlink.
//
// A netlink dump that races with a change (a route added while the table is
// being walked) ends with NLM_F_DUMP_INTR; vishvananda/netlink reports it as
// netlink.ErrDumpInterrupted together with results that may be incomplete or
// inconsistent. A reconciler must never act on such a snapshot: a missing entry
// would be re-added (harmless) but a missing entry of twill's own would be
// taken as absent and a half-read table could make it delete the wrong things.
// So every dump goes through Dump, which throws the partial result away and
// asks again, a bounded number of times, waiting a little longer each time and
// giving up as soon as ctx is done.
//
// Calls that are not dumps (add, replace, delete, get by name) are made on the
// handle directly.
package netlinkx

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/twillnet/twill/internal/retry"
)

// MaxDumpAttempts bounds how often one dump is tried when the kernel keeps
// interrupting it. Interruptions come from concurrent changes, so a handful of
// tries rides out a burst; a table that changes without pause is an error worth
// reporting rather than a reason to spin.
const MaxDumpAttempts = 8

// ErrInterrupted is returned (wrapped) when every attempt of a dump was
// interrupted. It also matches netlink.ErrDumpInterrupted with errors.Is.
var ErrInterrupted = errors.New("netlink dump interrupted on every attempt")

// Dump runs list until it returns an error other than
// netlink.ErrDumpInterrupted, at most MaxDumpAttempts times. what names the
// dump for the error message ("list routes"). A partial result is never
// returned.
func Dump[T any](ctx context.Context, what string, list func() (T, error)) (T, error) {
	var zero T
	// 1 ms before the second attempt, doubling: 127 ms in all before the 8th.
	bo := retry.Backoff{Min: time.Millisecond, Max: time.Second}
	for attempt := 1; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return zero, fmt.Errorf("%s: %w", what, err)
		}
		v, err := list()
		if err == nil {
			return v, nil
		}
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return zero, fmt.Errorf("%s: %w", what, err)
		}
		if attempt == MaxDumpAttempts {
			return zero, fmt.Errorf("%s: %w (%d attempts): %w", what, ErrInterrupted, attempt, err)
		}
		if err := bo.Wait(ctx); err != nil {
			return zero, fmt.Errorf("%s: %w", what, err)
		}
	}
}

// LinkList lists every link in the handle's namespace.
func LinkList(ctx context.Context, h *netlink.Handle) ([]netlink.Link, error) {
	return Dump(ctx, "list links", h.LinkList)
}

// AddrList lists the addresses of family (netlink.FAMILY_V4, ...) on link.
func AddrList(ctx context.Context, h *netlink.Handle, link netlink.Link, family int) ([]netlink.Addr, error) {
	return Dump(ctx, fmt.Sprintf("list addresses of %s", link.Attrs().Name), func() ([]netlink.Addr, error) {
		return h.AddrList(link, family)
	})
}

// RouteList lists the routes of family that match filter under mask
// (netlink.RT_FILTER_*), as netlink.Handle.RouteListFiltered does.
func RouteList(ctx context.Context, h *netlink.Handle, family int, filter *netlink.Route, mask uint64) ([]netlink.Route, error) {
	return Dump(ctx, "list routes", func() ([]netlink.Route, error) {
		// RouteListFiltered may fill in filter.Dst; give it a copy each time.
		var f *netlink.Route
		if filter != nil {
			c := *filter
			f = &c
		}
		return h.RouteListFiltered(family, f, mask)
	})
}

// NeighList lists the neighbour entries of family on the link with index
// linkIndex (0: every link): netlink.FAMILY_V4 for ARP entries,
// unix.AF_BRIDGE for forwarding database (FDB) entries.
func NeighList(ctx context.Context, h *netlink.Handle, linkIndex, family int) ([]netlink.Neigh, error) {
	return Dump(ctx, fmt.Sprintf("list neighbours (family %d) of link %d", family, linkIndex), func() ([]netlink.Neigh, error) {
		return h.NeighList(linkIndex, family)
	})
}

// LinkByName returns the link called name, or an error that IsNotFound
// recognises. The lookup is a get, not a dump, on every kernel twill supports;
// it still goes through Dump because the library falls back to a dump on
// kernels without IFLA_IFNAME lookups.
func LinkByName(ctx context.Context, h *netlink.Handle, name string) (netlink.Link, error) {
	return Dump(ctx, "find link "+name, func() (netlink.Link, error) {
		return h.LinkByName(name)
	})
}

// IsNotFound reports whether err says a link does not exist.
func IsNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf)
}
