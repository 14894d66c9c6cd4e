package masq

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"strings"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// The nftables mode keeps the same rules as the iptables chains, in one
// table of twill's own whose family is inet, so both IP families share it:
//
//	table inet twill {
//		chain postrouting { type nat hook postrouting priority srcnat; ... }
//		chain forward { type filter hook forward priority filter; ... }
//	}
//
// The table is written through the kernel's nf_tables netlink interface
// (github.com/google/nftables): no nft binary is needed, and nothing parses a
// program's output. Ensure reads the table back, compares it with the wanted
// one, and when anything differs replaces the whole table in one netlink
// batch, which the kernel applies as one transaction: a packet meets the old
// rule set or the new one, never a part.
const (
	// NFTablesTable is the name of twill's table, of family inet.
	NFTablesTable = "twill"
	nftNATChain   = "postrouting"
	nftFwdChain   = "forward"
)

// nftRule is one wanted rule: the family whose packets it matches
// (unix.NFPROTO_IPV4 or NFPROTO_IPV6; 0 for both), and its content.
type nftRule struct {
	family byte
	chain  string
	exprs  []expr.Any
	// comment is shown by `nft list table inet twill`.
	comment string
}

var nftTable = &nftables.Table{Name: NFTablesTable, Family: nftables.TableFamilyINet}

// nftChains are the base chains of the table, as they are created.
func nftChains() []*nftables.Chain {
	accept := nftables.ChainPolicyAccept
	return []*nftables.Chain{
		{Name: nftNATChain, Table: nftTable, Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource, Policy: &accept},
		{Name: nftFwdChain, Table: nftTable, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept},
	}
}

// nftRules returns the wanted rules, chain by chain and in order: the rules
// of Rules (see there for what each one is for), written as nft would write
//
//	meta mark & 0x4000 == 0x4000 return
//	ip saddr N ip daddr N return
//	ip saddr N ip daddr != 224.0.0.0/4 masquerade fully-random
//	ip saddr != N ip daddr S return
//	ip saddr != N ip daddr N masquerade fully-random
//	ip saddr N accept
//	ip daddr N accept
//
// with ip6 and ff00::/8 for an IPv6 network. The mark rule matches both
// families and comes once, first; then the rules of each Config in turn.
func nftRules(cfgs []Config, fullyRandom bool) []nftRule {
	mark := binaryutil.NativeEndian.PutUint32(0x4000) // KubeProxyMark
	rules := []nftRule{{
		chain: nftNATChain, comment: "twill: kube-proxy masquerades marked packets itself",
		exprs: []expr.Any{
			&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mark, Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: mark},
			&expr.Verdict{Kind: expr.VerdictReturn},
		},
	}}
	for _, cfg := range cfgs {
		fam := byte(unix.NFPROTO_IPV4)
		mc := netip.MustParsePrefix(multicast4)
		if cfg.Network.Addr().Is6() {
			fam, mc = unix.NFPROTO_IPV6, netip.MustParsePrefix(multicast6)
		}
		n, sn := cfg.Network, cfg.Subnet
		masq := &expr.Masq{FullyRandom: fullyRandom}
		rule := func(chain, comment string, e ...expr.Any) nftRule {
			return nftRule{family: fam, chain: chain, comment: comment,
				exprs: append([]expr.Any{&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{fam}}}, e...)}
		}
		src, dst := nftMatch(true, n, true), nftMatch(false, n, true)
		notSrc := nftMatch(true, n, false)
		rules = append(rules,
			rule(nftNATChain, "twill: pod to pod keeps its address", slices.Concat(src, dst, []expr.Any{&expr.Verdict{Kind: expr.VerdictReturn}})...),
			rule(nftNATChain, "twill: pods leaving the cluster network", slices.Concat(src, nftMatch(false, mc, false), []expr.Any{&expr.Counter{}, masq})...),
			rule(nftNATChain, "twill: replies come back through this node", slices.Concat(notSrc, nftMatch(false, sn, true), []expr.Any{&expr.Verdict{Kind: expr.VerdictReturn}})...),
			rule(nftNATChain, "twill: forwarded to pods on other nodes", slices.Concat(notSrc, dst, []expr.Any{&expr.Counter{}, masq})...),
			rule(nftFwdChain, "twill: from the cluster network", slices.Concat(src, []expr.Any{&expr.Counter{}, &expr.Verdict{Kind: expr.VerdictAccept}})...),
			rule(nftFwdChain, "twill: to the cluster network", slices.Concat(dst, []expr.Any{&expr.Counter{}, &expr.Verdict{Kind: expr.VerdictAccept}})...),
		)
	}
	return rules
}

// nftMatch matches (eq) or excludes (!eq) the packet's source (src) or
// destination address against p: load the address, mask it to p's bits,
// compare. The family check comes before, in the rule.
func nftMatch(src bool, p netip.Prefix, eq bool) []expr.Any {
	offset, size := uint32(16), uint32(4) // IPv4 daddr
	if p.Addr().Is6() {
		offset, size = 24, 16
	}
	if src {
		offset -= size // saddr comes right before daddr in both headers
	}
	op := expr.CmpOpEq
	if !eq {
		op = expr.CmpOpNeq
	}
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: size},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: size, Mask: net.CIDRMask(p.Bits(), int(size)*8), Xor: make([]byte, size)},
		&expr.Cmp{Op: op, Register: 1, Data: p.Masked().Addr().AsSlice()},
	}
}

// NFTables keeps twill's nftables table. One NFTables serves every family of
// the network: its table is of family inet.
type NFTables struct {
	conn *nftables.Conn
	log  *slog.Logger

	mu          sync.Mutex
	fullyRandom bool      // masquerade with fully-random ports: until the kernel refuses it
	writes      [2]uint64 // table replacements, per family (0 IPv4, 1 IPv6) whose rules differed
}

// NewNFTables returns an NFTables for the network namespace of the calling
// process; it changes nothing until Ensure. It fails when the kernel has no
// nf_tables.
func NewNFTables(log *slog.Logger) (*NFTables, error) {
	conn, err := nftables.New()
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	if _, err := conn.ListTablesOfFamily(nftables.TableFamilyINet); err != nil {
		return nil, fmt.Errorf("nftables: list tables (does the kernel have nf_tables?): %w", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &NFTables{conn: conn, log: log.With("component", "masq", "mode", "nftables"), fullyRandom: true}, nil
}

// Writes counts the times Ensure replaced the table because the rules of
// the family (IPv6 when v6) differed from the wanted ones.
func (n *NFTables) Writes(v6 bool) uint64 {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.writes[familyIndex(v6)]
}

func familyIndex(v6 bool) int {
	if v6 {
		return 1
	}
	return 0
}

// Ensure makes twill's table hold exactly the rules for cfgs (one Config per
// family of the network) and writes nothing when it already does. Call it on
// every resync.
func (n *NFTables) Ensure(ctx context.Context, cfgs []Config) error {
	if err := checkConfigs(cfgs); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	have, err := readNFTable(n.conn)
	if err != nil {
		return fmt.Errorf("masq: read table inet %s: %w", NFTablesTable, err)
	}
	want := nftRules(cfgs, n.fullyRandom)
	differ := diffNFTable(have, want)
	if len(differ) == 0 {
		return nil
	}
	names := make([]string, len(differ))
	for i, v6 := range differ {
		names[i] = familyName(v6)
	}
	n.log.Info("table differs; replacing it", "table", "inet "+NFTablesTable, "families", strings.Join(names, ","))
	err = replaceNFTable(n.conn, want)
	if err != nil && n.fullyRandom && errors.Is(err, unix.EINVAL) {
		// A kernel that predates fully-random masquerading refuses the flag.
		n.log.Warn("the kernel refused fully-random masquerading; masquerading without it", "err", err)
		n.fullyRandom = false
		want = nftRules(cfgs, false)
		err = replaceNFTable(n.conn, want)
	}
	if err != nil {
		return fmt.Errorf("masq: replace table inet %s: %w", NFTablesTable, err)
	}
	for _, v6 := range differ {
		n.writes[familyIndex(v6)]++
	}
	return nil
}

// checkConfigs refuses what New refuses, and two Configs of one family.
func checkConfigs(cfgs []Config) error {
	seen := map[bool]bool{}
	for _, cfg := range cfgs {
		if err := cfg.check(); err != nil {
			return err
		}
		v6 := cfg.Network.Addr().Is6()
		if seen[v6] {
			return fmt.Errorf("masq: two %s networks", familyName(v6))
		}
		seen[v6] = true
	}
	return nil
}

// nftState is what the kernel holds of twill's table.
type nftState struct {
	exists bool
	chains []*nftables.Chain
	rules  map[string][]*nftables.Rule // by chain
}

func readNFTable(conn *nftables.Conn) (nftState, error) {
	var st nftState
	tables, err := conn.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return st, err
	}
	st.exists = slices.ContainsFunc(tables, func(t *nftables.Table) bool { return t.Name == NFTablesTable })
	if !st.exists {
		return st, nil
	}
	chains, err := conn.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return st, err
	}
	st.rules = map[string][]*nftables.Rule{}
	for _, c := range chains {
		if c.Table.Name != NFTablesTable {
			continue
		}
		st.chains = append(st.chains, c)
		rules, err := conn.GetRules(nftTable, c)
		if err != nil {
			return st, fmt.Errorf("list chain %s: %w", c.Name, err)
		}
		st.rules[c.Name] = rules
	}
	return st, nil
}

// diffNFTable returns the families whose rules differ between the table the
// kernel has and the wanted one (false for IPv4, true for IPv6), nil when
// nothing does. A difference that is no one family's (the table or a chain
// missing or different, the mark rule, a rule of neither family) counts for
// every family the wanted rules have.
func diffNFTable(have nftState, want []nftRule) []bool {
	all := []bool{}
	for _, r := range want {
		if r.family != 0 && !slices.Contains(all, r.family == unix.NFPROTO_IPV6) {
			all = append(all, r.family == unix.NFPROTO_IPV6)
		}
	}
	if len(all) == 0 {
		all = append(all, false)
	}
	if !have.exists || !sameChains(have.chains, nftChains()) {
		return all
	}
	var differ []bool
	for _, fam := range []byte{0, unix.NFPROTO_IPV4, unix.NFPROTO_IPV6} {
		same := true
		for _, c := range nftChains() {
			var h []*nftables.Rule
			for _, r := range have.rules[c.Name] {
				if ruleFamily(r.Exprs) == fam {
					h = append(h, r)
				}
			}
			var w []nftRule
			for _, r := range want {
				if r.chain == c.Name && r.family == fam {
					w = append(w, r)
				}
			}
			same = same && sameRules(h, w)
		}
		switch {
		case same:
		case fam == 0:
			return all
		default:
			differ = append(differ, fam == unix.NFPROTO_IPV6)
		}
	}
	if len(differ) > 0 {
		return differ
	}
	// Each family's rules are right: their order between each other too?
	for _, c := range nftChains() {
		var w []nftRule
		for _, r := range want {
			if r.chain == c.Name {
				w = append(w, r)
			}
		}
		if !sameRules(have.rules[c.Name], w) {
			return all
		}
	}
	return nil
}

// ruleFamily tells the family a rule matches from its first check: a rule
// twill writes for one family starts with `meta nfproto`.
func ruleFamily(exprs []expr.Any) byte {
	if len(exprs) >= 2 {
		m, ok1 := exprs[0].(*expr.Meta)
		c, ok2 := exprs[1].(*expr.Cmp)
		if ok1 && ok2 && m.Key == expr.MetaKeyNFPROTO && c.Op == expr.CmpOpEq && len(c.Data) == 1 &&
			(c.Data[0] == unix.NFPROTO_IPV4 || c.Data[0] == unix.NFPROTO_IPV6) {
			return c.Data[0]
		}
	}
	return 0
}

func sameChains(have, want []*nftables.Chain) bool {
	if len(have) != len(want) {
		return false
	}
	for _, w := range want {
		i := slices.IndexFunc(have, func(h *nftables.Chain) bool { return h.Name == w.Name })
		if i < 0 {
			return false
		}
		h := have[i]
		if h.Type != w.Type || !sameRef(h.Hooknum, w.Hooknum) || !sameRef(h.Priority, w.Priority) || !sameRef(h.Policy, w.Policy) {
			return false
		}
	}
	return true
}

func sameRef[T comparable](a, b *T) bool {
	return (a == nil) == (b == nil) && (a == nil || *a == *b)
}

// sameRules compares rules read from the kernel with wanted ones: the same
// expressions (counters' values aside) and comments, in the same order.
func sameRules(have []*nftables.Rule, want []nftRule) bool {
	if len(have) != len(want) {
		return false
	}
	for i, h := range have {
		if !bytes.Equal(h.UserData, ruleUserData(want[i].comment)) || !reflect.DeepEqual(zeroCounters(h.Exprs), want[i].exprs) {
			return false
		}
	}
	return true
}

func zeroCounters(exprs []expr.Any) []expr.Any {
	out := make([]expr.Any, len(exprs))
	for i, e := range exprs {
		if _, ok := e.(*expr.Counter); ok {
			e = &expr.Counter{}
		}
		out[i] = e
	}
	return out
}

func ruleUserData(comment string) []byte {
	return userdata.AppendString(nil, userdata.TypeComment, comment)
}

// replaceNFTable replaces twill's table by one holding want, in one
// transaction: the table is added (a no-op when it exists), deleted, and
// made anew with its chains and rules.
func replaceNFTable(conn *nftables.Conn, want []nftRule) error {
	conn.AddTable(nftTable)
	conn.DelTable(nftTable)
	conn.AddTable(nftTable)
	chains := map[string]*nftables.Chain{}
	for _, c := range nftChains() {
		chains[c.Name] = conn.AddChain(c)
	}
	for _, r := range want {
		conn.AddRule(&nftables.Rule{Table: nftTable, Chain: chains[r.chain], Exprs: r.exprs, UserData: ruleUserData(r.comment)})
	}
	return conn.Flush()
}

// CleanupNFTables deletes twill's table, when there is one, in the network
// namespace of the calling process, and says whether there was. A kernel
// without nf_tables has none.
func CleanupNFTables(ctx context.Context) (removed bool, err error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	conn, err := nftables.New()
	if err != nil {
		return false, fmt.Errorf("masq: nftables: %w", err)
	}
	tables, err := conn.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		if errors.Is(err, unix.EAFNOSUPPORT) || errors.Is(err, unix.EPROTONOSUPPORT) {
			return false, nil
		}
		return false, fmt.Errorf("masq: nftables: list tables: %w", err)
	}
	if !slices.ContainsFunc(tables, func(t *nftables.Table) bool { return t.Name == NFTablesTable }) {
		return false, nil
	}
	conn.DelTable(nftTable)
	if err := conn.Flush(); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil // deleted meanwhile
		}
		return false, fmt.Errorf("masq: delete table inet %s: %w", NFTablesTable, err)
	}
	return true, nil
}

// IPTablesMayHoldChains says whether twill's iptables chains of a family
// (ip6tables' when v6) may exist, without running iptables, which on a host
// with the legacy iptables would load its kernel modules just to look:
// iptables-nft keeps its chains in nf_tables (tables of family ip or ip6),
// where they are listed here; the legacy iptables has tables only while its
// module is loaded, and lists them in /proc/net/ip_tables_names (or
// ip6_tables_names). When it cannot tell, the answer is true.
func IPTablesMayHoldChains(v6 bool) bool {
	names, family := "/proc/net/ip_tables_names", nftables.TableFamilyIPv4
	if v6 {
		names, family = "/proc/net/ip6_tables_names", nftables.TableFamilyIPv6
	}
	if b, err := os.ReadFile(names); err == nil && len(bytes.TrimSpace(b)) > 0 {
		return true // legacy tables are loaded: only iptables can list them
	}
	conn, err := nftables.New()
	if err != nil {
		return true
	}
	chains, err := conn.ListChainsOfTableFamily(family)
	if err != nil {
		return true
	}
	return slices.ContainsFunc(chains, func(c *nftables.Chain) bool { return strings.HasPrefix(c.Name, "TWILL-") })
}
