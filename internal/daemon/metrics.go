package daemon

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metrics are twilld's Prometheus metrics. Each daemon has its own registry,
// so tests can run several in one process.
type metrics struct {
	reg           *prometheus.Registry
	ready         prometheus.Gauge
	datastoreUp   prometheus.Gauge
	peers         prometheus.Gauge
	leaseAcquired prometheus.Counter
	reconciles    *prometheus.CounterVec
	reconcileTime prometheus.Histogram
	envFileWrites prometheus.Counter
}

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		ready: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "twill_ready", Help: "1 when the node holds its lease, has written the subnet env file and programmed the datapath once.",
		}),
		datastoreUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "twill_datastore_up", Help: "1 when the last request to the datastore succeeded.",
		}),
		peers: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "twill_peers", Help: "Peer leases in the last reconcile pass.",
		}),
		leaseAcquired: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "twill_lease_acquisitions_total", Help: "Leases acquired, including re-acquisitions after a lease was lost.",
		}),
		reconciles: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "twill_reconcile_total", Help: "Datapath reconcile passes by result.",
		}, []string{"result"}),
		reconcileTime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "twill_reconcile_duration_seconds", Help: "Time of one datapath reconcile pass.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 9),
		}),
		envFileWrites: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "twill_subnet_file_writes_total", Help: "Writes of the subnet env file.",
		}),
	}
	m.reg.MustRegister(m.ready, m.datastoreUp, m.peers, m.leaseAcquired, m.reconciles, m.reconcileTime,
		m.envFileWrites,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m.reconciles.WithLabelValues("ok")
	m.reconciles.WithLabelValues("error")
	return m
}
