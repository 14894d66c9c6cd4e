package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/twillnet/twill/internal/tools/lab"
)

// Hosts with two interfaces: eth0 on the lab's underlay (the default route)
// and eth1 on a second underlay, 10.77.0.0/24, a second bridge in the
// underlay namespace. Each of --iface, --iface-regex and --iface-can-reach
// makes every twilld use eth1 (its lease's address, the peers' FDB entries),
// and the pods keep reaching each other; without them, eth0 again.
func TestInterfaceFlags(t *testing.T) {
	l := newLab(t, lab.Options{Hosts: 2, PodsPerHost: 1, Backend: "vxlan"})
	ctx := ctxFor(t, 3*time.Minute)
	u := l.Topology().UnderlayNS()
	ipn(t, u, "link", "add", "underlay2", "type", "bridge")
	ipn(t, u, "addr", "add", "10.77.0.254/24", "dev", "underlay2")
	ipn(t, u, "link", "set", "underlay2", "up")
	second := func(i int) string { return fmt.Sprintf("10.77.0.%d", i) }
	for _, i := range l.Topology().HostNumbers() {
		h := l.Topology().HostNS(i)
		if _, err := lab.IP(ctx, "link", "add", "name", fmt.Sprintf("s%d", i), "netns", u, "type", "veth", "peer", "name", "eth1", "netns", h); err != nil {
			t.Fatal(err)
		}
		ipn(t, u, "link", "set", fmt.Sprintf("s%d", i), "master", "underlay2", "up")
		ipn(t, h, "addr", "add", second(i)+"/24", "dev", "eth1")
		ipn(t, h, "link", "set", "eth1", "up")
	}
	// uses waits until every host's twilld publishes addr(i) and every
	// peer's FDB sends its traffic there, then checks the pods.
	uses := func(what string, addr func(int) string) {
		t.Helper()
		for _, i := range l.Topology().HostNumbers() {
			for _, j := range l.Topology().HostNumbers() {
				if i == j {
					continue
				}
				waitFor(t, fmt.Sprintf("%s: h%d to send h%d's traffic to %s", what, i, j, addr(j)), 20*time.Second, func() error {
					// The device is made again when its local address
					// changes: it may be missing for a moment.
					out, err := lab.InNS(ctx, l.Topology().HostNS(i), "bridge", "fdb", "show", "dev", "twill.1")
					if err != nil {
						return err
					}
					if !strings.Contains(out, "dst "+addr(j)+" ") {
						return fmt.Errorf("fdb:\n%s", out)
					}
					return nil
				})
			}
		}
		requireMatrix(t, l)
	}
	restart := func(flags ...string) {
		t.Helper()
		for _, i := range l.Topology().HostNumbers() {
			if err := l.StopDaemon(ctx, i); err != nil {
				t.Fatal(err)
			}
			if err := l.StartDaemon(i, flags...); err != nil {
				t.Fatal(err)
			}
		}
	}
	uses("default route", func(i int) string { return l.Topology().HostAddr(i).String() })
	for _, flags := range [][]string{
		{"--iface", "wlan0", "--iface", "eth1"},
		{"--iface-regex", `^10\.77\.`},
		{"--iface-regex", "^nothing$", "--iface-can-reach", "10.77.0.254"},
	} {
		restart(flags...)
		uses(strings.Join(flags, " "), second)
		restart()
		uses("default route again", func(i int) string { return l.Topology().HostAddr(i).String() })
	}
}
