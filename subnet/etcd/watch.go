package etcd

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/twillnet/twill/subnet"
)

// LeaseCache holds every current lease of the network, kept up to date by
// Registry.Watch. Readers take snapshots; Changed signals, coalesced, that a
// snapshot would differ from the last one.
type LeaseCache struct {
	mu      sync.Mutex
	leases  map[netip.Prefix]subnet.Lease
	rev     int64
	synced  bool
	changed chan struct{}
	events  atomic.Uint64 // watch events applied
}

// NewLeaseCache returns an empty cache.
func NewLeaseCache() *LeaseCache {
	return &LeaseCache{leases: map[netip.Prefix]subnet.Lease{}, changed: make(chan struct{}, 1)}
}

// Changed receives a value after one or more changes; a burst of changes
// yields one value, so a consumer does one pass per burst.
func (c *LeaseCache) Changed() <-chan struct{} { return c.changed }

// Snapshot returns the current leases and whether the cache has been filled
// from etcd at least once.
func (c *LeaseCache) Snapshot() ([]subnet.Lease, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]subnet.Lease, 0, len(c.leases))
	for _, l := range c.leases {
		out = append(out, l)
	}
	return out, c.synced
}

// Get returns the lease on p.
func (c *LeaseCache) Get(p netip.Prefix) (subnet.Lease, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	l, ok := c.leases[p]
	return l, ok
}

// Revision is the etcd revision the cache reflects.
func (c *LeaseCache) Revision() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rev
}

func (c *LeaseCache) notify() {
	select {
	case c.changed <- struct{}{}:
	default:
	}
}

func (c *LeaseCache) replace(leases []StoredLease, rev int64) {
	c.mu.Lock()
	c.leases = make(map[netip.Prefix]subnet.Lease, len(leases))
	for _, l := range leases {
		c.leases[l.Subnet] = l.Lease
	}
	c.rev, c.synced = rev, true
	c.mu.Unlock()
	c.notify()
}

func (c *LeaseCache) isSynced() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.synced
}

// seed fills a cache that was never filled; a filled one is newer than any
// listing taken before it.
func (c *LeaseCache) seed(leases []StoredLease, rev int64) {
	if !c.isSynced() && rev > 0 {
		c.replace(leases, rev)
	}
}

// change is one watch event: a lease written, or (Lease nil) gone.
type change struct {
	Subnet netip.Prefix
	Lease  *subnet.Lease
}

// apply applies one watch response's events in their order: a key written
// and deleted in the same response is gone afterwards.
func (c *LeaseCache) apply(rev int64, changes []change) {
	c.events.Add(uint64(len(changes)))
	c.mu.Lock()
	for _, ch := range changes {
		if ch.Lease == nil {
			delete(c.leases, ch.Subnet)
		} else {
			c.leases[ch.Subnet] = *ch.Lease
		}
	}
	c.rev = rev
	c.mu.Unlock()
	if len(changes) > 0 {
		c.notify()
	}
}

// Watch fills cache from a listing, unless it was filled before, and keeps it
// current until ctx ends: one prefix watch, resumed from the last revision
// seen after the connection drops, and a fresh listing only when etcd has
// compacted that revision away. It returns only when ctx ends.
func (r *Registry) Watch(ctx context.Context, cache *LeaseCache) error {
	backoff := newBackoff(100*time.Millisecond, 5*time.Second)
	needList := !cache.isSynced() // a cache seeded by Acquire is watched from its revision
	for {
		if needList {
			leases, rev, err := r.Leases(ctx)
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				r.log.Warn("list leases failed; retrying", "err", err)
				if err := backoff.wait(ctx); err != nil {
					return err
				}
				continue
			}
			cache.replace(leases, rev)
			needList = false
		}
		compacted, err := r.watchFrom(ctx, cache, backoff)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if compacted {
			r.log.Info("watch revision compacted; listing leases again", "revision", cache.Revision())
			needList = true
			continue
		}
		if err != nil {
			r.log.Warn("lease watch interrupted; resuming", "revision", cache.Revision(), "err", err)
		}
		if err := backoff.wait(ctx); err != nil {
			return err
		}
	}
}

// watchFrom runs one watch from the cache's revision until it fails.
func (r *Registry) watchFrom(ctx context.Context, cache *LeaseCache, backoff *backoff) (compacted bool, err error) {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	wch := r.cli.Watch(wctx, r.SubnetsPrefix(), clientv3.WithPrefix(), clientv3.WithRev(cache.Revision()+1), clientv3.WithProgressNotify())
	for wr := range wch {
		if wr.CompactRevision != 0 || errors.Is(wr.Err(), rpctypes.ErrCompacted) {
			return true, nil
		}
		if err := wr.Err(); err != nil {
			return false, err
		}
		backoff.reset()
		changes := make([]change, 0, len(wr.Events))
		for _, ev := range wr.Events {
			p, perr := subnet.ParseKeyName(strings.TrimPrefix(string(ev.Kv.Key), r.SubnetsPrefix()))
			if ev.Type == mvccpb.DELETE {
				if perr == nil {
					changes = append(changes, change{Subnet: p})
				}
				continue
			}
			l, err := r.decode(ev.Kv.Key, ev.Kv.Value)
			if err != nil {
				r.log.Warn("skipping malformed lease", "key", string(ev.Kv.Key), "err", err)
				if perr == nil {
					changes = append(changes, change{Subnet: p}) // a lease overwritten with garbage is gone
				}
				continue
			}
			l.Claimed = ev.Kv.CreateRevision
			changes = append(changes, change{Subnet: l.Subnet, Lease: &l.Lease})
		}
		cache.apply(wr.Header.Revision, changes)
	}
	if ctx.Err() != nil {
		return false, ctx.Err()
	}
	return false, fmt.Errorf("watch on %s closed", r.SubnetsPrefix())
}

type backoff struct {
	next, max time.Duration
	min       time.Duration
}

func newBackoff(min, max time.Duration) *backoff { return &backoff{next: min, min: min, max: max} }

func (b *backoff) wait(ctx context.Context) error {
	t := time.NewTimer(b.next)
	defer t.Stop()
	b.next = min(b.next*2, b.max)
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func (b *backoff) reset() { b.next = b.min }
