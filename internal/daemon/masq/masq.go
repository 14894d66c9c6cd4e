// Package masq keeps twill's iptables rules: masquerading of pod traffic that
// leaves the cluster network, and FORWARD acceptance of traffic from and to
// it.
//
// # Design
//
// The rules live in two chains of twill's own, each reached by one jump
// inserted at the top of a built-in chain:
//
//	nat    POSTROUTING -> TWILL-POSTRTG
//	filter FORWARD     -> TWILL-FWD
//
// so twill never edits a rule it did not write, and removing twill is two
// jumps and two chains. Ensure is level-triggered like the backends: every
// call compares each chain with the wanted list and rewrites it only when it
// differs in any way (a rule missing, added, changed or moved); the Network
// changing is just another difference. A chain is rewritten aside (filled as
// TWILL-...-NEW, jumped to, then renamed), so traffic never meets a half-full
// chain: a connection that started while MASQUERADE was missing would keep
// its pod source address for its whole life.
//
// One Manager keeps one IP family: a dual-stack node runs two, one on an
// iptables handle with the IPv4 network and one on an ip6tables handle with
// the IPv6 network. The rules mean the same in both families and the chains
// have the same names; iptables and ip6tables keep separate tables, so the
// two Managers never see each other's chains.
//
// The rule logic talks to iptables through IPTables, the few go-iptables
// methods it uses, so it is unit-tested with a fake.
package masq

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/coreos/go-iptables/iptables"
)

// Chains twill owns.
const (
	NATChain     = "TWILL-POSTRTG"
	ForwardChain = "TWILL-FWD"
)

// KubeProxyMark is the mark kube-proxy sets on packets it will masquerade
// itself (in KUBE-POSTROUTING); twill lets them pass so nothing is NATed twice.
const KubeProxyMark = "0x4000/0x4000"

// newSuffix names the chain a rewrite fills before switching to it.
const newSuffix = "-NEW"

// IPTables is the part of go-iptables' *iptables.IPTables that masq uses.
// The same handle type serves both families; which program it runs
// (iptables or ip6tables) is fixed when it is made.
type IPTables interface {
	ChainExists(table, chain string) (bool, error)
	ClearChain(table, chain string) error
	ClearAndDeleteChain(table, chain string) error
	RenameChain(table, oldChain, newChain string) error
	List(table, chain string) ([]string, error)
	Exists(table, chain string, rulespec ...string) (bool, error)
	Insert(table, chain string, pos int, rulespec ...string) error
	Append(table, chain string, rulespec ...string) error
	Delete(table, chain string, rulespec ...string) error
	HasRandomFully() bool
}

// protocolReporter is what New asks of a handle, beyond IPTables, to refuse
// a Config of the other family: *iptables.IPTables has it. A handle without
// it (a test's fake, a wrapper) is trusted to be of the Config's family.
type protocolReporter interface {
	Proto() iptables.Protocol
}

// NewIPTables returns the iptables of the current network namespace for
// IPv4, or ip6tables for IPv6 when v6 (the program found in PATH, waiting
// for the xtables lock).
func NewIPTables(v6 bool) (IPTables, error) {
	proto := iptables.ProtocolIPv4
	if v6 {
		proto = iptables.ProtocolIPv6
	}
	ipt, err := iptables.NewWithProtocol(proto)
	if err != nil {
		return nil, fmt.Errorf("iptables: %w", err)
	}
	return ipt, nil
}

// Config is what the rules of one family depend on.
type Config struct {
	// Network is the cluster network of the family (net-conf.json's
	// Network, or IPv6Network).
	Network netip.Prefix
	// Subnet is this node's leased subnet of the same family.
	Subnet netip.Prefix
}

// check refuses a Config no rules can be written for.
func (cfg Config) check() error {
	n := cfg.Network
	// An IPv4-mapped IPv6 network (::ffff:a.b.c.d/n) is neither: no packet
	// on the wire carries such an address.
	if !n.IsValid() || n.Addr().Is4In6() || n.Masked() != n {
		return fmt.Errorf("masq: network %v is not an IPv4 or IPv6 network address", n)
	}
	if !cfg.Subnet.IsValid() || cfg.Subnet.Masked() != cfg.Subnet || !n.Contains(cfg.Subnet.Addr()) || cfg.Subnet.Bits() < n.Bits() {
		return fmt.Errorf("masq: subnet %v is not a subnet of network %s", cfg.Subnet, n)
	}
	return nil
}

// Multicast destinations are never masqueraded, per family.
const (
	multicast4 = "224.0.0.0/4"
	multicast6 = "ff00::/8"
)

func familyName(v6 bool) string {
	if v6 {
		return "IPv6"
	}
	return "IPv4"
}

// Rule is one rule in one chain.
type Rule struct {
	Table, Chain string
	Spec         []string
}

// String renders the rule as `iptables -S` prints it: "-A CHAIN spec...".
func (r Rule) String() string { return "-A " + r.Chain + " " + strings.Join(r.Spec, " ") }

// chainSpec is one of twill's chains and the built-in chain that jumps to it.
type chainSpec struct {
	table, chain, hook, comment string
}

var chains = []chainSpec{
	{"nat", NATChain, "POSTROUTING", "twill: masquerade pod traffic leaving the cluster network"},
	{"filter", ForwardChain, "FORWARD", "twill: accept traffic from and to the cluster network"},
}

func (c chainSpec) jump(target string) []string {
	return []string{"-m", "comment", "--comment", c.comment, "-j", target}
}

// Rules returns the wanted content of twill's chains, in order, for the
// family of cfg.Network. Each spec is written the way `iptables -S` prints
// it, and for IPv6 the way `ip6tables -S` does: addresses in lower case with
// zeros compressed as RFC 5952 says, which is how netip prints them too.
//
// nat TWILL-POSTRTG, first match wins:
//
//  1. kube-proxy's mark: RETURN (kube-proxy masquerades those itself);
//  2. from the network to the network (pod to pod): RETURN, the pod keeps
//     its source address;
//  3. from the network to anywhere else but multicast (224.0.0.0/4, or
//     ff00::/8 for IPv6): MASQUERADE, the pod leaves with this node's address
//     (the source address the kernel picks for the outgoing interface, so an
//     IPv6 node needs an address of global scope there, not only a
//     link-local one);
//  4. from outside the network to this node's own subnet: RETURN, the reply
//     comes back through this node anyway;
//  5. from outside the network to the rest of the network: MASQUERADE. This
//     is traffic this node forwards from a non-pod address (an external
//     client routed via this node, or the node itself with host-gw) to a pod
//     on another node; without it that node's pod would answer the client
//     directly, around this node, and stateful firewalls or rp_filter on the
//     way drop the asymmetric reply. (With vxlan the node's own traffic to
//     remote pods already has the device's address, inside the network.)
//
// filter TWILL-FWD: ACCEPT from the network, ACCEPT to the network, so a
// FORWARD policy of DROP (Docker sets one) does not cut pods off.
func Rules(cfg Config, randomFully bool) []Rule {
	n, sn := cfg.Network.String(), cfg.Subnet.String()
	mc := multicast4
	if cfg.Network.Addr().Is6() {
		mc = multicast6
	}
	masq := []string{"-j", "MASQUERADE"}
	if randomFully {
		masq = append(masq, "--random-fully")
	}
	nat := func(spec ...string) Rule { return Rule{"nat", NATChain, spec} }
	fwd := func(spec ...string) Rule { return Rule{"filter", ForwardChain, spec} }
	return []Rule{
		nat("-m", "mark", "--mark", KubeProxyMark, "-j", "RETURN"),
		nat("-s", n, "-d", n, "-j", "RETURN"),
		nat(append([]string{"-s", n, "!", "-d", mc}, masq...)...),
		nat("!", "-s", n, "-d", sn, "-j", "RETURN"),
		nat(append([]string{"!", "-s", n, "-d", n}, masq...)...),
		fwd("-s", n, "-j", "ACCEPT"),
		fwd("-d", n, "-j", "ACCEPT"),
	}
}

// Manager keeps the rules of one network in one family.
type Manager struct {
	ipt IPTables
	cfg Config
	log *slog.Logger

	mu sync.Mutex
	// listed is, per chain, what iptables printed right after twill wrote
	// it: iptables versions differ in how they print a rule, so after one
	// write the chain is compared with iptables' own rendering.
	listed map[string][]string
	// writes counts chains rewritten and jumps added: repairs, after the
	// first Ensure.
	writes uint64
}

// Writes counts the chain rewrites and jump insertions Ensure has made.
func (m *Manager) Writes() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.writes
}

// New returns a Manager for the family of cfg.Network, IPv4 or IPv6; it
// changes nothing until Ensure. ipt must run the program of that family
// (NewIPTables(v6)); New refuses a handle of the other family when the
// handle can tell (*iptables.IPTables can).
func New(ipt IPTables, cfg Config, log *slog.Logger) (*Manager, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	n := cfg.Network
	v6 := n.Addr().Is6()
	if p, ok := ipt.(protocolReporter); ok {
		if hv6 := p.Proto() == iptables.ProtocolIPv6; hv6 != v6 {
			return nil, fmt.Errorf("masq: network %s is %s but the iptables handle is for %s", n, familyName(v6), familyName(hv6))
		}
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "masq", "family", familyName(v6))
	return &Manager{ipt: ipt, cfg: cfg, log: log, listed: map[string][]string{}}, nil
}

// Ensure makes twill's chains hold exactly Rules and the built-in chains jump
// to them; it writes nothing when they already do. Call it on every resync.
func (m *Manager) Ensure(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	rules := Rules(m.cfg, m.ipt.HasRandomFully())
	var errs []error
	for _, c := range chains {
		var want []Rule
		for _, r := range rules {
			if r.Chain == c.chain {
				want = append(want, r)
			}
		}
		if err := m.ensureChain(ctx, c, want); err != nil {
			errs = append(errs, fmt.Errorf("%s %s: %w", c.table, c.chain, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("masq: ensure rules: %w", err)
	}
	return nil
}

func (m *Manager) ensureChain(ctx context.Context, c chainSpec, want []Rule) error {
	exists, err := m.ipt.ChainExists(c.table, c.chain)
	if err != nil {
		return err
	}
	rendered := make([]string, len(want))
	for i, r := range want {
		rendered[i] = r.String()
	}
	if exists {
		have, err := m.ipt.List(c.table, c.chain)
		if err != nil {
			return err
		}
		have = rulesOnly(have)
		if !slices.Equal(have, rendered) && !slices.Equal(have, m.listed[c.chain]) {
			m.log.Info("chain differs; rewriting it", "table", c.table, "chain", c.chain, "have", have, "want", rendered)
			exists = false
		}
	}
	if !exists {
		m.writes++
		if err := m.rewrite(ctx, c, want); err != nil {
			return err
		}
		have, err := m.ipt.List(c.table, c.chain)
		if err != nil {
			return err
		}
		m.listed[c.chain] = rulesOnly(have)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	ok, err := m.ipt.Exists(c.table, c.hook, c.jump(c.chain)...)
	if err != nil {
		return fmt.Errorf("check jump from %s: %w", c.hook, err)
	}
	if !ok {
		m.log.Info("adding jump", "table", c.table, "from", c.hook, "to", c.chain)
		m.writes++
		if err := m.ipt.Insert(c.table, c.hook, 1, c.jump(c.chain)...); err != nil {
			return fmt.Errorf("add jump from %s: %w", c.hook, err)
		}
	}
	return nil
}

// rewrite fills CHAIN-NEW, points the jump at it, drops CHAIN and renames
// CHAIN-NEW to CHAIN. At every moment the jump leads to a complete chain (or,
// on the very first run, there is no jump yet).
func (m *Manager) rewrite(ctx context.Context, c chainSpec, want []Rule) error {
	tmp := c.chain + newSuffix
	steps := []func() error{
		func() error { return m.removeJumps(c, tmp) }, // left by an interrupted rewrite
		func() error { return m.ipt.ClearChain(c.table, tmp) },
	}
	for _, r := range want {
		steps = append(steps, func() error { return m.ipt.Append(c.table, tmp, r.Spec...) })
	}
	steps = append(steps,
		func() error { return m.ipt.Insert(c.table, c.hook, 1, c.jump(tmp)...) },
		func() error { return m.removeJumps(c, c.chain) },
		func() error { return m.ipt.ClearAndDeleteChain(c.table, c.chain) },
		func() error { return m.ipt.RenameChain(c.table, tmp, c.chain) },
	)
	for _, step := range steps {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := step(); err != nil {
			return err
		}
	}
	return nil
}

// removeJumps deletes every jump from c.hook to target (there is normally at
// most one). A chain that does not exist has no jumps to it.
func (m *Manager) removeJumps(c chainSpec, target string) error {
	exists, err := m.ipt.ChainExists(c.table, target)
	if err != nil || !exists {
		return err
	}
	for range 100 {
		ok, err := m.ipt.Exists(c.table, c.hook, c.jump(target)...)
		if err != nil || !ok {
			return err
		}
		if err := m.ipt.Delete(c.table, c.hook, c.jump(target)...); err != nil {
			return fmt.Errorf("remove jump from %s to %s: %w", c.hook, target, err)
		}
	}
	return fmt.Errorf("remove jumps from %s to %s: still there after 100 deletions", c.hook, target)
}

// Cleanup removes the jumps and twill's chains (also a CHAIN-NEW left by an
// interrupted rewrite). It needs no Config: see the package function Cleanup.
func (m *Manager) Cleanup(ctx context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.listed)
	_, err := Cleanup(ctx, m.ipt)
	return err
}

// Cleanup removes everything twill put in the tables of ipt's family, and
// says whether there was anything: for `twilld --cleanup`, which may not
// know the network any more. Call it once with an iptables and once with an
// ip6tables handle to clean both families.
func Cleanup(ctx context.Context, ipt IPTables) (removed bool, err error) {
	m := &Manager{ipt: ipt}
	var errs []error
	for _, c := range chains {
		for _, name := range []string{c.chain, c.chain + newSuffix} {
			if err := ctx.Err(); err != nil {
				return removed, fmt.Errorf("masq: cleanup: %w", err)
			}
			exists, err := ipt.ChainExists(c.table, name)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if !exists {
				continue
			}
			if err := m.removeJumps(c, name); err != nil {
				errs = append(errs, err)
				continue
			}
			if err := ipt.ClearAndDeleteChain(c.table, name); err != nil {
				errs = append(errs, fmt.Errorf("delete %s %s: %w", c.table, name, err))
				continue
			}
			removed = true
		}
	}
	if err := errors.Join(errs...); err != nil {
		return removed, fmt.Errorf("masq: cleanup: %w", err)
	}
	return removed, nil
}

// rulesOnly drops the "-N CHAIN" line of `iptables -S CHAIN`.
func rulesOnly(lines []string) []string {
	out := lines[:0:0]
	for _, l := range lines {
		if strings.HasPrefix(l, "-A ") {
			out = append(out, strings.TrimSpace(l))
		}
	}
	return out
}
