package e2e

// The wireguard backend on the real kernel. This machine's kernel may have
// no WireGuard; twilld then runs wireguard-go, and the lab gives each host's
// twilld (and so its wireguard-go) a /run/wireguard of its own
// (internal/tools/lab/wireguard.go).

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/subnet"
)

func requireWireGuard(t *testing.T) {
	t.Helper()
	for _, bin := range []string{"wg", "tcpdump", "unshare"} {
		if _, err := exec.LookPath(bin); err != nil {
			missingTool(t, bin+" not found")
		}
	}
	if _, err := exec.LookPath("wireguard-go"); err != nil {
		if _, err := os.Stat("/sys/module/wireguard"); err != nil {
			missingTool(t, "neither the kernel's WireGuard nor wireguard-go (apt-get install wireguard-go)")
		}
	}
}

func missingTool(t *testing.T, msg string) {
	t.Helper()
	if os.Getenv("TWILL_REQUIRE_ALL") == "1" {
		t.Fatalf("%s (TWILL_REQUIRE_ALL=1: this test must run)", msg)
	}
	t.Skip(msg)
}

// newWireGuardLab is newLab for the wireguard backend, which also checks,
// after `lab down` at the end of the test, that no wireguard-go of the lab
// is left.
func newWireGuardLab(t *testing.T, o lab.Options) *lab.Lab {
	t.Helper()
	requireWireGuard(t)
	o.Backend = subnet.BackendWireGuard
	o.DaemonArgs = append(o.DaemonArgs, "--resync-interval", "1s")
	return newLab(t, o)
}

// downWireGuardLab takes the lab down before the test ends and checks that
// none of its wireguard-go processes is left (the cleanup's own `lab down`
// then finds nothing to do).
func downWireGuardLab(t *testing.T, l *lab.Lab) {
	t.Helper()
	if err := l.Down(ctxFor(t, time.Minute), false); err != nil {
		t.Fatalf("lab down: %v", err)
	}
	for i := 1; i <= l.Hosts; i++ {
		if pids, err := l.WireGuardPIDs(i); err != nil || len(pids) > 0 {
			t.Errorf("after lab down, wireguard-go of h%d: %v (%v)", i, pids, err)
		}
	}
}

// wg runs wg for host i in its view of /run/wireguard.
func wg(t *testing.T, l *lab.Lab, i int, args ...string) string {
	t.Helper()
	out, err := l.WG(ctxFor(t, 30*time.Second), i, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// publicKey is host i's public key, as its device has it.
func publicKey(t *testing.T, l *lab.Lab, i int, dev string) string {
	t.Helper()
	return strings.TrimSpace(wg(t, l, i, "show", dev, "public-key"))
}

// wgPeerKeys lists the peers' keys of host i's device.
func wgPeerKeys(t *testing.T, l *lab.Lab, i int, dev string) []string {
	t.Helper()
	keys := strings.Fields(wg(t, l, i, "show", dev, "peers"))
	slices.Sort(keys)
	return keys
}

// wgWrites is twill_kernel_writes_total of host i's twilld by kind, for
// the wireguard backend.
func wgWrites(t *testing.T, l *lab.Lab, i int, family string) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	for _, k := range []string{"route", "device", "peer"} {
		out[k] = metric(t, l.Topology().HostNS(i), `twill_kernel_writes_total{family="`+family+`",kind="`+k+`"}`)
	}
	return out
}

func wgPIDs(t *testing.T, l *lab.Lab, i int) []int {
	t.Helper()
	pids, err := l.WireGuardPIDs(i)
	if err != nil {
		t.Fatal(err)
	}
	return pids
}

// A three-host lab over the wireguard backend with wireguard-go:
//   - pods reach each other across hosts (ping, TCP) with their own
//     addresses; each host has one route and one peer per other host, and
//     its own wireguard-go with its socket in its own folder;
//   - on the underlay, a pod-to-pod transfer is nothing but UDP between the
//     hosts' port 51820, and its payload is not in it (while a capture in
//     the receiving pod sees it);
//   - twilld SIGKILLed and started again finds the device, its peers and
//     routes in place: no ping lost, no kernel write;
//   - a peer removed with wg, a route deleted and the device deleted come
//     back within a resync, counted as repairs;
//   - a node's new key reaches its peers;
//   - twilld --cleanup removes the device, and wireguard-go exits with it;
//   - lab down leaves no wireguard-go.
func TestWireGuard(t *testing.T) {
	const hosts = 3
	l := newWireGuardLab(t, lab.Options{Hosts: hosts, PodsPerHost: 1, IPMasq: true})
	ctx := ctxFor(t, 3*time.Minute)
	const dev = "twill-wg"
	for i := 1; i <= hosts; i++ {
		waitCounts(t, l, i, lab.HostCounts{Routes: hosts - 1, Peers: hosts - 1}, 10*time.Second)
		if env := hostEnv(t, l, i); env.MTU != 1500-60 {
			t.Errorf("h%d: pod MTU %d, want 1440 (1500 less WireGuard's 60 over IPv4)", i, env.MTU)
		}
		if pids := wgPIDs(t, l, i); len(pids) != 1 {
			t.Fatalf("h%d: wireguard-go processes %v, want one", i, pids)
		}
		if _, err := os.Stat(filepath.Join(l.WireGuardDir(i), dev+".sock")); err != nil {
			t.Fatalf("h%d: no control socket in its own folder: %v", i, err)
		}
	}
	requireWGMatrix(t, l)
	a, b := podsOn(l, 1)[0], podsOn(l, 3)[0]
	if src := tcpTransfer(t, a.NS, b.NS, b.Addr, 4<<20); src != a.Addr {
		t.Fatalf("pod to pod: the receiver saw source %s, want the pod's %s", src, a.Addr)
	}

	t.Run("encrypted on the underlay", func(t *testing.T) {
		requireEncrypted(t, l, a, b, false, 51820)
	})

	t.Run("restart", func(t *testing.T) {
		peerWrites := map[int]map[string]float64{2: wgWrites(t, l, 2, "ipv4"), 3: wgWrites(t, l, 3, "ipv4")}
		wgPid := wgPIDs(t, l, 1)
		pings := crossPings(t, l, hosts)
		if err := l.KillDaemon(ctx, 1); err != nil {
			t.Fatal(err)
		}
		waitReconciles(t, l, []int{2}, 2, 10*time.Second)
		if err := l.StartDaemon(1); err != nil {
			t.Fatal(err)
		}
		waitReconciles(t, l, []int{1}, 2, 20*time.Second)
		if w := wgWrites(t, l, 1, "ipv4"); w["route"] != 0 || w["device"] != 0 || w["peer"] != 0 {
			t.Errorf("the restarted twilld wrote to the kernel: %v; want nothing", w)
		}
		for i, before := range peerWrites {
			if w := wgWrites(t, l, i, "ipv4"); fmt.Sprint(w) != fmt.Sprint(before) {
				t.Errorf("h%d wrote while h1 restarted: %v -> %v", i, before, w)
			}
		}
		if again := wgPIDs(t, l, 1); !slices.Equal(again, wgPid) {
			t.Errorf("wireguard-go of h1 %v before the restart, %v after: want the same process", wgPid, again)
		}
		requireNoLoss(t, "twilld SIGKILL and restart", pings)
	})

	t.Run("drift", func(t *testing.T) {
		h1 := l.Topology().HostNS(1)
		repairs := func(kind string) float64 {
			return metric(t, h1, `twill_repairs_total{family="ipv4",kind="`+kind+`"}`)
		}
		peers, routes, devices := repairs("peer"), repairs("route"), repairs("device")
		h2key := publicKey(t, l, 2, dev)
		wg(t, l, 1, "set", dev, "peer", h2key, "remove")
		ipn(t, h1, "route", "del", hostEnv(t, l, 3).Subnet.Masked().String())
		waitCounts(t, l, 1, lab.HostCounts{Routes: hosts - 1, Peers: hosts - 1}, 10*time.Second)
		waitFor(t, "the repairs to be counted", 5*time.Second, func() error {
			if p, r := repairs("peer"), repairs("route"); p < peers+1 || r < routes+1 {
				return fmt.Errorf("peer repairs %v -> %v, route repairs %v -> %v", peers, p, routes, r)
			}
			return nil
		})

		// The device deleted: wireguard-go exits, twilld starts another.
		old := wgPIDs(t, l, 1)
		ipn(t, h1, "link", "del", dev)
		waitFor(t, "a new wireguard-go on h1", 15*time.Second, func() error {
			now, err := l.WireGuardPIDs(1)
			if err != nil || len(now) != 1 || slices.Contains(old, now[0]) {
				return fmt.Errorf("wireguard-go of h1 %v, before %v (%v)", now, old, err)
			}
			return nil
		})
		waitCounts(t, l, 1, lab.HostCounts{Routes: hosts - 1, Peers: hosts - 1}, 15*time.Second)
		if d := repairs("device"); d < devices+1 {
			t.Errorf("device repairs %v -> %v", devices, d)
		}
		requireWGMatrix(t, l)
	})

	t.Run("new key", func(t *testing.T) {
		old := publicKey(t, l, 2, dev)
		if err := l.StopDaemon(ctx, 2); err != nil {
			t.Fatal(err)
		}
		if err := os.Remove(l.WireGuardKeyFile(2)); err != nil {
			t.Fatal(err)
		}
		if err := l.StartDaemon(2); err != nil {
			t.Fatal(err)
		}
		var key string
		waitFor(t, "h2's new key on its device", 15*time.Second, func() error {
			if key = publicKey(t, l, 2, dev); key == old {
				return errors.New("still the old key")
			}
			return nil
		})
		for _, i := range []int{1, 3} {
			waitFor(t, fmt.Sprintf("h%d to have h2's new key", i), 15*time.Second, func() error {
				keys := wgPeerKeys(t, l, i, dev)
				if !slices.Contains(keys, key) || slices.Contains(keys, old) || len(keys) != hosts-1 {
					return fmt.Errorf("peers %v; h2's key %s, was %s", keys, key, old)
				}
				return nil
			})
		}
		requireWGMatrix(t, l)
	})

	t.Run("cleanup", func(t *testing.T) {
		h1 := l.Topology().HostNS(1)
		if err := l.StopDaemon(ctx, 1); err != nil {
			t.Fatal(err)
		}
		if out, err := l.InHost(ctx, 1, l.BinDir+"/twilld", "--cleanup"); err != nil {
			t.Fatalf("twilld --cleanup: %v\n%s", err, out)
		}
		waitFor(t, "wireguard-go of h1 to exit", 10*time.Second, func() error {
			if pids := wgPIDs(t, l, 1); len(pids) > 0 {
				return fmt.Errorf("still running: %v", pids)
			}
			return nil
		})
		if c, err := l.Counts(ctx, 1); err != nil || c != (lab.HostCounts{}) {
			t.Fatalf("after cleanup h1 holds %+v (%v)", c, err)
		}
		if out := ipn(t, h1, "link", "show"); strings.Contains(out, dev) {
			t.Fatalf("device left:\n%s", out)
		}
		if _, err := os.Stat(filepath.Join(l.WireGuardDir(1), dev+".sock")); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("h1's control socket after the cleanup: %v", err)
		}
		for _, i := range []int{2, 3} {
			if pids := wgPIDs(t, l, i); len(pids) != 1 {
				t.Errorf("h%d: wireguard-go %v, want one (only h1 was cleaned)", i, pids)
			}
		}
	})
	if !t.Failed() {
		downWireGuardLab(t, l)
	}
}

// A dual-stack network over the wireguard backend: twill-wg carries the
// IPv4 pods' traffic and twill-wg-v6 the IPv6 pods', each with one peer
// (endpoint in the family's underlay, on the family's port) and one route
// per other host; pods reach each other in both families, and IPv6 pod
// traffic crosses the IPv6 underlay encrypted.
func TestWireGuardDualStack(t *testing.T) {
	const hosts = 3
	l := newWireGuardLab(t, lab.Options{Hosts: hosts, PodsPerHost: 1, IPMasq: true, IPFamily: "dual"})
	for i := 1; i <= hosts; i++ {
		waitCounts(t, l, i, lab.HostCounts{Routes: 2 * (hosts - 1), Peers: 2 * (hosts - 1)}, 10*time.Second)
	}
	if env := hostEnv(t, l, 1); env.MTU != 1500-80 {
		t.Errorf("pod MTU %d, want 1420 (1500 less WireGuard's 80 over IPv6)", env.MTU)
	}
	for i := 1; i <= hosts; i++ {
		hn := l.Topology().HostNS(i)
		if pids := wgPIDs(t, l, i); len(pids) != 2 {
			t.Errorf("h%d: wireguard-go processes %v, want one per device", i, pids)
		}
		for _, v6 := range []bool{false, true} {
			dev, port := "twill-wg", 51820
			family := "-4"
			if v6 {
				dev, port, family = "twill-wg-v6", 51821, "-6"
			}
			var wantIPs, wantEndpoints []string
			for j := 1; j <= hosts; j++ {
				if j == i {
					continue
				}
				env := hostEnv(t, l, j)
				sn, ep := env.Subnet.Masked(), netip.AddrPortFrom(l.Topology().HostAddr(j), uint16(port))
				if v6 {
					sn, ep = env.IPv6Subnet.Masked(), netip.AddrPortFrom(l.Topology().HostAddrV6(j), uint16(port))
				}
				wantIPs = append(wantIPs, sn.String())
				wantEndpoints = append(wantEndpoints, ep.String())
			}
			slices.Sort(wantIPs)
			slices.Sort(wantEndpoints)
			gotIPs, gotEndpoints := secondColumn(wg(t, l, i, "show", dev, "allowed-ips")), secondColumn(wg(t, l, i, "show", dev, "endpoints"))
			if !slices.Equal(gotIPs, wantIPs) || !slices.Equal(gotEndpoints, wantEndpoints) {
				t.Errorf("h%d %s: allowed IPs %v, endpoints %v; want %v, %v", i, dev, gotIPs, gotEndpoints, wantIPs, wantEndpoints)
			}
			if p := strings.TrimSpace(wg(t, l, i, "show", dev, "listen-port")); p != strconv.Itoa(port) {
				t.Errorf("h%d %s: listen port %s, want %d", i, dev, p, port)
			}
			routes := strings.TrimSpace(ipn(t, hn, family, "route", "show", "proto", "116"))
			if lines := strings.Split(routes, "\n"); len(lines) != hosts-1 || strings.Count(routes, "dev "+dev+" ") != hosts-1 {
				t.Errorf("h%d: %s routes of twill:\n%s\nwant %d, each into %s", i, family, routes, hosts-1, dev)
			}
		}
	}
	requireWGMatrix(t, l)
	a, b := podsOn(l, 1)[0], podsOn(l, 2)[0]
	if src := tcpTransfer(t, a.NS, b.NS, b.AddrV6, 1<<20); src != a.AddrV6 {
		t.Fatalf("pod to pod over IPv6: the receiver saw source %s, want the pod's %s", src, a.AddrV6)
	}
	requireEncrypted(t, l, a, b, true, 51821)
	downWireGuardLab(t, l)
}

// requireWGMatrix is requireMatrix, with every host's `wg show` in the log
// when a pair fails.
func requireWGMatrix(t *testing.T, l *lab.Lab) {
	t.Helper()
	for _, v6 := range l.Families() {
		m := l.Check(ctxFor(t, 2*time.Minute), v6)
		if m.Failures() == 0 {
			continue
		}
		var b strings.Builder
		m.Print(&b)
		for i := 1; i <= l.Hosts; i++ {
			out, err := l.WG(ctxFor(t, 10*time.Second), i, "show")
			fmt.Fprintf(&b, "--- h%d wg show (%v) ---\n%s", i, err, out)
		}
		t.Fatalf("%d pod pairs failed over %s:\n%s", m.Failures(), subnet.FamilyName(v6), b.String())
	}
}

// secondColumn is the sorted second field of each line of wg's output
// ("<key>\t<value>").
func secondColumn(out string) []string {
	var vals []string
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if f := strings.Fields(line); len(f) >= 2 {
			vals = append(vals, f[1])
		}
	}
	slices.Sort(vals)
	return vals
}

// requireEncrypted sends a payload with a distinctive string from pod a to
// pod b (on other hosts) over one family while capturing on the underlay
// and in b's namespace. On the underlay every packet must be WireGuard's:
// UDP between the hosts' addresses with a WireGuard port (51820, 51821)
// on either side, enough of them in the family's underlay on port, and the
// string must not appear; in b's namespace, as a check of the capture
// itself, it must.
func requireEncrypted(t *testing.T, l *lab.Lab, a, b lab.Pod, v6 bool, port uint16) {
	t.Helper()
	secret := make([]byte, 8)
	rand.Read(secret)
	word := "twill-wireguard-secret-" + hex.EncodeToString(secret)
	payload := bytes.Repeat([]byte(word+" "), (256<<10)/(len(word)+1))
	// The world's address serves etcd (the daemons' leases), and ARP is
	// the underlay's own.
	filter := fmt.Sprintf("not arp and not host %s and not host %s", lab.WorldAddr, lab.WorldAddrV6)
	underlay := startCapture(t, l.Topology().UnderlayNS(), "any", filter)
	inPod := startCapture(t, b.NS, "eth0", "tcp")
	if src := tcpSend(t, a.NS, b.NS, b.AddrOf(v6), payload); src != a.AddrOf(v6) {
		t.Fatalf("the receiver saw source %s, want the pod's %s", src, a.AddrOf(v6))
	}
	time.Sleep(200 * time.Millisecond) // the last ACKs
	under, pod := underlay.stop(t), inPod.stop(t)

	if n := countContaining(pod, word); n == 0 {
		t.Fatalf("control: %d packets captured in %s, none with the payload: the capture does not work", len(pod), b.NS)
	}
	wgPackets := 0
	for _, p := range under {
		switch {
		case p.linkLocalControl():
			continue // IPv6 neighbour discovery and MLD of the underlay itself
		case p.proto != syscall.IPPROTO_UDP || !isWGPort(p.sport) && !isWGPort(p.dport),
			!lab.Underlay.Contains(p.src) && !lab.UnderlayV6.Contains(p.src),
			!lab.Underlay.Contains(p.dst) && !lab.UnderlayV6.Contains(p.dst):
			t.Errorf("on the underlay: %s", p)
		case p.src.Is6() == v6 && (p.sport == port || p.dport == port):
			// The transfer's; the other family's device may send a
			// keepalive meanwhile.
			wgPackets++
		}
	}
	if n := countContaining(under, word); n > 0 {
		t.Errorf("on the underlay: %d packets carry the payload in the clear", n)
	}
	// 256 KiB is some 180 full segments, and their ACKs.
	if wgPackets < 100 {
		t.Errorf("on the underlay: %d WireGuard packets during the transfer; want at least 100", wgPackets)
	}
	t.Logf("underlay: %d packets, %d of them WireGuard (UDP port %d); %s: %d packets, %d with the payload",
		len(under), wgPackets, port, b.NS, len(pod), countContaining(pod, word))
}

func isWGPort(p uint16) bool { return p == 51820 || p == 51821 }

func countContaining(ps []packet, word string) int {
	n := 0
	for _, p := range ps {
		if bytes.Contains(p.frame, []byte(word)) {
			n++
		}
	}
	return n
}

// capture is a tcpdump writing what it sees to a pcap file.
type capture struct {
	cmd  *exec.Cmd
	file string
	done chan error
}

// startCapture starts tcpdump on iface in a namespace, writing at most
// 20000 packets for at most a minute, and returns once it captures.
func startCapture(t *testing.T, netns, iface, filter string) *capture {
	t.Helper()
	c := &capture{file: filepath.Join(t.TempDir(), "capture.pcap"), done: make(chan error, 1)}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	// -Z root: tcpdump would write the file as user tcpdump, which cannot
	// write into the test's folder.
	args := []string{"netns", "exec", netns, "tcpdump", "-n", "-U", "-Z", "root", "-i", iface, "-c", "20000", "-w", c.file}
	c.cmd = exec.CommandContext(ctx, "ip", append(args, strings.Fields(filter)...)...)
	stderr, err := c.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.cmd.Start(); err != nil {
		t.Fatalf("tcpdump: %v", err)
	}
	t.Cleanup(func() { c.cmd.Process.Kill(); <-c.done })
	// tcpdump says "listening on ..." once it captures.
	listening := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		var lines []string
		said := false
		for sc.Scan() {
			lines = append(lines, sc.Text())
			if !said && strings.Contains(sc.Text(), "listening on") {
				listening <- ""
				said = true
			}
		}
		if !said {
			listening <- strings.Join(lines, "\n")
		}
		c.done <- c.cmd.Wait()
		close(c.done)
	}()
	select {
	case msg := <-listening:
		if msg != "" {
			t.Fatalf("tcpdump in %s did not start: %s", netns, msg)
		}
	case <-time.After(15 * time.Second):
		t.Fatalf("tcpdump in %s did not start in 15s", netns)
	}
	return c
}

// stop ends the capture (SIGINT: tcpdump writes out what it has) and reads
// the packets.
func (c *capture) stop(t *testing.T) []packet {
	t.Helper()
	// `ip netns exec` became tcpdump: the pid is tcpdump's.
	c.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-c.done:
	case <-time.After(10 * time.Second):
		c.cmd.Process.Kill()
		t.Fatal("tcpdump did not stop on SIGINT")
	}
	data, err := os.ReadFile(c.file)
	if err != nil {
		t.Fatal(err)
	}
	ps, err := parsePcap(data)
	if err != nil {
		t.Fatalf("%s: %v", c.file, err)
	}
	return ps
}

// packet is one captured frame, with what the test looks at decoded.
type packet struct {
	frame        []byte
	etherType    uint16
	src, dst     netip.Addr // invalid unless IPv4 or IPv6
	proto        int        // IP protocol (IPv6: after the extension headers)
	sport, dport uint16     // TCP and UDP
	icmpType     byte       // ICMPv6
}

func (p packet) String() string {
	if !p.src.IsValid() {
		return fmt.Sprintf("ethertype %#04x, %d bytes", p.etherType, len(p.frame))
	}
	return fmt.Sprintf("%s:%d > %s:%d protocol %d, %d bytes", p.src, p.sport, p.dst, p.dport, p.proto, len(p.frame))
}

// linkLocalControl reports an ICMPv6 packet of the link's own: neighbour
// discovery or MLD, from a link-local address or to a multicast group.
func (p packet) linkLocalControl() bool {
	return p.proto == syscall.IPPROTO_ICMPV6 && (p.src.IsLinkLocalUnicast() || p.src.IsUnspecified() || p.dst.IsMulticast()) &&
		(p.icmpType >= 130 && p.icmpType <= 137 || p.icmpType == 143)
}

// parsePcap reads a pcap file of Ethernet (one interface) or Linux cooked
// frames (-i any).
func parsePcap(data []byte) ([]packet, error) {
	if len(data) < 24 {
		return nil, fmt.Errorf("pcap of %d bytes", len(data))
	}
	var bo binary.ByteOrder
	switch m := binary.LittleEndian.Uint32(data); m {
	case 0xa1b2c3d4, 0xa1b23c4d:
		bo = binary.LittleEndian
	case 0xd4c3b2a1, 0x4d3cb2a1:
		bo = binary.BigEndian
	default:
		return nil, fmt.Errorf("not a pcap file (magic %#x)", m)
	}
	link := bo.Uint32(data[20:])
	var out []packet
	for rest := data[24:]; len(rest) > 0; {
		if len(rest) < 16 {
			return nil, errors.New("truncated record header")
		}
		n := int(bo.Uint32(rest[8:]))
		if len(rest) < 16+n {
			return nil, errors.New("truncated record")
		}
		frame := rest[16 : 16+n]
		rest = rest[16+n:]
		p := packet{frame: frame}
		var l3 []byte
		switch link {
		case 1: // Ethernet
			if len(frame) >= 14 {
				p.etherType, l3 = binary.BigEndian.Uint16(frame[12:]), frame[14:]
			}
		case 113: // LINUX_SLL
			if len(frame) >= 16 {
				p.etherType, l3 = binary.BigEndian.Uint16(frame[14:]), frame[16:]
			}
		case 276: // LINUX_SLL2
			if len(frame) >= 20 {
				p.etherType, l3 = binary.BigEndian.Uint16(frame[0:]), frame[20:]
			}
		default:
			return nil, fmt.Errorf("link type %d", link)
		}
		var l4 []byte
		switch {
		case p.etherType == 0x0800 && len(l3) >= 20:
			ihl := int(l3[0]&0x0f) * 4
			p.proto = int(l3[9])
			p.src, _ = netip.AddrFromSlice(l3[12:16])
			p.dst, _ = netip.AddrFromSlice(l3[16:20])
			if len(l3) >= ihl {
				l4 = l3[ihl:]
			}
		case p.etherType == 0x86dd && len(l3) >= 40:
			p.proto = int(l3[6])
			p.src, _ = netip.AddrFromSlice(l3[8:24])
			p.dst, _ = netip.AddrFromSlice(l3[24:40])
			l4 = l3[40:]
			// Hop-by-hop (MLD's router alert), routing and destination
			// options headers.
			for k := 0; k < 4 && (p.proto == 0 || p.proto == 43 || p.proto == 60) && len(l4) >= 8; k++ {
				p.proto, l4 = int(l4[0]), l4[min(len(l4), (int(l4[1])+1)*8):]
			}
		}
		switch {
		case (p.proto == syscall.IPPROTO_TCP || p.proto == syscall.IPPROTO_UDP) && len(l4) >= 4:
			p.sport, p.dport = binary.BigEndian.Uint16(l4), binary.BigEndian.Uint16(l4[2:])
		case p.proto == syscall.IPPROTO_ICMPV6 && len(l4) >= 1:
			p.icmpType = l4[0]
		}
		out = append(out, p)
	}
	return out, nil
}

// Mode "auto" (and ipv4, ipv6): one device, twill-wg on ListenPort, for
// both families; each peer is allowed both of its subnets and reached over
// the family the mode picks (here IPv4: the lab's IPv6 underlay is a ULA);
// pods reach each other in both families, and a restart of twilld takes
// nothing away from the IPv6 half while its IPv4 pass runs first.
func TestWireGuardSingleDevice(t *testing.T) {
	const hosts = 3
	// With --ip-masq twilld masquerades only traffic leaving the cluster
	// network (without it the bridge plugin masquerades pod-to-pod too).
	l := newWireGuardLab(t, lab.Options{Hosts: hosts, PodsPerHost: 1, IPFamily: "dual", IPMasq: true, BackendOptions: map[string]any{"Mode": "auto"}})
	for i := 1; i <= hosts; i++ {
		waitCounts(t, l, i, lab.HostCounts{Routes: 2 * (hosts - 1), Peers: hosts - 1}, 10*time.Second)
	}
	if env := hostEnv(t, l, 1); env.MTU != 1500-80 {
		t.Errorf("pod MTU %d, want 1420 (auto may reach peers over IPv6)", env.MTU)
	}
	for i := 1; i <= hosts; i++ {
		if devs := strings.Fields(wg(t, l, i, "show", "interfaces")); !slices.Equal(devs, []string{"twill-wg"}) {
			t.Fatalf("h%d: WireGuard devices %v, want twill-wg only", i, devs)
		}
		var wantIPs, wantEndpoints []string
		for j := 1; j <= hosts; j++ {
			if j != i {
				env := hostEnv(t, l, j)
				wantIPs = append(wantIPs, env.Subnet.Masked().String()+" "+env.IPv6Subnet.Masked().String())
				wantEndpoints = append(wantEndpoints, netip.AddrPortFrom(l.Topology().HostAddr(j), 51820).String())
			}
		}
		slices.Sort(wantIPs)
		slices.Sort(wantEndpoints)
		var gotIPs []string
		for _, line := range strings.Split(strings.TrimSpace(wg(t, l, i, "show", "twill-wg", "allowed-ips")), "\n") {
			f := strings.Fields(line)
			slices.Sort(f[1:]) // IPv4 sorts before IPv6 as text: "1" < "f"
			gotIPs = append(gotIPs, strings.Join(f[1:], " "))
		}
		slices.Sort(gotIPs)
		if gotEndpoints := secondColumn(wg(t, l, i, "show", "twill-wg", "endpoints")); !slices.Equal(gotIPs, wantIPs) || !slices.Equal(gotEndpoints, wantEndpoints) {
			t.Errorf("h%d: allowed IPs %v, endpoints %v; want %v, %v", i, gotIPs, gotEndpoints, wantIPs, wantEndpoints)
		}
	}
	requireWGMatrix(t, l)

	a, b := podsOn(l, 2)[0], podsOn(l, 1)[0]
	ping := startPing(t, a.NS, b.Addr, 20*time.Millisecond) // the pinger speaks ICMPv4
	ctx := ctxFor(t, time.Minute)
	if err := l.KillDaemon(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if err := l.StartDaemon(1); err != nil {
		t.Fatal(err)
	}
	waitReconciles(t, l, []int{1}, 3, 20*time.Second)
	requireNoLoss(t, "twilld restart with one device for both families", []*pinger{ping})
	if w := wgWrites(t, l, 1, "ipv4"); w["peer"] != 0 {
		t.Errorf("the restarted twilld rewrote %v IPv4 peers", w["peer"])
	}
	if w := wgWrites(t, l, 1, "ipv6"); w["peer"] != 0 {
		t.Errorf("the restarted twilld rewrote %v peers in its IPv6 pass", w["peer"])
	}
	if src := tcpTransfer(t, a.NS, b.NS, b.AddrV6, 256<<10); src != a.AddrV6 {
		t.Fatalf("IPv6 pod to pod after the restart: source %s, want %s", src, a.AddrV6)
	}
	downWireGuardLab(t, l)
}
