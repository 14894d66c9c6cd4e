// Package daemon is twilld: it leases the node's subnet, writes the subnet
// env file, and keeps the datapath equal to the desired state.
//
// The shape is level-triggered. The lease manager feeds one cache of all
// leases. At start and on every resync tick the daemon hands the whole
// picture to the backend, which diffs it against the kernel: the full pass,
// which also repairs drift. Whenever the cache signals a change (a burst of
// changes is one signal), the daemon compares a snapshot with the leases of
// the last good pass and has the backend program just the peers that
// differ, on top of what it last wrote; anything that pass cannot decide
// alone (a lease to skip, a clash, a failed write) takes the full pass at
// once. Nothing here acts on the content of an individual event.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/twillnet/twill/internal/daemon/iface"
	"github.com/twillnet/twill/internal/daemon/masq"
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
	if err := subnet.CheckPublicIP(publicIP, false); err != nil {
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
	be, err := newBackend(cfg.Backend, ext, nl, log)
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
		if d.ipt, err = masq.NewIPTables(false); err != nil {
			return fmt.Errorf("--ip-masq: %w", err)
		}
	} else {
		// Rules of an earlier run with --ip-masq must not outlive it.
		// Looking for them runs iptables several times (10-20 ms), so it
		// happens beside the env file and the first pass, not before.
		done := make(chan struct{})
		go func() {
			defer close(done)
			if ipt, err := masq.NewIPTables(false); err == nil {
				if err := masq.Cleanup(ctx, ipt); err != nil && ctx.Err() == nil {
					log.Warn("remove masquerade rules of an earlier run", "err", err)
				}
			}
		}()
		defer func() { <-done }()
	}
	if err := d.writeEnv(own); err != nil {
		return err
	}

	if err := d.run(ctx); err != nil {
		return err
	}

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
	be  Backend
	mgr leaseManager
	met *metrics
	hl  *health
	log *slog.Logger
	mtu int

	policy  subnet.PeerPolicy
	skipped map[string]bool // "subnet reason" of the leases skipped in the last pass

	envSubnet  netip.Prefix // the subnet the env file names
	programmed bool         // a pass succeeded once: the node is ready
	announced  bool         // DatapathReady was reported

	// The inputs of the last good pass, to tell what a pass must change:
	good     bool                        // the last pass succeeded
	knownOwn subnet.Lease                // its own lease
	known    map[netip.Prefix]knownLease // its peer leases, unfiltered
	epoch    uint64                      // counts calls of changes
	filter   *subnet.PeerFilter          // its admitted peers; nil when a lease was skipped

	ipt         masq.IPTables // nil without --ip-masq
	rules       *masq.Manager
	rulesSubnet netip.Prefix // the subnet rules was made for
	// retiredRuleWrites are the writes of rule managers replaced after a
	// subnet change, so ruleWrites never goes backwards.
	retiredRuleWrites uint64
}

// run follows the datastore and programs the datapath until ctx ends. A
// lease manager that stops before that ends the run with its error, so that
// twilld exits and is restarted rather than serving a frozen view.
func (d *daemon) run(ctx context.Context) error {
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 1)
	go func() {
		errc <- d.mgr.Run(runCtx)
		cancel()
	}()
	d.loop(runCtx)
	cancel()
	err := <-errc
	if ctx.Err() != nil {
		return nil
	}
	if err == nil {
		err = errors.New("stopped")
	}
	return fmt.Errorf("following the datastore: %w", err)
}

// loop runs a full pass at start and on every resync tick, and a pass over
// what changed after every change signal.
func (d *daemon) loop(ctx context.Context) {
	tick := time.NewTicker(d.c.ResyncInterval)
	defer tick.Stop()
	full := true
	for {
		d.pass(ctx, full)
		select {
		case <-ctx.Done():
			return
		case <-d.mgr.Changed():
			full = false
		case <-tick.C:
			full = true
		}
	}
}

// maxIncremental is the most peer changes a pass programs one by one; a
// larger burst takes the full pass.
const maxIncremental = 128

// pass is one reconcile: the env file follows the own lease, the datapath
// follows all leases. A full pass reads the kernel and programs every peer;
// after a change signal, when the last pass succeeded and only a few peers
// changed, only those peers are programmed (see Backend.Update).
func (d *daemon) pass(ctx context.Context, full bool) {
	own := d.mgr.Own()
	if own.Subnet != d.envSubnet {
		if err := d.writeEnv(own); err != nil {
			d.log.Error("write subnet env file", "err", err)
		}
		d.met.leaseAcquired.Inc()
	}
	peers, synced := d.mgr.Peers()
	if !synced {
		// Reconciling against an empty peer list would tear down every
		// peer's entries until the first listing arrives.
		d.ensureRules(ctx, own.Subnet)
		return
	}
	changed, removed, dup := d.changes(peers)
	ownSame := d.good && subnet.SameLease(own, d.knownOwn)
	nothing := ownSame && !dup && len(changed) == 0 && len(removed) == 0
	if !full && nothing {
		return
	}
	if !full && ownSame && !dup && d.filter != nil && len(changed)+len(removed) <= maxIncremental {
		if d.update(ctx, own, changed, removed) {
			return
		}
	}
	d.reconcile(ctx, own, peers, nothing)
}

// update programs the changed peers only. It returns false when a full pass
// must follow: a changed lease FilterPeers would skip, a backend that
// declines, or a write that failed.
func (d *daemon) update(ctx context.Context, own subnet.Lease, changed []subnet.Lease, removed []netip.Prefix) bool {
	f := d.filter
	d.filter = nil // until this pass succeeds: the filter is changed below
	for _, sn := range removed {
		f.Drop(sn)
	}
	for _, l := range changed {
		if _, had := d.known[l.Subnet]; had {
			f.Drop(l.Subnet)
		}
	}
	for _, l := range changed {
		if reason := f.Admit(l); reason != "" {
			return false // the full pass skips it, and logs why
		}
	}
	start := time.Now()
	ok, err := d.be.Update(ctx, own, changed, removed)
	if !ok {
		return false
	}
	if err != nil {
		if ctx.Err() == nil {
			d.log.Warn("updating the changed peers failed; running a full pass", "changed", len(changed), "removed", len(removed), "err", err)
		}
		return false
	}
	took := time.Since(start)
	for _, sn := range removed {
		delete(d.known, sn)
	}
	for _, l := range changed {
		d.known[l.Subnet] = knownLease{Lease: l, seen: d.epoch}
	}
	d.filter = f
	d.observe(took, len(d.known))
	d.met.incrementals.Inc()
	d.met.reconciles.WithLabelValues("ok").Inc()
	d.announce(ctx)
	d.log.Debug("updated peers", "changed", len(changed), "removed", len(removed), "took", took)
	return true
}

// reconcile is the full pass. unchanged says no lease changed since the
// last good pass, so whatever it writes is drift it repairs.
func (d *daemon) reconcile(ctx context.Context, own subnet.Lease, all []subnet.Lease, unchanged bool) {
	rulesBefore := d.ruleWrites()
	d.ensureRules(ctx, own.Subnet)
	peers := d.admit(own, all)
	before := d.be.Counters()
	start := time.Now()
	err := d.be.Reconcile(ctx, own, peers)
	took := time.Since(start)
	d.observe(took, len(peers))
	if unchanged {
		w := d.be.Counters().Sub(before)
		d.met.repairs.WithLabelValues("route").Add(float64(w.Routes))
		d.met.repairs.WithLabelValues("fdb").Add(float64(w.FDB))
		d.met.repairs.WithLabelValues("neigh").Add(float64(w.Neighs))
		d.met.repairs.WithLabelValues("device").Add(float64(w.Devices))
		d.met.repairs.WithLabelValues("rule").Add(float64(d.ruleWrites() - rulesBefore))
	}
	d.filter = nil
	if err != nil {
		d.good = false
		if ctx.Err() != nil {
			return
		}
		d.met.reconciles.WithLabelValues("error").Inc()
		d.log.Error("reconcile datapath", "peers", len(peers), "err", err)
		return
	}
	d.met.reconciles.WithLabelValues("ok").Inc()
	d.good, d.knownOwn = true, own
	clear(d.known)
	if d.known == nil {
		d.known = make(map[netip.Prefix]knownLease, len(all))
	}
	for _, l := range all {
		d.known[l.Subnet] = knownLease{Lease: l}
	}
	if len(d.skipped) == 0 && len(d.known) == len(all) {
		d.filter = subnet.NewPeerFilter(d.policy, own, peers)
	}
	d.announce(ctx)
	d.log.Debug("reconciled", "peers", len(peers), "took", took)
}

func (d *daemon) observe(took time.Duration, peers int) {
	d.met.reconcileTime.Observe(took.Seconds())
	d.met.lastDuration.Set(took.Seconds())
	d.met.lastReconcile.SetToCurrentTime()
	d.met.peers.WithLabelValues(d.cfg.Backend.Type).Set(float64(peers))
}

// announce makes the node ready after its first good pass (twill_ready,
// /readyz) and tells the datastore that the node's network is up.
func (d *daemon) announce(ctx context.Context) {
	if !d.programmed {
		d.programmed = true
		d.met.ready.Set(1)
		d.hl.set("")
	}
	if d.announced {
		return
	}
	if n, ok := d.mgr.(datapathReadyNotifier); ok {
		if err := n.DatapathReady(ctx); err != nil {
			d.log.Warn("report the datapath ready", "err", err)
			return
		}
	}
	d.announced = true
}

// knownLease is a lease of the last good pass, with the call of changes
// that last found it among the peers.
type knownLease struct {
	subnet.Lease
	seen uint64
}

// changes compares peers with the leases of the last good pass. dup says
// that two peers share a subnet the last pass knew (Kubernetes: two Nodes
// with one podCIDR); which one wins is the full pass's to decide.
func (d *daemon) changes(peers []subnet.Lease) (changed []subnet.Lease, removed []netip.Prefix, dup bool) {
	d.epoch++
	seen := 0
	for _, l := range peers {
		k, ok := d.known[l.Subnet]
		switch {
		case !ok:
		case k.seen == d.epoch:
			dup = true
		default:
			k.seen = d.epoch
			d.known[l.Subnet] = k
			seen++
			if subnet.SameLease(k.Lease, l) {
				continue
			}
		}
		changed = append(changed, l)
	}
	if seen == len(d.known) {
		return changed, nil, dup
	}
	for sn, k := range d.known {
		if k.seen != d.epoch {
			removed = append(removed, sn)
		}
	}
	return changed, removed, dup
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

func (d *daemon) writeEnv(own subnet.Lease) error {
	env := subnet.NewEnv(d.cfg, own, d.mtu, d.c.IPMasq)
	if err := subnet.WriteEnv(d.c.SubnetFile, env); err != nil {
		return err
	}
	d.envSubnet = own.Subnet
	d.met.envFileWrites.Inc()
	if !d.programmed {
		d.hl.set("programming the datapath")
	}
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
	if env.Network != cfg.Network || !cfg.Range(false).Contains(p) {
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
