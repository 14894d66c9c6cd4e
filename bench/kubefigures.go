package bench

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/twillnet/twill/bench/kubenode"
	"github.com/twillnet/twill/subnet/kube"
)

// runKubeMode is section 3: twilld in Kubernetes mode with KubeNodes
// realistic peer Nodes in a real kube-apiserver, in each of KubeModes (the
// nodenetwork mode with the peers' NodeNetwork records beside their Nodes):
// cold starts beside the batch limit, peak RSS, the peers' Node status
// written as kubelets do (churn) beside a window without writes, and one
// peer added or removed until the kernel matches. A mode that fails records
// its error and the next one still runs.
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
	if err := h.kubeWatchBytes(ctx, k, sec, n); err != nil {
		return err
	}
	var errs []error
	for _, mode := range h.cfg.KubeModes {
		if ctx.Err() != nil {
			break
		}
		if err := h.kubeModeFigures(ctx, k, sec, mode, n); err != nil {
			h.say("  --kube-mode %s failed: %v", mode, err)
			errs = append(errs, fmt.Errorf("--kube-mode %s: %w", mode, err))
			k.reset(context.Background())
		}
	}
	h.kubeNotes(sec, n)
	return errors.Join(errs...)
}

// kubeModeFigures takes the figures of one --kube-mode.
func (h *Harness) kubeModeFigures(ctx context.Context, k *kubeMode, sec *Section, mode string, n int) error {
	k.mode = mode
	h.say("  --kube-mode %s", mode)
	if mode == kubeNodeNetwork && k.recs < n {
		h.say("  creating %d NodeNetwork records, each owned by its Node, with %d clients", n-k.recs, kubeWorkers)
		t := time.Now()
		if err := k.addRecords(ctx, n); err != nil {
			return fmt.Errorf("create %d NodeNetwork records: %w", n, err)
		}
		d := time.Since(t)
		h.say("  created %d records in %.1f s", n, d.Seconds())
		h.add(sec, &Figure{Name: fmt.Sprintf("set-up: %d NodeNetwork records created, %d clients", n, kubeWorkers), Unit: "s", Value: newValue(d.Seconds())})
		if err := h.kubeRecordSize(ctx, k, sec); err != nil {
			return err
		}
	}
	if err := h.kubeConvergence(ctx, k, sec, n); err != nil {
		return err
	}
	if err := h.kubeChurn(ctx, k, sec, n); err != nil {
		return err
	}
	return h.kubeChanges(ctx, k, sec, n, h.cfg.KubeSamples)
}

// label names the mode and its peers in figure names.
func (k *kubeMode) label(n int) string {
	if k.mode == kubeNodeNetwork {
		return fmt.Sprintf("nodenetwork, %d records", n)
	}
	return fmt.Sprintf("annotations, %d Nodes", n)
}

// kubeRecordSize records what one peer NodeNetwork weighs as the API server
// sends it (JSON: custom resources have no protobuf form).
func (h *Harness) kubeRecordSize(ctx context.Context, k *kubeMode, sec *Section) error {
	name := peerNode(0, 0).Name
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	raw, err := k.json.CoreV1().RESTClient().Get().AbsPath("/apis", kube.GroupName, kube.Version, kube.Resource, name).DoRaw(cctx)
	if err != nil {
		return fmt.Errorf("read NodeNetwork %s: %w", name, err)
	}
	h.add(sec, &Figure{Name: "one peer NodeNetwork as the API server sends it: JSON", Unit: "KiB", Value: newValue(float64(len(raw)) / 1024)})
	return nil
}

// kubeNotes are the notes of section 3 that hold for every mode.
func (h *Harness) kubeNotes(sec *Section, n int) {
	h.note(sec, "start = fork of twilld --kube-subnet-mgr --kube-mode <mode> in the host namespace, with a kubeconfig holding a token of deploy/kube-twill.yaml's ServiceAccount bound to a (Pending) pod on the own node (the manifest's admission policy lets it write that node's record and status only); it logs at info level (debug would add a line per peer)")
	h.note(sec, "each run starts on a fresh node: no device, no twill routes, no env file, the own Node without twill's annotations and NetworkUnavailable condition, no NodeNetwork record of the own node")
	h.note(sec, "limit = the same %d entries written by `bridge -batch` + `ip -batch` into a fresh VXLAN device in a fresh namespace, measured between twilld's runs", 3*n)
	if h.cfg.PerfDir != "" {
		h.note(sec, "the last cold start of each mode ran under a system-wide perf record (--perf): it is slower than the others")
	}
	if slices.Contains(h.cfg.KubeModes, kubeNodeNetwork) {
		h.note(sec, "nodenetwork mode: the %d peers are their NodeNetwork records (created by the harness as their twillds would, field manager twilld, each with an ownerReference to its Node); the realistic Nodes stay, with the annotations the set-up published (annotations mode's; a nodenetwork cluster's Nodes would lack those 3 annotations), and only their status is written in the churn", n)
	}
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
	var cpu, ucpu, hcpu, hwm, rss, anon, file, heapInuse, heapHeld, goSys, apiCPU, etcdCPU, read []float64
	objects := map[string][]float64{}
	L := k.label(n)
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
			err = h.profiled(ctx, fmt.Sprintf("kube-%s-cold-start-%d", k.mode, n), start)
		} else {
			err = start()
		}
		if err != nil {
			return fmt.Errorf("%s, run %d: %w", L, r+1, err)
		}
		cs.w.close()
		env, all = append(env, cs.Env), append(all, cs.All)
		fdb, neigh, route = append(fdb, cs.FDB), append(neigh, cs.Neigh), append(route, cs.Route)
		cpu, ucpu, hcpu = append(cpu, cs.CPU), append(ucpu, cs.UserCPU), append(hcpu, cs.HarnessCPU)
		hwm, rss = append(hwm, cs.HWM), append(rss, cs.RSS)
		anon, file = append(anon, cs.AnonMiB), append(file, cs.FileMiB)
		heapInuse, heapHeld, goSys = append(heapInuse, cs.HeapInuseMiB), append(heapHeld, cs.HeapHeldMiB), append(goSys, cs.GoSysMiB)
		apiCPU, etcdCPU = append(apiCPU, cs.APICPU), append(etcdCPU, cs.EtcdCPU)
		read = append(read, cs.ReadMiB)
		for res, v := range cs.Objects {
			objects[res] = append(objects[res], v)
		}
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
		h.say("  %s, run %d: env file %.3f s, all %d entries %.3f s (batch limit %.3f s), CPU %.2f s (user %.2f), peak RSS %.1f MiB, read %.1f MiB; kube-apiserver CPU %.2f s",
			L, r+1, cs.Env.Seconds(), 3*n, cs.All.Seconds(), l.Total.Seconds(), cs.CPU, cs.UserCPU, cs.HWM, cs.ReadMiB, cs.APICPU)
	}
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: start -> env file", L), Unit: "s", Stats: Summarize(seconds(env))})
	f := h.add(sec, &Figure{Name: fmt.Sprintf("%s: start -> all %d entries", L, 3*n), Unit: "s", Stats: Summarize(seconds(all)),
		Limit: &Limit{Name: "ip/bridge -batch", Stats: Summarize(seconds(limTotal))}})
	if n >= 5000 && k.mode == kubeNodeNetwork {
		f.Targets = []Target{{"median", "<=", 0.5}} // the NodeNetwork issue: at 5,000 records
	}
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: start -> all FDB entries", L), Unit: "s", Stats: Summarize(seconds(fdb))})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: start -> all neighbours", L), Unit: "s", Stats: Summarize(seconds(neigh))})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: start -> all routes", L), Unit: "s", Stats: Summarize(seconds(route))})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: CPU seconds to converge", L), Unit: "s", Stats: Summarize(cpu)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: of which user space", L), Unit: "s", Stats: Summarize(ucpu)})
	f = h.add(sec, &Figure{Name: fmt.Sprintf("%s: peak RSS (VmHWM)", L), Unit: "MiB", Stats: Summarize(hwm)})
	if n >= 5000 {
		if k.mode == kubeNodeNetwork {
			f.Targets = []Target{{"median", "<=", 30}} // the NodeNetwork issue: at 5,000 records
		} else {
			f.Targets = []Target{{"median", "<=", 40}} // issue 6: with 5,000 realistic Nodes
		}
	}
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: bytes twilld read to the last entry (rchar)", L), Unit: "MiB", Stats: Summarize(read)})
	for _, res := range []string{kube.ResourceNodes, kube.Resource} {
		if v := objects[res]; len(v) > 0 {
			h.add(sec, &Figure{Name: fmt.Sprintf("%s: objects its informers received by 0.5 s after the last entry: %s", L, res), Unit: "count", Stats: Summarize(v)})
		}
	}
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: RSS 0.5 s after the last entry", L), Unit: "MiB", Stats: Summarize(rss)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: of which anonymous (Go heap, stacks, runtime)", L), Unit: "MiB", Stats: Summarize(anon)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: of which file-backed (the binary's pages)", L), Unit: "MiB", Stats: Summarize(file)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: Go heap in use then (twilld's /metrics)", L), Unit: "MiB", Stats: Summarize(heapInuse)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: Go heap held from the kernel then (sys - released)", L), Unit: "MiB", Stats: Summarize(heapHeld)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: all memory the Go runtime obtained (go_memstats_sys_bytes)", L), Unit: "MiB", Stats: Summarize(goSys)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: kube-apiserver CPU during the start", L), Unit: "s", Stats: Summarize(apiCPU)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: etcd CPU during the start", L), Unit: "s", Stats: Summarize(etcdCPU)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: harness CPU meanwhile (notifications)", L), Unit: "s", Stats: Summarize(hcpu)})
	// twilld's phases in the order they happened.
	names := slices.Collect(maps.Keys(phases))
	slices.SortFunc(names, func(a, b string) int {
		return cmp.Compare(Summarize(seconds(phases[a])).Median, Summarize(seconds(phases[b])).Median)
	})
	for _, ph := range names {
		h.add(sec, &Figure{Name: fmt.Sprintf("%s, twilld log: start -> %s", L, ph), Unit: "s", Stats: Summarize(seconds(phases[ph]))})
	}
	return nil
}

// kubeChanges starts twilld with n peers and, samples times, adds a peer:
// registers a new Node as the kubelet and the node IPAM controller do (not
// timed), then publishes its lease as its twilld would, in annotations mode
// its annotations (a merge patch of nodes/status), in nodenetwork mode its
// NodeNetwork record (a create, owned by the Node): the time runs from that
// write (the one that makes the Node a peer) to the kernel notification
// that completes its route, neighbour and FDB entry. Then the peers are
// removed one by one, timed the same way: in annotations mode by deleting
// the Node, in nodenetwork mode by deleting the record (the garbage
// collector, which would delete it with the Node, does not run here; the
// Nodes are deleted afterwards, not timed).
func (h *Harness) kubeChanges(ctx context.Context, k *kubeMode, sec *Section, n, samples int) error {
	if samples < 1 {
		return nil
	}
	L := k.label(n)
	records := k.mode == kubeNodeNetwork
	h.say("  one peer added / removed with %s, %d samples each", L, samples)
	cs, err := k.coldStart(ctx, n, "--log-level", "debug")
	if err != nil {
		return err
	}
	w := cs.w
	defer w.close()
	defer k.reset(context.Background())
	var added []string // Nodes of series 1 in the API server
	defer func() {
		for _, name := range added {
			dctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			if records {
				k.records.Delete(dctx, name, metav1.DeleteOptions{}) // gone already unless a sample failed
			}
			k.admin.CoreV1().Nodes().Delete(dctx, name, metav1.DeleteOptions{})
			cancel()
		}
	}()
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
		at, err := w.await(ctx, 10*time.Second, "the kernel to match after a peer "+kind, pred)
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
		if records {
			s.Annotations = nil // its twilld publishes a record instead
		}
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err := kubenode.Register(rctx, k.admin, s)
		var node *corev1.Node
		if err == nil {
			added = append(added, s.Name)
			if records {
				node, err = k.admin.CoreV1().Nodes().Get(rctx, s.Name, metav1.GetOptions{})
			}
		}
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
		if records {
			publish = func(ctx context.Context) error {
				_, err := k.records.Create(ctx, peerRecord(1, i, node.UID), metav1.CreateOptions{FieldManager: kube.FieldManager})
				return err
			}
		}
		if err := one("added", publish, peerPresent(peerAt(1, i))); err != nil {
			return err
		}
	}
	if err := verifyHost(ctx, k.topo, n+samples, false); err != nil {
		return fmt.Errorf("after adding %d peers: %w", samples, err)
	}
	for i := range samples {
		name := peerNode(1, i).Name
		del := func(ctx context.Context) error {
			return k.admin.CoreV1().Nodes().Delete(ctx, name, metav1.DeleteOptions{})
		}
		if records {
			del = func(ctx context.Context) error {
				return k.records.Delete(ctx, name, metav1.DeleteOptions{})
			}
		}
		if err := one("removed", del, peerAbsent(peerAt(1, i))); err != nil {
			return err
		}
		if !records {
			added = slices.DeleteFunc(added, func(s string) bool { return s == name })
		}
	}
	if err := verifyHost(ctx, k.topo, n, false); err != nil {
		return fmt.Errorf("after removing the added peers: %w", err)
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
		h.add(sec, &Figure{Name: fmt.Sprintf("%s: one peer %s: write sent -> kernel matches", L, kind), Unit: "ms",
			Stats: Summarize(millis(sent[kind])), Limit: limits[kind]})
		h.add(sec, &Figure{Name: fmt.Sprintf("%s: one peer %s: write returned -> kernel matches", L, kind), Unit: "ms",
			Stats: Summarize(millis(returned[kind]))})
	}
	addWrite, delWrite := "the annotation patch", "the Node delete"
	if records {
		addWrite, delWrite = "the record create", "the record delete"
	}
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: %s itself (sent -> returned)", L, addWrite), Unit: "ms", Stats: Summarize(millis(write["added"]))})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: %s itself (sent -> returned)", L, delWrite), Unit: "ms", Stats: Summarize(millis(write["removed"]))})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: twilld pass (its log: full or changed peers only) during the changes", L), Unit: "ms",
		Stats: Summarize(millis(reconcileTimes(k.twilld.Log, logOffset)))})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: twilld CPU per change (registration events included, if it receives them)", L), Unit: "ms",
		Value: newValue((u1.CPUSeconds - u0.CPUSeconds) / float64(2*samples) * 1000)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: twilld peak RSS (VmHWM) after the changes", L), Unit: "MiB", Value: newValue(u1.HWMMiB)})
	if records {
		h.note(sec, "nodenetwork mode: added = a new Node registered by \"kubelet\", given its podCIDR by \"kube-controller-manager\" and its status by \"kubelet\" (not timed, 100 ms before; twilld does not watch other Nodes), then its NodeNetwork record created as its twilld does (owned by the Node): timed from the start of the create (sent) and from its return (returned)")
		h.note(sec, "nodenetwork mode: removed = the record deleted, timed the same way; in a cluster the garbage collector deletes it when the Node is deleted (an ownerReference), but no kube-controller-manager runs here, so deleting the Node alone would leave the record (and the peer) in place; the added Nodes are deleted afterwards, not timed")
	} else {
		h.note(sec, "annotations mode: added = a new Node registered by \"kubelet\", given its podCIDR by \"kube-controller-manager\" and its status by \"kubelet\" (not timed, 100 ms before), then twill's annotations published as its twilld does (merge patch of nodes/status): timed from the start of that patch (sent) and from its return (returned; twilld's watch event may arrive before the answer, then it is 0)")
		h.note(sec, "annotations mode: removed = the Node deleted, timed the same way")
	}
	h.note(sec, "%s: one change at a time with a 20 ms pause; a resync pass (every 10 s) may coincide with a sample; limit = the same peer's FDB, neighbour and route entries written (or deleted) by the harness over one netlink socket into a fresh namespace already holding %d peers' entries", k.mode, n)
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
