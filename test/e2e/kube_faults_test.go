package e2e

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/internal/tools/testenv"
)

// Fault 9 (the API server restart is in TestKubernetesMode). In Kubernetes
// mode, a live node's Node object is deleted and re-created, and a watch
// expires because etcd was compacted past it while the API server was away:
// twilld recovers from both without restarting, and logs no credential.
func TestKubernetesFaults(t *testing.T) {
	l := newLab(t, lab.Options{Hosts: 3, PodsPerHost: 1, Backend: "vxlan", DaemonArgs: []string{"--log-level", "debug"},
		Datastore: "kube", KubeAPIServer: testenv.Tool(t, "kube-apiserver")})
	ctx := ctxFor(t, 3*time.Minute)
	cs, err := l.KubeClient()
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 3; i++ {
		waitCounts(t, l, i, expected("vxlan", 2), 15*time.Second)
	}
	pids := map[int]int{}
	for i := 1; i <= 3; i++ {
		if pids[i], err = l.DaemonPID(i); err != nil {
			t.Fatal(err)
		}
	}

	// h3's Node is deleted while h3 runs: the peers drop h3; h3 keeps its
	// lease and datapath. The Node comes back (the kubelet registers it
	// again) with the same podCIDR: h3 publishes its annotations on it
	// again and the peers add it back.
	env3 := hostEnv(t, l, 3)
	if err := cs.CoreV1().Nodes().Delete(ctx, "h3", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitCounts(t, l, 1, expected("vxlan", 1), 15*time.Second)
	waitCounts(t, l, 2, expected("vxlan", 1), 15*time.Second)
	waitCounts(t, l, 3, expected("vxlan", 2), time.Second)
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "h3"},
		Spec: corev1.NodeSpec{PodCIDR: l.NodePodCIDR(3).String(), PodCIDRs: []string{l.NodePodCIDR(3).String()}}}
	if _, err := cs.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "h3 to annotate its new Node", 15*time.Second, func() error {
		n, err := cs.CoreV1().Nodes().Get(ctx, "h3", metav1.GetOptions{})
		if err == nil && n.Annotations["twill.io/public-ip"] != l.Topology().HostAddr(3).String() {
			err = fmt.Errorf("annotations %v", n.Annotations)
		}
		return err
	})
	for i := 1; i <= 3; i++ {
		waitCounts(t, l, i, expected("vxlan", 2), 15*time.Second)
	}
	if again := hostEnv(t, l, 3); again != env3 {
		t.Fatalf("h3's env changed: %+v -> %+v", env3, again)
	}
	requireMatrix(t, l)

	// h2 is gone (its twilld stopped) and, while the API server is away,
	// its Node leaves storage with no event any watcher could see; etcd is
	// compacted past everything. When the API server is back, the others'
	// watches resume from a revision that no longer exists: the API server
	// says 410 Gone, the informers list again, and h2 is dropped.
	if err := l.StopDaemon(ctx, 2); err != nil {
		t.Fatal(err)
	}
	if err := l.StopKubeAPI(ctx); err != nil {
		t.Fatal(err)
	}
	etcdctl := func(args ...string) string {
		out, err := lab.InNS(ctx, l.Topology().UnderlayNS(), testenv.Tool(t, "etcdctl"), append([]string{"--endpoints", lab.EtcdURL()}, args...)...)
		if err != nil {
			t.Fatalf("etcdctl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	if out := etcdctl("del", "/registry/minions/h2"); strings.TrimSpace(out) != "1" {
		t.Fatalf("delete h2's Node from etcd: %q", out)
	}
	var st []struct {
		Status struct {
			Header struct {
				Revision int64 `json:"revision"`
			} `json:"header"`
		}
	}
	if err := json.Unmarshal([]byte(etcdctl("endpoint", "status", "-w", "json")), &st); err != nil || len(st) != 1 {
		t.Fatalf("etcd status: %v %+v", err, st)
	}
	etcdctl("compact", strconv.FormatInt(st[0].Status.Header.Revision, 10), "--physical")
	if err := l.StartKubeAPI(ctx); err != nil {
		t.Fatal(err)
	}
	for _, i := range []int{1, 3} {
		waitCounts(t, l, i, expected("vxlan", 1), 60*time.Second)
		log, _ := readFile(l.DaemonLog(i))
		if !strings.Contains(log, "node deletion learnt from a relist") {
			t.Errorf("h%d's log does not show the relist:\n%s", i, tail(log, 20))
		}
	}
	if !lab.Ping(ctx, podsOn(l, 1)[0].NS, podsOn(l, 3)[0].Addr.String()) || !lab.Ping(ctx, podsOn(l, 3)[0].NS, podsOn(l, 1)[0].Addr.String()) {
		t.Fatal("h1's and h3's pods do not reach each other after the relist")
	}
	for _, i := range []int{1, 3} {
		if pid, err := l.DaemonPID(i); err != nil || pid != pids[i] {
			t.Errorf("h%d's twilld is pid %d (%v), was %d: it restarted", i, pid, err, pids[i])
		}
	}

	// Through all of it, at debug level, no credential reached a log.
	kc, err := clientcmd.LoadFromFile(filepath.Join(l.HostDir(1), "kubeconfig"))
	if err != nil {
		t.Fatal(err)
	}
	var secrets []string
	for _, a := range kc.AuthInfos {
		if a.Token != "" {
			secrets = append(secrets, a.Token)
		}
	}
	if len(secrets) == 0 {
		t.Fatal("no token in h1's kubeconfig")
	}
	for i := 1; i <= 3; i++ {
		log, _ := readFile(l.DaemonLog(i))
		for _, s := range secrets {
			if strings.Contains(log, s) || strings.Contains(log, s[:min(len(s), 24)]) {
				t.Errorf("h%d's log contains the ServiceAccount token", i)
			}
		}
		if strings.Contains(log, "PRIVATE KEY") || strings.Contains(log, "Bearer ") {
			t.Errorf("h%d's log contains a key or an Authorization header", i)
		}
	}
}
