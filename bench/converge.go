package bench

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/twillnet/twill/subnet"
)

// runEtcdMode measures figures 1, 6 and 2, which share one etcd and one host.
func (h *Harness) runEtcdMode(ctx context.Context) {
	var e *etcdMode
	setup := func(ctx context.Context, sec *Section) error {
		if e != nil {
			return nil
		}
		var err error
		h.say("starting etcd (%s) in %su", "bin/tools/etcd", h.cfg.Prefix)
		e, err = newEtcdMode(ctx, h)
		return err
	}
	defer func() {
		if e != nil {
			e.close()
		}
	}()
	h.timed(ctx, "1", func(ctx context.Context, sec *Section) error {
		if err := setup(ctx, sec); err != nil {
			return err
		}
		return h.convergence(ctx, e, sec)
	})
	h.timed(ctx, "6", func(ctx context.Context, sec *Section) error {
		if err := setup(ctx, sec); err != nil {
			return err
		}
		return h.steadyState(ctx, e, sec)
	})
	h.timed(ctx, "2", func(ctx context.Context, sec *Section) error {
		if err := setup(ctx, sec); err != nil {
			return err
		}
		return h.changeLatency(ctx, e, sec)
	})
}

// convergence is figure 1: for each size, cold starts of twilld alternating
// with the batch limit; then, unless --dual-stack=false, the largest size
// again with every peer dual-stack.
func (h *Harness) convergence(ctx context.Context, e *etcdMode, sec *Section) error {
	for _, n := range h.cfg.Sizes {
		if err := e.setPeers(ctx, n); err != nil {
			return err
		}
		if err := h.convergeSize(ctx, e, sec, n); err != nil {
			return err
		}
	}
	if h.cfg.DualStack {
		n := slices.Max(h.cfg.Sizes)
		err := e.setDualStack(ctx, true, n)
		if err == nil {
			err = h.convergeSize(ctx, e, sec, n)
		}
		// Sections 6 and 2 follow on the same etcd, IPv4 only.
		if rerr := e.setDualStack(ctx, false, 0); rerr != nil {
			err = errors.Join(err, fmt.Errorf("back to an IPv4 network: %w", rerr))
		}
		if err != nil {
			return fmt.Errorf("dual-stack, %d peers: %w", n, err)
		}
	}
	if h.cfg.WireGuard {
		n := slices.Max(h.cfg.Sizes)
		err := h.convergeWireGuard(ctx, e, sec, n)
		// Sections 6 and 2 follow on the same etcd, with vxlan.
		if rerr := e.setNetwork(ctx, false, "", 0); rerr != nil {
			err = errors.Join(err, fmt.Errorf("back to the vxlan backend: %w", rerr))
		}
		if err != nil {
			return fmt.Errorf("wireguard, %d peers: %w", n, err)
		}
	}
	h.note(sec, "start = fork of twilld in the host namespace; entries = kernel notifications of twill's routes, permanent neighbours and FDB entries; the tables are dumped afterwards to check the counts")
	h.note(sec, "limit = the same entries written by `bridge -batch` (FDB) + `ip -batch` (neighbours, routes) into a fresh VXLAN device in a fresh namespace, measured between twilld's runs")
	if h.cfg.DualStack {
		h.note(sec, "dual-stack: the largest size again with every peer lease dual-stack (one key per peer, IPv4 /24 and IPv6 /64, a VTEP MAC per family); entries = 3N on twill.1 and 3N on twill-v6.1; limit = the same 6N in batch mode, twill.1's then twill-v6.1's (the order of twilld's planes), in one fresh namespace with both devices; issue 6's targets are for IPv4 and are not applied")
	}
	if h.cfg.WireGuard {
		h.note(sec, "wireguard: the largest size again with the wireguard backend (IPv4; every lease {\"PublicKey\":...,\"Port\":51820}): twilld writes every peer in one wgctrl request, then one route per peer into %s; the start ends at the last route (the peers are not in rtnetlink; they are checked afterwards with `wg show`, and twill_kernel_writes_total{kind=\"peer\"} read). limit = the same peers by `wg addconf` (one request, as twilld) + the same routes by `ip -batch`, into a fresh device in a fresh namespace (making the device is timed apart). Without WireGuard in the kernel both run wireguard-go. Issue 6's targets are for vxlan and are not applied", wgDevice)
	}
	if h.cfg.PerfDir != "" {
		h.note(sec, "the last IPv4 run of the largest size ran under a system-wide perf record (--perf): it is slower than the others")
	}
	h.note(sec, "each run starts on a fresh host: no device, no twill routes, no own lease in etcd, no env file")
	return nil
}

// convergeSamples are the measurements of one size's runs.
type convergeSamples struct {
	env, all, limTotal, limNH []time.Duration
	// kinds and limKinds are keyed by kernelWatch's kind names ("fdb",
	// "route6", ...). In a dual-stack network v4 is the time to the last
	// IPv4 entry, and v6 and the IPv6 kinds count from then, when twilld's
	// IPv6 plane begins; limV4 and limV6 are each family's batch limit.
	kinds, limKinds      map[string][]time.Duration
	v4, v6, limV4, limV6 []time.Duration
	cpu, ucpu, hcpu, hwm []float64
	phases               map[string][]time.Duration
}

// convergeSize takes the runs of one size with the peers now in etcd (of
// the network's families) and adds its figures.
func (h *Harness) convergeSize(ctx context.Context, e *etcdMode, sec *Section, n int) error {
	dual := e.dual
	label, entries := fmt.Sprintf("%d peers", n), 3*n
	if dual {
		label, entries = fmt.Sprintf("%d dual-stack peers", n), 6*n
	}
	s := &convergeSamples{kinds: map[string][]time.Duration{}, limKinds: map[string][]time.Duration{}, phases: map[string][]time.Duration{}}
	var steady *resyncWindow
	for r := range h.cfg.Runs {
		var cs *coldStart
		start := func() error {
			var err error
			cs, err = e.coldStart(ctx, n)
			return err
		}
		var err error
		if r == h.cfg.Runs-1 && n == slices.Max(h.cfg.Sizes) && !dual {
			err = h.profiled(ctx, fmt.Sprintf("cold-start-%d", n), start)
		} else {
			err = start()
		}
		if err != nil {
			return fmt.Errorf("%s, run %d: %w", label, r+1, err)
		}
		cs.w.close()
		if r == h.cfg.Runs-1 && n == slices.Max(h.cfg.Sizes) && !dual && h.cfg.ResyncWindow > 0 {
			if steady, err = h.measureResync(ctx, e, false); err != nil {
				return fmt.Errorf("%s, resync passes: %w", label, err)
			}
		}
		s.env, s.all = append(s.env, cs.Env), append(s.all, cs.All)
		v4, v6 := max(cs.FDB, cs.Neigh, cs.Route), max(cs.FDB6, cs.Neigh6, cs.Route6)
		for k, d := range map[string]time.Duration{"fdb": cs.FDB, "neigh": cs.Neigh, "route": cs.Route,
			"fdb6": cs.FDB6 - v4, "neigh6": cs.Neigh6 - v4, "route6": cs.Route6 - v4} {
			s.kinds[k] = append(s.kinds[k], d)
		}
		s.v4, s.v6 = append(s.v4, v4), append(s.v6, v6-v4)
		s.cpu, s.hwm = append(s.cpu, cs.CPU), append(s.hwm, cs.HWM)
		s.ucpu, s.hcpu = append(s.ucpu, cs.UserCPU), append(s.hcpu, cs.HarnessCPU)
		for k, v := range cs.Phases {
			s.phases[k] = append(s.phases[k], v)
		}
		if err := e.reset(ctx); err != nil {
			return err
		}
		l, err := measureBatchLimit(ctx, h, n, dual)
		if err != nil {
			return fmt.Errorf("batch limit, %d peers: %w", n, err)
		}
		s.limTotal, s.limNH = append(s.limTotal, l.Total), append(s.limNH, l.NexthopRoute)
		for k, d := range map[string]time.Duration{"fdb": l.FDB, "neigh": l.Neigh, "route": l.Route, "fdb6": l.FDB6, "neigh6": l.Neigh6, "route6": l.Route6} {
			s.limKinds[k] = append(s.limKinds[k], d)
		}
		s.limV4, s.limV6 = append(s.limV4, l.FDB+l.Neigh+l.Route), append(s.limV6, l.FDB6+l.Neigh6+l.Route6)
		families := ""
		if dual {
			families = fmt.Sprintf(" (last IPv4 entry %.3f s, last IPv6 entry %.3f s)", v4.Seconds(), v6.Seconds())
		}
		h.say("  %s, run %d: env file %.3f s, all %d entries %.3f s%s (batch limit %.3f s), CPU %.2f s (user %.2f), peak RSS %.1f MiB; harness CPU %.2f s",
			label, r+1, cs.Env.Seconds(), entries, cs.All.Seconds(), families, l.Total.Seconds(), cs.CPU, cs.UserCPU, cs.HWM, cs.HarnessCPU)
	}
	h.convergeFigures(sec, n, dual, label, entries, s)
	if steady != nil {
		steady.figures(h, sec, label)
	}
	return nil
}

// convergeFigures adds one size's figures. Issue 6's targets are for 5,000
// IPv4 peers; the dual-stack row has the same figures without them, and the
// breakdown by family and kind at any size.
func (h *Harness) convergeFigures(sec *Section, n int, dual bool, label string, entries int, s *convergeSamples) {
	targets := n >= 5000 && !dual
	lim := &Limit{Name: "ip/bridge -batch", Stats: Summarize(seconds(s.limTotal))}
	f := h.add(sec, &Figure{Name: fmt.Sprintf("%s: start -> env file", label), Unit: "s", Stats: Summarize(seconds(s.env))})
	if targets {
		f.Targets = []Target{{"median", "<=", 0.3}}
	}
	f = h.add(sec, &Figure{Name: fmt.Sprintf("%s: start -> all %d entries", label, entries), Unit: "s", Stats: Summarize(seconds(s.all)), Limit: lim})
	if targets {
		f.Targets = []Target{{"median", "<=", 1.0}, {"ratio", "<=", 1.5}}
	}
	if dual {
		h.add(sec, &Figure{Name: fmt.Sprintf("%s: start -> all %d IPv4 entries", label, 3*n), Unit: "s", Stats: Summarize(seconds(s.v4)),
			Limit: &Limit{Name: "ip/bridge -batch, IPv4", Stats: Summarize(seconds(s.limV4))}})
		h.add(sec, &Figure{Name: fmt.Sprintf("%s: last IPv4 entry -> all %d IPv6 entries", label, 3*n), Unit: "s", Stats: Summarize(seconds(s.v6)),
			Limit: &Limit{Name: "ip/bridge -batch, IPv6", Stats: Summarize(seconds(s.limV6))}})
	}
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: CPU seconds to converge", label), Unit: "s", Stats: Summarize(s.cpu)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: of which user space", label), Unit: "s", Stats: Summarize(s.ucpu)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: harness CPU meanwhile (notifications)", label), Unit: "s", Stats: Summarize(s.hcpu)})
	f = h.add(sec, &Figure{Name: fmt.Sprintf("%s: peak RSS (VmHWM)", label), Unit: "MiB", Stats: Summarize(s.hwm)})
	if targets {
		f.Targets = []Target{{"median", "<=", 25}}
	}
	if n < 5000 && !dual {
		return
	}
	// Where the time goes: each kind from the start of its family's plane,
	// beside the batch of that kind alone.
	kinds := []struct{ kind, what, limit string }{
		{"fdb", "start -> all FDB entries", "bridge -batch fdb"},
		{"neigh", "start -> all neighbours", "ip -batch neigh"},
		{"route", "start -> all routes", "ip -batch route"},
	}
	if dual {
		kinds = []struct{ kind, what, limit string }{
			{"fdb", "start -> all IPv4 FDB entries", "bridge -batch fdb"},
			{"neigh", "start -> all IPv4 neighbours", "ip -batch neigh"},
			{"route", "start -> all IPv4 routes", "ip -batch route"},
			{"fdb6", "last IPv4 entry -> all IPv6 FDB entries", "bridge -batch fdb (twill-v6.1)"},
			{"neigh6", "last IPv4 entry -> all IPv6 neighbours", "ip -batch neigh (IPv6)"},
			{"route6", "last IPv4 entry -> all IPv6 routes", "ip -batch route (IPv6)"},
		}
	}
	for _, k := range kinds {
		h.add(sec, &Figure{Name: fmt.Sprintf("%s: %s", label, k.what), Unit: "s", Stats: Summarize(seconds(s.kinds[k.kind])),
			Limit: &Limit{Name: k.limit, Stats: Summarize(seconds(s.limKinds[k.kind]))}})
	}
	if !dual {
		h.add(sec, &Figure{Name: fmt.Sprintf("%s, design alternative: routes via nexthop objects (ip -batch, nexthops + routes)", label), Unit: "s",
			Stats: Summarize(seconds(s.limNH)), Limit: &Limit{Name: "ip -batch route", Stats: Summarize(seconds(s.limKinds["route"]))}})
	}
	for _, ph := range phaseNames(dual) {
		if ds := s.phases[ph]; len(ds) > 0 {
			h.add(sec, &Figure{Name: fmt.Sprintf("%s, twilld log: start -> %s", label, ph), Unit: "s", Stats: Summarize(seconds(ds))})
		}
	}
}

// convergeWireGuard is figure 1's wireguard row: cold starts of twilld with
// n wireguard peers, each beside the limit of the `wg` and `ip` programs;
// after the last start, the full passes of the resync timer.
func (h *Harness) convergeWireGuard(ctx context.Context, e *etcdMode, sec *Section, n int) error {
	if err := checkWGSocketFree(wgDevice); err != nil {
		return err
	}
	if err := e.setNetwork(ctx, false, subnet.BackendWireGuard, n); err != nil {
		return err
	}
	label := fmt.Sprintf("%d WireGuard peers", n)
	var env, all, limTotal, limPeers, limRoutes, limDevice []time.Duration
	var cpu, ucpu, hcpu, hwm, wgCPU, wgRSS, writes []float64
	phases := map[string][]time.Duration{}
	var steady *resyncWindow
	for r := range h.cfg.Runs {
		cs, err := e.coldStart(ctx, n)
		if err != nil {
			return fmt.Errorf("%s, run %d: %w", label, r+1, err)
		}
		cs.w.close()
		env, all = append(env, cs.Env), append(all, cs.All)
		cpu, ucpu, hcpu, hwm = append(cpu, cs.CPU), append(ucpu, cs.UserCPU), append(hcpu, cs.HarnessCPU), append(hwm, cs.HWM)
		wgCPU, wgRSS, writes = append(wgCPU, cs.WGCPU), append(wgRSS, cs.WGRSS), append(writes, cs.PeerWrites)
		for k, v := range cs.Phases {
			phases[k] = append(phases[k], v)
		}
		if r == h.cfg.Runs-1 && h.cfg.ResyncWindow > 0 {
			if steady, err = h.measureResync(ctx, e, true); err != nil {
				return fmt.Errorf("%s, resync passes: %w", label, err)
			}
		}
		if err := e.reset(ctx); err != nil {
			return err
		}
		l, err := measureWGLimit(ctx, h, n)
		if err != nil {
			return fmt.Errorf("WireGuard limit, %d peers: %w", n, err)
		}
		limTotal, limPeers, limRoutes, limDevice = append(limTotal, l.Total), append(limPeers, l.Peers), append(limRoutes, l.Routes), append(limDevice, l.Device)
		h.say("  %s, run %d: env file %.3f s, all %d peers and routes %.3f s (limit %.3f s: wg addconf %.3f + ip -batch %.3f; device %.3f s), CPU %.2f s (user %.2f), peak RSS %.1f MiB; wireguard-go CPU %.2f s, RSS %.1f MiB; peer writes %.0f",
			label, r+1, cs.Env.Seconds(), n, cs.All.Seconds(), l.Total.Seconds(), l.Peers.Seconds(), l.Routes.Seconds(), l.Device.Seconds(),
			cs.CPU, cs.UserCPU, cs.HWM, cs.WGCPU, cs.WGRSS, cs.PeerWrites)
	}
	lim := &Limit{Name: "wg addconf + ip -batch", Stats: Summarize(seconds(limTotal))}
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: start -> env file", label), Unit: "s", Stats: Summarize(seconds(env))})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: start -> all %d peers and %d routes", label, n, n), Unit: "s", Stats: Summarize(seconds(all)), Limit: lim})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: limit, wg addconf of %d peers (one request)", label, n), Unit: "s", Stats: Summarize(seconds(limPeers))})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: limit, ip -batch of %d routes", label, n), Unit: "s", Stats: Summarize(seconds(limRoutes))})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: making a device (not in the limit)", label), Unit: "s", Stats: Summarize(seconds(limDevice))})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: twilld CPU seconds to converge", label), Unit: "s", Stats: Summarize(cpu)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: of which user space", label), Unit: "s", Stats: Summarize(ucpu)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: wireguard-go CPU seconds meanwhile", label), Unit: "s", Stats: Summarize(wgCPU)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: harness CPU meanwhile (notifications)", label), Unit: "s", Stats: Summarize(hcpu)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: twilld peak RSS (VmHWM)", label), Unit: "MiB", Stats: Summarize(hwm)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: wireguard-go RSS after the start", label), Unit: "MiB", Stats: Summarize(wgRSS)})
	h.add(sec, &Figure{Name: fmt.Sprintf("%s: twill_kernel_writes_total{kind=\"peer\"} after the start", label), Unit: "count", Stats: Summarize(writes)})
	for _, ph := range phaseNames(false) {
		if ds := phases[ph]; len(ds) > 0 {
			h.add(sec, &Figure{Name: fmt.Sprintf("%s, twilld log: start -> %s", label, ph), Unit: "s", Stats: Summarize(seconds(ds))})
		}
	}
	if steady != nil {
		steady.figures(h, sec, label)
	}
	return nil
}
