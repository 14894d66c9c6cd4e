package daemon

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// health is what /readyz reports: why the node is not ready, or nothing.
// Start-up sets a phase (waiting for the config, acquiring a lease) that the
// first env file write clears. Once started, the node is ready while the
// datastore is reachable: during an outage the datapath and the pods are
// left exactly as they are, but the node cannot follow its peers, and a
// readiness probe is how an orchestrator (a DaemonSet rollout, a load
// balancer's health check) learns that without anything being restarted.
type health struct {
	mu        sync.Mutex
	notReady  string // the start-up phase, "" once started
	datastore string // why the datastore is unreachable, "" while it is not
}

func (h *health) set(reason string) {
	h.mu.Lock()
	h.notReady = reason
	h.mu.Unlock()
}

func (h *health) setDatastore(reason string) {
	h.mu.Lock()
	h.datastore = reason
	h.mu.Unlock()
}

func (h *health) reason() string {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.notReady != "" {
		return h.notReady
	}
	return h.datastore
}

// serveHTTP serves /healthz, /readyz and /metrics on addr until ctx ends.
// It returns once the listener is bound, so a bad address fails start-up.
func serveHTTP(ctx context.Context, addr string, h *health, m *metrics) (net.Addr, func(), error) {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if r := h.reason(); r != "" {
			http.Error(w, "not ready: "+r, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("listen for health and metrics on %s: %w", addr, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	return ln.Addr(), serve(srv, ln), nil
}

// serve serves srv on ln (over TLS when srv has a TLSConfig) and returns
// the function that shuts it down and waits for it.
func serve(srv *http.Server, ln net.Listener) (stop func()) {
	if srv.TLSConfig != nil {
		ln = tls.NewListener(ln, srv.TLSConfig)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			_ = err // the listener was closed under us; shutdown follows
		}
	}()
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		<-done
	}
}
