package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"

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
	c        Config
	log      *slog.Logger
	notReady func(string) // from Config: /readyz says why twilld still waits
}

func newKubeStore(c Config, log *slog.Logger) (*kubeStore, error) {
	if c.NodeName == "" {
		return nil, errors.New("--kube-subnet-mgr needs the node name: --node-name or NODE_NAME")
	}
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
	client, err := kube.NewNodeClient(rc)
	if err != nil {
		return nil, fmt.Errorf("Kubernetes client: %w", err)
	}
	return &kubeStore{client: client, c: c, log: log}, nil
}

func (s *kubeStore) Close() {}

// watchUp is not reported in Kubernetes mode; the informer retries on its own.
func (s *kubeStore) watchUp(context.Context, func(bool, string)) {}

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

func (s *kubeStore) Leases(cfg *subnet.Config, attrs subnet.LeaseAttrs, _ netip.Prefix) (leaseManager, error) {
	return kube.NewManager(kube.Options{
		Client:           s.client,
		NodeName:         s.c.NodeName,
		AnnotationPrefix: s.c.KubeAnnotationPrefix,
		SetNodeCondition: s.c.SetNodeCondition,
		Log:              s.log,
		Waiting:          s.notReady,
	}, cfg, attrs)
}
