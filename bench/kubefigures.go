package bench

import (
	"bufio"
	"cmp"
	"context"
	"fmt"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/twillnet/twill/bench/kubenode"
	"github.com/twillnet/twill/subnet/kube"
)

// runKubeMode is section 3: twilld in Kubernetes mode with KubeNodes
// realistic peer Nodes in a real kube-apiserver: cold starts beside the batch
// limit, peak RSS, and one Node added or removed until the kernel matches.
func (h *Harness) runKubeMode(ctx context.Context, sec *Section) error {
	n := h.cfg.KubeNodes
	h.say("starting etcd and kube-apiserver (bin/tools) in %su", h.cfg.Prefix)
	t0 := time.Now()
	k, err := newKubeMode(ctx, h)
	if err != nil {
		return err
	}
	defer k.close()
	h.say("  API server ready, RBAC of deploy/kube-twill.yaml applied (%.1f s); creating %d realistic Nodes with %d clients", time.Since(t0).Seconds(), n, kubeWorkers)
	t1 := time.Now()
	if err := k.addNodes(ctx, n); err != nil {
		return fmt.Errorf("create %d Nodes: %w", n, err)
	}
	created := time.Since(t1)
	h.say("  created %d Nodes in %.1f s (%.0f writes/s)", n, created.Seconds(), float64(4*n)/created.Seconds())
	h.add(sec, &Figure{Name: fmt.Sprintf("set-up: %d Nodes created, 4 writes each, %d clients", n, kubeWorkers), Unit: "s", Value: newValue(created.Seconds())})
	if err := h.kubeNodeSize(ctx, k, sec); err != nil {
		return err
	}
	if err := h.kubeConvergence(ctx, k, sec, n); err != nil {
		return err
	}
	return h.kubeChanges(ctx, k, sec, n, h.cfg.KubeSamples)
}

// kubeNodeSize records what one peer Node weighs as the API server sends it.
func (h *Harness) kubeNodeSize(ctx context.Context, k *kubeMode, sec *Section) error {
	name := peerNode(0, 0).Name
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	raw, err := k.json.CoreV1().RESTClient().Get().Resource("nodes").Name(name).DoRaw(cctx)
	if err != nil {
		return fmt.Errorf("read Node %s: %w", name, err)
	}
	node, err := k.admin.CoreV1().Nodes().Get(cctx, name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("read Node %s: %w", name, err)
	}
	pb, err := node.Marshal()
	if err != nil {
		return err
	}
	var managers []string
	for _, mf := range node.ManagedFields {
		m := mf.Manager + " " + string(mf.Operation)
		if mf.Subresource != "" {
			m += " " + mf.Subresource
		}
		managers = append(managers, m)
	}
	h.add(sec, &Figure{Name: "one peer Node as the API server sends it: JSON", Unit: "KiB", Value: newValue(float64(len(raw)) / 1024)})
	h.add(sec, &Figure{Name: "one peer Node: protobuf (the object, without the envelope)", Unit: "KiB", Value: newValue(float64(len(pb)) / 1024)})
	h.note(sec, "a peer Node: %d labels, %d annotations, %d conditions, %d addresses, %d images, managedFields of %s",
		len(node.Labels), len(node.Annotations), len(node.Status.Conditions), len(node.Status.Addresses), len(node.Status.Images), strings.Join(managers, ", "))
	return nil
}

// kubeConvergence is the cold-start part: Runs starts of twilld with n peer
// Nodes, alternating with the batch limit of the same 3n entries.
func (h *Harness) kubeConvergence(ctx context.Context, k *kubeMode, sec *Section, n int) error {
	var env, all, fdb, neigh, route, limTotal []time.Duration
	var cpu, ucpu, hcpu, hwm, rss, anon, file, heapInuse, heapHeld, goSys, apiCPU, etcdCPU []float64
	phases := map[string][]time.Duration{}
	for r := range h.cfg.Runs {
		var cs *kubeColdStart
		start := func() error {
			var err error
			cs, err = k.coldStart(ctx, n)
			return err
		}
		var err error
		if r == h.cfg.Runs-1 {
			err = h.profiled(ctx, fmt.Sprintf("kube-cold-start-%d", n), start)
		} else {
			err = start()
		}
		if err != nil {
			return fmt.Errorf("%d Nodes, run %d: %w", n, r+1, err)
		}
		cs.w.close()
		env, all = append(env, cs.Env), append(all, cs.All)
		fdb, neigh, route = append(fdb, cs.FDB), append(neigh, cs.Neigh), append(route, cs.Route)
		cpu, ucpu, hcpu = append(cpu, cs.CPU), append(ucpu, cs.UserCPU), append(hcpu, cs.HarnessCPU)
		hwm, rss = append(hwm, cs.HWM), append(rss, cs.RSS)
		anon, file = append(anon, cs.AnonMiB), append(file, cs.FileMiB)
		heapInuse, heapHeld, goSys = append(heapInuse, cs.HeapInuseMiB), append(heapHeld, cs.HeapHeldMiB), append(goSys, cs.GoSysMiB)
		apiCPU, etcdCPU = append(apiCPU, cs.APICPU), append(etcdCPU, cs.EtcdCPU)
		for ph, v := range cs.Phases {
			phases[ph] = append(phases[ph], v)
		}
		if err := k.reset(ctx); err != nil {
			return err
		}
		l, err := measureBatchLimit(ctx, h, n, false)
		if err != nil {
			return fmt.Errorf("batch limit, %d peers: %w", n, err)
		}
		limTotal = append(limTotal, l.Total)
		h.say("  %d Nodes, run %d: env file %.3f s, all %d entries %.3f s (batch limit %.3f s), CPU %.2f s (user %.2f), peak RSS %.1f MiB; kube-apiserver CPU %.2f s",
			n, r+1, cs.Env.Seconds(), 3*n, cs.All.Seconds(), l.Total.Seconds(), cs.CPU, cs.UserCPU, cs.HWM, cs.APICPU)
	}
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: start -> env file", n), Unit: "s", Stats: Summarize(seconds(env))})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: start -> all %d entries", n, 3*n), Unit: "s", Stats: Summarize(seconds(all)),
		Limit: &Limit{Name: "ip/bridge -batch", Stats: Summarize(seconds(limTotal))}})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: start -> all FDB entries", n), Unit: "s", Stats: Summarize(seconds(fdb))})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: start -> all neighbours", n), Unit: "s", Stats: Summarize(seconds(neigh))})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: start -> all routes", n), Unit: "s", Stats: Summarize(seconds(route))})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: CPU seconds to converge", n), Unit: "s", Stats: Summarize(cpu)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: of which user space", n), Unit: "s", Stats: Summarize(ucpu)})
	f := h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: peak RSS (VmHWM)", n), Unit: "MiB", Stats: Summarize(hwm)})
	if n >= 5000 {
		f.Targets = []Target{{"median", "<=", 40}} // issue 6: with 5,000 realistic Nodes
	}
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: RSS 0.5 s after the last entry", n), Unit: "MiB", Stats: Summarize(rss)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: of which anonymous (Go heap, stacks, runtime)", n), Unit: "MiB", Stats: Summarize(anon)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: of which file-backed (the binary's pages)", n), Unit: "MiB", Stats: Summarize(file)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: Go heap in use then (twilld's /metrics)", n), Unit: "MiB", Stats: Summarize(heapInuse)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: Go heap held from the kernel then (sys - released)", n), Unit: "MiB", Stats: Summarize(heapHeld)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: all memory the Go runtime obtained (go_memstats_sys_bytes)", n), Unit: "MiB", Stats: Summarize(goSys)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: kube-apiserver CPU during the start", n), Unit: "s", Stats: Summarize(apiCPU)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: etcd CPU during the start", n), Unit: "s", Stats: Summarize(etcdCPU)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: harness CPU meanwhile (notifications)", n), Unit: "s", Stats: Summarize(hcpu)})
	// twilld's phases in the order they happened.
	names := slices.Collect(maps.Keys(phases))
	slices.SortFunc(names, func(a, b string) int {
		return cmp.Compare(Summarize(seconds(phases[a])).Median, Summarize(seconds(phases[b])).Median)
	})
	for _, ph := range names {
		h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes, twilld log: start -> %s", n, ph), Unit: "s", Stats: Summarize(seconds(phases[ph]))})
	}
	h.note(sec, "start = fork of twilld --kube-subnet-mgr in the host namespace, with a kubeconfig holding a token of deploy/kube-twill.yaml's ServiceAccount; it logs at info level (debug would add a line per peer)")
	h.note(sec, "each run starts on a fresh node: no device, no twill routes, no env file, the own Node without twill's annotations and NetworkUnavailable condition")
	h.note(sec, "limit = the same %d entries written by `bridge -batch` + `ip -batch` into a fresh VXLAN device in a fresh namespace, measured between twilld's runs", 3*n)
	if h.cfg.PerfDir != "" {
		h.note(sec, "the last cold start ran under a system-wide perf record (--perf): it is slower than the others")
	}
	return nil
}

// kubeChanges starts twilld with n peer Nodes and, samples times, registers a
// new Node as the kubelet and the node IPAM controller do (not timed), then
// publishes its annotations as its twilld would: the time runs from that
// patch (the write that makes the Node a peer) to the kernel notification that
// completes its route, neighbour and FDB entry. Then the Nodes are deleted one
// by one, timed the same way.
func (h *Harness) kubeChanges(ctx context.Context, k *kubeMode, sec *Section, n, samples int) error {
	if samples < 1 {
		return nil
	}
	h.say("  one Node added / removed with %d Nodes, %d samples each", n, samples)
	cs, err := k.coldStart(ctx, n, "--log-level", "debug")
	if err != nil {
		return err
	}
	w := cs.w
	defer w.close()
	defer k.reset(context.Background())
	if err := sleep(ctx, time.Second); err != nil {
		return err
	}
	u0, err := usage(k.twilld.Pid())
	if err != nil {
		return err
	}
	logOffset := fileSize(k.twilld.Log)
	// sent: from the write's start, which is what "added until programmed"
	// means; returned: from its return, as section 2 times etcd writes.
	// twilld's watch event can beat the API server's answer to the
	// harness, so returned can be near 0.
	sent, returned, write := map[string][]time.Duration{}, map[string][]time.Duration{}, map[string][]time.Duration{}
	one := func(kind string, op func(context.Context) error, pred func(*kernelWatch) bool) error {
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		start := time.Now()
		if err := op(wctx); err != nil {
			return err
		}
		back := time.Now()
		at, err := w.await(ctx, 10*time.Second, "the kernel to match after a Node "+kind, pred)
		if err != nil {
			return err
		}
		sent[kind] = append(sent[kind], at.Sub(start))
		returned[kind] = append(returned[kind], max(at.Sub(back), 0))
		write[kind] = append(write[kind], back.Sub(start))
		return sleep(ctx, 20*time.Millisecond)
	}
	for i := range samples {
		s := peerNode(1, i)
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err := kubenode.Register(rctx, k.admin, s)
		cancel()
		if err != nil {
			return err
		}
		// Let twilld digest the registration's three events (none makes a
		// peer) before the write that does.
		if err := sleep(ctx, 100*time.Millisecond); err != nil {
			return err
		}
		publish := func(ctx context.Context) error {
			return kubenode.Publish(ctx, k.admin, s.Name, s.Annotations, kube.FieldManager)
		}
		if err := one("added", publish, peerPresent(peerAt(1, i))); err != nil {
			return err
		}
	}
	if err := verifyHost(ctx, k.topo, n+samples, false); err != nil {
		return fmt.Errorf("after adding %d Nodes: %w", samples, err)
	}
	for i := range samples {
		name := peerNode(1, i).Name
		del := func(ctx context.Context) error {
			return k.admin.CoreV1().Nodes().Delete(ctx, name, metav1.DeleteOptions{})
		}
		if err := one("removed", del, peerAbsent(peerAt(1, i))); err != nil {
			return err
		}
	}
	if err := verifyHost(ctx, k.topo, n, false); err != nil {
		return fmt.Errorf("after removing the added Nodes: %w", err)
	}
	u1, err := usage(k.twilld.Pid())
	if err != nil {
		return err
	}
	lim, err := measureChangeLimit(ctx, h, n, samples)
	if err != nil {
		return fmt.Errorf("change limit: %w", err)
	}
	limits := map[string]*Limit{
		"added":   {Name: "3 netlink writes", Stats: Summarize(millis(lim.Add))},
		"removed": {Name: "3 netlink deletes", Stats: Summarize(millis(lim.Remove))},
	}
	for _, kind := range []string{"added", "removed"} {
		h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: one Node %s: write sent -> kernel matches", n, kind), Unit: "ms",
			Stats: Summarize(millis(sent[kind])), Limit: limits[kind]})
		h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: one Node %s: write returned -> kernel matches", n, kind), Unit: "ms",
			Stats: Summarize(millis(returned[kind]))})
	}
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: the annotation patch itself (sent -> returned)", n), Unit: "ms", Stats: Summarize(millis(write["added"]))})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: the Node delete itself (sent -> returned)", n), Unit: "ms", Stats: Summarize(millis(write["removed"]))})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: twilld pass (its log: full or changed peers only) during the changes", n), Unit: "ms",
		Stats: Summarize(millis(reconcileTimes(k.twilld.Log, logOffset)))})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: twilld CPU per change (registration events included)", n), Unit: "ms",
		Value: newValue((u1.CPUSeconds - u0.CPUSeconds) / float64(2*samples) * 1000)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d Nodes: twilld peak RSS (VmHWM) after the changes", n), Unit: "MiB", Value: newValue(u1.HWMMiB)})
	h.note(sec, "added = a new Node registered by \"kubelet\", given its podCIDR by \"kube-controller-manager\" and its status by \"kubelet\" (not timed, 100 ms before), then twill's annotations published as its twilld does (merge patch of nodes/status): timed from the start of that patch (sent) and from its return (returned; twilld's watch event may arrive before the answer, then it is 0)")
	h.note(sec, "removed = the Node deleted, timed the same way. One change at a time with a 20 ms pause; a resync pass (every 10 s) may coincide with a sample")
	h.note(sec, "limit = the same peer's FDB, neighbour and route entries written (or deleted) by the harness over one netlink socket into a fresh namespace already holding %d peers' entries", n)
	return nil
}

// logFirst returns the time from start to the first line of twilld's log with
// message msg.
func logFirst(path string, start time.Time, msg string) (time.Duration, bool) {
	f, err := os.Open(path)
	if err != nil {
		return 0, false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for lines := 0; sc.Scan() && lines < 100000; lines++ {
		m := logLine.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		got := m[2]
		if u, err := strconv.Unquote(got); err == nil {
			got = u
		}
		if got != msg {
			continue
		}
		at, err := time.Parse(time.RFC3339Nano, m[1])
		if err != nil {
			return 0, false
		}
		return at.Sub(start), true
	}
	return 0, false
}
