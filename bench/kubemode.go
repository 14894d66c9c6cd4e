package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/metadata"
	"k8s.io/client-go/rest"

	"github.com/twillnet/twill/backend/vxlan"
	"github.com/twillnet/twill/bench/kubenode"
	"github.com/twillnet/twill/deploy"
	"github.com/twillnet/twill/internal/tools/kubeapi"
	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/subnet"
	"github.com/twillnet/twill/subnet/kube"
)

// kubeMode is the set-up of section 3: the lab's topology with one host, the
// real etcd and the real kube-apiserver (bin/tools) serving in the underlay
// namespace, realistic peer Nodes in it (bench/kubenode), for the
// nodenetwork mode the peers' NodeNetwork records too, the own Node with a
// podCIDR, and twilld in the host namespace in Kubernetes mode with the
// ServiceAccount, RBAC and admission policy of deploy/kube-twill.yaml and a
// token bound to a pod on its node.
type kubeMode struct {
	benchHost
	etcd    *etcdServer
	srv     kubeapi.Server
	api     *Proc
	admin   kubernetes.Interface // protobuf, no client-side rate limit
	json    kubernetes.Interface // JSON only, to weigh a Node as JSON
	meta    metadata.Interface   // the Nodes' metadata (UIDs for ownerReferences)
	cfg     *rest.Config         // the cluster admin's
	records kube.RecordClient    // NodeNetworks, as the cluster admin, no client-side rate limit
	nodes   int                  // peer Nodes (series 0) now in the API server
	recs    int                  // peer NodeNetwork records (series 0) now in the API server
	// mode is twilld's --kube-mode at its next start: kubeAnnotations or
	// kubeNodeNetwork.
	mode string
	// beats counts the status heartbeats written so far, so that the churn
	// of one mode goes on with the Nodes the previous one did not write.
	beats int
	// plainWrite is what one Node status write weighs on a plain watch of
	// Nodes, in bytes (kubeWatchBytes).
	plainWrite float64
}

// twilld's --kube-mode values.
const (
	kubeAnnotations = "annotations"
	kubeNodeNetwork = "nodenetwork"
)

// ownPodCIDR is the own Node's podCIDR: inside benchNetwork, apart from the
// peers' (10.64.0.0 on) and the added ones' (10.200.0.0 on).
const ownPodCIDR = "10.1.0.0/24"

// kubeWorkers is how many clients create the peer Nodes at once.
const kubeWorkers = 16

func newKubeMode(ctx context.Context, h *Harness) (k *kubeMode, err error) {
	k = &kubeMode{benchHost: newBenchHost(h, "kube-mode")}
	if err := os.MkdirAll(filepath.Join(k.dir, "h1"), 0o755); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			k.close()
		}
	}()
	if err := k.topo.Up(ctx); err != nil {
		return k, err
	}
	if k.etcd, err = startEtcd(ctx, filepath.Join(h.cfg.ToolsDir, "etcd"), k.topo.UnderlayNS(), k.dir); err != nil {
		return k, err
	}
	k.srv = kubeapi.Server{
		Binary: filepath.Join(h.cfg.ToolsDir, "kube-apiserver"), Dir: filepath.Join(k.dir, "kube"),
		Host: lab.WorldAddr.String(), Port: lab.KubePort, EtcdURL: k.etcd.url,
	}
	argv, token, err := k.srv.Prepare()
	if err != nil {
		return k, err
	}
	if k.api, err = startInNS(k.topo.UnderlayNS(), filepath.Join(k.dir, "kube-apiserver.log"), argv[0], argv[1:]...); err != nil {
		return k, err
	}
	dial := lab.DialInNS(k.topo.UnderlayNS())
	if err := kubeapi.WaitReady(ctx, k.srv.URL(), dial, 90*time.Second); err != nil {
		return k, fmt.Errorf("%w (see %s)", err, k.api.Log)
	}
	cfg := k.srv.Config(token, dial)
	k.cfg = cfg
	jcfg := rest.CopyConfig(cfg)
	jcfg.AcceptContentTypes, jcfg.ContentType = "application/json", "application/json"
	if k.json, err = kubernetes.NewForConfig(jcfg); err != nil {
		return k, err
	}
	fast := rest.CopyConfig(cfg)
	fast.QPS = -1 // no client-side limit: the workers bound the load
	fast.ContentType = "application/vnd.kubernetes.protobuf"
	if k.admin, err = kubernetes.NewForConfig(fast); err != nil {
		return k, err
	}
	if k.meta, err = metadata.NewForConfig(fast); err != nil {
		return k, err
	}
	if k.records, err = kube.NewRecordClient(fast); err != nil {
		return k, err
	}
	// twilld runs with exactly the permissions the manifest grants.
	if _, err := kubeapi.Apply(ctx, cfg, deploy.KubeManifest, false); err != nil {
		return k, err
	}
	// The own Node as the kubelet and the node IPAM controller leave it;
	// twilld publishes its annotations (or its record) at every start.
	own := kubenode.Spec{Name: benchNode, Index: 65535, InternalIP: k.topo.HostAddr(1).String(), PodCIDR: ownPodCIDR}
	if err := kubenode.Register(ctx, k.admin, own); err != nil {
		return k, err
	}
	// A token bound to a (Pending) pod on the own node, as the kubelet
	// projects one into the DaemonSet's pod: the manifest's admission
	// policy lets it write that node's record and status only.
	saToken, err := kubeapi.PodBoundToken(ctx, k.admin, "kube-twill", "twill", "twill-"+benchNode, benchNode, 24*time.Hour)
	if err != nil {
		return k, err
	}
	if err := k.srv.WriteKubeconfig(k.kubeconfig(), saToken); err != nil {
		return k, err
	}
	conf := fmt.Sprintf(`{"Network":%q,"SubnetLen":24,"Backend":{"Type":"vxlan"}}`, benchNetwork)
	if err := os.WriteFile(k.netConf(), []byte(conf), 0o644); err != nil {
		return k, err
	}
	return k, nil
}

func (k *kubeMode) close() {
	k.twilld.Stop()
	k.api.Stop()
	if k.etcd != nil {
		k.etcd.close()
	}
	k.topo.Down(context.Background())
}

func (k *kubeMode) kubeconfig() string { return filepath.Join(k.dir, "h1", "kubeconfig") }
func (k *kubeMode) netConf() string    { return filepath.Join(k.dir, "net-conf.json") }

// peerNode is the Node of fake peer i of a series (peerAt): its podCIDR,
// its InternalIP and public IP in 198.19.0.0/16 (reached by nothing), its VTEP
// MAC in twill's annotations as twilld on that node would publish them.
func peerNode(series, i int) kubenode.Spec {
	p := peerAt(series, i)
	data, _ := json.Marshal(vxlan.Data{VNI: 1, VtepMAC: p.MAC})
	keys := kube.Keys("")
	return kubenode.Spec{
		Name: fmt.Sprintf("peer-%d-%05d", series, i), Index: series<<16 | i,
		InternalIP: p.PublicIP.String(), PodCIDR: p.Subnet.String(),
		Annotations: map[string]string{
			keys.BackendType: subnet.BackendVXLAN,
			keys.BackendData: string(data),
			keys.PublicIP:    p.PublicIP.String(),
		},
	}
}

// peerRecord is the NodeNetwork record twilld on the Node of fake peer i of a
// series would publish (the same lease as peerNode's annotations), owned by
// that Node (uid).
func peerRecord(series, i int, uid types.UID) *kube.NodeNetwork {
	p := peerAt(series, i)
	data, _ := json.Marshal(vxlan.Data{VNI: 1, VtepMAC: p.MAC})
	name := peerNode(series, i).Name
	return &kube.NodeNetwork{
		ObjectMeta: metav1.ObjectMeta{Name: name, OwnerReferences: []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: name, UID: uid}}},
		Spec: kube.NodeNetworkSpec{BackendType: subnet.BackendVXLAN, Subnet: p.Subnet.String(), PublicIP: p.PublicIP.String(),
			BackendData: data},
	}
}

// addRecords creates the NodeNetwork records of the peer Nodes of series 0
// until there are n, each owned by its Node, with kubeWorkers clients.
func (k *kubeMode) addRecords(ctx context.Context, n int) error {
	if n > k.nodes {
		return fmt.Errorf("%d records for %d peer Nodes", n, k.nodes)
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	// The CustomResourceDefinition is served a moment after it is applied.
	err := lab.Poll(ctx, 30*time.Second, 100*time.Millisecond, "the NodeNetwork resource", func() error {
		_, err := k.records.List(ctx, metav1.ListOptions{Limit: 1})
		return err
	})
	if err != nil {
		return err
	}
	uids := map[string]types.UID{}
	opts := metav1.ListOptions{Limit: 1000}
	for {
		l, err := k.meta.Resource(corev1.SchemeGroupVersion.WithResource("nodes")).List(ctx, opts)
		if err != nil {
			return fmt.Errorf("list the Nodes' metadata: %w", err)
		}
		for _, m := range l.Items {
			uids[m.Name] = m.UID
		}
		if opts.Continue = l.Continue; opts.Continue == "" {
			break
		}
	}
	from := k.recs
	err = kubenode.Parallel(ctx, n-from, kubeWorkers, func(ctx context.Context, j int) error {
		i := from + j
		name := peerNode(0, i).Name
		uid, ok := uids[name]
		if !ok {
			return fmt.Errorf("no Node %s for its record", name)
		}
		if _, err := k.records.Create(ctx, peerRecord(0, i, uid), metav1.CreateOptions{FieldManager: kube.FieldManager}); err != nil {
			return fmt.Errorf("create NodeNetwork %s: %w", name, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	k.recs = n
	return nil
}

// addNodes creates peer Nodes of series 0 until there are n.
func (k *kubeMode) addNodes(ctx context.Context, n int) error {
	if n < k.nodes {
		return fmt.Errorf("the API server holds %d peer Nodes; fewer (%d) are not supported", k.nodes, n)
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	from := k.nodes
	err := kubenode.CreateAll(ctx, k.admin, n-from, kubeWorkers, func(i int) kubenode.Spec { return peerNode(0, from+i) }, kube.FieldManager)
	if err != nil {
		return err
	}
	k.nodes = n
	return nil
}

// startTwilld starts twilld in Kubernetes mode in the host namespace, as the
// DaemonSet runs it (but forked directly, see startInNSEnv).
func (k *kubeMode) startTwilld(extra ...string) error {
	return k.start([]string{"--kube-subnet-mgr", "--kube-mode", k.mode, "--kubeconfig", k.kubeconfig(), "--net-config", k.netConf()}, extra...)
}

// reset stops twilld and returns the host and its Node to a fresh node's
// state: no device, no twill routes, no env file, a Node without twill's
// annotations and NetworkUnavailable condition (as the kubelet and the node
// IPAM controller leave it), and no NodeNetwork record of the node. The
// peer Nodes and records stay.
func (k *kubeMode) reset(ctx context.Context) error {
	errs := k.resetHost(ctx)
	if err := k.resetOwnNode(ctx); err != nil {
		errs = append(errs, err)
	}
	if k.records != nil {
		dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err := k.records.Delete(dctx, benchNode, metav1.DeleteOptions{})
		cancel()
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("reset NodeNetwork %s: %w", benchNode, err))
		}
	}
	return errors.Join(errs...)
}

// resetOwnNode removes what twilld wrote on its Node, in one status update
// (annotations can be changed through nodes/status, which is how twilld
// writes them).
func (k *kubeMode) resetOwnNode(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for attempt := 0; ; attempt++ {
		node, err := k.admin.CoreV1().Nodes().Get(ctx, benchNode, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("reset Node %s: %w", benchNode, err)
		}
		keys := kube.Keys("")
		changed := false
		for _, a := range []string{keys.BackendType, keys.BackendData, keys.PublicIP} {
			if _, ok := node.Annotations[a]; ok {
				delete(node.Annotations, a)
				changed = true
			}
		}
		conds := slices.DeleteFunc(slices.Clone(node.Status.Conditions), func(c corev1.NodeCondition) bool {
			return c.Type == corev1.NodeNetworkUnavailable
		})
		if len(conds) != len(node.Status.Conditions) {
			node.Status.Conditions, changed = conds, true
		}
		if !changed {
			return nil
		}
		_, err = k.admin.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{FieldManager: "twillbench"})
		if err == nil || !apierrors.IsConflict(err) || attempt >= 5 {
			if err != nil {
				return fmt.Errorf("reset Node %s: %w", benchNode, err)
			}
			return nil
		}
	}
}

// kubeColdStart is one measured start of twilld in Kubernetes mode with n
// peer Nodes. twilld is left running with w still watching.
type kubeColdStart struct {
	coldStart
	// APICPU and EtcdCPU are what kube-apiserver and etcd spent between
	// the fork and the last entry: the server side of the start.
	APICPU, EtcdCPU float64
	// AnonMiB and FileMiB split twilld's RSS 0.5 s after the last entry:
	// anonymous memory (Go heap, stacks, runtime) and file-backed pages (the
	// binary's code and data it touched).
	AnonMiB, FileMiB float64
	// Go's own view then, from twilld's /metrics (scraped after the RSS
	// was read): the heap in use, the heap the runtime holds from the
	// kernel (obtained minus released), and everything it obtained.
	HeapInuseMiB, HeapHeldMiB, GoSysMiB float64
	// ReadMiB is what twilld read (rchar: its API server connection, and
	// the files it read) from the fork to the last entry.
	ReadMiB float64
	// Objects are what its informers had delivered 0.5 s after the last
	// entry (twill_kube_watch_events_total), by resource.
	Objects map[string]float64
}

func (k *kubeMode) coldStart(ctx context.Context, n int, extra ...string) (*kubeColdStart, error) {
	if err := k.reset(ctx); err != nil {
		return nil, fmt.Errorf("reset h1 before a start: %w", err)
	}
	w, err := watchKernel(k.hostNS())
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			w.close()
		}
	}()
	api0, _ := usage(k.api.Pid())
	etcd0, _ := usage(k.etcd.proc.Pid())
	cs, err := timeStart(ctx, w, allAtLeast(n, false), fmt.Sprintf("%d routes, neighbours and FDB entries", n), n, k.envFile(), 60*time.Second, 3*time.Minute, func() (*Proc, error) {
		err := k.startTwilld(extra...)
		return k.twilld, err
	})
	if err != nil {
		return nil, err
	}
	p := k.twilld
	read, _ := readBytes(p.Pid())
	api1, _ := usage(k.api.Pid())
	etcd1, _ := usage(k.etcd.proc.Pid())
	r := &kubeColdStart{coldStart: *cs, APICPU: api1.CPUSeconds - api0.CPUSeconds, EtcdCPU: etcd1.CPUSeconds - etcd0.CPUSeconds,
		ReadMiB: read / (1 << 20), Objects: map[string]float64{}}
	// The peak may come after the last entry (the second pass, the
	// NetworkUnavailable patch): look again a moment later.
	if err := sleep(ctx, 500*time.Millisecond); err != nil {
		return nil, err
	}
	if u2, err := usage(p.Pid()); err == nil {
		r.HWM, r.RSS = max(r.HWM, u2.HWMMiB), u2.RSSMiB
		r.AnonMiB, r.FileMiB = u2.AnonMiB, u2.FileMiB
	}
	if body, err := nsHTTPGet(ctx, k.hostNS(), "http://127.0.0.1:9867/metrics"); err == nil {
		m := parseProm(body)
		mib := func(name string) float64 { return promValue(m, name, nil) / (1 << 20) }
		r.HeapInuseMiB = mib("go_memstats_heap_inuse_bytes")
		r.HeapHeldMiB = mib("go_memstats_heap_sys_bytes") - mib("go_memstats_heap_released_bytes")
		r.GoSysMiB = mib("go_memstats_sys_bytes")
		for _, res := range []string{kube.ResourceNodes, kube.Resource} {
			r.Objects[res] = promValue(m, "twill_kube_watch_events_total", map[string]string{"resource": res})
		}
	}
	if err := verifyHost(ctx, k.topo, n, false); err != nil {
		return nil, err
	}
	r.Phases = logPhases(p.Log, p.Started, false)
	if k.mode == kubeNodeNetwork {
		if d, ok := logFirst(p.Log, p.Started, "NodeNetwork records listed"); ok {
			r.Phases["records listed (informers synced)"] = d
		}
	} else if d, ok := logFirst(p.Log, p.Started, "nodes listed"); ok {
		r.Phases["Nodes listed (informer synced)"] = d
	}
	ok = true
	return r, nil
}

// verifyHost dumps host 1's tables (after a measurement) and checks that
// they hold exactly n entries of each kind, of each family when dual. The
// dump counts both families together; that each family has n is what the
// notifications showed at the last entry (allAtLeast), so 2n in all means
// exactly n of each.
func verifyHost(ctx context.Context, topo lab.Topology, n int, dual bool) error {
	l := &lab.Lab{State: lab.State{Options: lab.Options{Prefix: topo.Prefix, Hosts: 1}}}
	c, err := l.Counts(ctx, 1)
	if err != nil {
		return err
	}
	want, devices := n, []string{vxlan.DeviceName(subnet.DefaultVNI, false)}
	if dual {
		want, devices = 2*n, append(devices, vxlan.DeviceName(subnet.DefaultVNI, true))
	}
	have := strings.Split(c.Device, ",")
	slices.Sort(have)
	slices.Sort(devices)
	if c.Routes != want || c.Neigh != want || c.FDB != want || !slices.Equal(have, devices) {
		return fmt.Errorf("h1 holds %d routes, %d neighbours, %d FDB entries on %q; want %d of each on %s", c.Routes, c.Neigh, c.FDB, c.Device, want, strings.Join(devices, ","))
	}
	return nil
}
