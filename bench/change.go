package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/twillnet/twill/internal/daemon/masq"
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
		res, err = h.changeSeries(ctx, e, n, h.cfg.ChangeSamples, "")
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
		if err := h.changeLatencyMasq(ctx, e, sec, n); err != nil {
			return err
		}
	}
	return nil
}

// changeLatencyMasq is figure 2 again with --ip-masq, once per rules mode
// (iptables, then nftables: EnableNFTables false, then true), with the same
// etcd and peers and MasqSamples samples per kind of change; then the cost
// of the rules check itself in each mode, timed by the harness.
func (h *Harness) changeLatencyMasq(ctx context.Context, e *etcdMode, sec *Section, n int) (err error) {
	defer func() {
		// The figures that follow on this etcd expect the config without
		// the key.
		if rerr := e.setRulesMode(context.Background(), ""); rerr != nil {
			err = errors.Join(err, rerr)
		}
	}()
	for _, mode := range rulesModes {
		if mode == masq.ModeIPTables && !installed("iptables") {
			h.note(sec, "--ip-masq, iptables: not measured, iptables is not installed")
			continue
		}
		h.say("  again with --ip-masq in %s mode, %d samples", mode, h.cfg.MasqSamples)
		if err := e.setRulesMode(ctx, mode); err != nil {
			return err
		}
		res, err := h.changeSeries(ctx, e, n, h.cfg.MasqSamples, mode, "--ip-masq")
		if err != nil {
			return fmt.Errorf("with --ip-masq, %s: %w", mode, err)
		}
		prefix := fmt.Sprintf("%d peers, --ip-masq, %s", n, mode)
		for _, kind := range []string{"add", "new public IP", "remove"} {
			h.add(sec, &Figure{Name: fmt.Sprintf("%s: one peer %s: write returned -> kernel matches", prefix, kind), Unit: "ms",
				Stats: Summarize(millis(res.lat[kind])), Targets: []Target{{"median", "<=", 10}, {"p99", "<=", 50}}})
		}
		h.add(sec, &Figure{Name: prefix + ": twilld reconcile pass (its log)", Unit: "ms", Stats: Summarize(millis(res.passes))})
		h.add(sec, &Figure{Name: prefix + ": twilld CPU per change", Unit: "ms", Value: newValue(res.cpuPerChange * 1000)})
		h.add(sec, &Figure{Name: fmt.Sprintf("%s: rule writes during the changes (twill_repairs_total{kind=%q})", prefix, mode), Unit: "count",
			Value: newValue(res.rules.repairs), Targets: []Target{{"value", "<=", 0}},
			Note: fmt.Sprintf("%.0f full passes checked the rules meanwhile", res.rules.fullPasses)})
		h.note(sec, "--ip-masq, %s: twilld's start with %d peers in this series: env file %.3f s, all entries %.3f s (one start, not a figure)",
			mode, n, res.start.Env.Seconds(), res.start.All.Seconds())
	}
	h.note(sec, "--ip-masq series: the same etcd and peers, twilld restarted with EnableNFTables false (iptables), then true (nftables) in the network config; its mode is checked in its metrics and in the host's tables")
	h.note(sec, "twilld checks its rules on full passes only (start, resync every 10 s, own subnet changed); the update after a peer change does not touch them, in either mode")

	if !installed("iptables") || !installed("nft") {
		h.note(sec, "--ip-masq rules: the cost of one Ensure is measured when both iptables and nft are installed")
		return nil
	}
	h.say("  masquerade rules: one Ensure per mode, %d samples of each kind", h.cfg.MasqSamples)
	costs, err := measureRulesCost(ctx, h, h.cfg.MasqSamples)
	if err != nil {
		return fmt.Errorf("cost of the rules check: %w", err)
	}
	for _, k := range []struct {
		what string
		get  func(*rulesCost) []time.Duration
	}{
		{"nothing to change (every full pass)", func(c *rulesCost) []time.Duration { return c.Check }},
		{"forward chain flushed by hand (a repair)", func(c *rulesCost) []time.Duration { return c.Repair }},
		{"nothing there (a start, a new subnet)", func(c *rulesCost) []time.Duration { return c.Write }},
	} {
		for _, mode := range rulesModes {
			h.add(sec, &Figure{Name: fmt.Sprintf("--ip-masq rules, %s: one Ensure, %s", mode, k.what), Unit: "ms", Stats: Summarize(millis(k.get(costs[mode])))})
		}
	}
	h.note(sec, "one Ensure = twilld's rules keeper (masq.NewKeeper) run by the harness in a namespace of its own, for the rules twilld keeps here; modes alternate sample by sample. iptables runs the iptables program several times (a check lists each chain and tests its jump; a rewrite fills a new chain and renames it); nftables reads the table over netlink and replaces it in one transaction")
	return nil
}

type changeResult struct {
	lat, write   map[string][]time.Duration
	passes       []time.Duration
	cpuPerChange float64
	start        *coldStart
	// rules is how twilld's rule counters moved over the changes (with
	// --ip-masq only).
	rules rulesCounters
}

// changeSeries starts twilld with n peers, waits for it to converge, then
// adds `samples` peers one by one, gives each a new public IP, and removes
// them again. With a rules mode (and --ip-masq among extra), it checks that
// twilld keeps its rules in that mode and follows its rule counters.
func (h *Harness) changeSeries(ctx context.Context, e *etcdMode, n, samples int, mode masq.Mode, extra ...string) (*changeResult, error) {
	cs, err := e.coldStart(ctx, n, extra...)
	if err != nil {
		return nil, err
	}
	w := cs.w
	defer w.close()
	defer e.reset(context.Background())
	var rules0 rulesCounters
	if mode != "" {
		if err := h.checkRulesMode(ctx, e, mode); err != nil {
			return nil, err
		}
	}
	if err := sleep(ctx, time.Second); err != nil {
		return nil, err
	}
	if mode != "" {
		if rules0, err = h.rulesCounters(ctx, e, mode); err != nil {
			return nil, err
		}
	}
	u0, err := usage(e.twilld.Pid())
	if err != nil {
		return nil, err
	}
	res := &changeResult{lat: map[string][]time.Duration{}, write: map[string][]time.Duration{}, start: cs}
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
	if mode != "" {
		rules1, err := h.rulesCounters(ctx, e, mode)
		if err != nil {
			return nil, err
		}
		res.rules = rules1.sub(rules0)
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
