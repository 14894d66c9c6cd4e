package bench

import (
	"bufio"
	"context"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// changeLatency is figure 2: with ChangePeers programmed, one peer is added,
// given a new public IP, or removed in etcd; the time runs from the return of
// the etcd write to the kernel notification that makes the host's tables
// match.
func (h *Harness) changeLatency(ctx context.Context, e *etcdMode, sec *Section) error {
	n := h.cfg.ChangePeers
	if err := e.setPeers(ctx, n); err != nil {
		return err
	}
	var res *changeResult
	err := h.profiled(ctx, fmt.Sprintf("changes-%d", n), func() error {
		var err error
		res, err = h.changeSeries(ctx, e, n, h.cfg.ChangeSamples)
		return err
	})
	if err != nil {
		return err
	}
	if h.cfg.PerfDir != "" {
		h.note(sec, "measured under a system-wide perf record (--perf): slower than without")
	}
	lim, err := measureChangeLimit(ctx, h, n, h.cfg.ChangeSamples)
	if err != nil {
		return fmt.Errorf("change limit: %w", err)
	}
	limits := map[string]*Limit{
		"add":           {Name: "3 netlink writes", Stats: Summarize(millis(lim.Add))},
		"new public IP": {Name: "1 FDB replace", Stats: Summarize(millis(lim.NewIP))},
		"remove":        {Name: "3 netlink deletes", Stats: Summarize(millis(lim.Remove))},
	}
	for _, kind := range []string{"add", "new public IP", "remove"} {
		h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: one peer %s: write returned -> kernel matches", n, kind), Unit: "ms",
			Stats: Summarize(millis(res.lat[kind])), Limit: limits[kind], Targets: []Target{{"median", "<=", 10}, {"p99", "<=", 50}}})
	}
	for _, kind := range []string{"add", "new public IP", "remove"} {
		h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: one peer %s: etcd write itself", n, kind), Unit: "ms", Stats: Summarize(millis(res.write[kind]))})
	}
	h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: twilld pass (its log: full or changed peers only) during the changes", n), Unit: "ms", Stats: Summarize(millis(res.passes))})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: twilld CPU per change", n), Unit: "ms", Value: newValue(res.cpuPerChange * 1000)})
	h.note(sec, "limit = the same peer's FDB, neighbour and route entries written (or deleted) by the harness over one netlink socket into a fresh namespace already holding %d peers' entries", n)
	h.note(sec, "changes are made one at a time with a 20 ms pause; a resync pass (every 10 s) may coincide with a sample, as in production")

	if h.cfg.MasqSamples > 0 {
		h.say("  again with --ip-masq (the lab's default), %d samples", h.cfg.MasqSamples)
		res, err := h.changeSeries(ctx, e, n, h.cfg.MasqSamples, "--ip-masq")
		if err != nil {
			return fmt.Errorf("with --ip-masq: %w", err)
		}
		for _, kind := range []string{"add", "remove"} {
			h.add(sec, &Figure{Name: fmt.Sprintf("%d peers, --ip-masq: one peer %s: write returned -> kernel matches", n, kind), Unit: "ms",
				Stats: Summarize(millis(res.lat[kind])), Targets: []Target{{"median", "<=", 10}, {"p99", "<=", 50}}})
		}
		h.add(sec, &Figure{Name: fmt.Sprintf("%d peers, --ip-masq: twilld reconcile pass (its log)", n), Unit: "ms", Stats: Summarize(millis(res.passes))})
	}
	return nil
}

type changeResult struct {
	lat, write   map[string][]time.Duration
	passes       []time.Duration
	cpuPerChange float64
}

// changeSeries starts twilld with n peers, waits for it to converge, then
// adds `samples` peers one by one, gives each a new public IP, and removes
// them again.
func (h *Harness) changeSeries(ctx context.Context, e *etcdMode, n, samples int, extra ...string) (*changeResult, error) {
	cs, err := e.coldStart(ctx, n, extra...)
	if err != nil {
		return nil, err
	}
	w := cs.w
	defer w.close()
	defer e.reset(context.Background())
	if err := sleep(ctx, time.Second); err != nil {
		return nil, err
	}
	u0, err := usage(e.twilld.Pid())
	if err != nil {
		return nil, err
	}
	res := &changeResult{lat: map[string][]time.Duration{}, write: map[string][]time.Duration{}}
	logOffset := fileSize(e.twilld.Log)
	one := func(kind string, op func(context.Context) error, pred func(*kernelWatch) bool) error {
		wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		start := time.Now()
		if err := op(wctx); err != nil {
			return fmt.Errorf("etcd write (%s): %w", kind, err)
		}
		returned := time.Now()
		at, err := w.await(ctx, 10*time.Second, "the kernel to match after a peer "+kind, pred)
		if err != nil {
			return err
		}
		res.lat[kind] = append(res.lat[kind], at.Sub(returned))
		res.write[kind] = append(res.write[kind], returned.Sub(start))
		return sleep(ctx, 20*time.Millisecond)
	}
	put := func(p fakePeer) func(context.Context) error {
		return func(ctx context.Context) error {
			_, err := e.etcd.cli.Put(ctx, p.key(e.etcd.reg, false), p.value(false))
			return err
		}
	}
	for i := range samples {
		p := peerAt(1, i)
		if err := one("add", put(p), peerPresent(p)); err != nil {
			return nil, err
		}
	}
	if err := e.verify(ctx, n+samples); err != nil {
		return nil, fmt.Errorf("after adding %d peers: %w", samples, err)
	}
	for i := range samples {
		p := peerAt(1, i)
		p.PublicIP = netip.AddrFrom4([4]byte{198, 21, byte((i + 1) >> 8), byte(i + 1)})
		if err := one("new public IP", put(p), peerPresent(p)); err != nil {
			return nil, err
		}
	}
	for i := range samples {
		p := peerAt(1, i)
		del := func(ctx context.Context) error {
			_, err := e.etcd.cli.Delete(ctx, e.etcd.reg.SubnetKey(p.Subnet), clientv3.WithPrevKV())
			return err
		}
		if err := one("remove", del, peerAbsent(p)); err != nil {
			return nil, err
		}
	}
	if err := e.verify(ctx, n); err != nil {
		return nil, fmt.Errorf("after removing the added peers: %w", err)
	}
	if u1, err := usage(e.twilld.Pid()); err == nil {
		res.cpuPerChange = (u1.CPUSeconds - u0.CPUSeconds) / float64(3*samples)
	}
	res.passes = reconcileTimes(e.twilld.Log, logOffset)
	return res, nil
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// reconcileTimes reads the durations of the passes twilld logged (at debug
// level: msg=reconciled took=... for a full pass, msg="updated peers"
// took=... for one over the changed peers) after offset.
func reconcileTimes(path string, offset int64) []time.Duration {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	if _, err := f.Seek(offset, 0); err != nil {
		return nil
	}
	var out []time.Duration
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for lines := 0; sc.Scan() && lines < 100000; lines++ {
		line := sc.Text()
		if !strings.Contains(line, "msg=reconciled ") && !strings.Contains(line, `msg="updated peers" `) {
			continue
		}
		for _, field := range strings.Fields(line) {
			if v, ok := strings.CutPrefix(field, "took="); ok {
				if d, err := time.ParseDuration(v); err == nil {
					out = append(out, d)
				}
			}
		}
	}
	return out
}
