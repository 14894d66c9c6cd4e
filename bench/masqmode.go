package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os/exec"
	"strings"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/twillnet/twill/internal/daemon/masq"
	"github.com/twillnet/twill/internal/tools/lab"
)

// With --ip-masq twilld keeps masquerade and forward rules, in one of two
// modes chosen by the network config's EnableNFTables: iptables (the chains
// TWILL-POSTRTG and TWILL-FWD, written by running the iptables program) or
// nftables (the table inet twill, written over netlink in one transaction).
// twilld checks them on every full pass (its start, the resync every 10 s,
// a change of its own subnet), not on the update that follows a peer change.

// rulesModes are the modes the --ip-masq figures measure, in this order.
var rulesModes = []masq.Mode{masq.ModeIPTables, masq.ModeNFTables}

// ParseRulesMode reads a mode as the command line gives it: "iptables",
// "nftables", or "off" (returned as "").
func ParseRulesMode(s string) (masq.Mode, error) {
	switch m := masq.Mode(s); m {
	case masq.ModeIPTables, masq.ModeNFTables:
		return m, nil
	case "off", "":
		return "", nil
	}
	return "", fmt.Errorf("rules mode %q: want iptables, nftables or off", s)
}

// setRulesMode writes the network config with EnableNFTables for mode:
// true for nftables, false for iptables, the key left out for "" (twilld's
// default, iptables when the program is installed). twilld reads the config
// when it starts.
func (e *etcdMode) setRulesMode(ctx context.Context, mode masq.Mode) error {
	var nft *bool
	switch mode {
	case "":
	case masq.ModeIPTables, masq.ModeNFTables:
		v := mode == masq.ModeNFTables
		nft = &v
	default:
		return fmt.Errorf("unknown rules mode %q", mode)
	}
	if err := e.etcd.setConfig(ctx, e.dual, nft, e.backend); err != nil {
		return fmt.Errorf("network config for rules mode %q: %w", mode, err)
	}
	e.nftables = nft
	return nil
}

// rulesCounters are twilld's counters of its rules at one moment.
type rulesCounters struct {
	repairs    float64 // twill_repairs_total{kind=<mode>}: rule writes while its subnet stayed the same
	fullPasses float64 // twill_reconcile_total{result="ok"} - twill_reconcile_incremental_total: each checked the rules
}

func (h *Harness) rulesCounters(ctx context.Context, e *etcdMode, mode masq.Mode) (rulesCounters, error) {
	tw, err := h.twilldMetrics(ctx, e)
	if err != nil {
		return rulesCounters{}, fmt.Errorf("twilld metrics: %w", err)
	}
	if !hasSample(tw, "twill_repairs_total", map[string]string{"kind": string(mode)}) {
		return rulesCounters{}, fmt.Errorf("twilld has no twill_repairs_total{kind=%q}: it does not keep its rules in %s mode (see %s)", mode, mode, e.twilld.Log)
	}
	return rulesCounters{
		repairs:    promValue(tw, "twill_repairs_total", map[string]string{"kind": string(mode)}),
		fullPasses: promValue(tw, "twill_reconcile_total", map[string]string{"result": "ok"}) - promValue(tw, "twill_reconcile_incremental_total", nil),
	}, nil
}

func (c rulesCounters) sub(o rulesCounters) rulesCounters {
	return rulesCounters{repairs: c.repairs - o.repairs, fullPasses: c.fullPasses - o.fullPasses}
}

// hasSample says whether samples hold a sample of name with labels
// including match.
func hasSample(samples []promSample, name string, match map[string]string) bool {
	for _, s := range samples {
		if s.Name != name {
			continue
		}
		ok := true
		for k, v := range match {
			ok = ok && s.Labels[k] == v
		}
		if ok {
			return true
		}
	}
	return false
}

// checkRulesMode makes sure the twilld just started keeps its rules in mode:
// its metrics count repairs of that kind, and the host namespace holds that
// mode's rules and none of the other mode's (twilld removes those beside its
// first pass, so this waits up to 10 s). A program that is not installed is
// not asked.
func (h *Harness) checkRulesMode(ctx context.Context, e *etcdMode, mode masq.Mode) error {
	if _, err := h.rulesCounters(ctx, e, mode); err != nil {
		return err
	}
	probes := map[masq.Mode][]string{
		masq.ModeIPTables: {"iptables", "-w", "5", "-t", "nat", "-S", masq.NATChain},
		masq.ModeNFTables: {"nft", "list", "table", "inet", masq.NFTablesTable},
	}
	present := func(m masq.Mode) (bool, bool) {
		p := probes[m]
		if !installed(p[0]) {
			return false, false
		}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		_, err := run(cctx, "ip", append([]string{"netns", "exec", e.hostNS()}, p...)...)
		return err == nil, true
	}
	return lab.Poll(ctx, 10*time.Second, 50*time.Millisecond, fmt.Sprintf("twilld's rules in %s mode only", mode), func() error {
		var problems []string
		for _, m := range rulesModes {
			has, asked := present(m)
			switch {
			case !asked:
			case m == mode && !has:
				problems = append(problems, fmt.Sprintf("no %s rules (%s)", m, strings.Join(probes[m], " ")))
			case m != mode && has:
				problems = append(problems, fmt.Sprintf("%s rules left (%s)", m, strings.Join(probes[m], " ")))
			}
		}
		if problems != nil {
			return errors.New(strings.Join(problems, "; "))
		}
		return nil
	})
}

// rulesCost is what one Ensure of twilld's rules keeper (masq.NewKeeper,
// the code twilld runs) takes in one mode, for the rules of the etcd-mode
// network and a subnet of it (the rules have the same shape for any
// subnet), timed by the harness in a namespace of its own.
type rulesCost struct {
	// Check: nothing to change, what every full pass pays.
	Check []time.Duration
	// Repair: after the forward chain was flushed by hand; iptables
	// rewrites that chain, nftables replaces the table.
	Repair []time.Duration
	// Write: nothing there (a start, or a new own subnet): every rule
	// written.
	Write []time.Duration
}

// measureRulesCost times samples of each kind of Ensure per mode, the modes
// alternating sample by sample, in a fresh namespace holding nothing else.
func measureRulesCost(ctx context.Context, h *Harness, samples int) (map[masq.Mode]*rulesCost, error) {
	for _, p := range []string{"iptables", "nft"} {
		if !installed(p) {
			return nil, fmt.Errorf("%s is not installed", p)
		}
	}
	name := h.cfg.Prefix + "masq"
	if _, err := ipCmd(ctx, "netns", "add", name); err != nil {
		return nil, err
	}
	defer ipCmd(context.Background(), "netns", "del", name)
	if _, err := ipCmd(ctx, "-n", name, "link", "set", "lo", "up"); err != nil {
		return nil, err
	}
	cfgs := []masq.Config{{Network: benchNetwork, Subnet: netip.MustParsePrefix("10.0.0.0/24")}}
	out := map[masq.Mode]*rulesCost{}
	// Everything below runs on one thread that entered the namespace: the
	// iptables programs are forked from it and the nftables netlink sockets
	// are made on it.
	err := ns.WithNetNSPath(nsPath(name), func(ns.NetNS) error {
		ipt, err := masq.NewIPTables(false)
		if err != nil {
			return err
		}
		type side struct {
			mode  masq.Mode
			k     masq.Keeper
			flush []string               // empties the forward chain, as a person might
			clear func() (string, error) // removes every rule
		}
		var sides []side
		for _, mode := range rulesModes {
			k, err := masq.NewKeeper(mode, []bool{false}, slog.New(slog.DiscardHandler))
			if err != nil {
				return fmt.Errorf("%s: %w", mode, err)
			}
			s := side{mode: mode, k: k}
			if mode == masq.ModeIPTables {
				s.flush = []string{"iptables", "-w", "5", "-t", "filter", "-F", masq.ForwardChain}
				s.clear = func() (string, error) { _, err := masq.Cleanup(ctx, ipt); return "", err }
			} else {
				s.flush = []string{"nft", "flush", "chain", "inet", masq.NFTablesTable, "forward"}
				s.clear = func() (string, error) { _, err := masq.CleanupNFTables(ctx); return "", err }
			}
			sides = append(sides, s)
			out[mode] = &rulesCost{}
		}
		defer func() {
			masq.Cleanup(context.Background(), ipt)
			masq.CleanupNFTables(context.Background())
		}()
		// timed runs one Ensure after prepare and checks how many writes
		// it made: want, or at least one when want is -1.
		timed := func(s side, what string, prepare func() (string, error), want int, into *[]time.Duration) error {
			if prepare != nil {
				if _, err := prepare(); err != nil {
					return fmt.Errorf("%s, before Ensure (%s): %w", s.mode, what, err)
				}
			}
			w0 := s.k.Writes(false)
			start := time.Now()
			err := s.k.Ensure(ctx, cfgs)
			d := time.Since(start)
			if err != nil {
				return fmt.Errorf("%s, Ensure (%s): %w", s.mode, what, err)
			}
			if n := int(s.k.Writes(false) - w0); n != want && (want >= 0 || n == 0) {
				return fmt.Errorf("%s, Ensure (%s) made %d writes, want %d", s.mode, what, n, want)
			}
			*into = append(*into, d)
			return nil
		}
		for _, s := range sides {
			if err := s.k.Ensure(ctx, cfgs); err != nil { // the first write, not timed
				return fmt.Errorf("%s: %w", s.mode, err)
			}
		}
		for range samples {
			for _, s := range sides {
				c := out[s.mode]
				flush := func() (string, error) {
					cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
					defer cancel()
					return run(cctx, s.flush[0], s.flush[1:]...)
				}
				if err := timed(s, "nothing to change", nil, 0, &c.Check); err != nil {
					return err
				}
				if err := timed(s, "forward chain flushed", flush, 1, &c.Repair); err != nil {
					return err
				}
				if err := timed(s, "nothing there", s.clear, -1, &c.Write); err != nil {
					return err
				}
			}
		}
		return nil
	})
	return out, err
}

// removeRules removes twilld's iptables chains and nftables table from a
// namespace, as `twilld --cleanup` would.
func removeRules(ctx context.Context, netns string) error {
	return ns.WithNetNSPath(nsPath(netns), func(ns.NetNS) error {
		var errs []error
		if installed("iptables") {
			ipt, err := masq.NewIPTables(false)
			if err == nil {
				_, err = masq.Cleanup(ctx, ipt)
			}
			errs = append(errs, err)
		}
		_, err := masq.CleanupNFTables(ctx)
		errs = append(errs, err)
		if err := errors.Join(errs...); err != nil {
			return fmt.Errorf("remove twilld's rules in %s: %w", netns, err)
		}
		return nil
	})
}

// installed says whether a program is in PATH.
func installed(name string) bool {
	_, err := exec.LookPath(name)
	return err == nil
}
