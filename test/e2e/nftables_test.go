package e2e

import (
	"bufio"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/subnet"
)

// nftTable is twill's nftables table as nft lists it in a namespace, "" when
// there is none.
func nftTable(t *testing.T, netns string) string {
	t.Helper()
	ctx := ctxFor(t, 30*time.Second)
	out, err := lab.InNS(ctx, netns, "nft", "list", "tables", "inet")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "table inet twill\n") {
		return ""
	}
	if out, err = lab.InNS(ctx, netns, "nft", "list", "table", "inet", "twill"); err != nil {
		if strings.Contains(err.Error(), "No such file or directory") {
			return "" // deleted after the listing of tables
		}
		t.Fatal(err)
	}
	return out
}

var nftCounter = regexp.MustCompile(`counter packets \d+ bytes \d+`)

// withoutCounts drops the counters' values from nft's listing.
func withoutCounts(listing string) string {
	return nftCounter.ReplaceAllString(listing, "counter")
}

// iptablesMentionsTwill says whether iptables or ip6tables (v6) has any of
// twill's chains in a namespace.
func iptablesMentionsTwill(t *testing.T, netns string, v6 bool) bool {
	t.Helper()
	for _, table := range []string{"nat", "filter"} {
		var out string
		if v6 {
			out = ip6tablesS(t, netns, table, "")
		} else {
			out = iptables(t, netns, "-t", table, "-S")
		}
		if strings.Contains(out, "TWILL") {
			return true
		}
	}
	return false
}

// tcpdumpSource captures on every interface of a namespace the first packet
// that matches filter while send runs, and returns its source address as
// tcpdump printed it.
func tcpdumpSource(t *testing.T, netns, filter string, send func()) netip.Addr {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", netns, "tcpdump", "-l", "-n", "-i", "any", "-c", "1"}, strings.Fields(filter)...)...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	cmd.Stdout = &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("tcpdump: %v", err)
	}
	// tcpdump says "listening on ..." once it captures.
	listening := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		var lines []string
		for sc.Scan() {
			lines = append(lines, sc.Text())
			if strings.Contains(sc.Text(), "listening on") {
				listening <- ""
			}
		}
		listening <- strings.Join(lines, "\n")
	}()
	if msg := <-listening; msg != "" {
		t.Fatalf("tcpdump did not start: %s", msg)
	}
	send()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("tcpdump captured nothing matching %q: %v", filter, err)
	}
	// "... IP 198.18.0.1 > 198.18.0.254: ICMP echo request ..." (IP6 for IPv6)
	f := strings.Fields(out.String())
	for i := 0; i+1 < len(f); i++ {
		if f[i] == "IP" || f[i] == "IP6" {
			a, err := netip.ParseAddr(f[i+1])
			if err != nil {
				t.Fatalf("tcpdump printed %q", out.String())
			}
			return a
		}
	}
	t.Fatalf("no source address in tcpdump's %q", out.String())
	return netip.Addr{}
}

// With "EnableNFTables": true twill's rules are the table inet twill and
// nothing of them is in iptables or ip6tables; pods reach each other with
// their own addresses and leave the cluster network with their host's
// (seen on the underlay by tcpdump, and by the receiver), in both families,
// over both backends.
func TestNFTablesDatapath(t *testing.T) {
	for _, backend := range []string{"vxlan", "host-gw"} {
		t.Run(backend, func(t *testing.T) {
			l := newLab(t, lab.Options{Hosts: 2, PodsPerHost: 1, Backend: backend, IPMasq: true, NFTables: true, IPFamily: "dual"})
			ctx := ctxFor(t, 2*time.Minute)
			topo := l.Topology()
			h1 := topo.HostNS(1)
			for i := 1; i <= 2; i++ {
				waitFamilyEntries(t, l, i, false, 10*time.Second)
				waitFamilyEntries(t, l, i, true, 10*time.Second)
			}
			requireMatrix(t, l)

			table := nftTable(t, h1)
			for _, want := range []string{"chain postrouting", "ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 counter", "ip6 saddr fd00:10:244::/56 ip6 daddr != ff00::/8 counter", "masquerade fully-random", "chain forward"} {
				if !strings.Contains(table, want) {
					t.Fatalf("h1's table inet twill lacks %q:\n%s", want, table)
				}
			}
			for _, v6 := range []bool{false, true} {
				if iptablesMentionsTwill(t, h1, v6) {
					t.Fatalf("nftables mode left twill's chains in %s", subnet.FamilyName(v6))
				}
			}

			a, b := podsOn(l, 1)[0], podsOn(l, 2)[0]
			for _, c := range []struct {
				v6    bool
				world netip.Addr
				host  netip.Addr
			}{
				{false, lab.WorldAddr, topo.HostAddr(1)},
				{true, lab.WorldAddrV6, topo.HostAddrV6(1)},
			} {
				fam := subnet.FamilyName(c.v6)
				if src := tcpTransfer(t, a.NS, b.NS, b.AddrOf(c.v6), 1<<20); src != a.AddrOf(c.v6) {
					t.Fatalf("%s pod to pod: the receiver saw source %s, want the pod's %s", fam, src, a.AddrOf(c.v6))
				}
				if src := tcpTransfer(t, a.NS, topo.UnderlayNS(), c.world, 64<<10); src != c.host {
					t.Fatalf("%s pod to outside: the receiver saw source %s, want h1's %s (masquerade)", fam, src, c.host)
				}
				proto := "icmp"
				if c.v6 {
					proto = "icmp6"
				}
				src := tcpdumpSource(t, topo.UnderlayNS(), proto+" and dst host "+c.world.String(), func() {
					// Bounded: three echoes, a second each at most.
					if out, err := lab.InNS(ctx, a.NS, "ping", "-c", "3", "-i", "0.2", "-W", "1", c.world.String()); err != nil {
						t.Errorf("%s ping from the pod to the outside: %v\n%s", fam, err, out)
					}
				})
				if src != c.host {
					t.Fatalf("%s: the underlay carried the pod's echo request with source %s, want h1's %s", fam, src, c.host)
				}
			}
		})
	}
}

// nftables drift (a rule deleted, the table flushed) is repaired within a
// resync and counted by family in twill_repairs_total{kind="nftables"}; a
// restart that finds the table right writes nothing, so its counters keep
// counting.
func TestNFTablesDriftAndRestart(t *testing.T) {
	l := newLab(t, lab.Options{Hosts: 2, PodsPerHost: 1, Backend: "vxlan", IPMasq: true, NFTables: true, IPFamily: "dual",
		DaemonArgs: []string{"--resync-interval", "1s"}})
	ctx := ctxFor(t, 2*time.Minute)
	h1 := l.Topology().HostNS(1)
	waitFamilyEntries(t, l, 1, false, 10*time.Second)
	waitFamilyEntries(t, l, 1, true, 10*time.Second)
	repairs := func(family string) float64 {
		return metric(t, h1, `twill_repairs_total{family="`+family+`",kind="nftables"}`)
	}
	if r4, r6 := repairs("ipv4"), repairs("ipv6"); r4 != 0 || r6 != 0 {
		t.Fatalf("nftables repairs before any drift: IPv4 %v, IPv6 %v", r4, r6)
	}
	want := withoutCounts(nftTable(t, h1))
	restored := func(what string, r4, r6 float64) {
		t.Helper()
		waitFor(t, what+": the table restored and counted", 10*time.Second, func() error {
			if got := withoutCounts(nftTable(t, h1)); got != want {
				return fmt.Errorf("table inet twill:\n%s\nwant\n%s", got, want)
			}
			if g4, g6 := repairs("ipv4"), repairs("ipv6"); g4 != r4 || g6 != r6 {
				return fmt.Errorf("repairs IPv4 %v, IPv6 %v; want %v, %v", g4, g6, r4, r6)
			}
			return nil
		})
	}

	// One IPv6 rule deleted: an IPv6 repair only.
	out, err := lab.InNS(ctx, h1, "nft", "-a", "list", "chain", "inet", "twill", "postrouting")
	if err != nil {
		t.Fatal(err)
	}
	handle := ""
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "ip6 daddr != ff00::/8") {
			handle = line[strings.LastIndex(line, " ")+1:]
		}
	}
	if handle == "" {
		t.Fatalf("no IPv6 masquerade rule in\n%s", out)
	}
	if out, err := lab.InNS(ctx, h1, "nft", "delete", "rule", "inet", "twill", "postrouting", "handle", handle); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	restored("an IPv6 rule deleted", 0, 1)

	// The table flushed: both families.
	if out, err := lab.InNS(ctx, h1, "nft", "flush", "table", "inet", "twill"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	restored("the table flushed", 1, 2)

	// Traffic through the forward chain, then a SIGKILL and a restart.
	a, b := podsOn(l, 1)[0], podsOn(l, 2)[0]
	tcpTransfer(t, a.NS, b.NS, b.Addr, 256<<10)
	forwarded := func() int {
		n := 0
		for _, m := range regexp.MustCompile(`counter packets (\d+)`).FindAllStringSubmatch(nftTable(t, h1), -1) {
			var v int
			fmt.Sscan(m[1], &v)
			n += v
		}
		return n
	}
	before := forwarded()
	if before == 0 {
		t.Fatal("the table's counters counted nothing of a pod-to-pod transfer")
	}
	logBefore, _ := os.ReadFile(l.DaemonLog(1))
	if err := l.KillDaemon(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if err := l.StartDaemon(1); err != nil {
		t.Fatal(err)
	}
	waitReconciles(t, l, []int{1}, 3, 20*time.Second)
	if after := forwarded(); after < before {
		t.Errorf("the counters went from %d to %d over a restart: the table was replaced", before, after)
	}
	if r4, r6 := repairs("ipv4"), repairs("ipv6"); r4 != 0 || r6 != 0 {
		t.Errorf("the restarted twilld counted repairs: IPv4 %v, IPv6 %v", r4, r6)
	}
	if log, _ := os.ReadFile(l.DaemonLog(1)); len(log) < len(logBefore) || strings.Contains(string(log[len(logBefore):]), "table differs") {
		t.Errorf("the restarted twilld replaced the table:\n%s", tail(string(log), 30))
	}
	requireMatrix(t, l)
}

// Switching a running cluster from iptables to nftables and back: a node
// restarted with the other setting removes the rules of the mode it left
// on its first pass, and still masquerades.
func TestMasqModeSwitch(t *testing.T) {
	l := newLab(t, lab.Options{Hosts: 2, PodsPerHost: 1, Backend: "vxlan", IPMasq: true})
	ctx := ctxFor(t, 2*time.Minute)
	topo := l.Topology()
	h1 := topo.HostNS(1)
	waitCounts(t, l, 1, expected("vxlan", 1), 10*time.Second)
	if !iptablesMentionsTwill(t, h1, false) || nftTable(t, h1) != "" {
		t.Fatal("with iptables installed and EnableNFTables not set, twilld did not choose iptables")
	}
	a := podsOn(l, 1)[0]
	for _, step := range []struct {
		conf      string
		nftables  bool
		wantInLog string
	}{
		{`{"Network":"10.244.0.0/16","EnableNFTables":true,"Backend":{"Type":"vxlan"}}`, true, "EnableNFTables is true"},
		{`{"Network":"10.244.0.0/16","EnableNFTables":false,"Backend":{"Type":"vxlan"}}`, false, "EnableNFTables is false"},
	} {
		path := l.HostDir(1) + "/net-conf.json"
		if err := os.WriteFile(path, []byte(step.conf), 0o644); err != nil {
			t.Fatal(err)
		}
		if out, err := l.Ctl(ctx, "config", "set", "--file", path); err != nil {
			t.Fatalf("config set: %v\n%s", err, out)
		}
		if err := l.StopDaemon(ctx, 1); err != nil {
			t.Fatal(err)
		}
		if err := l.StartDaemon(1); err != nil {
			t.Fatal(err)
		}
		waitFor(t, fmt.Sprintf("h1 to switch to nftables=%t", step.nftables), 20*time.Second, func() error {
			inIPT, inNFT := iptablesMentionsTwill(t, h1, false), nftTable(t, h1) != ""
			if inIPT == step.nftables || inNFT != step.nftables {
				return fmt.Errorf("twill's iptables chains: %t, nftables table: %t", inIPT, inNFT)
			}
			return nil
		})
		if log, _ := os.ReadFile(l.DaemonLog(1)); !strings.Contains(string(log), step.wantInLog) {
			t.Errorf("h1's log does not say why it chose its mode (%q)", step.wantInLog)
		}
		if src := tcpTransfer(t, a.NS, topo.UnderlayNS(), lab.WorldAddr, 64<<10); src != topo.HostAddr(1) {
			t.Fatalf("nftables=%t: pod to outside seen from %s, want h1's %s", step.nftables, src, topo.HostAddr(1))
		}
	}
}

// A host without the iptables program: with EnableNFTables not set, twilld
// chooses nftables by itself, says why, and masquerades.
func TestNoIPTablesProgram(t *testing.T) {
	empty := t.TempDir() // a PATH with no program in it
	l := newLab(t, lab.Options{Hosts: 2, PodsPerHost: 1, Backend: "vxlan", IPMasq: true, DaemonEnv: []string{"PATH=" + empty}})
	topo := l.Topology()
	waitCounts(t, l, 1, expected("vxlan", 1), 10*time.Second)
	requireMatrix(t, l)
	if log, _ := os.ReadFile(l.DaemonLog(1)); !strings.Contains(string(log), "iptables is not installed") || !strings.Contains(string(log), "mode=nftables") {
		t.Fatalf("h1's log does not say it chose nftables for want of iptables:\n%s", tail(string(log), 20))
	}
	if nftTable(t, topo.HostNS(1)) == "" || iptablesMentionsTwill(t, topo.HostNS(1), false) {
		t.Fatal("h1 without iptables: want twill's nftables table and no iptables chains")
	}
	a := podsOn(l, 1)[0]
	if src := tcpTransfer(t, a.NS, topo.UnderlayNS(), lab.WorldAddr, 64<<10); src != topo.HostAddr(1) {
		t.Fatalf("pod to outside seen from %s, want h1's %s (masquerade)", src, topo.HostAddr(1))
	}
}
