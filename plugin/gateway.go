package plugin

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/twillnet/twill/internal/retry"
)

// IPv6 duplicate address detection (DAD) and the bridge.
//
// A new IPv6 address is "tentative" until DAD has found no other host using
// it: after a random delay of up to rtr_solicit_delay (1 s) the kernel sends
// dad_transmits (1) neighbour solicitations retrans_time (1 s) apart, so for
// one to two seconds. A tentative address answers no neighbour solicitation,
// and the kernel sends none from a tentative link-local address.
//
// The reference bridge (plugins 1.10) takes care of the pod's side: it sets
// accept_dad=0 on the pod's interface before bringing it up, and
// ipam.ConfigureIface waits for the pod's addresses to settle. It does nothing
// of the kind for the bridge: the ADD that first puts the IPv6 gateway on it
// returns while the gateway, and the bridge's own link-local address, are
// still tentative. For that second the pod cannot resolve its gateway (no
// route off the node, no default route), and the node cannot resolve the
// pod (it solicits from its link-local address), so traffic from other nodes
// does not arrive. Pods on the same bridge reach each other directly.
//
// So after the delegate's ADD, twill waits until the interface holding the
// node's IPv6 gateway has no tentative address left. Only the first pod on a
// bridge waits: the kernel (6.18, tested) does not repeat DAD when the bridge
// loses its carrier with its last pod and regains it with the next; an
// address added again (after the bridge was set down, which drops its
// addresses) goes through DAD again, and that ADD waits. The others pay one
// read of /proc/net/if_inet6. twill does not turn DAD off on the bridge (by sysctl
// or by re-adding the address with IFA_F_NODAD): the bridge is the
// delegate's, and an address removed and re-added under running pods takes
// their route with it for a moment.

// gatewaySettleTimeout bounds the wait: DAD with the kernel's defaults takes
// at most 2 s; a node configured for more probes gets some slack.
const gatewaySettleTimeout = 10 * time.Second

// procIfInet6 lists the IPv6 addresses of the network namespace the plugin
// runs in, which is the bridge's: the delegate inherits it.
const procIfInet6 = "/proc/net/if_inet6"

func readIfInet6() ([]byte, error) { return os.ReadFile(procIfInet6) }

// inet6Addr is one line of /proc/net/if_inet6.
type inet6Addr struct {
	addr    netip.Addr
	ifIndex int
	ifName  string
	flags   uint32 // IFA_F_*
}

// parseIfInet6 reads /proc/net/if_inet6: per line the address in 32 hex
// digits, then in hex the interface index, prefix length, scope and flags,
// then the interface name.
func parseIfInet6(data []byte) ([]inet6Addr, error) {
	var out []inet6Addr
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		if len(f) != 6 || len(f[0]) != 32 {
			return nil, fmt.Errorf("%s: unexpected line %q", procIfInet6, sc.Text())
		}
		var a [16]byte
		for i := range a {
			b, err := strconv.ParseUint(f[0][2*i:2*i+2], 16, 8)
			if err != nil {
				return nil, fmt.Errorf("%s: address %q: %w", procIfInet6, f[0], err)
			}
			a[i] = byte(b)
		}
		idx, err1 := strconv.ParseUint(f[1], 16, 32)
		flags, err2 := strconv.ParseUint(f[4], 16, 32)
		if err := errors.Join(err1, err2); err != nil {
			return nil, fmt.Errorf("%s: line %q: %w", procIfInet6, sc.Text(), err)
		}
		out = append(out, inet6Addr{addr: netip.AddrFrom16(a), ifIndex: int(idx), ifName: f[5], flags: uint32(flags)})
	}
	return out, sc.Err()
}

// gatewayPending reports whether the interface holding gw still has an
// address in DAD, naming the interface; an error if gw itself failed DAD.
// A gw on no interface (isGateway false, another delegate) is not pending.
// A failed address other than gw is not waited for: it stays failed.
func gatewayPending(addrs []inet6Addr, gw netip.Addr) (bool, string, error) {
	idx := -1
	var ifName string
	for _, a := range addrs {
		if a.addr == gw {
			if a.flags&unix.IFA_F_DADFAILED != 0 {
				return false, a.ifName, fmt.Errorf("the IPv6 gateway %s on %s failed duplicate address detection: another host on the bridge has it", gw, a.ifName)
			}
			idx, ifName = a.ifIndex, a.ifName
		}
	}
	if idx < 0 {
		return false, "", nil
	}
	for _, a := range addrs {
		if a.ifIndex == idx && a.flags&unix.IFA_F_TENTATIVE != 0 && a.flags&unix.IFA_F_DADFAILED == 0 {
			return true, ifName, nil
		}
	}
	return false, ifName, nil
}

// settleGateway waits until the interface holding gw has no tentative
// address, polling read (the contents of /proc/net/if_inet6) until ctx ends.
func settleGateway(ctx context.Context, gw netip.Addr, read func() ([]byte, error)) error {
	b := retry.Backoff{Min: 5 * time.Millisecond, Max: 50 * time.Millisecond}
	start := time.Now()
	for {
		data, err := read()
		if errors.Is(err, fs.ErrNotExist) {
			return nil // no IPv6 in this kernel: the delegate gave the pod none
		}
		if err != nil {
			return err
		}
		addrs, err := parseIfInet6(data)
		if err != nil {
			return err
		}
		pending, ifName, err := gatewayPending(addrs, gw)
		if err != nil || !pending {
			return err
		}
		if err := b.Wait(ctx); err != nil {
			return fmt.Errorf("%w: the IPv6 gateway %s on %s is still tentative (duplicate address detection) after %s", errGatewayTentative, gw, ifName, time.Since(start).Round(time.Millisecond))
		}
	}
}

// errGatewayTentative marks a gateway that did not settle in time: the
// runtime may retry.
var errGatewayTentative = errors.New("gateway not ready")
