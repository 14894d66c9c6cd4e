package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/twillnet/twill/internal/version"
	"github.com/twillnet/twill/subnet"
	"github.com/twillnet/twill/subnet/kube"
)

// kubeStore is the Kubernetes datastore: the lease is the Node's podCIDR,
// the network config a file (a ConfigMap in the DaemonSet).
type kubeStore struct {
	client   kube.NodeClient
	records  kube.RecordClient
	c        Config
	log      *slog.Logger
	notReady func(string) // from Config: /readyz says why twilld still waits
	events   func(string) // counts the informers' objects by resource (metrics)
	reach    *reachability
}

// kubeRESTConfig is the client config of the Kubernetes API server:
// --kubeconfig, or the pod's in-cluster config.
func kubeRESTConfig(c Config) (*rest.Config, error) {
	var rc *rest.Config
	var err error
	if c.Kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	} else {
		rc, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("Kubernetes client config: %w", err)
	}
	rc.UserAgent = "twilld/" + version.Version
	return rc, nil
}

func newKubeStore(c Config, log *slog.Logger) (*kubeStore, error) {
	if c.NodeName == "" {
		return nil, errors.New("--kube-subnet-mgr needs the node name: --node-name or NODE_NAME")
	}
	switch c.KubeMode {
	case "":
		c.KubeMode = kube.ModeNodeNetwork
	case kube.ModeNodeNetwork, kube.ModeAnnotations:
	default:
		return nil, fmt.Errorf("--kube-mode %q: want %s or %s", c.KubeMode, kube.ModeNodeNetwork, kube.ModeAnnotations)
	}
	rc, err := kubeRESTConfig(c)
	if err != nil {
		return nil, err
	}
	reach := &reachability{}
	rc.Wrap(func(rt http.RoundTripper) http.RoundTripper { return observed{next: rt, reach: reach} })
	client, err := kube.NewNodeClient(rc)
	if err != nil {
		return nil, fmt.Errorf("Kubernetes client: %w", err)
	}
	// Both modes write the node's record: the annotations mode beside its
	// annotations, for nodes already switched to the nodenetwork mode.
	records, err := kube.NewRecordClient(rc)
	if err != nil {
		return nil, fmt.Errorf("Kubernetes client: %w", err)
	}
	s := &kubeStore{client: client, records: records, c: c, log: log, reach: reach}
	log.Info("Kubernetes mode", "kubeMode", c.KubeMode)
	return s, nil
}

func (s *kubeStore) Close() {}

// nodePublicIPs reads the node-public-ip and node-public-ipv6 annotations
// of the node's own Node: addresses an operator gave the node there, which
// take the place of --public-ip and --public-ipv6 as they do for flanneld.
func (s *kubeStore) nodePublicIPs(ctx context.Context) (v4, v6 netip.Addr, err error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	node, err := s.client.Get(ctx, s.c.NodeName, metav1.GetOptions{})
	if err != nil {
		return v4, v6, fmt.Errorf("read Node %s: %w", s.c.NodeName, err)
	}
	return kube.NodePublicIPs(node.Annotations, s.c.KubeAnnotationPrefix)
}

func (s *kubeStore) Published(ctx context.Context, _ *subnet.Config, _ subnet.LeaseAttrs) (subnet.LeaseAttrs, bool) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if s.c.KubeMode == kube.ModeNodeNetwork {
		r, err := s.records.Get(ctx, s.c.NodeName, metav1.GetOptions{})
		if err != nil {
			s.log.Debug("read the NodeNetwork record published before", "err", err)
			return subnet.LeaseAttrs{}, false
		}
		l, ok, err := kube.RecordToLease(r)
		return l.Attrs, ok && err == nil
	}
	node, err := s.client.Get(ctx, s.c.NodeName, metav1.GetOptions{})
	if err != nil {
		s.log.Debug("read the Node's annotations published before", "err", err)
		return subnet.LeaseAttrs{}, false
	}
	attrs, ok, err := kube.ParseAnnotations(node.Annotations, s.c.KubeAnnotationPrefix)
	return attrs, ok && err == nil
}

// watchUp reports whether the API server answers, as seen by twilld's own
// requests: the informer's list and watch calls, which client-go repeats
// (with a growing pause) while the API server is away. It adds no request of
// its own, so recovery shows when the informer's next attempt succeeds.
func (s *kubeStore) watchUp(ctx context.Context, report func(bool, string)) {
	s.reach.follow(report)
	<-ctx.Done()
	s.reach.follow(nil)
}

// reachability is the API server's state as the last request found it.
type reachability struct {
	mu     sync.Mutex
	report func(up bool, state string)
	known  bool
	up     bool
	state  string
}

func (r *reachability) follow(report func(bool, string)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.report = report
	if report != nil && r.known {
		report(r.up, r.state)
	}
}

func (r *reachability) set(up bool, state string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.known && r.up == up {
		return
	}
	r.known, r.up, r.state = true, up, state
	if r.report != nil {
		r.report(up, state)
	}
}

// observed passes requests on and tells reachability how they went: any
// answer means the API server is there (an error status is the request's
// problem, not the connection's), no answer means it is not.
type observed struct {
	next  http.RoundTripper
	reach *reachability
}

func (o observed) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := o.next.RoundTrip(req)
	switch {
	case err == nil:
		o.reach.set(true, "answering")
	case req.Context().Err() == nil:
		o.reach.set(false, "failed")
	}
	return resp, err
}

func (s *kubeStore) Config(ctx context.Context, notReady func(string)) (*subnet.Config, error) {
	s.notReady = notReady
	return waitFor(ctx, s.log, notReady, func() (*subnet.Config, string) {
		data, err := os.ReadFile(s.c.NetConfig)
		if err != nil {
			return nil, fmt.Sprintf("waiting for the network config file: %v", err)
		}
		cfg, err := subnet.ParseConfig(data)
		if err != nil {
			return nil, fmt.Sprintf("%s: %v", s.c.NetConfig, err)
		}
		return cfg, ""
	})
}

func (s *kubeStore) Leases(cfg *subnet.Config, attrs subnet.LeaseAttrs, _ subnet.Lease) (leaseManager, error) {
	return kube.NewManager(kube.Options{
		Client:           s.client,
		Mode:             s.c.KubeMode,
		Records:          s.records,
		NodeName:         s.c.NodeName,
		AnnotationPrefix: s.c.KubeAnnotationPrefix,
		SetNodeCondition: s.c.SetNodeCondition,
		Log:              s.log,
		Waiting:          s.notReady,
		Event:            s.events,
	}, cfg, attrs)
}
