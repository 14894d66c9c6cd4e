// Package kubenode makes realistic Node objects in a real kube-apiserver, as
// the benchmarks of Kubernetes mode need them: a Node of a cloud cluster is
// mostly what twill does not read (its status with about 50 images,
// conditions, addresses and node info, its labels, and the managedFields of
// every writer), and that is what twilld's informer has to receive and decode
// for every Node.
//
// The Nodes are written the way a cluster writes them, so their managedFields
// are the real thing: the kubelet registers the Node (without a podCIDR), the
// node IPAM controller of kube-controller-manager sets spec.podCIDR(s), the
// kubelet reports the status through nodes/status, and twilld on that node
// publishes its annotations and the NetworkUnavailable condition through
// nodes/status. Four writes per Node.
//
// It is shared by the twillbench harness (section 3) and by
// subnet/kube's informer benchmark; it must not import subnet/kube, whose
// tests import it.
package kubenode

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
)

// Field managers of the writers a Node has in a cluster.
const (
	Kubelet           = "kubelet"
	ControllerManager = "kube-controller-manager"
)

// Spec is what makes one Node differ from the others.
type Spec struct {
	Name string
	// Index varies the Node's identifiers (machine ID, zone, image tags).
	Index int
	// InternalIP is the address the kubelet reports (twilld's public IP).
	InternalIP string
	// PodCIDR is set by "kube-controller-manager" after registration;
	// empty for none.
	PodCIDR string
	// Annotations, when not empty, are published by "twilld" (the field
	// manager given to Create) with the NetworkUnavailable=False condition,
	// as twilld on that node would.
	Annotations map[string]string
}

// Realistic returns the Node a kubelet of a cloud cluster registers and
// reports on: 12 labels, 4 annotations, 10 conditions, 4 addresses,
// capacity and allocatable, node info, and 50 images, each with a digest and
// a tag name, about 130 bytes each. Its podCIDR and twill's annotations are
// not set: other writers add them (see Create).
func Realistic(s Spec) *corev1.Node {
	i := s.Index
	zone := fmt.Sprintf("europe-west4-%c", 'a'+i%3)
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: s.Name,
			Labels: map[string]string{
				"beta.kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
				"beta.kubernetes.io/instance-type": "n2-standard-8", "kubernetes.io/arch": "amd64",
				"kubernetes.io/hostname": s.Name, "kubernetes.io/os": "linux",
				"node.kubernetes.io/instance-type": "n2-standard-8", "topology.kubernetes.io/region": "europe-west4",
				"topology.kubernetes.io/zone": zone, "failure-domain.beta.kubernetes.io/zone": zone,
				"cloud.google.com/gke-nodepool": "default-pool", "cloud.google.com/machine-family": "n2",
			},
			Annotations: map[string]string{
				"volumes.kubernetes.io/controller-managed-attach-detach": "true",
				"csi.volume.kubernetes.io/nodeid":                        fmt.Sprintf(`{"pd.csi.storage.gke.io":"projects/example/zones/%s/instances/%s"}`, zone, s.Name),
				"container.googleapis.com/instance_id":                   fmt.Sprintf("%019d", 7000000000000000000+i),
			},
		},
		Spec: corev1.NodeSpec{ProviderID: fmt.Sprintf("gce://example/%s/%s", zone, s.Name)},
	}
	now := metav1.NewTime(time.Now().Truncate(time.Second))
	cond := func(t corev1.NodeConditionType, st corev1.ConditionStatus, reason, msg string) corev1.NodeCondition {
		return corev1.NodeCondition{Type: t, Status: st, Reason: reason, Message: msg, LastHeartbeatTime: now, LastTransitionTime: now}
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
		{Type: corev1.NodeInternalIP, Address: s.InternalIP},
		{Type: corev1.NodeExternalIP, Address: fmt.Sprintf("34.%d.%d.%d", i>>16&255, i>>8&255, i&255)},
		{Type: corev1.NodeInternalDNS, Address: s.Name + ".europe-west4.c.example.internal"},
		{Type: corev1.NodeHostName, Address: s.Name},
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
		digest := fmt.Sprintf("%016x", uint64(j+1)*0x9e3779b97f4a7c15)
		st.Images = append(st.Images, corev1.ContainerImage{
			Names:     []string{repo + "@sha256:" + strings.Repeat(digest, 4), fmt.Sprintf("%s:v1.%d.%d", repo, j, i%10)},
			SizeBytes: int64(20_000_000 + j*1_234_567),
		})
	}
	return n
}

// Register writes a Node as a cluster does before twilld runs on it: the
// kubelet creates it (without images: it reports them later), the node IPAM
// controller sets its podCIDR (if s has one), and the kubelet reports the full
// status through nodes/status. Three writes.
func Register(ctx context.Context, cs kubernetes.Interface, s Spec) error {
	n := Realistic(s)
	status := *n.Status.DeepCopy()
	n.Status.Images = nil
	created, err := cs.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{FieldManager: Kubelet})
	if err != nil {
		return fmt.Errorf("create Node %s: %w", s.Name, err)
	}
	if s.PodCIDR != "" {
		// The node IPAM controller also sets the TTL annotation.
		patch := fmt.Sprintf(`{"metadata":{"annotations":{"node.alpha.kubernetes.io/ttl":"0"}},"spec":{"podCIDR":%q,"podCIDRs":[%q]}}`, s.PodCIDR, s.PodCIDR)
		if created, err = cs.CoreV1().Nodes().Patch(ctx, s.Name, types.StrategicMergePatchType, []byte(patch),
			metav1.PatchOptions{FieldManager: ControllerManager}); err != nil {
			return fmt.Errorf("set podCIDR of Node %s: %w", s.Name, err)
		}
	}
	created.Status = status
	hb := metav1.NewTime(time.Now())
	for j := range created.Status.Conditions {
		created.Status.Conditions[j].LastHeartbeatTime = hb
	}
	if _, err := cs.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{FieldManager: Kubelet}); err != nil {
		return fmt.Errorf("update status of Node %s: %w", s.Name, err)
	}
	return nil
}

// Publish writes twill's annotations on a Node as twilld's Acquire does: a
// JSON merge patch of the annotations through nodes/status.
func Publish(ctx context.Context, cs kubernetes.Interface, name string, ann map[string]string, fieldManager string) error {
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": ann}})
	if err != nil {
		return err
	}
	if _, err := cs.CoreV1().Nodes().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: fieldManager}, "status"); err != nil {
		return fmt.Errorf("publish annotations on Node %s: %w", name, err)
	}
	return nil
}

// publishReady writes the annotations and the NetworkUnavailable=False
// condition in one strategic merge patch through nodes/status: what twilld
// leaves on a Node after its first pass (Acquire's patch, then
// DatapathReady's), in one request instead of two.
func publishReady(ctx context.Context, cs kubernetes.Interface, name string, ann map[string]string, fieldManager string) error {
	now := metav1.Now()
	cond := corev1.NodeCondition{Type: corev1.NodeNetworkUnavailable, Status: corev1.ConditionFalse,
		Reason: "TwillIsUp", Message: "twill has set up the pod network on this node", LastTransitionTime: now, LastHeartbeatTime: now}
	patch, err := json.Marshal(map[string]any{
		"metadata": map[string]any{"annotations": ann},
		"status":   map[string]any{"conditions": []corev1.NodeCondition{cond}},
	})
	if err != nil {
		return err
	}
	if _, err := cs.CoreV1().Nodes().Patch(ctx, name, types.StrategicMergePatchType, patch, metav1.PatchOptions{FieldManager: fieldManager}, "status"); err != nil {
		return fmt.Errorf("publish annotations and condition on Node %s: %w", name, err)
	}
	return nil
}

// kubeletConditions are the conditions the kubelet itself reports (the
// others of a Realistic Node are the node problem detector's): their
// heartbeats are what its periodic status update changes.
var kubeletConditions = []corev1.NodeConditionType{
	corev1.NodeMemoryPressure, corev1.NodeDiskPressure, corev1.NodePIDPressure, corev1.NodeReady,
}

// conditionOrder is the order of a Realistic Node's conditions, with
// NetworkUnavailable last when published (the strategic merge patch that
// adds it appends it to the list).
func conditionOrder(published bool) []corev1.NodeConditionType {
	var order []corev1.NodeConditionType
	for _, c := range Realistic(Spec{}).Status.Conditions {
		order = append(order, c.Type)
	}
	if published {
		order = append(order, corev1.NodeNetworkUnavailable)
	}
	return order
}

// HeartbeatPatch returns the patch the kubelet sends through nodes/status on
// its periodic status update when nothing but time has passed (every
// nodeStatusReportFrequency, 5 minutes by default, with node leases): a
// strategic merge patch, as the kubelet computes it from the old and the
// new Node, that moves the lastHeartbeatTime of its four conditions to at
// and lists the order of all of the Node's conditions
// ($setElementOrder). published says whether the Node carries twilld's
// NetworkUnavailable condition (Create with annotations).
func HeartbeatPatch(published bool, at time.Time) []byte {
	type key struct {
		Type corev1.NodeConditionType `json:"type"`
	}
	type beat struct {
		LastHeartbeatTime metav1.Time              `json:"lastHeartbeatTime"`
		Type              corev1.NodeConditionType `json:"type"`
	}
	var order []key
	for _, t := range conditionOrder(published) {
		order = append(order, key{t})
	}
	var beats []beat
	for _, t := range kubeletConditions {
		beats = append(beats, beat{metav1.NewTime(at), t})
	}
	patch, _ := json.Marshal(map[string]any{"status": map[string]any{
		"$setElementOrder/conditions": order,
		"conditions":                  beats,
	}})
	return patch
}

// Heartbeat sends a HeartbeatPatch for Node name as the kubelet does
// (field manager "kubelet", subresource status).
func Heartbeat(ctx context.Context, cs kubernetes.Interface, name string, patch []byte) error {
	if _, err := cs.CoreV1().Nodes().Patch(ctx, name, types.StrategicMergePatchType, patch, metav1.PatchOptions{FieldManager: Kubelet}, "status"); err != nil {
		return fmt.Errorf("status heartbeat of Node %s: %w", name, err)
	}
	return nil
}

// Create registers a Node (Register) and, when s has annotations, publishes
// them with the NetworkUnavailable condition as twilld (fieldManager) would.
func Create(ctx context.Context, cs kubernetes.Interface, s Spec, fieldManager string) error {
	if err := Register(ctx, cs, s); err != nil {
		return err
	}
	if len(s.Annotations) == 0 {
		return nil
	}
	return publishReady(ctx, cs, s.Name, s.Annotations, fieldManager)
}

// CreateAll creates Nodes spec(0) .. spec(n-1) with w concurrent workers and
// returns the first error; the other workers stop at their next Node.
func CreateAll(ctx context.Context, cs kubernetes.Interface, n, w int, spec func(i int) Spec, fieldManager string) error {
	return Parallel(ctx, n, w, func(ctx context.Context, i int) error { return Create(ctx, cs, spec(i), fieldManager) })
}

// Parallel runs f(ctx, 0) .. f(ctx, n-1) on w goroutines and returns the
// first error; the others stop at their next item.
func Parallel(ctx context.Context, n, w int, f func(context.Context, int) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var next atomic.Int64
	var wg sync.WaitGroup
	var once sync.Once
	var firstErr error
	for range max(w, 1) {
		wg.Go(func() {
			for ctx.Err() == nil {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				if err := f(ctx, i); err != nil {
					once.Do(func() { firstErr = err; cancel() })
					return
				}
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	return ctx.Err()
}
