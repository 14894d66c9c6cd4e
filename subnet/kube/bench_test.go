package kube

import (
	"context"
	"flag"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/twillnet/twill/internal/testenv"
	"github.com/twillnet/twill/subnet"
)

// BenchmarkInformer5000Nodes measures the heap the Node informer's cache holds
// for 5,000 realistic Nodes in a real API server, without the transform, with
// SlimNode, and for the whole Manager (informer with SlimNode plus the lease
// cache). Setup creates the Nodes with 20 concurrent clients; etcd runs as a
// separate process so that its memory is not counted.
//
// It takes minutes, so it runs only when named (a plain -bench . skips it):
//
//	go test -run '^$' -bench Informer5000Nodes ./subnet/kube/
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
		slim = informerHeap(b, client, SlimNode(""), nodes)
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
	cfg, err := subnet.ParseConfig([]byte(`{"Network":"10.128.0.0/9"}`)) // realisticNode's podCIDRs
	if err != nil {
		b.Fatal(err)
	}
	m, err := NewManager(Options{Client: cs, NodeName: "node-00000"}, cfg, vxlanAttrs("192.0.2.1"))
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

// createNodes creates n realistic Nodes with w concurrent workers: each Node
// is created and then reported on by "kubelet" (its status and managedFields
// as a kubelet leaves them) and annotated by "twilld" through nodes/status.
func createNodes(b *testing.B, cs kubernetes.Interface, n, w int) {
	b.Helper()
	ctx := context.Background()
	var next, failed atomic.Int64
	var wg sync.WaitGroup
	var firstErr error
	var once sync.Once
	for range w {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n || failed.Load() > 0 {
					return
				}
				if err := createNode(ctx, cs, i); err != nil {
					failed.Add(1)
					once.Do(func() { firstErr = err })
					return
				}
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		b.Fatal(firstErr)
	}
}

func createNode(ctx context.Context, cs kubernetes.Interface, i int) error {
	n := realisticNode(i)
	// A kubelet registers its Node with a first status and reports the
	// images later through nodes/status, so managedFields get an entry each.
	status := *n.Status.DeepCopy()
	n.Status.Images = nil
	created, err := cs.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{FieldManager: "kubelet"})
	if err != nil {
		return fmt.Errorf("create node %d: %w", i, err)
	}
	created.Status = status
	hb := metav1.NewTime(time.Now())
	for j := range created.Status.Conditions {
		created.Status.Conditions[j].LastHeartbeatTime = hb
	}
	if _, err := cs.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{FieldManager: "kubelet"}); err != nil {
		return fmt.Errorf("update status of node %d: %w", i, err)
	}
	ann := Keys("").owned(vxlanAttrs(fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255)))
	ann[Keys("").BackendData] = fmt.Sprintf(`{"VNI":1,"VtepMAC":"ae:00:00:%02x:%02x:%02x"}`, i>>16&255, i>>8&255, i&255)
	patch := []byte(`{"metadata":{"annotations":{`)
	first := true
	for k, v := range ann {
		if !first {
			patch = append(patch, ',')
		}
		first = false
		patch = fmt.Appendf(patch, "%q:%q", k, v)
	}
	patch = append(patch, "}}}"...)
	if _, err := cs.CoreV1().Nodes().Patch(ctx, n.Name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: FieldManager}, "status"); err != nil {
		return fmt.Errorf("annotate node %d: %w", i, err)
	}
	return nil
}

// realisticNode looks like a Node of a cloud cluster: labels, the usual
// annotations, 10 conditions, 4 addresses, capacity, node info and 50 images
// with long names and digests.
func realisticNode(i int) *corev1.Node {
	name := fmt.Sprintf("node-%05d", i)
	ip := fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255)
	cidr := fmt.Sprintf("10.%d.%d.0/24", 128+i>>8, i&255)
	zone := fmt.Sprintf("europe-west4-%c", 'a'+i%3)
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: name,
			Labels: map[string]string{
				"beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
				"beta.kubernetes.io/instance-type": "n2-standard-8", "kubernetes.io/arch": "amd64",
				"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
				"node.kubernetes.io/instance-type": "n2-standard-8", "topology.kubernetes.io/region": "europe-west4",
				"topology.kubernetes.io/zone": zone, "failure-domain.beta.kubernetes.io/zone": zone,
				"cloud.google.com/gke-nodepool": "default-pool", "cloud.google.com/machine-family": "n2",
			},
			Annotations: map[string]string{
				"node.alpha.kubernetes.io/ttl":                           "0",
				"volumes.kubernetes.io/controller-managed-attach-detach": "true",
				"csi.volume.kubernetes.io/nodeid":                        fmt.Sprintf(`{"pd.csi.storage.gke.io":"projects/example/zones/%s/instances/%s"}`, zone, name),
				"container.googleapis.com/instance_id":                   fmt.Sprintf("%019d", 7000000000000000000+i),
			},
		},
		Spec: corev1.NodeSpec{
			PodCIDR: cidr, PodCIDRs: []string{cidr},
			ProviderID: fmt.Sprintf("gce://example/%s/%s", zone, name),
		},
	}
	now := metav1.NewTime(time.Now().Truncate(time.Second))
	cond := func(t corev1.NodeConditionType, s corev1.ConditionStatus, reason, msg string) corev1.NodeCondition {
		return corev1.NodeCondition{Type: t, Status: s, Reason: reason, Message: msg, LastHeartbeatTime: now, LastTransitionTime: now}
	}
	st := &n.Status
	st.Conditions = []corev1.NodeCondition{
		cond("FrequentUnregisterNetDevice", "False", "NoFrequentUnregisterNetDevice", "node is functioning properly"),
		cond("FrequentKubeletRestart", "False", "NoFrequentKubeletRestart", "kubelet is functioning properly"),
		cond("FrequentDockerRestart", "False", "NoFrequentDockerRestart", "docker is functioning properly"),
		cond("FrequentContainerdRestart", "False", "NoFrequentContainerdRestart", "containerd is functioning properly"),
		cond("KernelDeadlock", "False", "KernelHasNoDeadlock", "kernel has no deadlock"),
		cond("ReadonlyFilesystem", "False", "FilesystemIsNotReadOnly", "Filesystem is not read-only"),
		cond(corev1.NodeMemoryPressure, "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
		cond(corev1.NodeDiskPressure, "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
		cond(corev1.NodePIDPressure, "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
		cond(corev1.NodeReady, "True", "KubeletReady", "kubelet is posting ready status"),
	}
	st.Addresses = []corev1.NodeAddress{
		{Type: corev1.NodeInternalIP, Address: ip},
		{Type: corev1.NodeExternalIP, Address: fmt.Sprintf("34.%d.%d.%d", i>>16&255, i>>8&255, i&255)},
		{Type: corev1.NodeInternalDNS, Address: name + ".europe-west4.c.example.internal"},
		{Type: corev1.NodeHostName, Address: name},
	}
	res := corev1.ResourceList{
		corev1.ResourceCPU: resource.MustParse("8"), corev1.ResourceMemory: resource.MustParse("32880596Ki"),
		corev1.ResourcePods: resource.MustParse("110"), corev1.ResourceEphemeralStorage: resource.MustParse("98831908Ki"),
		"hugepages-1Gi": resource.MustParse("0"), "hugepages-2Mi": resource.MustParse("0"),
		"attachable-volumes-gce-pd": resource.MustParse("127"),
	}
	st.Capacity, st.Allocatable = res, res.DeepCopy()
	st.DaemonEndpoints.KubeletEndpoint.Port = 10250
	st.NodeInfo = corev1.NodeSystemInfo{
		MachineID: fmt.Sprintf("%032x", i), SystemUUID: fmt.Sprintf("%08x-0000-4000-8000-%012x", i, i),
		BootID: fmt.Sprintf("%08x-1111-4111-8111-%012x", i, i), KernelVersion: "6.6.56+",
		OSImage: "Container-Optimized OS from Google", ContainerRuntimeVersion: "containerd://1.7.24",
		KubeletVersion: "v1.37.2", KubeProxyVersion: "v1.37.2", OperatingSystem: "linux", Architecture: "amd64",
	}
	for j := range 50 {
		repo := fmt.Sprintf("europe-west4-docker.pkg.dev/example-platform-prod/services/team-%02d/service-with-a-long-name-%02d", j%7, j)
		digest := fmt.Sprintf("%064x", uint64(j+1)*0x9e3779b97f4a7c15)
		st.Images = append(st.Images, corev1.ContainerImage{
			Names:     []string{repo + "@sha256:" + strings.Repeat(digest[:16], 4), fmt.Sprintf("%s:v1.%d.%d", repo, j, i%10)},
			SizeBytes: int64(20_000_000 + j*1_234_567),
		})
	}
	return n
}
