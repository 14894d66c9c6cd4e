package testenv

import (
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// The rest of a cluster's control plane around a KubeAPI, for tests with
// real kubelets (StartKubeNode): each program is the real one from `make
// tools`, run through the API server's Wrap (so in its namespace), as the
// API server's admin, with no leader election and no serving port, and is
// stopped when the test ends (its log printed if the test failed).

// adminKubeconfig writes (once) the admin's kubeconfig in the API server's Dir.
func (k *KubeAPI) adminKubeconfig(t TB) string {
	t.Helper()
	path := filepath.Join(k.Dir, "admin.kubeconfig")
	if err := k.Kubeconfig(path, k.adminToken); err != nil {
		t.Fatal(err)
	}
	return path
}

// ClusterControllersOptions are StartClusterControllers'.
type ClusterControllersOptions struct {
	// ClusterCIDR is the pod network the node IPAM controller gives each
	// Node a podCIDR from (--cluster-cidr), e.g. 10.244.0.0/16.
	ClusterCIDR string
	// NodeCIDRMaskSize is the podCIDRs' size; default 24.
	NodeCIDRMaskSize int
	// Args are extra flags, appended last.
	Args []string
}

// StartClusterControllers runs kube-controller-manager with every controller
// enabled by default (--controllers=*: DaemonSet, Deployment and ReplicaSet,
// node IPAM and lifecycle, garbage collector, namespace, service account
// and its tokens, the root CA publisher, endpoints and EndpointSlices, ...)
// and node CIDR allocation on.
func (k *KubeAPI) StartClusterControllers(t TB, o ClusterControllersOptions) {
	t.Helper()
	bin := Tool(t, "kube-controller-manager")
	if o.ClusterCIDR == "" {
		t.Fatal("StartClusterControllers: ClusterCIDR is required")
	}
	if o.NodeCIDRMaskSize == 0 {
		o.NodeCIDRMaskSize = 24
	}
	dir := t.TempDir()
	// The CA of the API server's serving certificate: the root CA publisher
	// puts it in every namespace's kube-root-ca.crt ConfigMap, which the
	// pods' projected service account volumes read.
	rootCA := filepath.Join(dir, "root-ca.crt")
	if err := os.WriteFile(rootCA, k.CAData(), 0o644); err != nil {
		t.Fatal(err)
	}
	args := []string{bin,
		"--kubeconfig=" + k.adminKubeconfig(t),
		"--controllers=*",
		"--leader-elect=false",
		"--secure-port=0",
		// Controllers act as the admin, not as a service account each.
		"--use-service-account-credentials=false",
		"--allocate-node-cidrs=true",
		"--cluster-cidr=" + o.ClusterCIDR,
		"--node-cidr-mask-size=" + strconv.Itoa(o.NodeCIDRMaskSize),
		// The API server's: the node IPAM keeps node CIDRs out of it.
		"--service-cluster-ip-range=10.96.0.0/16",
		// The service account token controller signs legacy tokens with
		// the key the API server verifies.
		"--service-account-private-key-file=" + filepath.Join(k.Dir, "sa.key"),
		"--root-ca-file=" + rootCA,
		// Else it makes /usr/libexec/kubernetes/kubelet-plugins/volume/exec
		// on the machine.
		"--flex-volume-plugin-dir=" + filepath.Join(dir, "flexvolume"),
	}
	args = append(args, o.Args...)
	prog, argv := k.wrapped(args)
	startLogged(t, "kube-controller-manager", filepath.Join(dir, "kube-controller-manager.log"), 10*time.Second, prog, argv...)
}

// StartScheduler runs kube-scheduler.
func (k *KubeAPI) StartScheduler(t TB) {
	t.Helper()
	bin := Tool(t, "kube-scheduler")
	dir := t.TempDir()
	prog, argv := k.wrapped([]string{bin,
		"--kubeconfig=" + k.adminKubeconfig(t),
		"--leader-elect=false",
		"--secure-port=0",
	})
	startLogged(t, "kube-scheduler", filepath.Join(dir, "kube-scheduler.log"), 10*time.Second, prog, argv...)
}

// wrapped is a command line run through the API server's Wrap: the program
// to start and its arguments.
func (k *KubeAPI) wrapped(cmdline []string) (string, []string) {
	all := append(append([]string{}, k.opts.Wrap...), cmdline...)
	return all[0], all[1:]
}

// KubeProxyOptions are StartKubeProxy's.
type KubeProxyOptions struct {
	// Mode is "iptables" (default) or "nftables".
	Mode string
	// ClusterCIDR is the pod network (for masquerading traffic from outside it).
	ClusterCIDR string
}

// StartKubeProxy runs kube-proxy on the node, in its network and mount
// namespaces (so its rules land in the node's network namespace and it
// takes the node's own /run/xtables.lock). It leaves the conntrack table's
// size and timeouts alone (they are the machine's, not the namespace's).
func (n *KubeNode) StartKubeProxy(t TB, o KubeProxyOptions) {
	t.Helper()
	bin := Tool(t, "kube-proxy")
	if o.Mode == "" {
		o.Mode = "iptables"
	}
	config := filepath.Join(n.Dir, "kube-proxy.yaml")
	cfg := `apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: ` + n.kubeconfig + `
mode: ` + o.Mode + `
hostnameOverride: ` + n.Name + `
clusterCIDR: ` + o.ClusterCIDR + `
# Serving on the node's loopback only (each node has its own).
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# 0: leave the machine-wide conntrack settings as they are.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
`
	if err := os.WriteFile(config, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	startLogged(t, "kube-proxy "+n.Name, filepath.Join(n.Dir, "kube-proxy.log"), 10*time.Second, "nsenter",
		"--mount="+n.MountNS, "--net=/run/netns/"+n.NetNS, bin, "--config="+config, "--v=2")
}
