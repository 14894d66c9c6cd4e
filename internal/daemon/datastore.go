package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"google.golang.org/grpc/connectivity"

	"github.com/twillnet/twill/internal/retry"
	"github.com/twillnet/twill/subnet"
	"github.com/twillnet/twill/subnet/etcd"
)

// datastore is where the daemon gets the network config and its leases:
// etcd, or the Kubernetes API.
type datastore interface {
	// Config returns the network config, waiting (and saying why through
	// notReady) while it is absent or invalid.
	Config(ctx context.Context, notReady func(string)) (*subnet.Config, error)
	// Leases returns the lease manager for this node.
	// previous holds the subnets of the node's env file that fit the network.
	Leases(cfg *subnet.Config, attrs subnet.LeaseAttrs, previous subnet.Lease) (leaseManager, error)
	// Published returns the attributes this node published before (its
	// lease, or its Node's annotations), found by its public address or
	// name, so that a restart after a reboot can publish the same VTEP MACs.
	// ok is false when there are none or they cannot be read now.
	Published(ctx context.Context, cfg *subnet.Config, attrs subnet.LeaseAttrs) (prev subnet.LeaseAttrs, ok bool)
	// watchUp reports whether the datastore is reachable, at once and on
	// every change, until ctx ends. A datastore that cannot tell does not
	// call report.
	watchUp(ctx context.Context, report func(up bool, state string))
	Close()
}

// leaseManager holds the node's own lease and follows the peers'.
type leaseManager interface {
	// Acquire takes the node's lease, retrying transient failures.
	Acquire(ctx context.Context) (subnet.Lease, error)
	// Own is the lease held now; it changes when a lost lease is re-acquired.
	Own() subnet.Lease
	// Peers are every other lease, and whether they were read at least once.
	Peers() ([]subnet.Lease, bool)
	// Changed signals, coalesced, that Own or Peers changed.
	Changed() <-chan struct{}
	// Run follows peers and keeps the own lease until ctx ends.
	Run(ctx context.Context) error
	// Release gives the lease back (--release-on-exit).
	Release(ctx context.Context) error
}

// datapathReadyNotifier is implemented by lease managers that publish the
// node's readiness (the Kubernetes NetworkUnavailable condition).
type datapathReadyNotifier interface {
	DatapathReady(ctx context.Context) error
}

// etcdStore is the etcd datastore.
type etcdStore struct {
	reg *etcd.Registry
	ttl time.Duration
	log *slog.Logger
	cls func() error
}

func newEtcdStore(c Config, log *slog.Logger) (*etcdStore, error) {
	opts := c.Etcd
	opts.Log = log
	cli, err := etcd.NewClient(opts)
	if err != nil {
		return nil, err
	}
	return &etcdStore{reg: etcd.NewRegistry(cli, c.EtcdPrefix, log), ttl: c.LeaseTTL, log: log, cls: cli.Close}, nil
}

func (s *etcdStore) Close() { s.cls() }

func (s *etcdStore) Config(ctx context.Context, notReady func(string)) (*subnet.Config, error) {
	return waitFor(ctx, s.log, notReady, func() (*subnet.Config, string) {
		cfg, err := s.reg.Config(ctx)
		if err == nil {
			return cfg, ""
		}
		if errors.Is(err, etcd.ErrNoConfig) {
			return nil, fmt.Sprintf("waiting for the network config at %s (set it with `twillctl config set`)", s.reg.ConfigKey())
		}
		return nil, err.Error()
	})
}

func (s *etcdStore) Leases(cfg *subnet.Config, attrs subnet.LeaseAttrs, previous subnet.Lease) (leaseManager, error) {
	return &etcdLeases{Manager: etcd.NewManager(s.reg, etcd.AcquireRequest{Config: cfg, Attrs: attrs, TTL: s.ttl,
		Previous: previous.Subnet, PreviousIPv6: previous.IPv6Subnet})}, nil
}

func (s *etcdStore) Published(ctx context.Context, cfg *subnet.Config, attrs subnet.LeaseAttrs) (subnet.LeaseAttrs, bool) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	leases, _, err := s.reg.Leases(ctx)
	if err != nil {
		s.log.Debug("look for the lease published before", "err", err)
		return subnet.LeaseAttrs{}, false
	}
	v6 := !cfg.EnableIPv4
	own, _ := subnet.Lease{Attrs: attrs}.Family(v6)
	for _, l := range leases {
		if fl, ok := l.Family(v6); ok && fl.Attrs.PublicIP == own.Attrs.PublicIP &&
			(l.Attrs.NodeName == "" || attrs.NodeName == "" || l.Attrs.NodeName == attrs.NodeName) {
			return l.Attrs, true
		}
	}
	return subnet.LeaseAttrs{}, false
}

// etcdLeases adapts etcd.Manager to leaseManager.
type etcdLeases struct{ *etcd.Manager }

func (e *etcdLeases) Acquire(ctx context.Context) (subnet.Lease, error) {
	a, err := e.Manager.Acquire(ctx)
	if err != nil {
		return subnet.Lease{}, err
	}
	return a.Lease(), nil
}

func (e *etcdLeases) Own() subnet.Lease { return e.Manager.Own().Lease() }

// waitFor polls get until it returns a config, reporting each new reason for
// waiting once in the log and every time through notReady.
func waitFor(ctx context.Context, log *slog.Logger, notReady func(string), get func() (*subnet.Config, string)) (*subnet.Config, error) {
	last := ""
	bo := retry.Backoff{Min: 500 * time.Millisecond, Max: 5 * time.Second}
	for {
		cfg, reason := get()
		if cfg != nil {
			log.Info("network config", "network", cfg.Network, "subnetLen", cfg.SubnetLen, "ipv6Network", cfg.IPv6Network, "ipv6SubnetLen", cfg.IPv6SubnetLen, "backend", cfg.Backend.Type)
			return cfg, nil
		}
		notReady(reason)
		if reason != last {
			log.Warn("not starting yet", "reason", reason)
			last = reason
		}
		if err := bo.Wait(ctx); err != nil {
			return nil, err
		}
	}
}

// watchUp follows the state of the etcd connection, with no requests of its
// own. With several endpoints the connection is up while any member is.
func (s *etcdStore) watchUp(ctx context.Context, report func(up bool, state string)) {
	conn := s.reg.Client().ActiveConnection()
	for {
		st := conn.GetState()
		report(st == connectivity.Ready, st.String())
		if !conn.WaitForStateChange(ctx, st) {
			return
		}
	}
}
