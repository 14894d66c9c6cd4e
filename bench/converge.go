package bench

import (
	"context"
	"fmt"
	"slices"
	"time"
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
// with the batch limit.
func (h *Harness) convergence(ctx context.Context, e *etcdMode, sec *Section) error {
	for _, n := range h.cfg.Sizes {
		if err := e.setPeers(ctx, n); err != nil {
			return err
		}
		var env, all, fdb, neigh, route, limTotal, limFDB, limNeigh, limRoute, limNH []time.Duration
		var cpu, ucpu, hcpu, hwm []float64
		phases := map[string][]time.Duration{}
		for r := range h.cfg.Runs {
			var cs *coldStart
			start := func() error {
				var err error
				cs, err = e.coldStart(ctx, n)
				return err
			}
			var err error
			if r == h.cfg.Runs-1 && n == slices.Max(h.cfg.Sizes) {
				err = h.profiled(ctx, fmt.Sprintf("cold-start-%d", n), start)
			} else {
				err = start()
			}
			if err != nil {
				return fmt.Errorf("%d peers, run %d: %w", n, r+1, err)
			}
			cs.w.close()
			env, all = append(env, cs.Env), append(all, cs.All)
			fdb, neigh, route = append(fdb, cs.FDB), append(neigh, cs.Neigh), append(route, cs.Route)
			cpu, hwm = append(cpu, cs.CPU), append(hwm, cs.HWM)
			ucpu, hcpu = append(ucpu, cs.UserCPU), append(hcpu, cs.HarnessCPU)
			for k, v := range cs.Phases {
				phases[k] = append(phases[k], v)
			}
			if err := e.reset(ctx); err != nil {
				return err
			}
			l, err := measureBatchLimit(ctx, h, n)
			if err != nil {
				return fmt.Errorf("batch limit, %d peers: %w", n, err)
			}
			limTotal, limFDB = append(limTotal, l.Total), append(limFDB, l.FDB)
			limNeigh, limRoute, limNH = append(limNeigh, l.Neigh), append(limRoute, l.Route), append(limNH, l.NexthopRoute)
			h.say("  %d peers, run %d: env file %.3f s, all %d entries %.3f s (batch limit %.3f s), CPU %.2f s (user %.2f), peak RSS %.1f MiB; harness CPU %.2f s",
				n, r+1, cs.Env.Seconds(), 3*n, cs.All.Seconds(), l.Total.Seconds(), cs.CPU, cs.UserCPU, cs.HWM, cs.HarnessCPU)
		}
		big := n >= 5000
		lim := &Limit{Name: "ip/bridge -batch", Stats: Summarize(seconds(limTotal))}
		f := h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: start -> env file", n), Unit: "s", Stats: Summarize(seconds(env))})
		if big {
			f.Targets = []Target{{"median", "<=", 0.3}}
		}
		f = h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: start -> all %d entries", n, 3*n), Unit: "s", Stats: Summarize(seconds(all)), Limit: lim})
		if big {
			f.Targets = []Target{{"median", "<=", 1.0}, {"ratio", "<=", 1.5}}
		}
		h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: CPU seconds to converge", n), Unit: "s", Stats: Summarize(cpu)})
		h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: of which user space", n), Unit: "s", Stats: Summarize(ucpu)})
		h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: harness CPU meanwhile (notifications)", n), Unit: "s", Stats: Summarize(hcpu)})
		f = h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: peak RSS (VmHWM)", n), Unit: "MiB", Stats: Summarize(hwm)})
		if big {
			f.Targets = []Target{{"median", "<=", 25}}
		}
		if !big {
			continue
		}
		// Where the time goes, for the largest size.
		h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: start -> all FDB entries", n), Unit: "s", Stats: Summarize(seconds(fdb)),
			Limit: &Limit{Name: "bridge -batch fdb", Stats: Summarize(seconds(limFDB))}})
		h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: start -> all neighbours", n), Unit: "s", Stats: Summarize(seconds(neigh)),
			Limit: &Limit{Name: "ip -batch neigh", Stats: Summarize(seconds(limNeigh))}})
		h.add(sec, &Figure{Name: fmt.Sprintf("%d peers: start -> all routes", n), Unit: "s", Stats: Summarize(seconds(route)),
			Limit: &Limit{Name: "ip -batch route", Stats: Summarize(seconds(limRoute))}})
		h.add(sec, &Figure{Name: fmt.Sprintf("%d peers, design alternative: routes via nexthop objects (ip -batch, nexthops + routes)", n), Unit: "s",
			Stats: Summarize(seconds(limNH)), Limit: &Limit{Name: "ip -batch route", Stats: Summarize(seconds(limRoute))}})
		for _, p := range phaseMessages {
			if ds := phases[p.phase]; len(ds) > 0 {
				h.add(sec, &Figure{Name: fmt.Sprintf("%d peers, twilld log: start -> %s", n, p.phase), Unit: "s", Stats: Summarize(seconds(ds))})
			}
		}
	}
	h.note(sec, "start = fork of twilld in the host namespace; entries = kernel notifications of twill's routes, permanent neighbours and FDB entries; the tables are dumped afterwards to check the counts")
	h.note(sec, "limit = the same entries written by `bridge -batch` (FDB) + `ip -batch` (neighbours, routes) into a fresh VXLAN device in a fresh namespace, measured between twilld's runs")
	if h.cfg.PerfDir != "" {
		h.note(sec, "the last run of the largest size ran under a system-wide perf record (--perf): it is slower than the others")
	}
	h.note(sec, "each run starts on a fresh host: no device, no twill routes, no own lease in etcd, no env file")
	return nil
}
