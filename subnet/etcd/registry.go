package etcd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/twillnet/twill/subnet"
)

// ErrNoConfig means the network config key does not exist yet.
var ErrNoConfig = errors.New("no network config")

// ErrLeaseNotFound means there is no lease for the subnet.
var ErrLeaseNotFound = errors.New("lease not found")

// Registry reads and writes one network's keys.
type Registry struct {
	cli    *clientv3.Client
	prefix string
	log    *slog.Logger
}

// NewRegistry returns a registry for the network under prefix.
func NewRegistry(cli *clientv3.Client, prefix string, log *slog.Logger) *Registry {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Registry{cli: cli, prefix: strings.TrimRight(prefix, "/"), log: log}
}

// ConfigKey is the key of the network config.
func (r *Registry) ConfigKey() string { return r.prefix + "/config" }

// SubnetsPrefix is the key prefix of all leases, with a trailing slash.
func (r *Registry) SubnetsPrefix() string { return r.prefix + "/subnets/" }

// SubnetKey is the key of the lease on p.
func (r *Registry) SubnetKey(p netip.Prefix) string { return r.SubnetsPrefix() + subnet.KeyName(p) }

// Config reads and validates the network config. It returns ErrNoConfig when
// the key is absent and the validation error when the stored config is bad.
func (r *Registry) Config(ctx context.Context) (*subnet.Config, error) {
	resp, err := r.cli.Get(ctx, r.ConfigKey())
	if err != nil {
		return nil, fmt.Errorf("read network config %s from etcd: %w", r.ConfigKey(), err)
	}
	if len(resp.Kvs) == 0 {
		return nil, fmt.Errorf("%w at %s", ErrNoConfig, r.ConfigKey())
	}
	cfg, err := subnet.ParseConfig(resp.Kvs[0].Value)
	if err != nil {
		return nil, fmt.Errorf("etcd key %s: %w", r.ConfigKey(), err)
	}
	return cfg, nil
}

// RawConfig returns the stored config bytes as they are.
func (r *Registry) RawConfig(ctx context.Context) ([]byte, error) {
	resp, err := r.cli.Get(ctx, r.ConfigKey())
	if err != nil {
		return nil, fmt.Errorf("read network config %s from etcd: %w", r.ConfigKey(), err)
	}
	if len(resp.Kvs) == 0 {
		return nil, fmt.Errorf("%w at %s", ErrNoConfig, r.ConfigKey())
	}
	return resp.Kvs[0].Value, nil
}

// SetConfig validates data and stores it. Nothing is written when it is invalid.
func (r *Registry) SetConfig(ctx context.Context, data []byte) (*subnet.Config, error) {
	cfg, err := subnet.ParseConfig(data)
	if err != nil {
		return nil, err
	}
	if _, err := r.cli.Put(ctx, r.ConfigKey(), string(data)); err != nil {
		return nil, fmt.Errorf("write network config %s to etcd: %w", r.ConfigKey(), err)
	}
	return cfg, nil
}

// StoredLease is a lease as read from etcd.
type StoredLease struct {
	subnet.Lease
	Key         string
	EtcdLease   clientv3.LeaseID
	ModRevision int64
}

// name is the key's last element, the lease's name (subnet.LeaseKeyName).
func (l StoredLease) name() string { return l.Key[strings.LastIndexByte(l.Key, '/')+1:] }

// Leases lists every well-formed lease and the revision of the listing. A
// malformed key or value is skipped with a warning naming the key: one bad
// entry never hides the others.
func (r *Registry) Leases(ctx context.Context) ([]StoredLease, int64, error) {
	leases, _, rev, err := r.list(ctx)
	return leases, rev, err
}

// list also returns every subnet whose key exists, malformed value or not:
// such a subnet is not free, since a create-if-absent on it cannot succeed.
func (r *Registry) list(ctx context.Context) ([]StoredLease, map[netip.Prefix]bool, int64, error) {
	resp, err := r.cli.Get(ctx, r.SubnetsPrefix(), clientv3.WithPrefix())
	if err != nil {
		return nil, nil, 0, fmt.Errorf("list leases under %s: %w", r.SubnetsPrefix(), err)
	}
	out := make([]StoredLease, 0, len(resp.Kvs))
	occupied := make(map[netip.Prefix]bool, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		if p, _, err := subnet.ParseLeaseKey(strings.TrimPrefix(string(kv.Key), r.SubnetsPrefix())); err == nil && p.IsValid() {
			occupied[p] = true
		}
		l, err := r.decode(kv.Key, kv.Value)
		if err != nil {
			r.log.Warn("skipping malformed lease", "key", string(kv.Key), "err", err)
			continue
		}
		l.EtcdLease, l.ModRevision, l.Claimed = clientv3.LeaseID(kv.Lease), kv.ModRevision, kv.CreateRevision
		out = append(out, l)
	}
	return out, occupied, resp.Header.Revision, nil
}

// Lease reads the lease on p, with its expiry.
func (r *Registry) Lease(ctx context.Context, p netip.Prefix) (*StoredLease, error) {
	kv, err := r.leaseKV(ctx, p)
	if err != nil {
		return nil, err
	}
	l, err := r.decode(kv.Key, kv.Value)
	if err != nil {
		return nil, err
	}
	l.EtcdLease, l.ModRevision, l.Claimed = clientv3.LeaseID(kv.Lease), kv.ModRevision, kv.CreateRevision
	if l.EtcdLease != clientv3.NoLease {
		ttl, err := r.cli.TimeToLive(ctx, l.EtcdLease)
		if err == nil && ttl.TTL > 0 {
			l.Expires = time.Now().Add(time.Duration(ttl.TTL) * time.Second)
		}
	}
	return &l, nil
}

// DeleteLease removes the lease on p. Its node notices and re-acquires a subnet.
func (r *Registry) DeleteLease(ctx context.Context, p netip.Prefix) error {
	kv, err := r.leaseKV(ctx, p)
	if err != nil {
		return err
	}
	resp, err := r.cli.Delete(ctx, string(kv.Key))
	if err != nil {
		return fmt.Errorf("delete lease %s: %w", p, err)
	}
	if resp.Deleted == 0 {
		return fmt.Errorf("%w: %s", ErrLeaseNotFound, p)
	}
	return nil
}

// leaseKV reads the key of the lease whose IPv4 subnet is p: twill's own
// form, or a dual-stack lease's (flannel's "p&v6subnet").
func (r *Registry) leaseKV(ctx context.Context, p netip.Prefix) (*mvccpb.KeyValue, error) {
	name := subnet.KeyName(p)
	resp, err := r.cli.Get(ctx, r.SubnetKey(p), clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("read lease %s: %w", p, err)
	}
	for _, kv := range resp.Kvs {
		if rest := strings.TrimPrefix(string(kv.Key), r.SubnetsPrefix()+name); rest == "" || strings.HasPrefix(rest, "&") {
			return kv, nil
		}
	}
	return nil, fmt.Errorf("%w: %s", ErrLeaseNotFound, p)
}

func (r *Registry) decode(key, value []byte) (StoredLease, error) {
	name, ok := strings.CutPrefix(string(key), r.SubnetsPrefix())
	if !ok {
		return StoredLease{}, fmt.Errorf("key %q is outside %s", key, r.SubnetsPrefix())
	}
	v4, v6, err := subnet.ParseLeaseKey(name)
	if err != nil {
		return StoredLease{}, err
	}
	if !v4.IsValid() {
		return StoredLease{}, fmt.Errorf("lease %s has no IPv4 subnet (an IPv6-only lease; twill's datapath is IPv4 so far)", name)
	}
	attrs, err := subnet.ParseLeaseAttrs(value)
	if err != nil {
		return StoredLease{}, err
	}
	return StoredLease{Lease: subnet.Lease{Subnet: v4, IPv6Subnet: v6, Attrs: attrs}, Key: string(key)}, nil
}

// AcquireRequest says what a node wants.
type AcquireRequest struct {
	Config *subnet.Config
	Attrs  subnet.LeaseAttrs
	TTL    time.Duration
	// Previous is the subnet this node had before (from its env file), tried
	// when no lease carries its public IP.
	Previous netip.Prefix
}

// Acquired is a lease held by this node.
type Acquired struct {
	Subnet    netip.Prefix
	EtcdLease clientv3.LeaseID
	Reused    bool // the node's earlier subnet was kept
	// Revision is the etcd revision that wrote the lease.
	Revision int64
	Attrs    subnet.LeaseAttrs

	// The listing the choice was made from, at revision listedAt: it
	// seeds the peer cache, so start-up lists the leases once, not twice.
	listing  []StoredLease
	listedAt int64
}

// Lease returns the acquired lease in the shared form.
func (a *Acquired) Lease() subnet.Lease { return subnet.Lease{Subnet: a.Subnet, Attrs: a.Attrs} }

// Reservation says the node holds a reserved subnet: a key with no etcd
// lease, which never expires and is not released.
func (a *Acquired) Reservation() bool { return a.EtcdLease == clientv3.NoLease }

// Acquire takes a subnet for the node: the lease that already carries its
// public IP, else its previous subnet if free, else a free one. Every write is
// a transaction that fails if someone else changed the key since it was read,
// and a lost race is retried with a fresh listing.
func (r *Registry) Acquire(ctx context.Context, req AcquireRequest) (*Acquired, error) {
	value, err := json.Marshal(req.Attrs)
	if err != nil {
		return nil, err
	}
	ttlSec := int64((req.TTL + time.Second - 1) / time.Second)
	if ttlSec < 1 {
		ttlSec = 1
	}
	for attempt := 1; ; attempt++ {
		leases, taken, rev, err := r.list(ctx)
		if err != nil {
			return nil, err
		}
		mine, err := findOwn(leases, req)
		if err != nil {
			return nil, err
		}
		// A reservation (an operator's key with no etcd lease, as flannel's
		// reservations are) stays one: the node takes it without a TTL.
		leaseID := clientv3.NoLease
		var put []clientv3.OpOption
		if mine == nil || mine.EtcdLease != clientv3.NoLease {
			grant, err := r.cli.Grant(ctx, ttlSec)
			if err != nil {
				return nil, fmt.Errorf("grant etcd lease (TTL %ds): %w", ttlSec, err)
			}
			leaseID = grant.ID
			put = append(put, clientv3.WithLease(leaseID))
		}
		var (
			target netip.Prefix
			cmp    clientv3.Cmp
			reused bool
		)
		switch {
		case mine != nil:
			// Our own lease from an earlier run: take it over unless it changed under us.
			target, reused = mine.Subnet, true
			cmp = clientv3.Compare(clientv3.ModRevision(mine.Key), "=", mine.ModRevision)
		case req.Previous.IsValid() && req.Config.Range(false).Contains(req.Previous) && !taken[req.Previous]:
			target, reused = req.Previous, true
			cmp = clientv3.Compare(clientv3.CreateRevision(r.SubnetKey(target)), "=", 0)
		default:
			target, err = subnet.PickFree(req.Config.Range(false), taken, nil)
			if err != nil {
				r.revoke(leaseID)
				return nil, err
			}
			cmp = clientv3.Compare(clientv3.CreateRevision(r.SubnetKey(target)), "=", 0)
		}
		ops := []clientv3.Op{clientv3.OpPut(r.SubnetKey(target), string(value), put...)}
		if mine != nil && mine.Key != r.SubnetKey(target) {
			// The node's lease under another name (flannel's dual-stack form,
			// "v4&v6"): twill's IPv4 lease replaces it in the same
			// transaction, so the node never holds two keys.
			ops = append(ops, clientv3.OpDelete(mine.Key))
		}
		resp, err := r.cli.Txn(ctx).If(cmp).Then(ops...).Commit()
		if err != nil {
			r.revoke(leaseID)
			return nil, fmt.Errorf("write lease %s: %w", target, err)
		}
		if resp.Succeeded {
			if mine != nil && mine.EtcdLease != clientv3.NoLease && mine.EtcdLease != leaseID {
				// The key moved to the new etcd lease; the old one holds nothing now.
				r.revoke(mine.EtcdLease)
			}
			return &Acquired{Subnet: target, EtcdLease: leaseID, Reused: reused, Revision: resp.Header.Revision, Attrs: req.Attrs,
				listing: leases, listedAt: rev}, nil
		}
		r.revoke(leaseID)
		r.log.Debug("lost the race for a subnet, retrying", "subnet", target, "attempt", attempt)
		if attempt >= 50 {
			return nil, fmt.Errorf("acquire a subnet: lost the race %d times in a row", attempt)
		}
		// A short random pause spreads nodes that keep colliding.
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(time.Duration(rand.IntN(20*attempt)) * time.Millisecond):
		}
	}
}

// ErrPublicIPInUse means another node's lease carries this node's public IP.
var ErrPublicIPInUse = errors.New("public IP already in use by another node")

// findOwn finds the lease this node held before: the one carrying its public
// IP, else the one its env file names if it carries its node name (the node's
// address changed). A lease with its public IP but another node's name is a
// misconfiguration, refused rather than fought over.
func findOwn(leases []StoredLease, req AcquireRequest) (*StoredLease, error) {
	name := req.Attrs.NodeName
	var byPrevious *StoredLease
	for i, l := range leases {
		if !req.Config.Range(false).Contains(l.Subnet) {
			continue
		}
		if l.Attrs.PublicIP == req.Attrs.PublicIP {
			if name != "" && l.Attrs.NodeName != "" && l.Attrs.NodeName != name {
				return nil, fmt.Errorf("%w: %s is leased to node %q (subnet %s); give each node its own --public-ip, or delete that lease with `twillctl leases delete %s` if the node is gone",
					ErrPublicIPInUse, l.Attrs.PublicIP, l.Attrs.NodeName, l.Subnet, l.Subnet)
			}
			return &leases[i], nil
		}
		if name != "" && l.Subnet == req.Previous && l.Attrs.NodeName == name {
			byPrevious = &leases[i]
		}
	}
	return byPrevious, nil
}

// Release deletes the node's lease (for a node leaving the cluster). A
// reservation is the operator's to delete and is kept.
func (r *Registry) Release(ctx context.Context, a *Acquired) error {
	if a.Reservation() {
		r.log.Info("the subnet is reserved; keeping its key", "subnet", a.Subnet)
		return nil
	}
	if _, err := r.cli.Revoke(ctx, a.EtcdLease); err != nil {
		return fmt.Errorf("release lease %s: %w", a.Subnet, err)
	}
	return nil
}

// KeepAlive keeps the etcd lease of a alive until ctx ends. The returned
// channel is closed when keep-alive stops: the lease expired or was revoked,
// or ctx ended.
func (r *Registry) KeepAlive(ctx context.Context, a *Acquired) (<-chan *clientv3.LeaseKeepAliveResponse, error) {
	ch, err := r.cli.KeepAlive(ctx, a.EtcdLease)
	if err != nil {
		return nil, fmt.Errorf("keep lease %s alive: %w", a.Subnet, err)
	}
	return ch, nil
}

func (r *Registry) revoke(id clientv3.LeaseID) {
	if id == clientv3.NoLease {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := r.cli.Revoke(ctx, id); err != nil {
		r.log.Debug("revoke unused etcd lease", "id", id, "err", err)
	}
}

// Client is the etcd client the registry uses.
func (r *Registry) Client() *clientv3.Client { return r.cli }
