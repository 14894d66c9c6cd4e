package daemon

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/subnet"
	"github.com/twillnet/twill/subnet/etcd"
)

// metrics are twilld's Prometheus metrics. Each daemon has its own registry,
// so tests can run several in one process.
type metrics struct {
	reg           *prometheus.Registry
	ready         prometheus.Gauge
	datastoreUp   prometheus.Gauge
	peers         *prometheus.GaugeVec
	peersSkipped  prometheus.Gauge
	repairs       *prometheus.CounterVec
	leaseAcquired prometheus.Counter
	reconciles    *prometheus.CounterVec
	incrementals  prometheus.Counter
	reconcileTime prometheus.Histogram
	envFileWrites prometheus.Counter
	lastReconcile prometheus.Gauge
	lastDuration  prometheus.Gauge
	kubeEvents    *prometheus.CounterVec
	brNetfilter   *prometheus.GaugeVec
}

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		ready: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "twill_ready", Help: "1 when the node holds its lease, has written the subnet env file and programmed the datapath once.",
		}),
		datastoreUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "twill_datastore_up", Help: "1 while the datastore is reachable: etcd's connection is up, or the Kubernetes API server answered twilld's last request.",
		}),
		peers: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "twill_peers", Help: "Peer leases in the last reconcile pass, by backend and IP family.",
		}, []string{"backend", "family"}),
		peersSkipped: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "twill_peers_skipped",
			Help: "Peer leases the last pass did not program: outside the network, overlapping another lease, carrying this node's public IP, or a public IP outside --public-ip-cidr.",
		}),
		repairs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "twill_repairs_total",
			Help: "Kernel entries a reconcile pass had to write although no lease had changed since the last good pass (drift: deleted by hand, or by another program), by kind and IP family.",
		}, []string{"kind", "family"}),
		leaseAcquired: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "twill_lease_acquisitions_total", Help: "Leases acquired, including re-acquisitions after a lease was lost.",
		}),
		reconciles: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "twill_reconcile_total", Help: "Datapath reconcile passes by result.",
		}, []string{"result"}),
		incrementals: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "twill_reconcile_incremental_total",
			Help: "Successful passes that programmed only the peers changed since the last pass, without reading the kernel (also counted in twill_reconcile_total).",
		}),
		reconcileTime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "twill_reconcile_duration_seconds", Help: "Time of one datapath reconcile pass.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 9),
		}),
		lastReconcile: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "twill_last_reconcile_timestamp_seconds", Help: "When the last reconcile pass ended (Unix time).",
		}),
		lastDuration: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "twill_last_reconcile_duration_seconds", Help: "How long the last reconcile pass took.",
		}),
		envFileWrites: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "twill_subnet_file_writes_total", Help: "Writes of the subnet env file.",
		}),
		brNetfilter: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "twill_br_netfilter",
			Help: "1 when traffic a bridge forwards between pods passes netfilter (iptables, nftables) in this IP family: br_netfilter loaded and net.bridge.bridge-nf-call-iptables (ip6tables) = 1; 0 otherwise, when kube-proxy's Services break between pods of one node. Read at every full pass.",
		}, []string{"family"}),
		kubeEvents: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "twill_kube_watch_events_total",
			Help: "Kubernetes mode: objects twilld's informers received (listed, added, updated or deleted), by resource: nodes (every Node with --kube-mode=annotations, the own Node alone with nodenetwork) and nodenetworks.",
		}, []string{"resource"}),
	}
	m.reg.MustRegister(m.ready, m.peers, m.peersSkipped, m.repairs, m.reconciles, m.incrementals, m.reconcileTime,
		m.envFileWrites, m.lastReconcile, m.lastDuration, m.kubeEvents, m.brNetfilter,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.reconciles.WithLabelValues("ok")
	m.reconciles.WithLabelValues("error")
	return m
}

// registerLeaseStats exports the etcd lease manager's counters, acquisitions
// included (in Kubernetes mode leaseAcquired counts those). They are read at
// scrape time, so subnet/etcd needs no knowledge of Prometheus.
func (m *metrics) registerLeaseStats(stats func() etcd.Stats) {
	m.reg.MustRegister(
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "twill_lease_acquisitions_total", Help: "Leases acquired, including re-acquisitions after a lease was lost.",
		}, func() float64 { return float64(stats().Acquisitions) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "twill_lease_renewals_total", Help: "Keep-alive answers from etcd for the node's lease.",
		}, func() float64 { return float64(stats().Renewals) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "twill_lease_losses_total", Help: "Times the node's lease was lost (expired, revoked or deleted) and had to be acquired again.",
		}, func() float64 { return float64(stats().Losses) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "twill_lease_expiry_timestamp_seconds", Help: "When the node's lease expires unless renewed (Unix time).",
		}, func() float64 {
			if e := stats().Expires; !e.IsZero() {
				return float64(e.UnixNano()) / 1e9
			}
			return 0
		}),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "twill_datastore_events_total", Help: "Lease events received from the datastore's watch.",
		}, func() float64 { return float64(stats().Events) }),
	)
}

// registerPlanes exports, per family, what each backend has written to the
// kernel since twilld started (a restart that finds everything in place
// writes nothing: the figure stays 0), and starts the family's repair
// counters at 0.
func (m *metrics) registerPlanes(planes []*plane) {
	for _, p := range planes {
		fam := familyLabel(p.v6)
		kinds := map[string]func(dataplane.Counters) uint64{
			"route":  func(c dataplane.Counters) uint64 { return c.Routes },
			"fdb":    func(c dataplane.Counters) uint64 { return c.FDB },
			"neigh":  func(c dataplane.Counters) uint64 { return c.Neighs },
			"device": func(c dataplane.Counters) uint64 { return c.Devices },
		}
		if p.d.cfg.Backend.Type == subnet.BackendWireGuard {
			kinds["peer"] = func(c dataplane.Counters) uint64 { return c.Peers }
		}
		for kind := range kinds {
			m.repairs.WithLabelValues(kind, fam)
		}
		for kind, get := range kinds {
			m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
				Name:        "twill_kernel_writes_total",
				Help:        "Kernel entries the backend set or deleted (devices: created) since twilld started, by kind and IP family.",
				ConstLabels: prometheus.Labels{"kind": kind, "family": fam},
			}, func() float64 { return float64(get(p.be.Counters())) }))
		}
	}
}
