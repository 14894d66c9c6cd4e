package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/internal/tools/testenv"
	"github.com/twillnet/twill/subnet/kube"
)

// Fault 9 (the API server restart is in TestKubernetesMode), in the
// nodenetwork mode: a node's NodeNetwork record is deleted by hand; a live
// node's Node object is deleted and re-created; a node leaves while the API
// server is away and etcd is compacted past its deletion, so the watches
// cannot resume (410 Gone). twilld recovers from each without restarting,
// and logs no credential.
func TestKubernetesFaults(t *testing.T) {
	l := newLab(t, lab.Options{Hosts: 3, PodsPerHost: 1, Backend: "vxlan", DaemonArgs: []string{"--log-level", "debug"},
		Datastore: "kube", KubeAPIServer: testenv.Tool(t, "kube-apiserver")})
	ctx := ctxFor(t, 3*time.Minute)
	cs, err := l.KubeClient()
	if err != nil {
		t.Fatal(err)
	}
	rc := recordClient(t, l)
	for i := 1; i <= 3; i++ {
		waitCounts(t, l, i, expected("vxlan", 2), 15*time.Second)
	}
	pids := map[int]int{}
	for i := 1; i <= 3; i++ {
		if pids[i], err = l.DaemonPID(i); err != nil {
			t.Fatal(err)
		}
	}

	// h2's record is deleted by hand while pods on h1 and h3 ping h2's
	// pod: h2's twilld writes it again (a new object, the same lease, owned
	// by h2's Node) and every peer holds h2's entries again.
	want2 := wantPublication(t, l, 2, netip.Addr{})
	old2, err := rc.Get(ctx, "h2", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p1, p2, p3 := podsOn(l, 1)[0], podsOn(l, 2)[0], podsOn(l, 3)[0]
	pings := map[string]*pinger{
		"h1's pod to h2's": startPing(t, p1.NS, p2.Addr, 20*time.Millisecond),
		"h2's pod to h1's": startPing(t, p2.NS, p1.Addr, 20*time.Millisecond),
		"h3's pod to h2's": startPing(t, p3.NS, p2.Addr, 20*time.Millisecond),
	}
	time.Sleep(500 * time.Millisecond)
	if err := rc.Delete(ctx, "h2", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "h2 to write its record again", 15*time.Second, func() error {
		r, err := rc.Get(ctx, "h2", metav1.GetOptions{})
		if err == nil && r.UID == old2.UID {
			err = fmt.Errorf("still the old record %s", r.UID)
		}
		return err
	})
	waitPublished(t, l, cs, rc, 2, want2, 5*time.Second)
	for i := 1; i <= 3; i++ {
		waitCounts(t, l, i, expected("vxlan", 2), 15*time.Second)
	}
	time.Sleep(500 * time.Millisecond)
	// The peers drop h2 on the record's deletion and add it back on its
	// creation, some tens of milliseconds later: a request or two may go
	// unanswered in that gap, no more.
	for _, p := range pings {
		p.halt() // all at once: each finish waits two seconds for late answers
	}
	for name, p := range pings {
		st := p.finish()
		t.Logf("%s while h2's record was deleted and written again: %v", name, st)
		if st.Sent < 20 || st.Outage > time.Second {
			t.Errorf("%s: %v", name, st)
		}
	}
	requireMatrix(t, l)

	// h3's Node is deleted while h3 runs: the garbage collector deletes
	// h3's record, which names that Node as its owner, and the peers drop
	// h3; h3 keeps its lease and datapath, and does not write its record
	// again while its Node is gone (it would only be collected again). The
	// Node comes back (the kubelet registers it again) with the same
	// podCIDR: h3 writes its record again, owned by the new Node, and the
	// peers add it back.
	env3 := hostEnv(t, l, 3)
	node3, err := cs.CoreV1().Nodes().Get(ctx, "h3", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := cs.CoreV1().Nodes().Delete(ctx, "h3", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	recordGone(t, rc, 3, 30*time.Second)
	waitCounts(t, l, 1, expected("vxlan", 1), 15*time.Second)
	waitCounts(t, l, 2, expected("vxlan", 1), 15*time.Second)
	waitCounts(t, l, 3, expected("vxlan", 2), time.Second)
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); time.Sleep(200 * time.Millisecond) {
		if r, err := rc.Get(ctx, "h3", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			t.Fatalf("h3's record while its Node is gone: %+v (%v)", r, err)
		}
	}
	waitCounts(t, l, 1, expected("vxlan", 1), time.Second)
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "h3"},
		Spec: corev1.NodeSpec{PodCIDR: l.NodePodCIDR(3).String(), PodCIDRs: []string{l.NodePodCIDR(3).String()}}}
	created, err := cs.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if created.UID == node3.UID {
		t.Fatalf("the new Node h3 has the old one's UID %s", created.UID)
	}
	// readPublication checks the record's owner is the Node as it is now.
	waitPublished(t, l, cs, rc, 3, wantPublication(t, l, 3, netip.Addr{}), 15*time.Second)
	for i := 1; i <= 3; i++ {
		waitCounts(t, l, i, expected("vxlan", 2), 15*time.Second)
	}
	if again := hostEnv(t, l, 3); again != env3 {
		t.Fatalf("h3's env changed: %+v -> %+v", env3, again)
	}
	requireMatrix(t, l)

	// h2 leaves (its twilld stopped) while the API server is away (it
	// crashed; TestKubernetesMode stops it gracefully): its Node and its
	// record leave storage with no event any watcher could see, and etcd
	// is compacted past everything. (Had only the Node gone, the garbage
	// collector would delete the record once the API server is back, and
	// the peers would learn it from an ordinary watch event; here no event
	// of that deletion exists.) When the API server is back, the record
	// informers' watches resume from a revision that no longer exists: the
	// API server says 410 Gone, the informers list again, and h2 is
	// dropped, which only that relist can tell them.
	//
	// A restarted API server answers 403 for a moment, until its RBAC
	// caches are filled; a watch refused so also ends in a relist, without
	// the 410. To take the 410 path, h1 and h3 reach the API server only
	// once it authorizes twill's ServiceAccount, as behind a load balancer
	// that checks /readyz.
	if err := l.StopDaemon(ctx, 2); err != nil {
		t.Fatal(err)
	}
	logAt := map[int]int{}
	for _, i := range []int{1, 3} {
		log, _ := readFile(l.DaemonLog(i))
		logAt[i] = len(log)
	}
	crashKubeAPI(t, l)
	etcdctl := func(args ...string) string {
		out, err := lab.InNS(ctx, l.Topology().UnderlayNS(), testenv.Tool(t, "etcdctl"), append([]string{"--endpoints", lab.EtcdURL()}, args...)...)
		if err != nil {
			t.Fatalf("etcdctl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}
	for _, key := range []string{"/registry/minions/h2", "/registry/twill.io/nodenetworks/h2"} {
		if out := etcdctl("del", key); strings.TrimSpace(out) != "1" {
			t.Fatalf("delete %s from etcd: %q", key, out)
		}
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
	u := l.Topology().UnderlayNS()
	block := func(op string) {
		for _, i := range []int{1, 3} {
			iptables(t, u, op, "INPUT", "-p", "tcp", "--dport", strconv.Itoa(lab.KubePort), "-s", l.Topology().HostAddr(i).String(),
				"-j", "REJECT", "--reject-with", "tcp-reset")
		}
	}
	block("-I")
	if err := l.StartKubeAPI(ctx); err != nil {
		t.Fatal(err)
	}
	saCfg, err := clientcmd.BuildConfigFromFlags("", filepath.Join(l.HostDir(1), "kubeconfig"))
	if err != nil {
		t.Fatal(err)
	}
	saCfg.Dial = lab.DialInNS(u)
	saRecords, err := kube.NewRecordClient(saCfg)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the API server to authorize twill's ServiceAccount", 30*time.Second, func() error {
		_, err := saRecords.List(ctx, metav1.ListOptions{})
		return err
	})
	// Until then h1 and h3 keep h2's entries: nothing told them of h2.
	for _, i := range []int{1, 3} {
		waitCounts(t, l, i, expected("vxlan", 2), time.Second)
	}
	block("-D")
	for _, i := range []int{1, 3} {
		waitCounts(t, l, i, expected("vxlan", 1), 60*time.Second)
		log, _ := readFile(l.DaemonLog(i))
		if !expiredWatch(log[logAt[i]:], "*kube.NodeNetwork") {
			t.Errorf("h%d's log does not show its NodeNetwork watch ending with 410 Gone:\n%s", i, tail(log[logAt[i]:], 30))
		}
	}
	if _, err := rc.Get(ctx, "h2", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Fatalf("h2's record after the API server is back: %v", err)
	}
	if !lab.Ping(ctx, p1.NS, p3.Addr.String()) || !lab.Ping(ctx, p3.NS, p1.Addr.String()) {
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

// expiredWatch reports whether a twilld log shows a watch of the type
// (client-go's name of it, e.g. *kube.NodeNetwork) closed by the API
// server's 410 Gone: client-go's reflector logs it at debug level.
func expiredWatch(log, typ string) bool {
	for _, line := range strings.Split(log, "\n") {
		if strings.Contains(line, `msg="Watch closed"`) && strings.Contains(line, "type="+typ+" ") &&
			strings.Contains(line, "too old resource version") {
			return true
		}
	}
	return false
}

// crashKubeAPI kills the lab's API server with SIGKILL, a crash (StopKubeAPI
// stops it gracefully, which takes the lab 15 s while watches are open), and
// waits until its port refuses connections. StartKubeAPI starts it again.
func crashKubeAPI(t *testing.T, l *lab.Lab) {
	t.Helper()
	pidFile := filepath.Join(l.Dir, "kube-apiserver.pid")
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		t.Fatalf("%s: %q", pidFile, b)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill the API server (pid %d): %v", pid, err)
	}
	os.Remove(pidFile)
	dial := lab.DialInNS(l.Topology().UnderlayNS())
	addr := net.JoinHostPort(lab.WorldAddr.String(), strconv.Itoa(lab.KubePort))
	waitFor(t, "the killed API server's port to refuse connections", 10*time.Second, func() error {
		c, err := dial(ctxFor(t, 5*time.Second), "tcp", addr)
		if err == nil {
			c.Close()
			return errors.New("it accepts connections")
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			return err
		}
		return nil
	})
}
