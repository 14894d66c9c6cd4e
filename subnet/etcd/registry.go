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
		if v4, v6, err := subnet.ParseLeaseKey(strings.TrimPrefix(string(kv.Key), r.SubnetsPrefix())); err == nil {
			for _, p := range []netip.Prefix{v4, v6} {
				if p.IsValid() {
					occupied[p] = true
				}
			}
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

// leaseKV reads the key of the lease with the subnet p: for an IPv4 subnet
// "p" or a dual-stack lease's "p&v6subnet"; for an IPv6 subnet the lease
// whose IPv6 part it is (found by listing the leases' keys).
func (r *Registry) leaseKV(ctx context.Context, p netip.Prefix) (*mvccpb.KeyValue, error) {
	if p.Addr().Is6() {
		resp, err := r.cli.Get(ctx, r.SubnetsPrefix(), clientv3.WithPrefix())
		if err != nil {
			return nil, fmt.Errorf("list leases under %s: %w", r.SubnetsPrefix(), err)
		}
		for _, kv := range resp.Kvs {
			if _, v6, err := subnet.ParseLeaseKey(strings.TrimPrefix(string(kv.Key), r.SubnetsPrefix())); err == nil && v6 == p {
				return kv, nil
			}
		}
		return nil, fmt.Errorf("%w: %s", ErrLeaseNotFound, p)
	}
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
	// Previous and PreviousIPv6 are the subnets this node had before (from
	// its env file), tried when no lease carries its public IP.
	Previous, PreviousIPv6 netip.Prefix
}

// Acquired is a lease held by this node.
type Acquired struct {
	// Subnet and IPv6Subnet are the subnets of the families the network
	// has; the other is zero.
	Subnet, IPv6Subnet netip.Prefix
	EtcdLease          clientv3.LeaseID
	Reused             bool // the node's earlier subnet was kept
	// Revision is the etcd revision that wrote the lease.
	Revision int64
	Attrs    subnet.LeaseAttrs

	// The listing the choice was made from, at revision listedAt: it
	// seeds the peer cache, so start-up lists the leases once, not twice.
	listing  []StoredLease
	listedAt int64
}

// Lease returns the acquired lease in the shared form.
func (a *Acquired) Lease() subnet.Lease {
	return subnet.Lease{Subnet: a.Subnet, IPv6Subnet: a.IPv6Subnet, Attrs: a.Attrs}
}

// Name is the lease's key name (subnet.LeaseKeyName).
func (a *Acquired) Name() string { return subnet.LeaseKeyName(a.Subnet, a.IPv6Subnet) }

// Reservation says the node holds a reserved subnet: a key with no etcd
// lease, which never expires and is not released.
func (a *Acquired) Reservation() bool { return a.EtcdLease == clientv3.NoLease }

// Acquire takes a subnet of each family the network has for the node, in
// one key (flannel's "v4&v6" form for a dual-stack lease): the lease that
// already carries its public IP, else its previous subnets if free, else
// free ones. Every write is one transaction that fails if someone else
// changed what it was decided from, so the node gets both subnets or
// neither, and a lost race is retried with a fresh listing.
//
// Exclusivity: a new IPv4 subnet is claimed on the condition that no key
// starts with its name; a new IPv6 subnet, which sits in the middle of a
// key, on the condition that no lease key was created since the listing.
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
		v4, v6, reused, err := r.choose(req, mine, taken)
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
		key := r.SubnetsPrefix() + subnet.LeaseKeyName(v4, v6)
		var cmps []clientv3.Cmp
		if mine != nil {
			// Our own lease from an earlier run: take it over unless it changed under us.
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(mine.Key), "=", mine.ModRevision))
		}
		if key != keyOf(mine) {
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(key), "=", 0))
		}
		if v4.IsValid() && (mine == nil || v4 != mine.Subnet) {
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(r.SubnetKey(v4)), "=", 0).WithPrefix())
		}
		if v6.IsValid() && (mine == nil || v6 != mine.IPv6Subnet) {
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(r.SubnetsPrefix()), "<", rev+1).WithPrefix())
		}
		ops := []clientv3.Op{clientv3.OpPut(key, string(value), put...)}
		if mine != nil && mine.Key != key {
			// The node's lease under another name (its IPv6 subnet added or
			// dropped): the new key replaces it in the same transaction, so
			// the node never holds two keys.
			ops = append(ops, clientv3.OpDelete(mine.Key))
		}
		name := subnet.LeaseKeyName(v4, v6)
		resp, err := r.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
		if err != nil {
			r.revoke(leaseID)
			return nil, fmt.Errorf("write lease %s: %w", name, err)
		}
		if resp.Succeeded {
			if mine != nil && mine.EtcdLease != clientv3.NoLease && mine.EtcdLease != leaseID {
				// The key moved to the new etcd lease; the old one holds nothing now.
				r.revoke(mine.EtcdLease)
			}
			return &Acquired{Subnet: v4, IPv6Subnet: v6, EtcdLease: leaseID, Reused: reused, Revision: resp.Header.Revision, Attrs: req.Attrs,
				listing: leases, listedAt: rev}, nil
		}
		r.revoke(leaseID)
		r.log.Debug("lost the race for a subnet, retrying", "lease", name, "attempt", attempt)
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

func keyOf(l *StoredLease) string {
	if l == nil {
		return ""
	}
	return l.Key
}

// choose picks the subnet of each enabled family: the own lease's where it
// has one in range, else the previous one if free, else a free one.
func (r *Registry) choose(req AcquireRequest, mine *StoredLease, taken map[netip.Prefix]bool) (v4, v6 netip.Prefix, reused bool, err error) {
	cfg := req.Config
	pick := func(v6 bool, held, previous netip.Prefix) (netip.Prefix, bool, error) {
		rg := cfg.Range(v6)
		switch {
		case held.IsValid() && rg.Contains(held):
			return held, true, nil
		case previous.IsValid() && rg.Contains(previous) && !taken[previous]:
			return previous, true, nil
		}
		p, err := subnet.PickFree(rg, taken, nil)
		return p, false, err
	}
	var held4, held6 netip.Prefix
	if mine != nil {
		held4, held6 = mine.Subnet, mine.IPv6Subnet
	}
	reused = true
	if cfg.EnableIPv4 {
		var kept bool
		if v4, kept, err = pick(false, held4, req.Previous); err != nil {
			return v4, v6, false, err
		}
		reused = reused && kept
	}
	if cfg.EnableIPv6 {
		var kept bool
		if v6, kept, err = pick(true, held6, req.PreviousIPv6); err != nil {
			return v4, v6, false, err
		}
		reused = reused && kept
	}
	return v4, v6, reused, nil
}

// ErrPublicIPInUse means another node's lease carries this node's public IP.
var ErrPublicIPInUse = errors.New("public IP already in use by another node")

// findOwn finds the lease this node held before: the one carrying its public
// IP (IPv4, or IPv6 in an IPv6-only network), else the one its env file
// names if it carries its node name (the node's address changed). A lease
// with its public IP but another node's name is a misconfiguration, refused
// rather than fought over.
func findOwn(leases []StoredLease, req AcquireRequest) (*StoredLease, error) {
	name := req.Attrs.NodeName
	v6 := !req.Config.EnableIPv4
	rg := req.Config.Range(v6)
	var byPrevious *StoredLease
	for i, l := range leases {
		fl, _ := l.Family(v6)
		own, _ := subnet.Lease{Attrs: req.Attrs}.Family(v6)
		if !rg.Contains(fl.Subnet) {
			continue
		}
		if fl.Attrs.PublicIP == own.Attrs.PublicIP {
			if name != "" && l.Attrs.NodeName != "" && l.Attrs.NodeName != name {
				return nil, fmt.Errorf("%w: %s is leased to node %q (subnet %s); give each node its own --public-ip, or delete that lease with `twillctl leases delete %s` if the node is gone",
					ErrPublicIPInUse, fl.Attrs.PublicIP, l.Attrs.NodeName, fl.Subnet, fl.Subnet)
			}
			return &leases[i], nil
		}
		previous := req.Previous
		if v6 {
			previous = req.PreviousIPv6
		}
		if name != "" && fl.Subnet == previous && l.Attrs.NodeName == name {
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
