// Package kubeinformer measures what twill's Kubernetes mode keeps in memory
// for the Nodes of a large cluster, against a real kube-apiserver.
package kubeinformer

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/twillnet/twill/bench/kubenode"
	"github.com/twillnet/twill/internal/tools/testenv"
	"github.com/twillnet/twill/subnet"
	"github.com/twillnet/twill/subnet/kube"
)

// BenchmarkInformer5000Nodes measures the heap the Node informer's cache holds
// for 5,000 realistic Nodes in a real API server, without the transform, with
// SlimNode, and for the whole Manager (informer with SlimNode plus the lease
// cache). Setup creates the Nodes with 20 concurrent clients; etcd runs as a
// separate process so that its memory is not counted.
//
// It takes minutes, so it runs only when named (a plain -bench . skips it):
//
//	cd bench && go test -run '^$' -bench Informer5000Nodes ./kubeinformer/
//
// TWILL_KUBE_BENCH_NODES=500 makes a quick try with fewer Nodes.
func BenchmarkInformer5000Nodes(b *testing.B) {
	if pattern := flag.Lookup("test.bench").Value.String(); !strings.Contains(pattern, "Informer5000Nodes") || testing.Short() {
		b.Skip("takes minutes: run it by name, -bench Informer5000Nodes")
	}
	nodes := 5000
	if s := os.Getenv("TWILL_KUBE_BENCH_NODES"); s != "" {
		var err error
		if nodes, err = strconv.Atoi(s); err != nil || nodes < 2 {
			b.Fatalf("TWILL_KUBE_BENCH_NODES=%q: want a number above 1", s)
		}
	}
	api := testenv.StartKubeAPI(b, testenv.KubeAPIOptions{EtcdProcess: true})
	cfg := api.AdminConfig()
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	admin, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	createNodes(b, admin, nodes, 20)
	b.Logf("created %d Nodes in %v", nodes, time.Since(start).Round(time.Millisecond))
	sample, err := admin.CoreV1().Nodes().Get(context.Background(), "node-00001", metav1.GetOptions{})
	if err != nil {
		b.Fatal(err)
	}
	raw, _ := sample.Marshal()
	var managers []string
	for _, mf := range sample.ManagedFields {
		managers = append(managers, mf.Manager+"/"+string(mf.Operation)+"/"+mf.Subresource)
	}
	b.Logf("one Node: %d bytes protobuf, managedFields of %v, %d images, %d conditions, %d labels, %d annotations",
		len(raw), managers, len(sample.Status.Images), len(sample.Status.Conditions), len(sample.Labels), len(sample.Annotations))

	// The informers read with the client's default (JSON) encoding, as twilld
	// does unless told otherwise.
	client, err := kubernetes.NewForConfig(api.AdminConfig())
	if err != nil {
		b.Fatal(err)
	}
	var full, slim, mgr uint64
	for b.Loop() {
		t0 := time.Now()
		full = informerHeap(b, client, nil, nodes)
		t1 := time.Now()
		slim = informerHeap(b, client, kube.SlimNode(""), nodes)
		t2 := time.Now()
		mgr = managerHeap(b, client, nodes)
		b.Logf("informer synced in %v without the transform, %v with; the Manager in %v",
			t1.Sub(t0).Round(time.Millisecond), t2.Sub(t1).Round(time.Millisecond), time.Since(t2).Round(time.Millisecond))
	}
	b.ReportMetric(float64(full)/(1<<20), "MiB-no-transform")
	b.ReportMetric(float64(slim)/(1<<20), "MiB-transform")
	b.ReportMetric(float64(mgr)/(1<<20), "MiB-manager")
	b.ReportMetric(float64(full)/float64(nodes), "B/node-no-transform")
	b.ReportMetric(float64(slim)/float64(nodes), "B/node-transform")
	b.Logf("heap held for %d Nodes: no transform %.1f MiB, SlimNode %.1f MiB (%.1fx less), whole Manager %.1f MiB",
		nodes, float64(full)/(1<<20), float64(slim)/(1<<20), float64(full)/float64(slim), float64(mgr)/(1<<20))
}

// liveHeap is the heap in use after full collections.
func liveHeap() uint64 {
	var ms runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// informerHeap starts a Node informer, waits until it holds every Node, and
// returns the growth of the live heap.
func informerHeap(b *testing.B, cs kubernetes.Interface, tr cache.TransformFunc, want int) uint64 {
	b.Helper()
	before := liveHeap()
	var opts []informers.SharedInformerOption
	if tr != nil {
		opts = append(opts, informers.WithTransform(tr))
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	f := informers.NewSharedInformerFactoryWithOptions(cs, 0, opts...)
	inf := f.Core().V1().Nodes().Informer()
	f.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		b.Fatal("informer did not sync")
	}
	if n := len(inf.GetStore().ListKeys()); n != want {
		b.Fatalf("informer holds %d Nodes, want %d", n, want)
	}
	after := liveHeap()
	runtime.KeepAlive(inf)
	cancel()
	f.Shutdown()
	return after - min(before, after)
}

// managerHeap runs a Manager until its peers are synced and returns the
// growth of the live heap.
func managerHeap(b *testing.B, cs kubernetes.Interface, want int) uint64 {
	b.Helper()
	before := liveHeap()
	cfg, err := subnet.ParseConfig([]byte(`{"Network":"10.128.0.0/9"}`)) // createNodes' podCIDRs
	if err != nil {
		b.Fatal(err)
	}
	m, err := kube.NewManager(kube.Options{Client: cs.CoreV1().Nodes(), NodeName: "node-00000"}, cfg, subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("192.0.2.1"), BackendType: "vxlan", BackendData: []byte(`{"VNI":1,"VtepMAC":"ae:12:34:56:78:9a"}`)})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := m.Acquire(ctx); err != nil {
		b.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); m.Run(ctx) }()
	deadline := time.After(5 * time.Minute)
	for {
		p, ok := m.Peers()
		if ok && len(p) == want-1 {
			break
		}
		select {
		case <-m.Changed():
		case <-time.After(time.Second):
		case <-deadline:
			b.Fatalf("the Manager has %d peers after 5 minutes, want %d", len(p), want-1)
		}
	}
	after := liveHeap()
	runtime.KeepAlive(m)
	cancel()
	<-done
	return after - min(before, after)
}

// createNodes creates n realistic Nodes (bench/kubenode) with w concurrent
// workers, each written as a cluster writes it: registered by "kubelet", given
// its podCIDR by "kube-controller-manager", reported on by "kubelet" through
// nodes/status and annotated by "twilld" through nodes/status.
func createNodes(b *testing.B, cs kubernetes.Interface, n, w int) {
	b.Helper()
	err := kubenode.CreateAll(context.Background(), cs, n, w, func(i int) kubenode.Spec {
		ip := fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255)
		keys := kube.Keys("")
		ann := map[string]string{
			keys.BackendType: subnet.BackendVXLAN,
			keys.BackendData: fmt.Sprintf(`{"VNI":1,"VtepMAC":"ae:00:00:%02x:%02x:%02x"}`, i>>16&255, i>>8&255, i&255),
			keys.PublicIP:    ip,
		}
		return kubenode.Spec{
			Name: fmt.Sprintf("node-%05d", i), Index: i, InternalIP: ip,
			PodCIDR:     fmt.Sprintf("10.%d.%d.0/24", 128+i>>8, i&255), // inside managerHeap's Network
			Annotations: ann,
		}
	}, kube.FieldManager)
	if err != nil {
		b.Fatal(err)
	}
}
