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
	"os/exec"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/backend/vxlan"
	"github.com/twillnet/twill/backend/wireguard"
	"github.com/twillnet/twill/internal/daemon/iface"
	"github.com/twillnet/twill/internal/daemon/masq"
	"github.com/twillnet/twill/subnet"
	"github.com/twillnet/twill/subnet/etcd"
	"github.com/twillnet/twill/subnet/kube"
)

// Config is everything twilld is told on its command line.
type Config struct {
	Etcd       etcd.ClientOptions
	EtcdPrefix string
	Iface      iface.Selector // --iface, --iface-regex, --iface-can-reach
	PublicIP   netip.Addr     // what peers reach this node at over IPv4; zero = the interface's address
	PublicIPv6 netip.Addr     // the same over IPv6 (--public-ipv6)
	// PeerPublicIPs, when not empty, are the only networks peers' public IPs
	// may be in (--public-ip-cidr, both families); other leases are skipped.
	PeerPublicIPs []netip.Prefix
	SubnetFile    string
	// FlannelSubnetFile, when set, is a second env file in flannel's
	// format (FLANNEL_ keys), for flannel's CNI plugin during a migration.
	FlannelSubnetFile string
	IPMasq            bool
	// WireGuardKeyFile holds the node's WireGuard private key (wireguard
	// backend; wireguard.DefaultKeyFile when empty).
	WireGuardKeyFile string
	LeaseTTL         time.Duration
	ResyncInterval   time.Duration
	HTTPAddr         string
	// SecureMetricsAddr, when set, serves /metrics a second time there,
	// over TLS (SecureMetricsCertFile and KeyFile, or a self-signed
	// certificate), to bearer tokens the Kubernetes API server accepts
	// and allows to get /metrics.
	SecureMetricsAddr     string
	SecureMetricsCertFile string
	SecureMetricsKeyFile  string
	ReleaseOnExit         bool
	NodeName              string

	// Kubernetes mode: the lease is the Node's podCIDR.
	KubeSubnetMgr        bool
	Kubeconfig           string // "" = in-cluster config
	NetConfig            string // net-conf.json file
	KubeAnnotationPrefix string
	SetNodeCondition     bool      // NetworkUnavailable=False once the datapath is up
	KubeMode             kube.Mode // "" means kube.ModeNodeNetwork
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
	if ks, ok := store.(*kubeStore); ok {
		ks.events = func(resource string) { met.kubeEvents.WithLabelValues(resource).Inc() }
		for _, r := range []string{kube.ResourceNodes, kube.Resource} {
			met.kubeEvents.WithLabelValues(r)
		}
	}
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
	if ks, ok := store.(*kubeStore); ok {
		v4, v6, err := ks.nodePublicIPs(ctx)
		if err != nil {
			return fmt.Errorf("public address from the Node: %w", err)
		}
		for _, a := range []struct {
			ip netip.Addr
			to *netip.Addr
		}{{v4, &c.PublicIP}, {v6, &c.PublicIPv6}} {
			if a.ip.IsValid() {
				log.Info("public address from the Node's annotation", "addr", a.ip)
				*a.to = a.ip
			}
		}
	}
	ext, err := iface.Resolve(ctx, nl, c.Iface, cfg.EnableIPv4, cfg.EnableIPv6)
	if err != nil {
		return fmt.Errorf("find the external interface: %w", err)
	}
	d := &daemon{c: c, cfg: cfg, met: met, hl: hl, log: log}
	attrs := subnet.LeaseAttrs{BackendType: cfg.Backend.Type, NodeName: c.NodeName}
	allowed := map[bool][]netip.Prefix{}
	for _, v6 := range cfg.Families() {
		e := ext.Get(v6)
		public := c.PublicIP
		if v6 {
			public = c.PublicIPv6
		}
		if !public.IsValid() {
			public = e.Addr
		}
		if err := subnet.CheckPublicIP(public, v6); err != nil {
			flag := map[bool]string{false: "--public-ip", true: "--public-ipv6"}[v6]
			return fmt.Errorf("public %s address: %w; give one with %s or --iface", subnet.FamilyName(v6), err, flag)
		}
		allowed[v6] = familyPrefixes(c.PeerPublicIPs, v6)
		if len(c.PeerPublicIPs) > 0 && len(allowed[v6]) == 0 {
			return fmt.Errorf("--public-ip-cidr %v has no %s network, and the network config enables %s: add the %s network the nodes' addresses are in", c.PeerPublicIPs, subnet.FamilyName(v6), subnet.FamilyName(v6), subnet.FamilyName(v6))
		}
		if len(allowed[v6]) > 0 && !slices.ContainsFunc(allowed[v6], func(p netip.Prefix) bool { return p.Contains(public) }) {
			return fmt.Errorf("this node's public IP %s is outside --public-ip-cidr %v: its peers would skip it", public, c.PeerPublicIPs)
		}
		if v6 {
			attrs.PublicIPv6 = public
		} else {
			attrs.PublicIP = public
		}
		log.Info("using interface", "family", subnet.FamilyName(v6), "iface", e.Name, "addr", e.Addr, "public-ip", public, "mtu", e.MTU)
	}
	if c.SecureMetricsAddr != "" {
		if !c.KubeSubnetMgr && c.Kubeconfig == "" {
			return errors.New("--secure-metrics-addr checks tokens with the Kubernetes API server: it needs --kube-subnet-mgr or --kubeconfig")
		}
		rc, err := kubeRESTConfig(c)
		if err != nil {
			return err
		}
		rv, err := newReviewer(rc, log)
		if err != nil {
			return err
		}
		addr, stop, err := serveSecureMetrics(c.SecureMetricsAddr, c.SecureMetricsCertFile, c.SecureMetricsKeyFile, c.NodeName,
			[]netip.Addr{attrs.PublicIP, attrs.PublicIPv6, ext.V4.Addr, ext.V6.Addr}, rv, met)
		if err != nil {
			return err
		}
		defer stop()
		log.Info("serving /metrics over TLS to tokens allowed to get it", "addr", addr.String())
	}
	// What the node published before (its lease, its Node), so that a
	// device made again after a reboot carries the MAC peers know. Read
	// once, and only if a backend has to make its device.
	published := sync.OnceValues(func() (subnet.LeaseAttrs, bool) { return store.Published(ctx, cfg, attrs) })
	wg := wireguard.Options{KeyFile: c.WireGuardKeyFile}
	if cfg.Backend.Type == subnet.BackendWireGuard && cfg.Backend.Mode != wireguard.ModeSeparate {
		wg.Joint = wireguard.NewJoint(cfg.Backend.Mode)
	}
	for _, v6 := range cfg.Families() {
		be, err := newBackend(cfg.Backend, ext.Get(v6), nl, log, wg)
		if err != nil {
			return err
		}
		if vx, ok := be.(*vxlan.Backend); ok {
			vx.PublishedMAC(func() (dataplane.MAC, bool) {
				prev, ok := published()
				data := prev.BackendData
				if v6 {
					data = prev.BackendV6Data
				}
				d, err := vxlan.ParseData(data)
				if !ok || prev.BackendType != subnet.BackendVXLAN || err != nil || d.VNI != cfg.Backend.VNI {
					return dataplane.MAC{}, false
				}
				return d.VtepMAC, true
			})
		}
		data, mtu, err := be.Prepare(ctx)
		if err != nil {
			return fmt.Errorf("prepare the %s backend for %s: %w", cfg.Backend.Type, subnet.FamilyName(v6), err)
		}
		if d.mtu == 0 || mtu < d.mtu {
			// One pod MTU for both families: the smaller.
			d.mtu = mtu
		}
		if v6 {
			attrs.BackendV6Data = data
		} else {
			attrs.BackendData = data
		}
		d.planes = append(d.planes, &plane{d: d, v6: v6, be: be,
			policy: subnet.PeerPolicy{Network: cfg.Range(v6).Network, PublicIPs: allowed[v6]}})
	}
	if cfg.EnableIPv6 && d.mtu < 1280 {
		return fmt.Errorf("the pod MTU would be %d, below the 1280 IPv6 needs: the external interface's MTU is too small for an IPv6 network", d.mtu)
	}
	if !cfg.EnableIPv4 {
		// flannel's IPv6-only leases say so; its readers need a valid IPv4.
		attrs.PublicIP = netip.IPv4Unspecified()
	}
	met.registerPlanes(d.planes)

	hl.set("acquiring a lease")
	mgr, err := store.Leases(cfg, attrs, previousLease(c.SubnetFile, cfg, log))
	if err != nil {
		return err
	}
	d.mgr = mgr
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
	log.Info("lease acquired", "subnet", own.Subnet, "ipv6-subnet", own.IPv6Subnet)

	for _, p := range d.planes {
		enable := masq.EnableIPForward
		if p.v6 {
			enable = masq.EnableIPv6Forward
		}
		if err := enable(); err != nil {
			// A container without a writable /proc/sys cannot; the host usually
			// has it on already (kubelet and kube-proxy want it too), and the
			// bridge plugin turns it on at the node's first pod (the
			// delegate's isDefaultGateway, as in twill's conflist): seen on a
			// fresh node under the DaemonSet, whose pods then talked.
			log.Warn("forwarding is off and twilld cannot turn it on; traffic between pods of different nodes needs it: "+
				"the bridge plugin turns it on when the node's first pod is added (isDefaultGateway), or set it on the node (sysctl net.ipv4.ip_forward=1, net.ipv6.conf.all.forwarding=1)",
				"family", subnet.FamilyName(p.v6), "err", err)
		}
	}
	if c.IPMasq {
		var why string
		d.rulesMode, why = masq.ChooseMode(cfg.EnableNFTables, cfg.Families(), exec.LookPath)
		log.Info("masquerade rules", "mode", d.rulesMode, "why", why)
		if d.rules, err = masq.NewKeeper(d.rulesMode, cfg.Families(), log); err != nil {
			return fmt.Errorf("--ip-masq: %w", err)
		}
		for _, p := range d.planes {
			met.repairs.WithLabelValues(string(d.rulesMode), familyLabel(p.v6))
		}
	}
	// Rules of an earlier run that must not outlive it (--ip-masq off, the
	// other mode, or a family the network no longer has) are removed.
	// Looking for them runs iptables several times (10-20 ms), so it
	// happens beside the env file and the first pass, not before.
	done := make(chan struct{})
	go func() {
		defer close(done)
		d.removeOtherRules(ctx)
	}()
	defer func() { <-done }()
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
		log.Info("lease released", "subnet", mgr.Own().Subnet, "ipv6-subnet", mgr.Own().IPv6Subnet)
	} else {
		log.Info("stopping; the lease is kept", "subnet", mgr.Own().Subnet, "ipv6-subnet", mgr.Own().IPv6Subnet)
	}
	return nil
}

func familyPrefixes(ps []netip.Prefix, v6 bool) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range ps {
		if p.Addr().Is6() == v6 {
			out = append(out, p)
		}
	}
	return out
}

type daemon struct {
	c   Config
	cfg *subnet.Config
	mgr leaseManager
	met *metrics
	hl  *health
	log *slog.Logger
	mtu int

	// planes are the datapaths of the network's families, IPv4 first.
	planes []*plane

	// rules keeps the masquerade and forward rules (nil without --ip-masq),
	// written the rulesMode way; rulesCfgs is what its last good Ensure
	// was for.
	rules     masq.Keeper
	rulesMode masq.Mode
	rulesCfgs []masq.Config

	envLease   subnet.Lease // the subnets the env file names
	programmed bool         // a pass succeeded once: the node is ready
	announced  bool         // DatapathReady was reported
}

// plane is the datapath of one IP family: its backend and masquerade rules,
// and what its last good pass saw. Each plane sees the leases projected on
// its family (subnet.Lease.Family), so everything below is single-family
// and keyed by the family's subnet; a peer without a subnet of the family
// is not in that family's plane.
type plane struct {
	d  *daemon
	v6 bool
	be Backend

	policy  subnet.PeerPolicy
	skipped map[string]bool // "subnet reason" of the leases skipped in the last pass

	// The inputs of the last good pass, to tell what a pass must change:
	good     bool                        // the last pass succeeded
	knownOwn subnet.Lease                // its own lease
	known    map[netip.Prefix]knownLease // its peer leases, unfiltered
	epoch    uint64                      // counts calls of changes
	filter   *subnet.PeerFilter          // its admitted peers; nil when a lease was skipped

	bridge     bridgeNetfilter // br_netfilter's state at the last full pass
	bridgeSeen bool
}

func (p *plane) family() string { return subnet.FamilyName(p.v6) }

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

// pass is one reconcile: the env file follows the own lease, each family's
// datapath follows all leases of that family. A full pass reads the kernel
// and programs every peer; after a change signal, when the last pass
// succeeded and only a few peers changed, only those peers are programmed
// (see Backend.Update). The node is ready once every family's pass
// succeeded.
func (d *daemon) pass(ctx context.Context, full bool) {
	own := d.mgr.Own()
	if own.Subnet != d.envLease.Subnet || own.IPv6Subnet != d.envLease.IPv6Subnet {
		if err := d.writeEnv(own); err != nil {
			d.log.Error("write subnet env file", "err", err)
		}
		d.met.leaseAcquired.Inc()
	}
	if full {
		d.checkBridges()
	}
	peers, synced := d.mgr.Peers()
	good := d.ensureRules(ctx, own, full || !synced) && synced
	skipped := 0
	for _, p := range d.planes {
		fown, ok := own.Family(p.v6)
		if !ok {
			d.log.Error("the own lease has no subnet of a family the network has", "family", p.family(), "subnet", own.Subnet, "ipv6-subnet", own.IPv6Subnet)
			good = false
			continue
		}
		if !synced {
			// Reconciling against an empty peer list would tear down every
			// peer's entries until the first listing arrives.
			continue
		}
		p.pass(ctx, full, fown, project(peers, p.v6))
		good = good && p.good
		skipped += len(p.skipped)
	}
	if synced {
		d.met.peersSkipped.Set(float64(skipped))
	}
	if good {
		d.announce(ctx)
	}
}

// project returns the leases of one family (subnet.Lease.Family).
func project(leases []subnet.Lease, v6 bool) []subnet.Lease {
	out := make([]subnet.Lease, 0, len(leases))
	for _, l := range leases {
		if f, ok := l.Family(v6); ok {
			out = append(out, f)
		}
	}
	return out
}

// pass is one family's part of daemon.pass; own and peers are of its family.
func (p *plane) pass(ctx context.Context, full bool, own subnet.Lease, peers []subnet.Lease) {
	changed, removed, dup := p.changes(peers)
	ownSame := p.good && subnet.SameLease(own, p.knownOwn)
	nothing := ownSame && !dup && len(changed) == 0 && len(removed) == 0
	if !full && nothing {
		return
	}
	if !full && ownSame && !dup && p.filter != nil && len(changed)+len(removed) <= maxIncremental {
		if p.update(ctx, own, changed, removed) {
			return
		}
	}
	p.reconcile(ctx, own, peers, nothing)
}

// update programs the changed peers only. It returns false when a full pass
// must follow: a changed lease FilterPeers would skip, a backend that
// declines, or a write that failed.
func (p *plane) update(ctx context.Context, own subnet.Lease, changed []subnet.Lease, removed []netip.Prefix) bool {
	d := p.d
	f := p.filter
	p.filter = nil // until this pass succeeds: the filter is changed below
	for _, sn := range removed {
		f.Drop(sn)
	}
	for _, l := range changed {
		if _, had := p.known[l.Subnet]; had {
			f.Drop(l.Subnet)
		}
	}
	for _, l := range changed {
		if reason := f.Admit(l); reason != "" {
			return false // the full pass skips it, and logs why
		}
	}
	start := time.Now()
	ok, err := p.be.Update(ctx, own, changed, removed)
	if !ok {
		return false
	}
	if err != nil {
		p.good = false
		if ctx.Err() == nil {
			d.log.Warn("updating the changed peers failed; running a full pass", "family", p.family(), "changed", len(changed), "removed", len(removed), "err", err)
		}
		return false
	}
	took := time.Since(start)
	for _, sn := range removed {
		delete(p.known, sn)
	}
	for _, l := range changed {
		p.known[l.Subnet] = knownLease{Lease: l, seen: p.epoch}
	}
	p.filter = f
	p.observe(took, len(p.known))
	d.met.incrementals.Inc()
	d.met.reconciles.WithLabelValues("ok").Inc()
	d.log.Debug("updated peers", "family", p.family(), "changed", len(changed), "removed", len(removed), "took", took)
	return true
}

// reconcile is the full pass. unchanged says no lease changed since the
// last good pass, so whatever it writes is drift it repairs.
func (p *plane) reconcile(ctx context.Context, own subnet.Lease, all []subnet.Lease, unchanged bool) {
	d := p.d
	peers := p.admit(own, all)
	before := p.be.Counters()
	start := time.Now()
	err := p.be.Reconcile(ctx, own, peers)
	took := time.Since(start)
	p.observe(took, len(peers))
	if unchanged {
		w := p.be.Counters().Sub(before)
		fam := familyLabel(p.v6)
		d.met.repairs.WithLabelValues("route", fam).Add(float64(w.Routes))
		d.met.repairs.WithLabelValues("fdb", fam).Add(float64(w.FDB))
		d.met.repairs.WithLabelValues("neigh", fam).Add(float64(w.Neighs))
		d.met.repairs.WithLabelValues("device", fam).Add(float64(w.Devices))
		if p.d.cfg.Backend.Type == subnet.BackendWireGuard {
			d.met.repairs.WithLabelValues("peer", fam).Add(float64(w.Peers))
		}
	}
	p.filter = nil
	if err != nil {
		p.good = false
		if ctx.Err() != nil {
			return
		}
		d.met.reconciles.WithLabelValues("error").Inc()
		d.log.Error("reconcile datapath", "family", p.family(), "peers", len(peers), "err", err)
		return
	}
	d.met.reconciles.WithLabelValues("ok").Inc()
	p.good, p.knownOwn = true, own
	clear(p.known)
	if p.known == nil {
		p.known = make(map[netip.Prefix]knownLease, len(all))
	}
	for _, l := range all {
		p.known[l.Subnet] = knownLease{Lease: l}
	}
	if len(p.skipped) == 0 && len(p.known) == len(all) {
		p.filter = subnet.NewPeerFilter(p.policy, own, peers)
	}
	d.log.Debug("reconciled", "family", p.family(), "peers", len(peers), "took", took)
}

func (p *plane) observe(took time.Duration, peers int) {
	m := p.d.met
	m.reconcileTime.Observe(took.Seconds())
	m.lastDuration.Set(took.Seconds())
	m.lastReconcile.SetToCurrentTime()
	m.peers.WithLabelValues(p.d.cfg.Backend.Type, familyLabel(p.v6)).Set(float64(peers))
}

// familyLabel is the value of the metrics' family label.
func familyLabel(v6 bool) string {
	if v6 {
		return "ipv6"
	}
	return "ipv4"
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
func (p *plane) changes(peers []subnet.Lease) (changed []subnet.Lease, removed []netip.Prefix, dup bool) {
	p.epoch++
	seen := 0
	for _, l := range peers {
		k, ok := p.known[l.Subnet]
		switch {
		case !ok:
		case k.seen == p.epoch:
			dup = true
		default:
			k.seen = p.epoch
			p.known[l.Subnet] = k
			seen++
			if subnet.SameLease(k.Lease, l) {
				continue
			}
		}
		changed = append(changed, l)
	}
	if seen == len(p.known) {
		return changed, nil, dup
	}
	for sn, k := range p.known {
		if k.seen != p.epoch {
			removed = append(removed, sn)
		}
	}
	return changed, removed, dup
}

// admit drops the peer leases that must not be programmed (FilterPeers:
// outside the network, overlapping, a public IP not allowed). Each skipped
// lease is logged once, when it first appears or its reason changes.
func (p *plane) admit(own subnet.Lease, peers []subnet.Lease) []subnet.Lease {
	kept, skipped := subnet.FilterPeers(p.policy, own, peers)
	now := make(map[string]bool, len(skipped))
	for _, s := range skipped {
		key := s.Lease.Subnet.String() + " " + s.Reason
		now[key] = true
		if !p.skipped[key] {
			p.d.log.Warn("skipping a peer lease", "family", p.family(), "subnet", s.Lease.Subnet, "public-ip", s.Lease.Attrs.PublicIP, "node", s.Lease.Attrs.NodeName, "reason", s.Reason)
		}
	}
	p.skipped = now
	return kept
}

// ensureRules keeps the masquerade and forward rules (with --ip-masq) for
// the own lease's subnets: on a full pass (full), and on any pass that finds
// the subnets changed. What it writes while the subnets are those of its
// last good Ensure is drift it repairs. It returns false when the rules
// could not be written: the node is not ready until they are.
func (d *daemon) ensureRules(ctx context.Context, own subnet.Lease, full bool) bool {
	if d.rules == nil {
		return true
	}
	var cfgs []masq.Config
	for _, p := range d.planes {
		if f, ok := own.Family(p.v6); ok {
			cfgs = append(cfgs, masq.Config{Network: p.policy.Network, Subnet: f.Subnet})
		}
	}
	same := slices.Equal(cfgs, d.rulesCfgs)
	if !full && same {
		return true
	}
	before := make([]uint64, len(d.planes))
	for i, p := range d.planes {
		before[i] = d.rules.Writes(p.v6)
	}
	if err := d.rules.Ensure(ctx, cfgs); err != nil {
		d.rulesCfgs = nil
		if ctx.Err() == nil {
			d.met.reconciles.WithLabelValues("error").Inc()
			d.log.Error("ensure masquerade rules", "mode", d.rulesMode, "err", err)
		}
		return false
	}
	if same {
		for i, p := range d.planes {
			d.met.repairs.WithLabelValues(string(d.rulesMode), familyLabel(p.v6)).Add(float64(d.rules.Writes(p.v6) - before[i]))
		}
	}
	d.rulesCfgs = cfgs
	return true
}

// removeOtherRules removes the rules an earlier run may have left that this
// one does not keep: those of the other mode, of a family the network no
// longer has, or all of them without --ip-masq.
func (d *daemon) removeOtherRules(ctx context.Context) {
	for _, v6 := range []bool{false, true} {
		if d.rulesMode == masq.ModeIPTables && slices.ContainsFunc(d.planes, func(p *plane) bool { return p.v6 == v6 }) {
			continue
		}
		if !masq.IPTablesMayHoldChains(v6) {
			continue
		}
		ipt, err := masq.NewIPTables(v6)
		if err != nil {
			// No iptables program here (twill's image has none): chains an
			// earlier run wrote may be left; say how to remove them.
			d.log.Warn("iptables chains of an earlier run may be left (TWILL-POSTRTG, TWILL-FWD), and there is no iptables here to remove them; "+
				"remove them on the node with its iptables (Documentation/kubernetes.md, \"Upgrading from an image with iptables\")",
				"family", subnet.FamilyName(v6), "err", err)
			continue
		}
		switch removed, err := masq.Cleanup(ctx, ipt); {
		case err != nil && ctx.Err() == nil:
			d.log.Warn("remove iptables rules of an earlier run", "family", subnet.FamilyName(v6), "err", err)
		case removed:
			d.log.Info("removed the iptables chains of an earlier run", "family", subnet.FamilyName(v6))
		}
	}
	if d.rulesMode != masq.ModeNFTables {
		removed, err := masq.CleanupNFTables(ctx)
		switch {
		case err != nil && ctx.Err() == nil:
			d.log.Warn("remove the nftables table of an earlier run", "err", err)
		case removed:
			d.log.Info("removed the nftables table of an earlier run", "table", "inet "+masq.NFTablesTable)
		}
	}
}

func (d *daemon) writeEnv(own subnet.Lease) error {
	env := subnet.NewEnv(d.cfg, own, d.mtu, d.c.IPMasq)
	if err := subnet.WriteEnv(d.c.SubnetFile, env); err != nil {
		return err
	}
	if d.c.FlannelSubnetFile != "" {
		if err := subnet.WriteFlannelEnv(d.c.FlannelSubnetFile, env); err != nil {
			return err
		}
	}
	d.envLease = own
	d.met.envFileWrites.Inc()
	if !d.programmed {
		d.hl.set("programming the datapath")
	}
	d.log.Info("wrote subnet env file", "path", d.c.SubnetFile, "subnet", env.Subnet, "ipv6-subnet", env.IPv6Subnet, "mtu", env.MTU)
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

// previousLease holds the subnets of an existing env file that fit the
// network, each family on its own.
func previousLease(path string, cfg *subnet.Config, log *slog.Logger) subnet.Lease {
	var prev subnet.Lease
	env, err := subnet.ReadEnv(path)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			log.Warn("ignoring unreadable subnet env file", "path", path, "err", err)
		}
		return prev
	}
	if p := env.Subnet.Masked(); env.Network == cfg.Network && cfg.Range(false).Contains(p) {
		prev.Subnet = p
	}
	if p := env.IPv6Subnet.Masked(); env.IPv6Network == cfg.IPv6Network && cfg.Range(true).Contains(p) {
		prev.IPv6Subnet = p
	}
	return prev
}
