package etcd

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/twillnet/twill/internal/retry"
	"github.com/twillnet/twill/subnet"
)

// LeaseCache is the node's subnet.Cache as the etcd watch keeps it, keyed by
// the lease key's name under the subnets prefix (subnet.LeaseKeyName), with the etcd revision it reflects:
// where the watch resumes, and what tells a reader whether a write it made is
// in the picture yet.
type LeaseCache struct {
	*subnet.Cache
	rev    atomic.Int64
	events atomic.Uint64 // watch events applied
}

// NewLeaseCache returns an empty cache.
func NewLeaseCache() *LeaseCache { return &LeaseCache{Cache: subnet.NewCache()} }

// Revision is the etcd revision the cache reflects. It is stored after the
// leases of that revision, so a reader that sees it sees them.
func (c *LeaseCache) Revision() int64 { return c.rev.Load() }

func (c *LeaseCache) replace(leases []StoredLease, rev int64) {
	m := make(map[string]subnet.Lease, len(leases))
	for _, l := range leases {
		m[l.name()] = l.Lease
	}
	c.Replace(m)
	c.rev.Store(rev)
}

// seed fills a cache that was never filled; a filled one is newer than any
// listing taken before it.
func (c *LeaseCache) seed(leases []StoredLease, rev int64) {
	if !c.Synced() && rev > 0 {
		c.replace(leases, rev)
	}
}

// apply applies one watch response's events in their order (a key written
// and deleted in the same response is gone afterwards) and then its revision.
func (c *LeaseCache) apply(rev int64, changes []subnet.Change) {
	c.events.Add(uint64(len(changes)))
	c.Apply(changes...)
	c.rev.Store(rev)
}

// Watch fills cache from a listing, unless it was filled before, and keeps it
// current until ctx ends: one prefix watch, resumed from the last revision
// seen after the connection drops, and a fresh listing only when etcd has
// compacted that revision away. It returns only when ctx ends.
func (r *Registry) Watch(ctx context.Context, cache *LeaseCache) error {
	backoff := &retry.Backoff{Min: 100 * time.Millisecond, Max: 5 * time.Second}
	needList := !cache.Synced() // a cache seeded by Acquire is watched from its revision
	for {
		if needList {
			leases, rev, err := r.Leases(ctx)
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				r.log.Warn("list leases failed; retrying", "err", err)
				if err := backoff.Wait(ctx); err != nil {
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
		if err := backoff.Wait(ctx); err != nil {
			return err
		}
	}
}

// watchFrom runs one watch from the cache's revision until it fails.
func (r *Registry) watchFrom(ctx context.Context, cache *LeaseCache, backoff *retry.Backoff) (compacted bool, err error) {
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
		backoff.Reset()
		changes := make([]subnet.Change, 0, len(wr.Events))
		for _, ev := range wr.Events {
			name := strings.TrimPrefix(string(ev.Kv.Key), r.SubnetsPrefix())
			if ev.Type == mvccpb.DELETE {
				changes = append(changes, subnet.Change{Key: name})
				continue
			}
			l, err := r.decode(ev.Kv.Key, ev.Kv.Value)
			if err != nil {
				r.log.Warn("skipping malformed lease", "key", string(ev.Kv.Key), "err", err)
				changes = append(changes, subnet.Change{Key: name}) // a lease overwritten with garbage is gone
				continue
			}
			l.Claimed = ev.Kv.CreateRevision
			changes = append(changes, subnet.Change{Key: name, Lease: &l.Lease})
		}
		cache.apply(wr.Header.Revision, changes)
	}
	if ctx.Err() != nil {
		return false, ctx.Err()
	}
	return false, fmt.Errorf("watch on %s closed", r.SubnetsPrefix())
}
