package masq

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// The addresses of TestKernelIPv6MasqueradeOnTheWire: a pod of testCfg6's
// node subnet, the node's address on each side, and a machine outside the
// cluster network.
var (
	wirePod      = netip.MustParseAddr("fd00:10:244:7::2")
	wireNodePod  = netip.MustParseAddr("fd00:10:244:7::1")
	wireNodeOut  = netip.MustParseAddr("fd00:198:18::1")
	wireWorld    = netip.MustParseAddr("fd00:198:18::2")
	wireWorldUDP = netip.AddrPortFrom(wireWorld, 7777)
)

// IPv6 pod traffic that leaves the cluster network is masqueraded on the
// wire, and the replies find their way back, through the rules and IPv6
// forwarding alone:
//
//	pod ns                   node ns                           world ns
//	eth0 fd00:10:244:7::2 -- pod0 fd00:10:244:7::1
//	                         out0 fd00:198:18::1  -- eth0 fd00:198:18::2
//
// The world has no route to the cluster network, as a machine outside the
// cluster would not: a reply reaches the pod only if the node replaced the
// pod's address with its own. The node's FORWARD policy is DROP (as Docker
// sets it), so the pod's packets pass only through TWILL-FWD.
func TestKernelIPv6MasqueradeOnTheWire(t *testing.T) {
	requirePrograms(t, "ip", "ip6tables")
	pod, node, world := newNetNS(t), newNetNS(t), newNetNS(t)
	ip := func(n ns.NetNS, cmds ...[]string) {
		t.Helper()
		doIn(t, n, func() error {
			for _, c := range cmds {
				if _, err := run("ip", c...); err != nil {
					return err
				}
			}
			return nil
		})
	}
	// No duplicate address detection: addresses, link-local ones included,
	// are usable at once rather than a second or two later.
	for _, n := range []ns.NetNS{pod, node, world} {
		doIn(t, n, func() error {
			return os.WriteFile("/proc/sys/net/ipv6/conf/default/accept_dad", []byte("0"), 0o644)
		})
	}
	ip(node,
		[]string{"link", "set", "lo", "up"},
		[]string{"link", "add", "pod0", "type", "veth", "peer", "name", "eth0", "netns", pod.Path()},
		[]string{"link", "add", "out0", "type", "veth", "peer", "name", "eth0", "netns", world.Path()},
		[]string{"addr", "add", wireNodePod.String() + "/64", "dev", "pod0"},
		[]string{"addr", "add", wireNodeOut.String() + "/64", "dev", "out0"},
		[]string{"link", "set", "pod0", "up"},
		[]string{"link", "set", "out0", "up"},
	)
	ip(pod,
		[]string{"link", "set", "lo", "up"},
		[]string{"addr", "add", wirePod.String() + "/64", "dev", "eth0"},
		[]string{"link", "set", "eth0", "up"},
		[]string{"-6", "route", "add", "default", "via", wireNodePod.String()},
	)
	ip(world,
		[]string{"link", "set", "lo", "up"},
		[]string{"addr", "add", wireWorld.String() + "/64", "dev", "eth0"},
		[]string{"link", "set", "eth0", "up"},
	)
	doIn(t, node, EnableIPv6Forward)

	// A socket belongs to the namespace it was made in, wherever it is
	// used afterwards.
	udp := func(n ns.NetNS, a netip.AddrPort) *net.UDPConn {
		t.Helper()
		var c *net.UDPConn
		doIn(t, n, func() (err error) {
			c, err = net.ListenUDP("udp6", net.UDPAddrFromAddrPort(a))
			return err
		})
		t.Cleanup(func() { c.Close() })
		return c
	}
	worldConn := udp(world, wireWorldUDP)
	newPodConn := func() *net.UDPConn { return udp(pod, netip.AddrPortFrom(wirePod, 0)) }

	// Without twill's rules (and FORWARD accepting everything) the world
	// sees the pod's own address: the test can tell the difference.
	src, err := sendFromPod(newPodConn(), worldConn, "plain", 10*time.Second)
	if err != nil {
		t.Fatalf("without rules: %v", err)
	}
	if src.Addr() != wirePod {
		t.Fatalf("without rules the world saw source %s, want the pod's %s", src, wirePod)
	}

	var m *Manager
	doIn(t, node, func() error {
		if _, err := run("ip6tables", "-P", "FORWARD", "DROP"); err != nil {
			return err
		}
		ipt, err := NewIPTables(true)
		if err != nil {
			return err
		}
		if m, err = New(ipt, testCfg6, nil); err != nil {
			return err
		}
		return m.Ensure(context.Background())
	})

	// A new flow (a new source port: conntrack keeps the NAT decision of
	// the flow above) leaves with the node's address, and the reply comes
	// back to the pod's.
	podConn := newPodConn()
	src, err = sendFromPod(podConn, worldConn, "masqueraded", 10*time.Second)
	if err != nil {
		t.Fatalf("with rules: %v", err)
	}
	if src.Addr() != wireNodeOut {
		t.Fatalf("with rules the world saw source %s, want the node's %s (masquerade)", src, wireNodeOut)
	}
	if _, err := worldConn.WriteToUDPAddrPort([]byte("reply"), src); err != nil {
		t.Fatal(err)
	}
	from, err := readPayload(podConn, "reply", 5*time.Second)
	if err != nil {
		t.Fatalf("the reply to the masqueraded address did not reach the pod: %v", err)
	}
	if from != wireWorldUDP {
		t.Errorf("the pod got the reply from %s, want %s", from, wireWorldUDP)
	}

	// Without the rules the FORWARD policy stops the pod: TWILL-FWD was
	// what let it through.
	doIn(t, node, func() error { return m.Cleanup(context.Background()) })
	if src, err := sendFromPod(newPodConn(), worldConn, "dropped", time.Second); err == nil {
		t.Errorf("after Cleanup, with FORWARD policy DROP, the world still got a datagram from %s", src)
	}
}

// sendFromPod sends payload from pod to the world's address until the world receives
// it (the first datagrams may meet a link that is not up yet) or timeout
// passes, and returns the source address the world saw.
func sendFromPod(pod, world *net.UDPConn, payload string, timeout time.Duration) (netip.AddrPort, error) {
	to := world.LocalAddr().(*net.UDPAddr).AddrPort()
	deadline := time.Now().Add(timeout)
	var sendErr error
	for time.Now().Before(deadline) {
		if _, err := pod.WriteToUDPAddrPort([]byte(payload), to); err != nil {
			sendErr = err
		}
		from, err := readPayload(world, payload, 200*time.Millisecond)
		if err == nil {
			return from, nil
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			return from, err
		}
	}
	return netip.AddrPort{}, fmt.Errorf("the world got no %q from the pod in %s (last send error: %v)", payload, timeout, sendErr)
}

// readPayload reads from c until a datagram holding payload arrives (others,
// such as repeats of an earlier exchange, are skipped) or timeout passes.
func readPayload(c *net.UDPConn, payload string, timeout time.Duration) (netip.AddrPort, error) {
	if err := c.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return netip.AddrPort{}, err
	}
	buf := make([]byte, 64)
	for {
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return netip.AddrPort{}, err
		}
		if string(buf[:n]) == payload {
			return netip.AddrPortFrom(from.Addr().Unmap(), from.Port()), nil
		}
	}
}
