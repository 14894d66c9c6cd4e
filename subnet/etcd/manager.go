package etcd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/twillnet/twill/internal/retry"
	"github.com/twillnet/twill/subnet"
)

// Manager holds one node's lease and follows its peers: it acquires a subnet,
// keeps the etcd lease alive, notices when the lease is lost (expired while
// etcd was unreachable, or deleted by an operator) and acquires one again,
// preferring the same subnet, all without the daemon restarting.
type Manager struct {
	reg   *Registry
	req   AcquireRequest
	cache *LeaseCache
	log   *slog.Logger

	// changed is the daemon's subscription to the cache, ownChanged hold's:
	// each sees every change, neither relays for the other.
	changed, ownChanged <-chan struct{}

	mu    sync.Mutex
	own   *Acquired
	stats Stats
}

// Stats are the manager's counters, for metrics.
type Stats struct {
	Renewals     uint64    // keep-alive answers from etcd
	Losses       uint64    // leases lost (expired, revoked or deleted)
	Acquisitions uint64    // leases acquired, the first included
	Expires      time.Time // when the lease expires unless renewed; zero if unknown
	Events       uint64    // lease events received from the watch
}

// Stats returns a copy of the counters.
func (m *Manager) Stats() Stats {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := m.stats
	s.Events = m.cache.events.Load()
	return s
}

// NewManager returns a manager that will acquire a lease as req describes.
func NewManager(reg *Registry, req AcquireRequest) *Manager {
	cache := NewLeaseCache()
	return &Manager{reg: reg, req: req, cache: cache, log: reg.log, changed: cache.Subscribe(), ownChanged: cache.Subscribe()}
}

// Acquire takes the node's first lease, retrying while etcd is unreachable.
// Errors that retrying cannot fix (no free subnet, a public IP in use by
// another node) are returned at once.
func (m *Manager) Acquire(ctx context.Context) (*Acquired, error) {
	bo := retry.Backoff{Min: 200 * time.Millisecond, Max: 10 * time.Second}
	for {
		a, err := m.reg.Acquire(ctx, m.req)
		if err == nil {
			m.cache.seed(a.listing, a.listedAt)
			a.listing = nil
			m.setOwn(a)
			return a, nil
		}
		if errors.Is(err, subnet.ErrNoFreeSubnet) || errors.Is(err, ErrPublicIPInUse) || ctx.Err() != nil {
			return nil, err
		}
		m.log.Warn("acquire lease failed; retrying", "err", err)
		if err := bo.Wait(ctx); err != nil {
			return nil, err
		}
	}
}

// Own returns the lease the node holds now.
func (m *Manager) Own() *Acquired {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.own
}

func (m *Manager) setOwn(a *Acquired) {
	m.mu.Lock()
	m.own = a
	m.stats.Acquisitions++
	m.stats.Expires = time.Now().Add(m.req.TTL)
	m.req.Previous, m.req.PreviousIPv6 = a.Subnet, a.IPv6Subnet
	m.mu.Unlock()
	m.cache.Notify()
}

// Changed signals, coalesced, that the own lease or the peers changed. It is
// the cache's own signal: a change is seen at once, whatever the manager is
// doing (keeping the lease alive or acquiring one again).
func (m *Manager) Changed() <-chan struct{} { return m.changed }

// Peers returns every lease but the node's own, and whether the peer list has
// been read from etcd at least once.
func (m *Manager) Peers() ([]subnet.Lease, bool) {
	own := ""
	if a := m.Own(); a != nil {
		own = a.Name()
	}
	return m.cache.Peers(own)
}

// Run follows the peers and keeps the own lease until ctx ends. Acquire must
// have succeeded first.
func (m *Manager) Run(ctx context.Context) error {
	if m.Own() == nil {
		return errors.New("lease manager: Run before Acquire")
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		m.reg.Watch(ctx, m.cache)
	}()
	defer wg.Wait()
	for ctx.Err() == nil {
		lost := m.hold(ctx)
		if ctx.Err() != nil {
			break
		}
		old := m.Own()
		m.log.Warn("lease lost; acquiring again", "subnet", old.Subnet, "reason", lost)
		if errors.Is(lost, errKeyDeleted) {
			// The etcd lease outlives the key an operator deleted and would
			// linger, holding nothing, until its TTL ran out.
			m.reg.revoke(old.EtcdLease)
		}
		a, err := m.Acquire(ctx)
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			// No free subnet: keep trying; a peer may leave.
			m.log.Error("cannot acquire a lease", "err", err)
			if retry.Sleep(ctx, 5*time.Second) != nil {
				break
			}
			continue
		}
		if a.Subnet != old.Subnet {
			m.log.Warn("lease re-acquired on a different subnet; pods on the old subnet must be recreated", "old", old.Subnet, "new", a.Subnet)
		} else {
			m.log.Info("lease re-acquired", "subnet", a.Subnet)
		}
	}
	return ctx.Err()
}

// hold keeps the current lease alive and returns why it was lost, or nil when
// ctx ended.
func (m *Manager) hold(ctx context.Context) error {
	own := m.Own()
	kctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var ka <-chan *clientv3.LeaseKeepAliveResponse // a reservation has nothing to keep alive
	if !own.Reservation() {
		var err error
		if ka, err = m.reg.KeepAlive(kctx, own); err != nil {
			return err
		}
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case resp, ok := <-ka:
			if !ok {
				if ctx.Err() != nil {
					return nil
				}
				m.lost()
				return fmt.Errorf("etcd lease %x expired or was revoked", int64(own.EtcdLease))
			}
			m.mu.Lock()
			m.stats.Renewals++
			m.stats.Expires = time.Now().Add(time.Duration(resp.TTL) * time.Second)
			m.mu.Unlock()
		case <-m.ownChanged:
			if m.cache.Revision() < own.Revision {
				continue
			}
			l, ok := m.cache.Get(own.Name())
			if !ok {
				m.lost()
				return errKeyDeleted
			}
			if l.Attrs.PublicIP != own.Attrs.PublicIP || l.Attrs.PublicIPv6 != own.Attrs.PublicIPv6 {
				m.lost()
				return fmt.Errorf("lease key now names public IP %s %s", l.Attrs.PublicIP, l.Attrs.PublicIPv6)
			}
		}
	}
}

// errKeyDeleted is why a lease whose key was deleted (by an operator) is lost.
var errKeyDeleted = errors.New("lease key deleted")

func (m *Manager) lost() {
	m.mu.Lock()
	m.stats.Losses++
	m.mu.Unlock()
}

// Release deletes the own lease.
func (m *Manager) Release(ctx context.Context) error {
	own := m.Own()
	if own == nil {
		return nil
	}
	return m.reg.Release(ctx, own)
}
