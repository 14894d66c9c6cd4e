// Package kubelab is a Kubernetes cluster on the lab's hosts with the real
// programs: a control plane in the underlay namespace (etcd, kube-apiserver,
// kube-controller-manager with node IPAM, kube-scheduler) and on each host a
// node (containerd, kubelet, kube-proxy; testenv.StartKubeNode), on which
// twill is deployed as users deploy it: deploy/kube-twill.yaml, the image
// `make image` builds. The kubelet tests and `twillctl lab run --kubelet`
// both drive it, through a testenv.TB.
package kubelab

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/twillnet/twill/deploy"
	"github.com/twillnet/twill/internal/tools/kubeapi"
	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/internal/tools/testenv"
	"github.com/twillnet/twill/subnet/kube"
)

// ClusterCIDR is the pod network the node IPAM controller gives each Node a
// /24 of.
const ClusterCIDR = "10.244.0.0/16"

// The images `make image` builds, as the runtimes list them once imported,
// and the image the shipped manifest names.
const (
	TwillImage    = "twill:dev"
	WorkloadImage = "twill-test/workload:1"
	ShippedImage  = "twill:v0.1.0"
)

// Cluster is a running cluster; its nodes are named h1, h2, ... after the
// lab's hosts.
type Cluster struct {
	Topo   lab.Topology
	API    *testenv.KubeAPI
	Client kubernetes.Interface
	Nodes  map[string]*testenv.KubeNode
}

// Start makes the topology's namespaces and starts the control plane and a
// node per host. Everything is undone when tb ends.
func Start(tb testenv.TB, topo lab.Topology) *Cluster {
	tb.Helper()
	testenv.RequireRoot(tb)
	ctx := tb.Context()
	tb.Cleanup(func() {
		if err := topo.Down(context.Background()); err != nil {
			tb.Errorf("remove namespaces: %v", err)
		}
	})
	if err := topo.Up(ctx); err != nil {
		tb.Fatal(err)
	}
	u := topo.UnderlayNS()
	api := testenv.StartKubeAPI(tb, testenv.KubeAPIOptions{
		Host: lab.WorldAddr.String(),
		Port: lab.KubePort,
		// etcd in the underlay namespace beside the API server.
		Wrap: []string{"nsenter", "--net=/run/netns/" + u},
		Dial: lab.DialInNS(u),
		// The API server keeps the kubernetes Service's endpoints (its
		// advertised address, the underlay's, reachable from the nodes),
		// which pods reach through kube-proxy.
		Args: []string{"--endpoint-reconciler-type=lease"},
	})
	api.StartClusterControllers(tb, testenv.ClusterControllersOptions{ClusterCIDR: ClusterCIDR})
	api.StartScheduler(tb)
	k := &Cluster{Topo: topo, API: api, Client: api.AdminClient(tb), Nodes: map[string]*testenv.KubeNode{}}
	for _, i := range topo.HostNumbers() {
		name := fmt.Sprintf("h%d", i)
		k.Nodes[name] = testenv.StartKubeNode(tb, testenv.KubeNodeOptions{
			Name:   name,
			NetNS:  topo.HostNS(i),
			NodeIP: topo.HostAddr(i).String(),
			API:    api,
		})
	}
	return k
}

// NodeNames are the nodes' names, sorted.
func (k *Cluster) NodeNames() []string {
	var names []string
	for n := range k.Nodes {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// PrepareNodes does on each node what an operator does before applying the
// manifest: kube-proxy runs (twilld reaches the API server as a pod does,
// through the kubernetes Service), the images of `make image` are imported
// into containerd (there is no registry), and the reference CNI plugins
// twill delegates to are in /opt/cni/bin, where a distribution's package
// puts them.
func (k *Cluster) PrepareNodes(tb testenv.TB) {
	tb.Helper()
	tars := []string{testenv.Image(tb, "twill.tar"), testenv.Image(tb, "twill-test-workload.tar")}
	plugins := testenv.CNIBinDir(tb)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	for _, name := range k.NodeNames() {
		n := k.Nodes[name]
		n.StartKubeProxy(tb, testenv.KubeProxyOptions{ClusterCIDR: ClusterCIDR})
		for _, tar := range tars {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if out, err := n.Runtime.Ctr("-n", "k8s.io", "images", "import", tar); err != nil {
					mu.Lock()
					errs = append(errs, fmt.Errorf("node %s: import %s: %v\n%s", name, tar, err, out))
					mu.Unlock()
				}
			}()
		}
		for _, p := range []string{"bridge", "host-local", "loopback", "portmap"} {
			data, err := os.ReadFile(filepath.Join(plugins, p))
			if err == nil {
				err = os.WriteFile(n.HostPath("/opt/cni/bin/"+p), data, 0o755)
			}
			if err != nil {
				tb.Fatalf("node %s: install the reference plugin %s: %v", name, p, err)
			}
		}
	}
	wg.Wait()
	for _, err := range errs {
		tb.Error(err)
	}
	if tb.Failed() {
		tb.Fatal("the images were not imported")
	}
	for _, name := range k.NodeNames() {
		out, err := k.Nodes[name].Runtime.Ctr("-n", "k8s.io", "images", "ls", "-q")
		if err != nil {
			tb.Fatal(err)
		}
		for _, want := range []string{"docker.io/library/" + TwillImage, "docker.io/" + WorkloadImage} {
			if !strings.Contains("\n"+out, "\n"+want+"\n") {
				tb.Fatalf("node %s: image %s not in the runtime after import:\n%s", name, want, out)
			}
		}
	}
}

// ApplyTwill applies deploy/kube-twill.yaml as shipped, with only the
// image's name changed to the one `make image` built, and returns the
// objects applied.
func (k *Cluster) ApplyTwill(tb testenv.TB) []string {
	tb.Helper()
	if got := bytes.Count(deploy.KubeManifest, []byte(ShippedImage)); got != 3 {
		tb.Fatalf("deploy/kube-twill.yaml names %s %d times, want 3 (the init containers and twilld)", ShippedImage, got)
	}
	manifest := bytes.ReplaceAll(deploy.KubeManifest, []byte(ShippedImage), []byte(TwillImage))
	ctx, cancel := context.WithTimeout(tb.Context(), 60*time.Second)
	defer cancel()
	applied, err := kubeapi.Apply(ctx, k.API.AdminConfig(), manifest, false)
	if err != nil {
		tb.Fatalf("apply deploy/kube-twill.yaml (applied %v): %v", applied, err)
	}
	return applied
}

// WaitPodCIDRs waits until every node is registered with a podCIDR, and
// returns them.
func (k *Cluster) WaitPodCIDRs(tb testenv.TB) map[string]netip.Prefix {
	tb.Helper()
	podCIDRs := map[string]netip.Prefix{}
	WaitFor(tb, "every Node registered with a podCIDR", 60*time.Second, func() error {
		for _, name := range k.NodeNames() {
			n, err := k.Client.CoreV1().Nodes().Get(tb.Context(), name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			p, err := netip.ParsePrefix(n.Spec.PodCIDR)
			if err != nil {
				return fmt.Errorf("node %s: podCIDR %q: %v", name, n.Spec.PodCIDR, err)
			}
			podCIDRs[name] = p
		}
		return nil
	}, nil)
	return podCIDRs
}

// WaitNetworkReady waits until each node's twilld published its NodeNetwork
// (vxlan, the node's podCIDR and address, owned by its Node) and cleared
// the Node's NetworkUnavailable, and the Nodes are Ready; it returns the
// records by node.
func (k *Cluster) WaitNetworkReady(tb testenv.TB, podCIDRs map[string]netip.Prefix) map[string]*kube.NodeNetwork {
	tb.Helper()
	ctx := tb.Context()
	records, err := kube.NewRecordClient(k.API.AdminConfig())
	if err != nil {
		tb.Fatal(err)
	}
	out := map[string]*kube.NodeNetwork{}
	WaitFor(tb, "a NodeNetwork of each node with its podCIDR and address", 30*time.Second, func() error {
		for _, name := range k.NodeNames() {
			r, err := records.Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return fmt.Errorf("NodeNetwork %s: %w", name, err)
			}
			if r.Spec.BackendType != "vxlan" || r.Spec.Subnet != podCIDRs[name].String() || r.Spec.PublicIP != k.Nodes[name].NodeIP {
				return fmt.Errorf("NodeNetwork %s: %+v, want vxlan, %s, %s", name, r.Spec, podCIDRs[name], k.Nodes[name].NodeIP)
			}
			owned := false
			for _, o := range r.OwnerReferences {
				owned = owned || (o.Kind == "Node" && o.Name == name)
			}
			if !owned {
				return fmt.Errorf("NodeNetwork %s: owners %+v, want its Node", name, r.OwnerReferences)
			}
			out[name] = r
		}
		return nil
	}, nil)
	WaitFor(tb, "every Node Ready with NetworkUnavailable False (TwillIsUp)", 60*time.Second, func() error {
		for _, name := range k.NodeNames() {
			n, err := k.Client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if c := NodeCondition(n, corev1.NodeNetworkUnavailable); c == nil || c.Status != corev1.ConditionFalse || c.Reason != "TwillIsUp" {
				return fmt.Errorf("node %s: NetworkUnavailable %+v", name, c)
			}
			if c := NodeCondition(n, corev1.NodeReady); c == nil || c.Status != corev1.ConditionTrue {
				return fmt.Errorf("node %s: Ready %+v", name, c)
			}
		}
		return nil
	}, nil)
	return out
}

// NodeCondition is the Node's condition of a type, or nil.
func NodeCondition(n *corev1.Node, typ corev1.NodeConditionType) *corev1.NodeCondition {
	for i := range n.Status.Conditions {
		if n.Status.Conditions[i].Type == typ {
			return &n.Status.Conditions[i]
		}
	}
	return nil
}

// PodWaiting says why a pod is not ready yet: its conditions' and waiting
// containers' messages.
func PodWaiting(p *corev1.Pod) string {
	var s []string
	for _, c := range p.Status.Conditions {
		if c.Status != corev1.ConditionTrue && c.Message != "" {
			s = append(s, string(c.Type)+": "+c.Message)
		}
	}
	for _, c := range p.Status.ContainerStatuses {
		if c.State.Waiting != nil {
			s = append(s, c.State.Waiting.Reason+": "+c.State.Waiting.Message)
		}
	}
	return strings.Join(s, ", ")
}

// Probe is a pod on a node running `workload probe ARGS...`.
type Probe struct {
	Name, Node string
	Args       []string
}

// PodReady reports whether the pod's Ready condition is true.
func PodReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// WaitFor calls f every 100 ms until it returns nil; after d it calls diag
// (when not nil) and fails with f's last error. It stops at once when tb's
// context ends (an interrupted guided run).
func WaitFor(tb testenv.TB, what string, d time.Duration, f func() error, diag func()) {
	tb.Helper()
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			if diag != nil {
				diag()
			}
			tb.Fatalf("timed out after %s waiting for %s: %v", d, what, err)
		}
		select {
		case <-tb.Context().Done():
			tb.Fatalf("stopped waiting for %s: %v", what, context.Cause(tb.Context()))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// WaitPodsReady waits until a pod of the selector is Running and Ready on
// every node, and returns them by node. On timeout it describes the pods.
func (k *Cluster) WaitPodsReady(tb testenv.TB, ns, selector string, d time.Duration) map[string]*corev1.Pod {
	tb.Helper()
	var byNode map[string]*corev1.Pod
	WaitFor(tb, "pods "+selector+" in "+ns+" running and ready on every node", d, func() error {
		list, err := k.Client.CoreV1().Pods(ns).List(context.Background(), metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			return err
		}
		byNode = map[string]*corev1.Pod{}
		var states []string
		for i := range list.Items {
			p := &list.Items[i]
			states = append(states, fmt.Sprintf("%s on %q: %s ready=%v %s", p.Name, p.Spec.NodeName, p.Status.Phase, PodReady(p), PodWaiting(p)))
			if p.Status.Phase == corev1.PodRunning && PodReady(p) && p.Status.PodIP != "" && p.DeletionTimestamp == nil {
				byNode[p.Spec.NodeName] = p
			}
		}
		for n := range k.Nodes {
			if byNode[n] == nil {
				return fmt.Errorf("none ready on %s yet: %s", n, strings.Join(states, "; "))
			}
		}
		return nil
	}, func() { k.DescribePods(tb, ns, selector) })
	return byNode
}

// DescribePods logs what `kubectl describe` would show of the pods (status,
// containers, events) and the end of their containers' logs, read from
// their node's /var/log/pods.
func (k *Cluster) DescribePods(tb testenv.TB, ns, selector string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	list, err := k.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		tb.Logf("list pods %s in %s: %v", selector, ns, err)
		return
	}
	for i := range list.Items {
		k.DescribePod(tb, &list.Items[i])
	}
	for _, name := range k.NodeNames() {
		n, err := k.Client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			continue
		}
		var conds []string
		for _, c := range n.Status.Conditions {
			conds = append(conds, fmt.Sprintf("%s=%s (%s: %s)", c.Type, c.Status, c.Reason, c.Message))
		}
		tb.Logf("node %s: podCIDR %s, taints %v, conditions %s", name, n.Spec.PodCIDR, n.Spec.Taints, strings.Join(conds, "; "))
	}
}

func (k *Cluster) DescribePod(tb testenv.TB, p *corev1.Pod) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var b strings.Builder
	fmt.Fprintf(&b, "pod %s/%s on %q: phase %s, IP %s\n", p.Namespace, p.Name, p.Spec.NodeName, p.Status.Phase, p.Status.PodIP)
	for _, c := range p.Status.Conditions {
		fmt.Fprintf(&b, "  condition %s=%s %s %s\n", c.Type, c.Status, c.Reason, c.Message)
	}
	statuses := append(append([]corev1.ContainerStatus{}, p.Status.InitContainerStatuses...), p.Status.ContainerStatuses...)
	for _, s := range statuses {
		fmt.Fprintf(&b, "  container %s: ready=%v restarts=%d state=%s last=%s\n", s.Name, s.Ready, s.RestartCount, containerState(s.State), containerState(s.LastTerminationState))
	}
	events, err := k.Client.CoreV1().Events(p.Namespace).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + p.Name})
	if err == nil {
		for _, e := range events.Items {
			fmt.Fprintf(&b, "  event %s %s (x%d): %s\n", e.Type, e.Reason, e.Count, e.Message)
		}
	}
	if n := k.Nodes[p.Spec.NodeName]; n != nil {
		dir := n.HostPath(fmt.Sprintf("/var/log/pods/%s_%s_%s", p.Namespace, p.Name, p.UID))
		files, _ := filepath.Glob(filepath.Join(dir, "*", "*.log"))
		for _, f := range files {
			data, _ := os.ReadFile(f)
			lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
			if len(lines) > 30 {
				lines = lines[len(lines)-30:]
			}
			rel, _ := filepath.Rel(dir, f)
			fmt.Fprintf(&b, "  log %s:\n    %s\n", rel, strings.Join(lines, "\n    "))
		}
	}
	tb.Log(b.String())
}

func containerState(s corev1.ContainerState) string {
	switch {
	case s.Running != nil:
		return "Running since " + s.Running.StartedAt.Format(time.TimeOnly)
	case s.Waiting != nil:
		return "Waiting " + s.Waiting.Reason + ": " + s.Waiting.Message
	case s.Terminated != nil:
		return fmt.Sprintf("Terminated %s (exit %d): %s", s.Terminated.Reason, s.Terminated.ExitCode, s.Terminated.Message)
	}
	return "-"
}

// PodLog is a container's log as its node's runtime wrote it (CRI format:
// time, stream, tag, message), the messages only.
func (k *Cluster) PodLog(p *corev1.Pod, container string) (string, error) {
	n := k.Nodes[p.Spec.NodeName]
	if n == nil {
		return "", fmt.Errorf("pod %s is on no node of the test (%q)", p.Name, p.Spec.NodeName)
	}
	files, err := filepath.Glob(n.HostPath(fmt.Sprintf("/var/log/pods/%s_%s_%s/%s/*.log", p.Namespace, p.Name, p.UID, container)))
	if err != nil || len(files) == 0 {
		return "", fmt.Errorf("no log of %s/%s on %s (%v)", p.Name, container, n.Name, err)
	}
	sort.Strings(files)
	data, err := os.ReadFile(files[len(files)-1])
	if err != nil {
		return "", err
	}
	var b strings.Builder
	for _, line := range strings.Split(strings.TrimRight(string(data), "\n"), "\n") {
		if f := strings.SplitN(line, " ", 4); len(f) == 4 {
			b.WriteString(f[3] + "\n")
		}
	}
	return b.String(), nil
}

// EchoContainer is the workload image's echo server (TCP 8080, UDP 8081),
// ready once it listens on TCP.
func EchoContainer() corev1.Container {
	return corev1.Container{
		Name:            "serve",
		Image:           WorkloadImage,
		ImagePullPolicy: corev1.PullNever,
		Args:            []string{"serve"},
		ReadinessProbe: &corev1.Probe{
			ProbeHandler:  corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(8080)}},
			PeriodSeconds: 1,
		},
	}
}

// CreateEchoDeployment creates a Deployment of the workload image's echo
// server in default, with one pod per node (required anti-affinity), ready
// once it listens on TCP.
func (k *Cluster) CreateEchoDeployment(tb testenv.TB, name string) {
	tb.Helper()
	labels := map[string]string{"app": name}
	replicas := int32(len(k.Nodes))
	d := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default"},
		Spec: appsv1.DeploymentSpec{
			Replicas: &replicas,
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					TerminationGracePeriodSeconds: new(int64(2)),
					Affinity: &corev1.Affinity{PodAntiAffinity: &corev1.PodAntiAffinity{
						RequiredDuringSchedulingIgnoredDuringExecution: []corev1.PodAffinityTerm{{
							LabelSelector: &metav1.LabelSelector{MatchLabels: labels},
							TopologyKey:   corev1.LabelHostname,
						}},
					}},
					Containers: []corev1.Container{EchoContainer()},
				},
			},
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := k.Client.AppsV1().Deployments("default").Create(ctx, d, metav1.CreateOptions{}); err != nil {
		tb.Fatalf("create Deployment %s: %v", name, err)
	}
}

// RunProbePods runs the probe pods at once and waits until each has ended;
// it returns their logs by name, and fails the test (with the pod's log and
// description) for each that did not succeed.
func (k *Cluster) RunProbePods(tb testenv.TB, probes []Probe, d time.Duration) map[string]string {
	tb.Helper()
	ctx := tb.Context()
	for _, p := range probes {
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: "default", Labels: map[string]string{"role": "probe"}},
			Spec: corev1.PodSpec{
				NodeSelector:                  map[string]string{corev1.LabelHostname: p.Node},
				RestartPolicy:                 corev1.RestartPolicyNever,
				TerminationGracePeriodSeconds: new(int64(1)),
				Containers: []corev1.Container{{
					Name:            "probe",
					Image:           WorkloadImage,
					ImagePullPolicy: corev1.PullNever,
					Args:            append([]string{"probe"}, p.Args...),
				}},
			},
		}
		if _, err := k.Client.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			tb.Fatalf("create pod %s: %v", p.Name, err)
		}
	}
	ended := map[string]*corev1.Pod{}
	WaitFor(tb, "the probe pods to end", d, func() error {
		var running []string
		for _, p := range probes {
			if ended[p.Name] != nil {
				continue
			}
			pod, err := k.Client.CoreV1().Pods("default").Get(ctx, p.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
				ended[p.Name] = pod
				continue
			}
			running = append(running, fmt.Sprintf("%s: %s %s", p.Name, pod.Status.Phase, PodWaiting(pod)))
		}
		if len(running) > 0 {
			return fmt.Errorf("%v", running)
		}
		return nil
	}, func() { k.DescribePods(tb, "default", "role=probe") })
	logs := map[string]string{}
	for _, p := range probes {
		pod := ended[p.Name]
		log, err := k.PodLog(pod, "probe")
		if err != nil {
			tb.Errorf("probe %s: %v", p.Name, err)
		}
		logs[p.Name] = log
		if pod.Status.Phase != corev1.PodSucceeded {
			k.DescribePod(tb, pod)
			tb.Errorf("probe pod %s on %s (workload probe %s): %s:\n%s", p.Name, p.Node, strings.Join(p.Args, " "), pod.Status.Phase, log)
		}
	}
	return logs
}

// StartUnderlayEcho runs the workload's echo server in the underlay
// namespace (outside the cluster network) until the test ends.
func (k *Cluster) StartUnderlayEcho(tb testenv.TB, bin string, tcp, udp int) {
	tb.Helper()
	cmd := exec.Command("nsenter", "--net=/run/netns/"+k.Topo.UnderlayNS(), bin, "serve", "-tcp", strconv.Itoa(tcp), "-udp", strconv.Itoa(udp))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	tb.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
	})
	WaitFor(tb, "the underlay's echo server", 10*time.Second, func() error {
		select {
		case <-done:
			return fmt.Errorf("exited: %s", out.String())
		default:
		}
		out, err := lab.InNS(context.Background(), k.Topo.UnderlayNS(), "ss", "-Hltn", "sport = :"+strconv.Itoa(tcp))
		if err != nil {
			return err
		}
		if strings.TrimSpace(out) == "" {
			return fmt.Errorf("nothing listens on TCP port %d yet", tcp)
		}
		return nil
	}, nil)
}

// Reach is what CheckReach saw.
type Reach struct {
	Echo   map[string]*corev1.Pod // the echo pods, by node
	EchoIP map[string]netip.Addr
	Probes []Probe
	Logs   map[string]string // the probes' logs, by name
}

// CheckReach runs a Deployment "echo" of the workload's echo server, one pod
// per node, whose addresses must come from their nodes' podCIDRs, then probe
// pods: from each node to every other node's echo pod (TCP and UDP), and to
// an echo server in the underlay namespace, outside the cluster network,
// which must see the node's address as the source (twilld's --ip-masq). It
// logs a line per pod and reports each failure with tb.Errorf.
func (k *Cluster) CheckReach(tb testenv.TB, podCIDRs map[string]netip.Prefix) Reach {
	tb.Helper()
	r := Reach{EchoIP: map[string]netip.Addr{}}
	workload := testenv.Image(tb, "workload")
	k.CreateEchoDeployment(tb, "echo")
	r.Echo = k.WaitPodsReady(tb, "default", "app=echo", 60*time.Second)
	for _, name := range k.NodeNames() {
		p := r.Echo[name]
		ip, err := netip.ParseAddr(p.Status.PodIP)
		if err != nil || !podCIDRs[name].Contains(ip) {
			tb.Fatalf("echo pod %s on %s has address %q, not in the node's podCIDR %s", p.Name, name, p.Status.PodIP, podCIDRs[name])
		}
		r.EchoIP[name] = ip
		tb.Logf("echo pod %s on %s: %s (podCIDR %s)", p.Name, name, ip, podCIDRs[name])
	}
	for _, from := range k.NodeNames() {
		for _, to := range k.NodeNames() {
			if from != to {
				r.Probes = append(r.Probes, Probe{Name: "probe-" + from + "-" + to, Node: from, Args: []string{"-addr", r.EchoIP[to].String()}})
			}
		}
	}
	k.StartUnderlayEcho(tb, workload, 18080, 18081)
	for _, name := range k.NodeNames() {
		r.Probes = append(r.Probes, Probe{Name: "probe-" + name + "-world", Node: name,
			Args: []string{"-addr", lab.WorldAddr.String(), "-tcp", "18080", "-udp", "18081", "-whoami"}})
	}
	r.Logs = k.RunProbePods(tb, r.Probes, 60*time.Second)
	from := regexp.MustCompile(`from=(\S+)`)
	for _, p := range r.Probes {
		lines := strings.Split(strings.TrimSpace(r.Logs[p.Name]), "\n")
		tb.Logf("%s on %s: %s", p.Name, p.Node, strings.Join(lines, " | "))
		if strings.HasSuffix(p.Name, "-world") {
			m := from.FindStringSubmatch(r.Logs[p.Name])
			if m == nil || m[1] != k.Nodes[p.Node].NodeIP {
				tb.Errorf("%s: the underlay's server saw %v, want the node's address %s (--ip-masq):\n%s", p.Name, m, k.Nodes[p.Node].NodeIP, r.Logs[p.Name])
			}
		}
	}
	return r
}
