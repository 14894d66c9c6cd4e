package masq

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// The nftables kernel tests write twill's table in network namespaces of
// their own and look at it with the nft program, as an operator would.

// nftList returns `nft list table inet twill` without counters' values, or
// "" when there is no such table.
func nftList() (string, error) {
	out, err := run("nft", "list", "tables", "inet")
	if err != nil || !strings.Contains(out, "table inet "+NFTablesTable+"\n") {
		return "", err
	}
	return run("nft", "list", "table", "inet", NFTablesTable)
}

// wantNFT is the table nft prints for testCfg and testCfg6, counters aside.
var wantNFT = []string{
	"chain postrouting {",
	"type nat hook postrouting priority srcnat; policy accept;",
	`meta mark & 0x00004000 == 0x00004000 return comment "twill: kube-proxy masquerades marked packets itself"`,
	`ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return comment "twill: pod to pod keeps its address"`,
	`ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 counter packets 0 bytes 0 masquerade fully-random comment "twill: pods leaving the cluster network"`,
	`ip saddr != 10.244.0.0/16 ip daddr 10.244.7.0/24 return comment "twill: replies come back through this node"`,
	`ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 counter packets 0 bytes 0 masquerade fully-random comment "twill: forwarded to pods on other nodes"`,
	`ip6 saddr fd00:10:244::/56 ip6 daddr fd00:10:244::/56 return comment "twill: pod to pod keeps its address"`,
	`ip6 saddr fd00:10:244::/56 ip6 daddr != ff00::/8 counter packets 0 bytes 0 masquerade fully-random comment "twill: pods leaving the cluster network"`,
	`ip6 saddr != fd00:10:244::/56 ip6 daddr fd00:10:244:7::/64 return comment "twill: replies come back through this node"`,
	`ip6 saddr != fd00:10:244::/56 ip6 daddr fd00:10:244::/56 counter packets 0 bytes 0 masquerade fully-random comment "twill: forwarded to pods on other nodes"`,
	"chain forward {",
	"type filter hook forward priority filter; policy accept;",
	`ip saddr 10.244.0.0/16 counter packets 0 bytes 0 accept comment "twill: from the cluster network"`,
	`ip daddr 10.244.0.0/16 counter packets 0 bytes 0 accept comment "twill: to the cluster network"`,
	`ip6 saddr fd00:10:244::/56 counter packets 0 bytes 0 accept comment "twill: from the cluster network"`,
	`ip6 daddr fd00:10:244::/56 counter packets 0 bytes 0 accept comment "twill: to the cluster network"`,
}

// checkNFT says how nft's listing differs from want, line by line.
func checkNFT(listing string, want []string) error {
	var got []string
	for _, l := range strings.Split(listing, "\n") {
		l = strings.TrimSpace(l)
		if l == "" || l == "}" || strings.HasPrefix(l, "table inet ") {
			continue
		}
		got = append(got, l)
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		return fmt.Errorf("nft lists\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	return nil
}

type nftWrites struct{ v4, v6 uint64 }

func writesOf(n *NFTables) nftWrites { return nftWrites{n.Writes(false), n.Writes(true)} }

// One table holds both families' rules, as nft shows them; a second Ensure
// writes nothing; a change by hand to one family's rules is put right and
// counted for that family only; a change that is no family's (the table
// flushed, a chain's priority, a rule added) for both; CleanupNFTables
// leaves nothing.
func TestKernelNFTablesEnsureRepairAndCleanup(t *testing.T) {
	ctx := context.Background()
	cfgs := []Config{testCfg, testCfg6}
	inNetNS(t, "nft")(func() error {
		n, err := NewNFTables(nil)
		if err != nil {
			return err
		}
		ensure := func(what string, want nftWrites) error {
			if err := n.Ensure(ctx, cfgs); err != nil {
				return fmt.Errorf("%s: %w", what, err)
			}
			if got := writesOf(n); got != want {
				return fmt.Errorf("%s: writes (IPv4, IPv6) %v, want %v", what, got, want)
			}
			listing, err := nftList()
			if err != nil {
				return err
			}
			if err := checkNFT(listing, wantNFT); err != nil {
				return fmt.Errorf("%s: %w", what, err)
			}
			return nil
		}
		if err := ensure("first Ensure", nftWrites{1, 1}); err != nil {
			return err
		}
		if err := ensure("second Ensure", nftWrites{1, 1}); err != nil {
			return err
		}
		// A handle is what nft needs to delete one rule.
		handleOf := func(chain, match string) (string, error) {
			out, err := run("nft", "-a", "list", "chain", "inet", NFTablesTable, chain)
			if err != nil {
				return "", err
			}
			for _, l := range strings.Split(out, "\n") {
				if strings.Contains(l, match) {
					if i := strings.LastIndex(l, "# handle "); i >= 0 {
						return strings.TrimSpace(l[i+len("# handle "):]), nil
					}
				}
			}
			return "", fmt.Errorf("no rule with %q in\n%s", match, out)
		}
		steps := []struct {
			what string
			nft  func() error
			want nftWrites
		}{
			{"an IPv6 rule deleted", func() error {
				h, err := handleOf("postrouting", "ip6 daddr != ff00::/8")
				if err == nil {
					_, err = run("nft", "delete", "rule", "inet", NFTablesTable, "postrouting", "handle", h)
				}
				return err
			}, nftWrites{1, 2}},
			{"an IPv4 rule changed", func() error {
				h, err := handleOf("forward", "ip daddr 10.244.0.0/16")
				if err == nil {
					_, err = run("nft", "replace", "rule", "inet", NFTablesTable, "forward", "handle", h, "ip", "daddr", "10.244.0.0/16", "drop")
				}
				return err
			}, nftWrites{2, 2}},
			{"a rule added", func() error {
				_, err := run("nft", "add", "rule", "inet", NFTablesTable, "forward", "tcp", "dport", "22", "drop")
				return err
			}, nftWrites{3, 3}},
			{"the table flushed", func() error {
				_, err := run("nft", "flush", "table", "inet", NFTablesTable)
				return err
			}, nftWrites{4, 4}},
			{"a chain of another priority", func() error {
				if _, err := run("nft", "delete", "chain", "inet", NFTablesTable, "forward"); err != nil {
					return err
				}
				_, err = run("nft", "add", "chain", "inet", NFTablesTable, "forward", "{ type filter hook forward priority 10 ; }")
				return err
			}, nftWrites{5, 5}},
			{"the table deleted", func() error {
				_, err := run("nft", "delete", "table", "inet", NFTablesTable)
				return err
			}, nftWrites{6, 6}},
		}
		for _, s := range steps {
			if err := s.nft(); err != nil {
				return fmt.Errorf("%s: %w", s.what, err)
			}
			if err := ensure(s.what, s.want); err != nil {
				return err
			}
		}

		// A new subnet changes the IPv4 rules only.
		moved := testCfg
		moved.Subnet = netip.MustParsePrefix("10.244.9.0/24")
		if err := n.Ensure(ctx, []Config{moved, testCfg6}); err != nil {
			return err
		}
		if got := writesOf(n); got != (nftWrites{7, 6}) {
			return fmt.Errorf("after the subnet moved: writes %v, want {7 6}", got)
		}
		// An IPv4-only network drops the IPv6 rules.
		if err := n.Ensure(ctx, []Config{moved}); err != nil {
			return err
		}
		listing, err := nftList()
		if err != nil {
			return err
		}
		if strings.Contains(listing, "ip6 ") || !strings.Contains(listing, "ip daddr 10.244.9.0/24 return") {
			return fmt.Errorf("IPv4-only after dual-stack:\n%s", listing)
		}

		if removed, err := CleanupNFTables(ctx); err != nil || !removed {
			return fmt.Errorf("CleanupNFTables: removed %v, %v", removed, err)
		}
		if listing, err := nftList(); err != nil || listing != "" {
			return fmt.Errorf("after CleanupNFTables: %q, %v", listing, err)
		}
		// Again, with nothing to remove.
		if removed, err := CleanupNFTables(ctx); err != nil || removed {
			return fmt.Errorf("CleanupNFTables again: removed %v, %v", removed, err)
		}
		return nil
	})
}

// Pod traffic of both families that leaves the cluster network is
// masqueraded on the wire by the nftables rules, and replies come back;
// a flow kube-proxy marked (0x4000) keeps the pod's address, for
// kube-proxy to masquerade: twill does not do it first.
//
//	pod ns                   node ns                          world ns
//	eth0 10.244.7.2       -- pod0 10.244.7.1
//	     fd00:10:244:7::2        fd00:10:244:7::1
//	                         out0 198.18.0.1       -- eth0 198.18.0.2
//	                              fd00:198:18::1           fd00:198:18::2
func TestKernelNFTablesMasqueradeOnTheWire(t *testing.T) {
	requirePrograms(t, "ip", "nft")
	pod, node, world := newNetNS(t), newNetNS(t), newNetNS(t)
	var (
		pod4, nodePod4, nodeOut4, world4 = netip.MustParseAddr("10.244.7.2"), netip.MustParseAddr("10.244.7.1"), netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("198.18.0.2")
	)
	ip := func(n ns.NetNS, cmds ...string) {
		t.Helper()
		doIn(t, n, func() error {
			for _, c := range cmds {
				if _, err := run("ip", strings.Fields(c)...); err != nil {
					return err
				}
			}
			return nil
		})
	}
	for _, n := range []ns.NetNS{pod, node, world} {
		doIn(t, n, func() error {
			return os.WriteFile("/proc/sys/net/ipv6/conf/default/accept_dad", []byte("0"), 0o644)
		})
	}
	ip(node, "link set lo up",
		"link add pod0 type veth peer name eth0 netns "+pod.Path(),
		"link add out0 type veth peer name eth0 netns "+world.Path(),
		"addr add "+nodePod4.String()+"/24 dev pod0", "addr add "+wireNodePod.String()+"/64 dev pod0",
		"addr add "+nodeOut4.String()+"/24 dev out0", "addr add "+wireNodeOut.String()+"/64 dev out0",
		"link set pod0 up", "link set out0 up")
	ip(pod, "link set lo up",
		"addr add "+pod4.String()+"/24 dev eth0", "addr add "+wirePod.String()+"/64 dev eth0",
		"link set eth0 up",
		"route add default via "+nodePod4.String(), "-6 route add default via "+wireNodePod.String())
	ip(world, "link set lo up",
		"addr add "+world4.String()+"/24 dev eth0", "addr add "+wireWorld.String()+"/64 dev eth0",
		"link set eth0 up")
	doIn(t, node, EnableIPForward)
	doIn(t, node, EnableIPv6Forward)

	udp := func(n ns.NetNS, a netip.AddrPort) *net.UDPConn {
		t.Helper()
		var c *net.UDPConn
		doIn(t, n, func() (err error) {
			c, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(a))
			return err
		})
		t.Cleanup(func() { c.Close() })
		return c
	}
	doIn(t, node, func() error {
		n, err := NewNFTables(nil)
		if err != nil {
			return err
		}
		return n.Ensure(context.Background(), []Config{testCfg, testCfg6})
	})

	for _, c := range []struct {
		family           string
		pod, world, node netip.Addr
	}{
		{"IPv4", pod4, world4, nodeOut4},
		{"IPv6", wirePod, wireWorld, wireNodeOut},
	} {
		worldConn := udp(world, netip.AddrPortFrom(c.world, 7777))
		podConn := udp(pod, netip.AddrPortFrom(c.pod, 0))
		src, err := sendFromPod(podConn, worldConn, "masqueraded", 10*time.Second)
		if err != nil {
			t.Fatalf("%s: %v", c.family, err)
		}
		if src.Addr() != c.node {
			t.Fatalf("%s: the world saw source %s, want the node's %s (masquerade)", c.family, src, c.node)
		}
		if _, err := worldConn.WriteToUDPAddrPort([]byte("reply"), src); err != nil {
			t.Fatal(err)
		}
		if _, err := readPayload(podConn, "reply", 5*time.Second); err != nil {
			t.Fatalf("%s: the reply to the masqueraded address did not reach the pod: %v", c.family, err)
		}
	}

	// kube-proxy marks, in its own table, the packets it will masquerade
	// itself; this one masquerades nothing, so a marked packet that twill
	// left alone arrives with the pod's address.
	doIn(t, node, func() error {
		_, err := run("nft", "add table inet kubeproxy-like; "+
			"add chain inet kubeproxy-like marking { type filter hook forward priority -10 ; } ; "+
			"add rule inet kubeproxy-like marking udp dport 7778 meta mark set mark or 0x4000")
		return err
	})
	for _, c := range []struct {
		family     string
		pod, world netip.Addr
	}{{"IPv4", pod4, world4}, {"IPv6", wirePod, wireWorld}} {
		worldConn := udp(world, netip.AddrPortFrom(c.world, 7778))
		src, err := sendFromPod(udp(pod, netip.AddrPortFrom(c.pod, 0)), worldConn, "marked", 10*time.Second)
		if err != nil {
			t.Fatalf("%s marked: %v", c.family, err)
		}
		if src.Addr() != c.pod {
			t.Errorf("%s: a packet with kube-proxy's mark left with source %s, want the pod's %s (twill must leave it to kube-proxy)", c.family, src, c.pod)
		}
	}
}
