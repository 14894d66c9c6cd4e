// Package daemon is twilld: it leases the node's subnet, writes the subnet
// env file, and keeps the datapath equal to the desired state.
//
// The shape is level-triggered. The lease manager feeds one cache of all
// leases; whenever it signals a change (a burst of changes is one signal),
// and on every resync tick, the daemon takes a snapshot and hands the whole
// picture to the backend, which diffs it against the kernel. Nothing here
// acts on the content of an individual event.
package daemon

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/twillnet/twill/backend"
	"github.com/twillnet/twill/internal/iface"
	"github.com/twillnet/twill/internal/masq"
	"github.com/twillnet/twill/subnet"
	"github.com/twillnet/twill/subnet/etcd"
)

// Config is everything twilld is told on its command line.
type Config struct {
	Etcd       etcd.ClientOptions
	EtcdPrefix string
	Iface      string     // name or address; "" = the default route's interface
	PublicIP   netip.Addr // what peers reach this node at; zero = the interface's address
	// PeerPublicIPs, when not empty, are the only networks peers' public IPs
	// may be in (--public-ip-cidr); other leases are skipped.
	PeerPublicIPs  []netip.Prefix
	SubnetFile     string
	IPMasq         bool
	LeaseTTL       time.Duration
	ResyncInterval time.Duration
	HTTPAddr       string
	ReleaseOnExit  bool
	NodeName       string

	// Kubernetes mode: the lease is the Node's podCIDR.
	KubeSubnetMgr        bool
	Kubeconfig           string // "" = in-cluster config
	NetConfig            string // net-conf.json file
	KubeAnnotationPrefix string
	SetNodeCondition     bool // NetworkUnavailable=False once the datapath is up
}

// Run runs twilld until ctx ends. On a clean stop the lease is kept (pods go
// on running and a restart finds the same subnet) unless ReleaseOnExit is set.
func Run(ctx context.Context, c Config, log *slog.Logger) error {
	if c.LeaseTTL <= 0 || c.ResyncInterval <= 0 {
		return errors.New("lease TTL and resync interval must be positive")
	}
	nl, err := netlink.NewHandle()
	if err != nil {
		return fmt.Errorf("open netlink: %w", err)
	}
	defer nl.Close()
	ext, err := iface.Resolve(ctx, nl, c.Iface)
	if err != nil {
		return fmt.Errorf("find the external interface: %w", err)
	}
	publicIP := c.PublicIP
	if !publicIP.IsValid() {
		publicIP = ext.Addr
	}
	if err := subnet.CheckPublicIP(publicIP); err != nil {
		return fmt.Errorf("public IP: %w; give one with --public-ip or --iface", err)
	}
	if len(c.PeerPublicIPs) > 0 && !slices.ContainsFunc(c.PeerPublicIPs, func(p netip.Prefix) bool { return p.Contains(publicIP) }) {
		return fmt.Errorf("this node's public IP %s is outside --public-ip-cidr %v: its peers would skip it", publicIP, c.PeerPublicIPs)
	}
	log.Info("using interface", "iface", ext.Name, "addr", ext.Addr, "public-ip", publicIP, "mtu", ext.MTU)

	var store datastore
	if c.KubeSubnetMgr {
		store, err = newKubeStore(c, log)
	} else {
		store, err = newEtcdStore(c, log)
	}
	if err != nil {
		return err
	}
	defer store.Close()

	met := newMetrics()
	hl := &health{notReady: "waiting for the network config"}
	addr, stopHTTP, err := serveHTTP(ctx, c.HTTPAddr, hl, met)
	if err != nil {
		return err
	}
	defer stopHTTP()
	log.Info("serving /healthz, /readyz and /metrics", "addr", addr.String())
	go store.watchUp(ctx, datastoreReporter(met, hl, log))

	cfg, err := store.Config(ctx, hl.set)
	if err != nil {
		return err
	}
	be, err := backend.New(cfg.Backend, ext, nl, log)
	if err != nil {
		return err
	}
	met.registerKernelWrites(be.Counters)
	data, mtu, err := be.Prepare(ctx)
	if err != nil {
		return fmt.Errorf("prepare the %s backend: %w", cfg.Backend.Type, err)
	}

	hl.set("acquiring a lease")
	attrs := subnet.LeaseAttrs{PublicIP: publicIP, BackendType: cfg.Backend.Type, BackendData: data, NodeName: c.NodeName}
	mgr, err := store.Leases(cfg, attrs, previousSubnet(c.SubnetFile, cfg, log))
	if err != nil {
		return err
	}
	own, err := mgr.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("lease a subnet: %w", err)
	}
	met.leaseAcquired.Inc()
	if st, ok := mgr.(interface{ Stats() etcd.Stats }); ok {
		// The etcd manager counts acquisitions itself, re-acquisitions of
		// the same subnet included, which the daemon cannot see.
		met.registerLeaseStats(st.Stats)
	} else {
		met.reg.MustRegister(met.leaseAcquired)
	}
	log.Info("lease acquired", "subnet", own.Subnet)

	if err := masq.EnableIPForward(); err != nil {
		// A container without a writable /proc/sys cannot; the host usually
		// has it on already (kubelet and kube-proxy want it too).
		log.Error("IPv4 forwarding is off and cannot be turned on; pods on other nodes are unreachable until it is (sysctl -w net.ipv4.ip_forward=1)", "err", err)
	}
	d := &daemon{c: c, cfg: cfg, be: be, mgr: mgr, met: met, hl: hl, log: log, mtu: mtu,
		policy: subnet.PeerPolicy{Network: cfg.Network, PublicIPs: c.PeerPublicIPs}}
	if c.IPMasq {
		if d.ipt, err = masq.NewIPTables(); err != nil {
			return fmt.Errorf("--ip-masq: %w", err)
		}
	} else if ipt, err := masq.NewIPTables(); err == nil {
		// Rules of an earlier run with --ip-masq must not outlive it.
		if err := masq.Cleanup(ctx, ipt); err != nil {
			log.Warn("remove masquerade rules of an earlier run", "err", err)
		}
	}
	if err := d.writeEnv(own.Subnet); err != nil {
		return err
	}

	runCtx, cancel := context.WithCancel(ctx)
	mgrDone := make(chan struct{})
	go func() { defer close(mgrDone); mgr.Run(runCtx) }()
	d.loop(runCtx)
	cancel()
	<-mgrDone

	if c.ReleaseOnExit {
		rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := mgr.Release(rctx); err != nil {
			return err
		}
		log.Info("lease released", "subnet", mgr.Own().Subnet)
	} else {
		log.Info("stopping; the lease is kept", "subnet", mgr.Own().Subnet)
	}
	return nil
}

type daemon struct {
	c   Config
	cfg *subnet.Config
	be  backend.Backend
	mgr leaseManager
	met *metrics
	hl  *health
	log *slog.Logger
	mtu int

	policy  subnet.PeerPolicy
	skipped map[string]bool // "subnet reason" of the leases skipped in the last pass

	envSubnet  netip.Prefix // the subnet the env file names
	announced  bool         // DatapathReady was reported
	lastInputs [32]byte     // fingerprint of the leases of the last good pass

	ipt         masq.IPTables // nil without --ip-masq
	rules       *masq.Manager
	rulesSubnet netip.Prefix // the subnet rules was made for
	// retiredRuleWrites are the writes of rule managers replaced after a
	// subnet change, so ruleWrites never goes backwards.
	retiredRuleWrites uint64
}

// loop reconciles after every change signal and every resync tick.
func (d *daemon) loop(ctx context.Context) {
	tick := time.NewTicker(d.c.ResyncInterval)
	defer tick.Stop()
	for {
		d.pass(ctx)
		select {
		case <-ctx.Done():
			return
		case <-d.mgr.Changed():
		case <-tick.C:
		}
	}
}

// pass is one reconcile: the env file follows the own lease, the datapath
// follows all leases.
func (d *daemon) pass(ctx context.Context) {
	own := d.mgr.Own()
	if own.Subnet != d.envSubnet {
		if err := d.writeEnv(own.Subnet); err != nil {
			d.log.Error("write subnet env file", "err", err)
		}
		d.met.leaseAcquired.Inc()
	}
	rulesBefore := d.ruleWrites()
	d.ensureRules(ctx, own.Subnet)
	peers, synced := d.mgr.Peers()
	if !synced {
		// Reconciling against an empty peer list would tear down every
		// peer's entries until the first listing arrives.
		return
	}
	peers = d.admit(own, peers)
	inputs := fingerprint(own, peers)
	before := d.be.Counters()
	start := time.Now()
	err := d.be.Reconcile(ctx, own, peers)
	took := time.Since(start)
	d.met.reconcileTime.Observe(took.Seconds())
	d.met.lastDuration.Set(took.Seconds())
	d.met.lastReconcile.SetToCurrentTime()
	d.met.peers.WithLabelValues(d.cfg.Backend.Type).Set(float64(len(peers)))
	if inputs == d.lastInputs {
		// Nothing twill knows of changed since the last good pass, so
		// whatever had to be written was drift.
		w := d.be.Counters().Sub(before)
		d.met.repairs.WithLabelValues("route").Add(float64(w.Routes))
		d.met.repairs.WithLabelValues("fdb").Add(float64(w.FDB))
		d.met.repairs.WithLabelValues("neigh").Add(float64(w.Neighs))
		d.met.repairs.WithLabelValues("device").Add(float64(w.Devices))
		d.met.repairs.WithLabelValues("rule").Add(float64(d.ruleWrites() - rulesBefore))
	}
	if err != nil {
		if ctx.Err() != nil {
			return
		}
		d.met.reconciles.WithLabelValues("error").Inc()
		d.log.Error("reconcile datapath", "peers", len(peers), "err", err)
		return
	}
	d.met.reconciles.WithLabelValues("ok").Inc()
	d.lastInputs = inputs
	if !d.announced {
		// The first good pass: tell the datastore the node's network is up.
		if n, ok := d.mgr.(datapathReadyNotifier); ok {
			if err := n.DatapathReady(ctx); err != nil {
				d.log.Warn("report the datapath ready", "err", err)
				return
			}
		}
		d.announced = true
	}
	d.log.Debug("reconciled", "peers", len(peers), "took", time.Since(start))
}

// admit drops the peer leases that must not be programmed (FilterPeers:
// outside the network, overlapping, a public IP not allowed). Each skipped
// lease is logged once, when it first appears or its reason changes.
func (d *daemon) admit(own subnet.Lease, peers []subnet.Lease) []subnet.Lease {
	kept, skipped := subnet.FilterPeers(d.policy, own, peers)
	d.met.peersSkipped.Set(float64(len(skipped)))
	now := make(map[string]bool, len(skipped))
	for _, s := range skipped {
		key := s.Lease.Subnet.String() + " " + s.Reason
		now[key] = true
		if !d.skipped[key] {
			d.log.Warn("skipping a peer lease", "subnet", s.Lease.Subnet, "public-ip", s.Lease.Attrs.PublicIP, "node", s.Lease.Attrs.NodeName, "reason", s.Reason)
		}
	}
	d.skipped = now
	return kept
}

// ensureRules keeps the masquerade rules (with --ip-masq) for the own subnet.
func (d *daemon) ensureRules(ctx context.Context, own netip.Prefix) {
	if d.ipt == nil {
		return
	}
	if d.rules == nil || d.rulesSubnet != own {
		r, err := masq.New(d.ipt, masq.Config{Network: d.cfg.Network, Subnet: own}, d.log)
		if err != nil {
			d.log.Error("masquerade rules", "err", err)
			return
		}
		if d.rules != nil {
			d.retiredRuleWrites += d.rules.Writes()
		}
		d.rules, d.rulesSubnet = r, own
	}
	if err := d.rules.Ensure(ctx); err != nil && ctx.Err() == nil {
		d.log.Error("ensure masquerade rules", "err", err)
	}
}

func (d *daemon) writeEnv(p netip.Prefix) error {
	env := subnet.NewEnv(d.cfg.Network, p, d.mtu, d.c.IPMasq)
	if err := subnet.WriteEnv(d.c.SubnetFile, env); err != nil {
		return err
	}
	d.envSubnet = p
	d.met.envFileWrites.Inc()
	d.met.ready.Set(1)
	d.hl.set("")
	d.log.Info("wrote subnet env file", "path", d.c.SubnetFile, "subnet", env.Subnet, "mtu", env.MTU)
	return nil
}

// datastoreReporter turns the datastore's reachability into
// twill_datastore_up and /readyz. An outage is logged once when it starts and
// once when it ends, however often the connection changes state in between.
func datastoreReporter(met *metrics, hl *health, log *slog.Logger) func(up bool, state string) {
	var (
		registered bool
		everUp     bool      // start-up is not an outage
		down       time.Time // when the outage began; zero while up
	)
	return func(up bool, state string) {
		if !registered {
			// Only a datastore that reports exports the gauge.
			met.reg.MustRegister(met.datastoreUp)
			registered = true
		}
		switch {
		case up:
			met.datastoreUp.Set(1)
			hl.setDatastore("")
			if !down.IsZero() && everUp {
				log.Info("datastore reachable again", "unreachable-for", time.Since(down).Round(time.Millisecond))
			}
			down, everUp = time.Time{}, true
		default:
			met.datastoreUp.Set(0)
			first := down.IsZero()
			if first {
				down = time.Now()
			}
			hl.setDatastore(fmt.Sprintf("datastore unreachable since %s (connection %s); the datapath and the pods are kept as they are",
				down.UTC().Format(time.RFC3339), state))
			if first && everUp {
				log.Warn("datastore unreachable; keeping the datapath as it is", "connection", state)
			}
		}
	}
}

// previousSubnet is the subnet of an existing env file, if it fits the network.
func previousSubnet(path string, cfg *subnet.Config, log *slog.Logger) netip.Prefix {
	env, err := subnet.ReadEnv(path)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			log.Warn("ignoring unreadable subnet env file", "path", path, "err", err)
		}
		return netip.Prefix{}
	}
	p := env.Subnet.Masked()
	if env.Network != cfg.Network || !cfg.Contains(p) {
		return netip.Prefix{}
	}
	return p
}

// ruleWrites counts the iptables writes of the rule managers so far.
func (d *daemon) ruleWrites() uint64 {
	if d.rules == nil {
		return d.retiredRuleWrites
	}
	return d.retiredRuleWrites + d.rules.Writes()
}

// fingerprint identifies the inputs of a reconcile pass: the own lease and
// every peer's, in a fixed order.
func fingerprint(own subnet.Lease, peers []subnet.Lease) [32]byte {
	byPrefix := func(a, b subnet.Lease) int { return subnet.ComparePrefix(a.Subnet, b.Subnet) }
	sorted := peers
	if !slices.IsSortedFunc(peers, byPrefix) { // FilterPeers already sorts them
		sorted = slices.SortedFunc(slices.Values(peers), byPrefix)
	}
	h := sha256.New()
	buf := make([]byte, 0, 256)
	for _, l := range append([]subnet.Lease{own}, sorted...) {
		// Fixed-size binary fields and length-prefixed strings: no
		// formatting, and no two inputs encode alike.
		buf = append(buf[:0], l.Subnet.Addr().AsSlice()...)
		buf = append(buf, byte(l.Subnet.Bits()))
		buf = append(buf, l.Attrs.PublicIP.AsSlice()...)
		buf = binary.AppendUvarint(buf, uint64(len(l.Attrs.BackendType)))
		buf = append(buf, l.Attrs.BackendType...)
		buf = binary.AppendUvarint(buf, uint64(len(l.Attrs.BackendData)))
		buf = append(buf, l.Attrs.BackendData...)
		h.Write(buf)
	}
	var sum [32]byte
	copy(sum[:], h.Sum(nil))
	return sum
}
