package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/twillnet/twill/backend/vxlan"
	"github.com/twillnet/twill/subnet"
	"github.com/twillnet/twill/subnet/etcd"
	"github.com/twillnet/twill/subnet/kube"
)

// FlannelPrefix is flannel's etcd prefix, which a lab migrating from flannel
// uses.
const FlannelPrefix = "/coreos.com/network"

// MakeFlannelNode turns host i into a node as flanneld (VXLAN) leaves one:
// its twilld stopped and its datapath removed, a flannel.1 with flanneld's
// settings (VNI 1, UDP 8472, learning off, the subnet's network address
// /32, MTU 1450) holding flanneld's three entries per peer, and what it
// publishes rewritten as flanneld writes it: in etcd mode its lease in
// flannel's JSON on a 24 h etcd lease, in Kubernetes mode flannel's
// annotations on its Node (under the lab's annotation prefix). Its pods
// stay on cni0. It returns flannel.1's MAC.
func (l *Lab) MakeFlannelNode(ctx context.Context, i int) (string, error) {
	if l.Backend != subnet.BackendVXLAN {
		return "", fmt.Errorf("a flannel node needs the vxlan backend")
	}
	hn := l.Topology().HostNS(i)
	env, err := subnet.ReadEnv(l.EnvFile(i))
	if err != nil {
		return "", err
	}
	sn := env.Subnet.Masked()
	if err := l.StopDaemon(ctx, i); err != nil {
		return "", err
	}
	if _, err := InNS(ctx, hn, filepath.Join(l.BinDir, "twilld"), "--cleanup"); err != nil {
		return "", err
	}
	dev := vxlan.FlannelDeviceName(1, false)
	err = runIP(ctx, [][]string{
		{"-n", hn, "link", "add", dev, "mtu", "1450", "type", "vxlan", "id", "1", "local", l.Topology().HostAddr(i).String(), "dev", "eth0", "dstport", "8472", "nolearning"},
		{"-n", hn, "addr", "add", netip.PrefixFrom(sn.Addr(), 32).String(), "dev", dev},
		{"-n", hn, "link", "set", dev, "up"},
	})
	if err != nil {
		return "", err
	}
	mac, err := linkMAC(ctx, hn, dev)
	if err != nil {
		return "", err
	}
	peers, publish, err := l.flannelLeases(ctx, i, mac)
	if err != nil {
		return "", err
	}
	for _, p := range peers {
		if p.Subnet == sn || !p.Subnet.IsValid() {
			continue
		}
		d, err := vxlan.ParseData(p.Attrs.BackendData)
		if err != nil {
			return "", fmt.Errorf("lease %s: %w", p.Subnet, err)
		}
		if _, err := InNS(ctx, hn, "bridge", "fdb", "add", d.VtepMAC.String(), "dev", dev, "dst", p.Attrs.PublicIP.String(), "self", "permanent"); err != nil {
			return "", err
		}
		err = runIP(ctx, [][]string{
			{"-n", hn, "neigh", "add", p.Subnet.Addr().String(), "lladdr", d.VtepMAC.String(), "dev", dev, "nud", "permanent"},
			{"-n", hn, "route", "add", p.Subnet.String(), "via", p.Subnet.Addr().String(), "dev", dev, "onlink"},
		})
		if err != nil {
			return "", err
		}
	}
	return mac, publish(ctx)
}

// flannelLeases returns the leases of the hosts but i, and the function
// that publishes host i as flanneld would, with VTEP MAC mac.
func (l *Lab) flannelLeases(ctx context.Context, i int, mac string) ([]subnet.Lease, func(context.Context) error, error) {
	name := fmt.Sprintf("h%d", i)
	if l.Datastore == "kube" {
		if l.kubeMode() != "annotations" {
			return nil, nil, errors.New("a flannel node in Kubernetes mode publishes Node annotations: run the lab with KubeMode annotations")
		}
		cs, err := l.KubeClient()
		if err != nil {
			return nil, nil, err
		}
		nodes, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return nil, nil, err
		}
		prefix := l.KubeAnnotationPrefix
		if prefix == "" {
			prefix = kube.DefaultAnnotationPrefix
		}
		var peers []subnet.Lease
		for k := range nodes.Items {
			if nodes.Items[k].Name == name {
				continue
			}
			p, ok, err := kube.NodeToLease(&nodes.Items[k], prefix)
			if err != nil || !ok {
				return nil, nil, fmt.Errorf("Node %s: %v (published %v)", nodes.Items[k].Name, err, ok)
			}
			peers = append(peers, p)
		}
		publish := func(ctx context.Context) error {
			p := prefix + "/"
			patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]any{
				p + "kube-subnet-manager": "true", p + "backend-type": "vxlan", p + "public-ip": l.Topology().HostAddr(i).String(),
				p + "backend-data": fmt.Sprintf(`{"VNI":1,"VtepMAC":"%s"}`, mac)}}})
			_, err := cs.CoreV1().Nodes().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{})
			return err
		}
		return peers, publish, nil
	}
	reg, closeReg, err := l.registry()
	if err != nil {
		return nil, nil, err
	}
	stored, _, err := reg.Leases(ctx)
	if err != nil {
		closeReg()
		return nil, nil, err
	}
	env, err := subnet.ReadEnv(l.EnvFile(i))
	if err != nil {
		closeReg()
		return nil, nil, err
	}
	sn := env.Subnet.Masked()
	var peers []subnet.Lease
	for _, p := range stored {
		if p.Subnet != sn {
			peers = append(peers, p.Lease)
		}
	}
	publish := func(ctx context.Context) error {
		defer closeReg()
		grant, err := reg.Client().Grant(ctx, 24*60*60)
		if err != nil {
			return err
		}
		value := fmt.Sprintf(`{"PublicIP":"%s","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"%s"}}`, l.Topology().HostAddr(i), mac)
		_, err = reg.Client().Put(ctx, reg.SubnetKey(sn), value, clientv3.WithLease(grant.ID))
		return err
	}
	return peers, publish, nil
}

func linkMAC(ctx context.Context, netns, dev string) (string, error) {
	out, err := IP(ctx, "-n", netns, "-j", "link", "show", dev)
	if err != nil {
		return "", err
	}
	var links []struct{ Address string }
	if err := json.Unmarshal([]byte(out), &links); err != nil || len(links) != 1 {
		return "", fmt.Errorf("link %s in %s: %q: %v", dev, netns, out, err)
	}
	return links[0].Address, nil
}

// registry opens the lab's etcd from this process: its connections are made
// inside the underlay namespace, where etcd is.
func (l *Lab) registry() (*etcd.Registry, func(), error) {
	dial := DialInNS(l.Topology().UnderlayNS())
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   strings.Split(l.EtcdEndpoints(), ","),
		DialTimeout: 5 * time.Second,
		DialOptions: []grpc.DialOption{grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return dial(ctx, "tcp", addr)
		})},
	})
	if err != nil {
		return nil, nil, err
	}
	prefix := l.EtcdPrefix
	if prefix == "" {
		prefix = etcd.DefaultPrefix
	}
	return etcd.NewRegistry(cli, prefix, nil), func() { cli.Close() }, nil
}

// PingRun is what a continuous ping saw.
type PingRun struct {
	From, To          string
	Sent, Received    int
	Interval, Elapsed time.Duration
}

func (p PingRun) String() string {
	return fmt.Sprintf("%s -> %s: %d sent every %s, %d answered, %d lost", p.From, p.To, p.Sent, p.Interval, p.Received, p.Sent-p.Received)
}

var pingSummary = regexp.MustCompile(`(\d+) packets transmitted, (\d+) (?:packets )?received`)

// PingFor pings to from a pod's namespace every interval for d: a bounded
// run inside the lab.
func PingFor(ctx context.Context, from Pod, to Pod, interval, d time.Duration) (PingRun, error) {
	r := PingRun{From: from.Name, To: to.Name, Interval: interval}
	start := time.Now()
	out, err := InNS(ctx, from.NS, "ping", "-q", "-i", strconv.FormatFloat(interval.Seconds(), 'f', 3, 64),
		"-w", strconv.Itoa(int(d.Seconds())), "-W", "1", to.Addr.String())
	r.Elapsed = time.Since(start)
	m := pingSummary.FindStringSubmatch(out)
	if m == nil {
		return r, fmt.Errorf("ping from %s to %s: %v: %s", from.Name, to.Name, err, out)
	}
	r.Sent, _ = strconv.Atoi(m[1])
	r.Received, _ = strconv.Atoi(m[2])
	return r, nil
}

// MigrateFromFlannel switches flannel node i to twilld while a pod on
// another host and a pod on i ping each other every 50 ms, and returns what
// the pings saw. twilld adopts flannel.1 as it is, so none should be lost.
func (l *Lab) MigrateFromFlannel(ctx context.Context, i int) ([]PingRun, error) {
	var on, other []Pod
	for _, p := range l.Pods {
		if p.Host == i {
			on = append(on, p)
		} else {
			other = append(other, p)
		}
	}
	if len(on) == 0 || len(other) == 0 {
		return nil, fmt.Errorf("no pod on h%d and another host to ping between", i)
	}
	pairs := [][2]Pod{{other[0], on[0]}, {on[0], other[0]}}
	runs := make([]PingRun, len(pairs))
	errs := make([]error, len(pairs))
	var wg sync.WaitGroup
	for k, p := range pairs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runs[k], errs[k] = PingFor(ctx, p[0], p[1], 50*time.Millisecond, 5*time.Second)
		}()
	}
	time.Sleep(time.Second)
	startErr := l.StartDaemon(i)
	wg.Wait()
	if startErr != nil {
		return runs, startErr
	}
	for _, err := range errs {
		if err != nil {
			return runs, err
		}
	}
	return runs, nil
}
