package lab

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/twillnet/twill/deploy"
	"github.com/twillnet/twill/internal/tools/kubeapi"
	"github.com/twillnet/twill/subnet/kube"
)

// KubePort is the lab's kube-apiserver port, on WorldAddr in the underlay.
const KubePort = 6443

// DialInNS returns a dialer whose sockets are made inside a named network
// namespace: the socket is created on a thread that entered the namespace,
// and stays there after the thread leaves. Clients in this process reach the
// lab's servers with it.
func DialInNS(netns string) kubeapi.Dialer {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var conn net.Conn
		err := ns.WithNetNSPath("/run/netns/"+netns, func(ns.NetNS) error {
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			conn = c
			return err
		})
		return conn, err
	}
}

// KubeServer is the lab's API server.
func (l *Lab) KubeServer() kubeapi.Server {
	return kubeapi.Server{
		Binary:  l.KubeAPIServer,
		Dir:     filepath.Join(l.Dir, "kube"),
		Host:    WorldAddr.String(),
		Port:    KubePort,
		EtcdURL: EtcdURL(),
	}
}

// KubeClient is an admin client of the lab's API server.
func (l *Lab) KubeClient() (kubernetes.Interface, error) {
	return kubernetes.NewForConfig(l.KubeServer().Config(l.KubeAdminToken, DialInNS(l.Topology().UnderlayNS())))
}

// NodePodCIDR is the podCIDR the lab gives host i's Node.
func (l *Lab) NodePodCIDR(i int) netip.Prefix {
	a := l.Network.Addr().As4()
	a[2] = byte(i)
	return netip.PrefixFrom(netip.AddrFrom4(a), 24)
}

// NodePodCIDRV6 is the IPv6 podCIDR the lab gives host i's Node: the
// i-th /64 of the IPv6 network.
func (l *Lab) NodePodCIDRV6(i int) netip.Prefix {
	a := l.ipv6Network().Addr().As16()
	a[7] += byte(i)
	return netip.PrefixFrom(netip.AddrFrom16(a), 64)
}

// nodePodCIDRs are host i's podCIDRs, one per family of the lab.
func (l *Lab) nodePodCIDRs(i int) []string {
	var out []string
	for _, v6 := range l.Families() {
		if v6 {
			out = append(out, l.NodePodCIDRV6(i).String())
		} else {
			out = append(out, l.NodePodCIDR(i).String())
		}
	}
	return out
}

// startKube starts the API server on the lab's etcd, applies the DaemonSet
// manifest (server-side dry run first), creates one Node per host with a
// podCIDR, and writes each host a kubeconfig with a token of the manifest's
// ServiceAccount: twilld runs with exactly the permissions the manifest grants.
func (l *Lab) startKube(ctx context.Context) error {
	srv := l.KubeServer()
	argv, token, err := srv.Prepare()
	if err != nil {
		return err
	}
	l.KubeAdminToken = token
	if err := l.save(); err != nil {
		return err
	}
	if err := l.spawn("kube-apiserver", l.Topology().UnderlayNS(), argv[0], argv[1:]...); err != nil {
		return err
	}
	dial := DialInNS(l.Topology().UnderlayNS())
	if err := kubeapi.WaitReady(ctx, srv.URL(), dial, 90*time.Second); err != nil {
		return fmt.Errorf("%w (see %s)", err, filepath.Join(l.Dir, "kube-apiserver.log"))
	}
	l.say("kube-apiserver ready at %s in %s", srv.URL(), l.Topology().UnderlayNS())
	cfg := srv.Config(token, dial)
	if _, err := kubeapi.Apply(ctx, cfg, deploy.KubeManifest, true); err != nil {
		return fmt.Errorf("server-side dry run of deploy/kube-twill.yaml: %w", err)
	}
	applied, err := kubeapi.Apply(ctx, cfg, deploy.KubeManifest, false)
	if err != nil {
		return err
	}
	l.say("applied deploy/kube-twill.yaml: %s", strings.Join(applied, ", "))
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	for i := 1; i <= l.Hosts; i++ {
		node := &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("h%d", i)},
			Spec:       corev1.NodeSpec{PodCIDR: l.nodePodCIDRs(i)[0], PodCIDRs: l.nodePodCIDRs(i)},
		}
		if _, err := cs.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("create Node h%d: %w", i, err)
		}
	}
	// Each twilld holds a token of the manifest's ServiceAccount bound to a
	// pod on its node, as the kubelet gives the DaemonSet's pods: the
	// admission policy lets it write its own node's objects only. The pods
	// stay Pending, since no kubelet runs.
	for i := 1; i <= l.Hosts; i++ {
		name := fmt.Sprintf("h%d", i)
		saToken, err := kubeapi.PodBoundToken(ctx, cs, "kube-twill", "twill", "twill-"+name, name, 24*time.Hour)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(l.hostDir(i), 0o755); err != nil {
			return err
		}
		if err := srv.WriteKubeconfig(l.kubeconfig(i), saToken); err != nil {
			return err
		}
	}
	if l.kubeMode() == "nodenetwork" {
		// The garbage collector deletes a Node's NodeNetwork with the Node.
		admin := filepath.Join(l.Dir, "kube", "admin.kubeconfig")
		if err := srv.WriteKubeconfig(admin, token); err != nil {
			return err
		}
		if err := l.spawn("kube-controller-manager", l.Topology().UnderlayNS(), l.kubeControllerManager(),
			"--kubeconfig="+admin, "--controllers=garbagecollector", "--leader-elect=false",
			"--secure-port=0", "--use-service-account-credentials=false"); err != nil {
			return err
		}
		l.say("kube-controller-manager running its garbage collector")
	}
	return nil
}

// kubeMode is twilld's --kube-mode in the lab.
func (l *Lab) kubeMode() string {
	if l.KubeMode == "" {
		return "nodenetwork"
	}
	return l.KubeMode
}

// kubeControllerManager is the kube-controller-manager binary: `make tools`
// builds it beside kube-apiserver.
func (l *Lab) kubeControllerManager() string {
	return filepath.Join(filepath.Dir(l.KubeAPIServer), "kube-controller-manager")
}

func (l *Lab) kubeconfig(i int) string { return filepath.Join(l.hostDir(i), "kubeconfig") }

// StopKubeAPI stops the lab's API server; StartKubeAPI starts it again with
// the same certificates and etcd.
func (l *Lab) StopKubeAPI(ctx context.Context) error {
	return stopPid(ctx, filepath.Join(l.Dir, "kube-apiserver.pid"))
}

// StartKubeAPI restarts a stopped API server and waits until it is ready.
func (l *Lab) StartKubeAPI(ctx context.Context) error {
	srv := l.KubeServer()
	argv, _, err := srv.Prepare()
	if err != nil {
		return err
	}
	if err := l.spawn("kube-apiserver", l.Topology().UnderlayNS(), argv[0], argv[1:]...); err != nil {
		return err
	}
	return kubeapi.WaitReady(ctx, srv.URL(), DialInNS(l.Topology().UnderlayNS()), 90*time.Second)
}

// kubeStatus prints the Nodes, or the NodeNetwork records, as twill sees them.
func (l *Lab) kubeStatus(ctx context.Context, w io.Writer) error {
	if l.kubeMode() == "nodenetwork" {
		rc, err := kube.NewRecordClient(l.KubeServer().Config(l.KubeAdminToken, DialInNS(l.Topology().UnderlayNS())))
		if err != nil {
			return err
		}
		recs, err := rc.List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		fmt.Fprintf(w, "NodeNetwork records (kube-apiserver %s):\n", l.KubeServer().URL())
		for _, r := range recs.Items {
			s := r.Spec
			line := "  " + r.Name + "  backend " + s.BackendType
			if s.Subnet != "" {
				line += fmt.Sprintf("  subnet %s  public-ip %s  %s", s.Subnet, s.PublicIP, s.BackendData)
			}
			if s.IPv6Subnet != "" {
				line += fmt.Sprintf("  ipv6-subnet %s  public-ipv6 %s  %s", s.IPv6Subnet, s.PublicIPv6, s.BackendV6Data)
			}
			fmt.Fprintln(w, line)
		}
		fmt.Fprintln(w)
		return nil
	}
	cs, err := l.KubeClient()
	if err != nil {
		return err
	}
	nodes, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "nodes (kube-apiserver %s):\n", l.KubeServer().URL())
	for _, n := range nodes.Items {
		fmt.Fprintf(w, "  %s  podCIDRs %s  public-ip %s  public-ipv6 %s  backend %s %s %s\n", n.Name, strings.Join(n.Spec.PodCIDRs, ","),
			n.Annotations["twill.io/public-ip"], n.Annotations["twill.io/public-ipv6"], n.Annotations["twill.io/backend-type"],
			n.Annotations["twill.io/backend-data"], n.Annotations["twill.io/backend-v6-data"])
	}
	fmt.Fprintln(w)
	return nil
}
