package bench

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"

	"github.com/twillnet/twill/bench/kubenode"
	"github.com/twillnet/twill/subnet/kube"
)

// kubeletStatusPeriod is the kubelet's nodeStatusReportFrequency: with node
// leases (the default since Kubernetes 1.17) a kubelet writes its Node's
// status at least this often when nothing changed, to move the heartbeats of
// its conditions. A cluster of N nodes makes N such writes per period.
const kubeletStatusPeriod = 5 * time.Minute

// churnWorkers bounds the status writes in flight: at 16.7 writes/s and a
// few milliseconds each, one is usually enough; the bound only keeps a slow
// API server from piling them up.
const churnWorkers = 8

// churnDrain is how long a churn window goes on after the last status write
// has returned, for twilld to receive the events still under way.
const churnDrain = 250 * time.Millisecond

// kubeSnapshot is what the harness reads at either end of a window.
type kubeSnapshot struct {
	at                time.Time
	twilld, api, etcd ProcUsage
	read              float64            // twilld's rchar
	objects           map[string]float64 // twill_kube_watch_events_total by resource
	kernelWrites      float64            // twill_kernel_writes_total, all kinds
	passes            float64            // twill_reconcile_total, all results
}

// snapshot reads twilld's, the API server's and etcd's usage and twilld's
// metrics. metricsFirst scrapes the metrics before reading /proc (at the
// start of a window), else after (at its end), so that the scrapes, which
// cost twilld CPU and make it read /proc files, fall outside the window.
func (k *kubeMode) snapshot(ctx context.Context, metricsFirst bool) (*kubeSnapshot, error) {
	s := &kubeSnapshot{objects: map[string]float64{}}
	scrape := func() error {
		body, err := nsHTTPGet(ctx, k.hostNS(), "http://127.0.0.1:9867/metrics")
		if err != nil {
			return fmt.Errorf("twilld's metrics: %w", err)
		}
		m := parseProm(body)
		for _, res := range []string{kube.ResourceNodes, kube.Resource} {
			s.objects[res] = promValue(m, "twill_kube_watch_events_total", map[string]string{"resource": res})
		}
		s.kernelWrites = promValue(m, "twill_kernel_writes_total", nil)
		s.passes = promValue(m, "twill_reconcile_total", nil)
		return nil
	}
	if metricsFirst {
		if err := scrape(); err != nil {
			return nil, err
		}
	}
	var err error
	s.at = time.Now()
	pid := k.twilld.Pid()
	if s.twilld, err = usage(pid); err != nil {
		return nil, err
	}
	if s.read, err = readBytes(pid); err != nil {
		return nil, err
	}
	if s.api, err = usage(k.api.Pid()); err != nil {
		return nil, err
	}
	if s.etcd, err = usage(k.etcd.proc.Pid()); err != nil {
		return nil, err
	}
	if !metricsFirst {
		if err := scrape(); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// churnWrites is what the status writer did in a window.
type churnWrites struct {
	ok, failed int
	firstErr   error
	patch      []time.Duration // sent -> returned, of the writes that succeeded
	// last is the Node written last and when (its heartbeat time), to
	// check afterwards that the write did what it says.
	last   string
	lastAt time.Time
}

// kubeWindow is one measured window: its length, what the writer did (none
// in the window without writes), and the deltas.
type kubeWindow struct {
	elapsed time.Duration
	writes  churnWrites
	s0, s1  *kubeSnapshot
}

func (w *kubeWindow) cpu() float64     { return w.s1.twilld.CPUSeconds - w.s0.twilld.CPUSeconds }
func (w *kubeWindow) apiCPU() float64  { return w.s1.api.CPUSeconds - w.s0.api.CPUSeconds }
func (w *kubeWindow) etcdCPU() float64 { return w.s1.etcd.CPUSeconds - w.s0.etcd.CPUSeconds }
func (w *kubeWindow) read() float64    { return w.s1.read - w.s0.read }
func (w *kubeWindow) objects(res string) float64 {
	return w.s1.objects[res] - w.s0.objects[res]
}
func (w *kubeWindow) allObjects() float64 {
	return w.objects(kube.ResourceNodes) + w.objects(kube.Resource)
}

// cpuPct is twilld's CPU in the window as a share of one core.
func (w *kubeWindow) cpuPct() float64 { return w.cpu() / w.elapsed.Seconds() * 100 }

// window measures twilld for d: without writes (rate 0), or while the peer
// Nodes' status is written at rate writes per second for d; then the writes
// in flight are awaited and churnDrain more passes before the window ends.
func (k *kubeMode) window(ctx context.Context, n int, d time.Duration, rate float64) (*kubeWindow, error) {
	s0, err := k.snapshot(ctx, true)
	if err != nil {
		return nil, err
	}
	w := &kubeWindow{s0: s0}
	if rate > 0 {
		w.writes = k.heartbeats(ctx, n, rate, d)
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if err := sleep(ctx, churnDrain); err != nil {
			return nil, err
		}
	} else if err := sleep(ctx, d+churnDrain); err != nil {
		return nil, err
	}
	if w.s1, err = k.snapshot(ctx, false); err != nil {
		return nil, err
	}
	w.elapsed = w.s1.at.Sub(w.s0.at)
	return w, nil
}

// heartbeats writes the status of peer Nodes of series 0 for d, rate times a
// second, as their kubelets do every kubeletStatusPeriod (kubenode.Heartbeat),
// each Node once until all have been written, and returns when the last
// write has returned.
func (k *kubeMode) heartbeats(ctx context.Context, n int, rate float64, d time.Duration) churnWrites {
	var (
		mu  sync.Mutex
		res churnWrites
		wg  sync.WaitGroup
	)
	sem := make(chan struct{}, churnWorkers)
	start := time.Now()
	for i := 0; ; i++ {
		at := start.Add(time.Duration(float64(i) / rate * float64(time.Second)))
		if at.Sub(start) >= d {
			break
		}
		if wait := time.Until(at); wait > 0 {
			if sleep(ctx, wait) != nil {
				break
			}
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		name := peerNode(0, k.beats%n).Name
		k.beats++
		now := time.Now()
		res.last, res.lastAt = name, now
		wg.Go(func() {
			defer func() { <-sem }()
			pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			t := time.Now()
			// The peers were created with twilld's NetworkUnavailable
			// condition (kubenode.Create with annotations).
			err := kubenode.Heartbeat(pctx, k.admin, name, kubenode.HeartbeatPatch(true, now))
			took := time.Since(t)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				res.failed++
				if res.firstErr == nil {
					res.firstErr = err
				}
				return
			}
			res.ok++
			res.patch = append(res.patch, took)
		})
	}
	// The window lasts d, whenever the last write went out.
	if wait := time.Until(start.Add(d)); wait > 0 {
		sleep(ctx, wait)
	}
	wg.Wait()
	return res
}

// checkHeartbeat reads the Node written last and checks that the write
// moved the heartbeat of its Ready condition and left its conditions as
// they were (11: the kubelet's 4, the node problem detector's 6, twilld's).
func (k *kubeMode) checkHeartbeat(ctx context.Context, name string, at time.Time) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	node, err := k.admin.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("read Node %s after the churn: %w", name, err)
	}
	if len(node.Status.Conditions) != 11 {
		return fmt.Errorf("Node %s has %d conditions after its status heartbeat; want 11", name, len(node.Status.Conditions))
	}
	for _, c := range node.Status.Conditions {
		if c.Type == corev1.NodeReady && c.LastHeartbeatTime.Unix() != at.Unix() {
			return fmt.Errorf("Node %s: Ready heartbeat %s after the churn; want %s", name, c.LastHeartbeatTime.UTC().Format(time.RFC3339), at.UTC().Format(time.RFC3339))
		}
	}
	return nil
}

// kubeChurn starts twilld with n peers in the current mode, lets it settle,
// then watches it for KubeChurn without any write, then for as long while
// the peer Nodes' status is written as their kubelets do: n writes per
// kubeletStatusPeriod (16.7 a second at 5,000 Nodes). It reports the
// objects twilld's informers received, the bytes it read, its CPU and the
// API server's in both windows, and what one status write costs twilld,
// and, by multiplication, a cluster of n twillds.
func (h *Harness) kubeChurn(ctx context.Context, k *kubeMode, sec *Section, n int) error {
	d := h.cfg.KubeChurn
	if d <= 0 {
		return nil
	}
	L := k.label(n)
	rate := float64(n) / kubeletStatusPeriod.Seconds()
	cs, err := k.coldStart(ctx, n)
	if err != nil {
		return err
	}
	cs.w.close()
	defer k.reset(context.Background())
	// The start's own writes (its annotations or record, the condition)
	// come back as events in the first second.
	if err := sleep(ctx, 5*time.Second); err != nil {
		return err
	}
	h.say("  %s: %s without writes, then %s of Node status writes at %.1f/s", L, d, d, rate)
	idle, err := k.window(ctx, n, d, 0)
	if err != nil {
		return err
	}
	churn, err := k.window(ctx, n, d, rate)
	if err != nil {
		return err
	}
	cw := churn.writes
	if cw.ok == 0 {
		return fmt.Errorf("no Node status write succeeded in the churn window (%d failed: %v)", cw.failed, cw.firstErr)
	}
	if err := k.checkHeartbeat(ctx, cw.last, cw.lastAt); err != nil {
		return err
	}
	writes := float64(cw.ok)
	perWrite := churn.allObjects() / writes
	readPerWrite := (churn.read() - idle.read()) / writes
	ratio := churn.cpuPct() / idle.cpuPct()
	h.say("  %s: %d writes (%d failed); objects received %.0f (idle %.0f), %.2f per write; read %.1f KiB (idle %.1f), %.2f KiB per write; twilld CPU %.2f s (idle %.2f), %.2fx; kube-apiserver CPU %.2f s (idle %.2f)",
		L, cw.ok, cw.failed, churn.allObjects(), idle.allObjects(), perWrite, churn.read()/1024, idle.read()/1024, readPerWrite/1024,
		churn.cpu(), idle.cpu(), ratio, churn.apiCPU(), idle.apiCPU())

	note := fmt.Sprintf("%.0f s; %.2f writes/s asked, %.2f/s done", churn.elapsed.Seconds(), rate, writes/churn.elapsed.Seconds())
	h.add(sec, &Figure{Name: fmt.Sprintf("%s, churn: Node status writes (kubelet heartbeat, strategic merge patch of nodes/status)", L), Unit: "count",
		Value: newValue(writes), Note: note})
	if cw.failed > 0 {
		h.add(sec, &Figure{Name: fmt.Sprintf("%s, churn: status writes that failed", L), Unit: "count", Value: newValue(float64(cw.failed)),
			Targets: []Target{{"value", "<=", 0}}, Note: cw.firstErr.Error()})
	}
	h.add(sec, &Figure{Name: fmt.Sprintf("%s, churn: one status write (sent -> returned)", L), Unit: "ms", Stats: Summarize(millis(cw.patch))})
	for _, w := range []struct {
		name string
		w    *kubeWindow
	}{{"idle", idle}, {"churn", churn}} {
		for _, res := range []string{kube.ResourceNodes, kube.Resource} {
			h.add(sec, &Figure{Name: fmt.Sprintf("%s, %s: objects twilld's informers received: %s", L, w.name, res), Unit: "count", Value: newValue(w.w.objects(res))})
		}
	}
	f := h.add(sec, &Figure{Name: fmt.Sprintf("%s: objects twilld received per Node status write", L), Unit: "count", Value: newValue(perWrite)})
	if k.mode == kubeNodeNetwork {
		f.Targets = []Target{{"value", "<=", 0}}
	}
	h.add(sec, &Figure{Name: fmt.Sprintf("%s, idle: bytes twilld read (rchar)", L), Unit: "KiB", Value: newValue(idle.read() / 1024)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s, churn: bytes twilld read (rchar)", L), Unit: "KiB", Value: newValue(churn.read() / 1024)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: bytes twilld read per Node status write (churn - idle)", L), Unit: "KiB", Value: newValue(readPerWrite / 1024)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s, idle: twilld CPU", L), Unit: "% of a core", Value: newValue(idle.cpuPct()),
		Note: fmt.Sprintf("%.2f s in %.1f s, %.0f passes", idle.cpu(), idle.elapsed.Seconds(), idle.s1.passes-idle.s0.passes)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s, churn: twilld CPU", L), Unit: "% of a core", Value: newValue(churn.cpuPct()),
		Note: fmt.Sprintf("%.2f s in %.1f s, %.0f passes", churn.cpu(), churn.elapsed.Seconds(), churn.s1.passes-churn.s0.passes)})
	if idle.cpu() > 0 {
		f = h.add(sec, &Figure{Name: fmt.Sprintf("%s: twilld CPU, churn over idle", L), Unit: "x", Value: newValue(ratio)})
		if k.mode == kubeNodeNetwork {
			f.Targets = []Target{{"value", "<=", 1.10}} // within 10 % of idle
		}
	}
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: twilld CPU per Node status write (churn - idle)", L), Unit: "ms",
		Value: newValue((churn.cpu() - idle.cpu()*churn.elapsed.Seconds()/idle.elapsed.Seconds()) / writes * 1000)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s, idle: kube-apiserver CPU", L), Unit: "s", Value: newValue(idle.apiCPU())})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s, churn: kube-apiserver CPU", L), Unit: "s", Value: newValue(churn.apiCPU())})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s, idle: etcd CPU", L), Unit: "s", Value: newValue(idle.etcdCPU())})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s, churn: etcd CPU", L), Unit: "s", Value: newValue(churn.etcdCPU())})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s, churn: kernel writes by twilld (twill_kernel_writes_total)", L), Unit: "count",
		Value: newValue(churn.s1.kernelWrites - churn.s0.kernelWrites)})
	// What every twilld of a cluster of n nodes reads: the N-squared term.
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: per-write bytes x %d twillds x %.1f writes/s = leaving the API servers for twill", L, n, rate), Unit: "MiB/s",
		Value: newValue(max(readPerWrite, 0) * float64(n) * rate / (1 << 20)), Note: "arithmetic on the measured per-write bytes, negative taken as 0"})
	if k.mode == kubeAnnotations && k.plainWrite > 0 {
		h.add(sec, &Figure{Name: fmt.Sprintf("%s: the same once its informer watches again (plain watch: %.1f KiB per write) x %d twillds x %.1f writes/s", L, k.plainWrite/1024, n, rate), Unit: "MiB/s",
			Value: newValue(k.plainWrite * float64(n) * rate / (1 << 20)), Note: "arithmetic on the harness's plain watch"})
	}
	if k.mode == kubeAnnotations || len(h.cfg.KubeModes) == 1 {
		h.note(sec, "churn: with twilld settled (5 s after its start), a window of %s without any write, then one as long in which the peer Nodes' status is written as their kubelets do every %s (nodeStatusReportFrequency, with node leases): %.1f writes/s for %d Nodes, each a strategic merge patch of nodes/status by field manager kubelet that moves the lastHeartbeatTime of the kubelet's 4 conditions (with $setElementOrder of all 11), %d in flight at most; each window ends %s after its last write returned",
			d, kubeletStatusPeriod, rate, n, churnWorkers, churnDrain)
		h.note(sec, "churn: objects = twilld's twill_kube_watch_events_total (what its informers delivered: listed, added, updated, deleted) by resource; bytes = rchar of /proc/<pid>/io (its reads of the API server connection, TLS included; the metrics scrapes are outside the windows); CPU = utime + stime of /proc/<pid>/stat (10 ms ticks); passes = twill_reconcile_total (the resync runs every 10 s in both windows)")
	}
	return nil
}

// watchBytesWrites is how many status writes kubeWatchBytes makes.
const watchBytesWrites = 20

// kubeWatchBytes weighs one Node status write as a Node watcher receives it
// (protobuf, gzip accepted, as client-go asks), on the two kinds of watch
// twilld's informer makes: the first one is a WatchList (sendInitialEvents:
// the Nodes come as events, then the changes on the same stream), which
// kube-apiserver 1.37 compresses when the client accepts gzip; when that
// watch ends (client-go's reflector asks for watches of 5 to 10 minutes)
// the informer watches again from its last resourceVersion, a plain watch,
// which it does not compress. The churn windows measure twilld on its first
// watch.
func (h *Harness) kubeWatchBytes(ctx context.Context, k *kubeMode, sec *Section, n int) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	hc, err := rest.HTTPClientFor(k.cfg)
	if err != nil {
		return err
	}
	l, err := k.admin.CoreV1().Nodes().List(ctx, metav1.ListOptions{Limit: 1})
	if err != nil {
		return err
	}
	type stream struct {
		name, encoding string
		bytes          atomic.Int64
	}
	open := func(s *stream, query string) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, k.srv.URL()+"/api/v1/nodes?"+query, nil)
		if err != nil {
			return err
		}
		req.Header.Set("Accept", "application/vnd.kubernetes.protobuf;stream=watch")
		req.Header.Set("Accept-Encoding", "gzip") // set by hand: the body stays as sent
		resp, err := hc.Do(req)
		if err != nil {
			return fmt.Errorf("%s of Nodes: %w", s.name, err)
		}
		if resp.StatusCode != http.StatusOK {
			resp.Body.Close()
			return fmt.Errorf("%s of Nodes: %s", s.name, resp.Status)
		}
		s.encoding = resp.Header.Get("Content-Encoding")
		go func() {
			defer resp.Body.Close()
			buf := make([]byte, 64<<10)
			for {
				m, err := resp.Body.Read(buf)
				s.bytes.Add(int64(m))
				if err != nil {
					return
				}
			}
		}()
		return nil
	}
	plain := &stream{name: "plain watch"}
	list := &stream{name: "WatchList"}
	if err := open(plain, "watch=1&allowWatchBookmarks=true&resourceVersion="+l.ResourceVersion); err != nil {
		return err
	}
	if err := open(list, "watch=1&allowWatchBookmarks=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan"); err != nil {
		return err
	}
	// The WatchList first sends every Node: wait until that has arrived.
	last := int64(-1)
	for range 60 {
		if err := sleep(ctx, time.Second); err != nil {
			return err
		}
		if b := list.bytes.Load(); b == last && b > 0 {
			break
		} else {
			last = b
		}
	}
	initial := list.bytes.Load()
	p0, l0 := plain.bytes.Load(), list.bytes.Load()
	for range watchBytesWrites {
		name := peerNode(0, k.beats%n).Name
		k.beats++
		if err := kubenode.Heartbeat(ctx, k.admin, name, kubenode.HeartbeatPatch(true, time.Now())); err != nil {
			return err
		}
		if err := sleep(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
	if err := sleep(ctx, time.Second); err != nil {
		return err
	}
	perWrite := func(s *stream, from int64) float64 { return float64(s.bytes.Load()-from) / watchBytesWrites / 1024 }
	enc := func(s *stream) string {
		if s.encoding == "" {
			return "not compressed"
		}
		return "Content-Encoding " + s.encoding
	}
	k.plainWrite = perWrite(plain, p0) * 1024
	h.add(sec, &Figure{Name: "one Node status write on a plain watch of Nodes (protobuf; a watch from a resourceVersion)", Unit: "KiB",
		Value: newValue(perWrite(plain, p0)), Note: enc(plain)})
	h.add(sec, &Figure{Name: "one Node status write on a WatchList of Nodes (protobuf; an informer's first watch)", Unit: "KiB",
		Value: newValue(perWrite(list, l0)), Note: enc(list)})
	h.add(sec, &Figure{Name: fmt.Sprintf("the WatchList's first part: the %d Nodes as events", n+1), Unit: "MiB",
		Value: newValue(float64(initial) / (1 << 20)), Note: enc(list)})
	h.note(sec, "watch bytes: the harness opened two watches of Nodes (protobuf, Accept-Encoding gzip, as client-go asks) and wrote %d Node status heartbeats (below); bytes = the HTTP response bodies, as sent. twilld's informers start with a WatchList; when it ends (client-go's reflector asks for watches of 5 to 10 min) they watch again from their last resourceVersion, a plain watch", watchBytesWrites)
	return nil
}
