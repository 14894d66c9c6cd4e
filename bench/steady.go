package bench

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"
)

// steadyState is figure 6: twilld with SteadyPeers peers and nothing
// changing, for SteadyDuration: its CPU and memory, and every request etcd
// served in that time, from etcd's own metrics.
func (h *Harness) steadyState(ctx context.Context, e *etcdMode, sec *Section) error {
	n := h.cfg.SteadyPeers
	if err := e.setPeers(ctx, n); err != nil {
		return err
	}
	mode := h.cfg.SteadyMasq
	args := []string{"--log-level", "info"}
	if mode != "" {
		// The figures that follow on this etcd expect the config without
		// the key (deferred first, so it runs after the reset below).
		defer e.setRulesMode(context.Background(), "")
		if err := e.setRulesMode(ctx, mode); err != nil {
			return err
		}
		args = append(args, "--ip-masq")
		sec.Title += fmt.Sprintf(", --ip-masq in %s mode", mode)
	}
	cs, err := e.coldStart(ctx, n, args...)
	if err != nil {
		return err
	}
	cs.w.close()
	defer e.reset(context.Background())
	if mode != "" {
		if err := h.checkRulesMode(ctx, e, mode); err != nil {
			return err
		}
	}
	// Let start-up settle: the first keep-alive goes out when the lease is
	// taken, the first resync comes 10 s after start.
	h.say("  twilld converged with %d peers; settling 5 s, then measuring %s", n, h.cfg.SteadyDuration)
	if err := sleep(ctx, 5*time.Second); err != nil {
		return err
	}
	pid := e.twilld.Pid()
	tw0, _ := h.twilldMetrics(ctx, e)
	m0, err := e.etcd.metrics(ctx)
	if err != nil {
		return fmt.Errorf("etcd metrics: %w", err)
	}
	u0, err := usage(pid)
	if err != nil {
		return err
	}
	start := time.Now()
	if err := sleep(ctx, h.cfg.SteadyDuration); err != nil {
		return err
	}
	u1, err := usage(pid)
	if err != nil {
		return err
	}
	elapsed := time.Since(start)
	m1, err := e.etcd.metrics(ctx)
	if err != nil {
		return fmt.Errorf("etcd metrics: %w", err)
	}
	tw1, _ := h.twilldMetrics(ctx, e)

	perMin := 60 / elapsed.Seconds()
	calls := grpcDelta(m0, m1, "grpc_server_started_total", true)
	msgs := grpcDelta(m0, m1, "grpc_server_msg_received_total", false)
	var other, keepAlive, watch float64
	var detail []string
	for _, k := range sortedKeys(calls) {
		other += calls[k]
		detail = append(detail, fmt.Sprintf("%s (unary) %.0f", k, calls[k]))
	}
	for _, k := range sortedKeys(msgs) {
		switch {
		case strings.HasSuffix(k, "/LeaseKeepAlive"):
			keepAlive += msgs[k]
		case strings.HasSuffix(k, "/Watch"):
			watch += msgs[k]
		default:
			other += msgs[k]
		}
		detail = append(detail, fmt.Sprintf("%s (stream message) %.0f", k, msgs[k]))
	}
	h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: datastore requests other than keep-alive and watch", n), Unit: "req/min",
		Value: newValue(other * perMin), Targets: []Target{{"value", "<=", 0}}})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: lease keep-alive messages", n), Unit: "req/min", Value: newValue(keepAlive * perMin)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: watch stream messages from twilld", n), Unit: "req/min", Value: newValue(watch * perMin)})
	cpuPct := (u1.CPUSeconds - u0.CPUSeconds) / elapsed.Seconds() * 100
	h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: idle CPU", n), Unit: "% of a core", Value: newValue(cpuPct), Targets: []Target{{"value", "<", 1}}})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: RSS at the end", n), Unit: "MiB", Value: newValue(u1.RSSMiB)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: peak RSS (VmHWM) since start", n), Unit: "MiB", Value: newValue(u1.HWMMiB)})
	if tw0 != nil && tw1 != nil {
		passes := promValue(tw1, "twill_reconcile_total", nil) - promValue(tw0, "twill_reconcile_total", nil)
		h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: reconcile passes in the window (resync every 10 s)", n), Unit: "count", Value: newValue(passes)})
		sum := promValue(tw1, "twill_reconcile_duration_seconds_sum", nil) - promValue(tw0, "twill_reconcile_duration_seconds_sum", nil)
		if passes > 0 {
			h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: mean resync pass (twilld's histogram)", n), Unit: "ms", Value: newValue(sum / passes * 1000)})
		}
	}
	if mode != "" {
		h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: CPU of the programs twilld ran (iptables) in the window", n), Unit: "% of a core",
			Value: newValue((u1.ChildSeconds - u0.ChildSeconds) / elapsed.Seconds() * 100)})
		if tw0 != nil && tw1 != nil {
			kind := map[string]string{"kind": string(mode)}
			passes := promValue(tw1, "twill_reconcile_total", map[string]string{"result": "ok"}) - promValue(tw1, "twill_reconcile_incremental_total", nil) -
				(promValue(tw0, "twill_reconcile_total", map[string]string{"result": "ok"}) - promValue(tw0, "twill_reconcile_incremental_total", nil))
			h.add(sec, &Figure{Name: fmt.Sprintf("%d peers, --ip-masq, %s: rule writes in the window (twill_repairs_total{kind=%q})", n, mode, mode), Unit: "count",
				Value: newValue(promValue(tw1, "twill_repairs_total", kind) - promValue(tw0, "twill_repairs_total", kind)), Targets: []Target{{"value", "<=", 0}},
				Note: fmt.Sprintf("%.0f full passes checked the rules", passes)})
		}
		h.note(sec, "twilld ran with --ip-masq, its rules in %s mode (--steady-masq; off measures without --ip-masq, as runs before 2026-12-02 did); every full pass (the resync) checks the rules, and the figures above include that", mode)
	}
	if len(detail) == 0 {
		detail = []string{"none"}
	}
	h.note(sec, "measured over %.1f s; etcd requests in the window by method: %s", elapsed.Seconds(), strings.Join(detail, ", "))
	h.note(sec, "requests are counted by etcd itself (grpc_server_started_total for unary calls, grpc_server_msg_received_total for stream messages) on --listen-metrics-urls; the harness makes no etcd request during the window")
	return nil
}

func (h *Harness) twilldMetrics(ctx context.Context, e *etcdMode) ([]promSample, error) {
	body, err := nsHTTPGet(ctx, e.hostNS(), "http://127.0.0.1:9867/metrics")
	if err != nil {
		return nil, err
	}
	return parseProm(body), nil
}

// grpcDelta returns, per service/method, how much a gRPC counter grew: unary
// methods only, or stream methods only.
func grpcDelta(before, after []promSample, name string, unary bool) map[string]float64 {
	key := func(s promSample) string { return s.Labels["grpc_service"] + "/" + s.Labels["grpc_method"] }
	prev := map[string]float64{}
	for _, s := range before {
		if s.Name == name {
			prev[key(s)] += s.Value
		}
	}
	out := map[string]float64{}
	for _, s := range after {
		if s.Name != name || (s.Labels["grpc_type"] == "unary") != unary {
			continue
		}
		out[key(s)] += s.Value
	}
	for k, v := range out {
		if d := v - prev[k]; d > 0 {
			out[k] = d
		} else {
			delete(out, k)
		}
	}
	return out
}

func sortedKeys(m map[string]float64) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
