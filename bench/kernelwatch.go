package bench

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/twillnet/twill/backend/dataplane"
)

// kernelWatch follows twill's entries in one namespace through rtnetlink
// notifications instead of dumping tables: the kernel multicasts every route,
// neighbour and FDB change as it is made, so the harness learns the moment an
// entry is in place without dumping tables in a loop and without costing
// twilld a request. It tracks routes with twill's protocol, permanent
// neighbour entries inside the network, and FDB entries with a remote, of
// both IP families: the maps hold both, and n counts each kind per family.
type kernelWatch struct {
	stop chan struct{}
	wg   sync.WaitGroup

	mu     sync.Mutex
	routes map[netip.Prefix]bool
	neighs map[netip.Addr]dataplane.MAC
	fdb    map[dataplane.MAC]netip.Addr
	n      [2][kinds]int // [0 IPv4, 1 IPv6][kind]: entries in the maps
	err    error

	// count: the time each kind of each family first reached count
	// entries.
	count   int
	reached map[string]time.Time

	pred func(*kernelWatch) bool
	met  chan time.Time
}

// watchKernel subscribes in the named namespace. Call close when done.
//
// It reads the notifications from a raw rtnetlink socket and decodes only the
// few fields it needs, without allocating: a cold start is 15,000
// notifications in well under a second, and the harness must not take CPU
// time twilld needs on a small machine.
func watchKernel(netnsName string) (*kernelWatch, error) {
	w := newKernelWatch()
	var fd int
	err := ns.WithNetNSPath(nsPath(netnsName), func(ns.NetNS) error {
		var err error
		fd, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("netlink socket in %s: %w", netnsName, err)
	}
	// A large receive buffer: an overflow (ENOBUFS) would lose notifications.
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 64<<20); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("netlink receive buffer: %w", err)
	}
	// Wake up every 100 ms to notice close.
	tv := unix.Timeval{Usec: 100000}
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		return nil, err
	}
	groups := uint32(unix.RTMGRP_IPV4_ROUTE | unix.RTMGRP_IPV6_ROUTE | unix.RTMGRP_NEIGH)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: groups}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("subscribe to routes and neighbours in %s: %w", netnsName, err)
	}
	w.wg.Add(1)
	go w.read(fd)
	return w, nil
}

// newKernelWatch is a watch that has seen nothing and reads nothing yet.
func newKernelWatch() *kernelWatch {
	return &kernelWatch{
		stop:    make(chan struct{}),
		routes:  map[netip.Prefix]bool{},
		neighs:  map[netip.Addr]dataplane.MAC{},
		fdb:     map[dataplane.MAC]netip.Addr{},
		reached: map[string]time.Time{},
		met:     make(chan time.Time, 1),
	}
}

func (w *kernelWatch) close() {
	close(w.stop)
	w.wg.Wait()
}

func (w *kernelWatch) fail(err error) {
	w.mu.Lock()
	if w.err == nil {
		w.err = err
	}
	w.mu.Unlock()
}

func (w *kernelWatch) read(fd int) {
	defer w.wg.Done()
	defer unix.Close(fd)
	buf := make([]byte, 1<<20)
	for {
		select {
		case <-w.stop:
			return
		default:
		}
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			w.fail(fmt.Errorf("read netlink notifications: %w", err))
			return
		}
		w.mu.Lock()
		for b := buf[:n]; len(b) >= unix.NLMSG_HDRLEN; {
			l := int(native.Uint32(b[0:4]))
			if l < unix.NLMSG_HDRLEN || l > len(b) {
				break
			}
			w.message(native.Uint16(b[4:6]), b[unix.NLMSG_HDRLEN:l])
			b = b[min(nlAlign(l), len(b)):]
		}
		w.check()
		w.mu.Unlock()
	}
}

var native = binary.NativeEndian

func nlAlign(n int) int { return (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }

// attrs calls f for each rtattr in b.
func attrs(b []byte, f func(typ uint16, val []byte)) {
	for len(b) >= unix.SizeofRtAttr {
		l := int(native.Uint16(b[0:2]))
		if l < unix.SizeofRtAttr || l > len(b) {
			return
		}
		f(native.Uint16(b[2:4])&^unix.NLA_F_NESTED, b[unix.SizeofRtAttr:l])
		b = b[min((l+unix.RTA_ALIGNTO-1)&^(unix.RTA_ALIGNTO-1), len(b)):]
	}
}

// The kinds of entries, and the names reachedAt knows them by (IPv6's with
// a "6": "route6", ...).
const (
	kindRoute = iota
	kindNeigh
	kindFDB
	kinds
)

var kindNames = [2][kinds]string{{"route", "neigh", "fdb"}, {"route6", "neigh6", "fdb6"}}

// fam is the index of a's family in kernelWatch.n.
func fam(a netip.Addr) int {
	if a.Is6() {
		return 1
	}
	return 0
}

// addr decodes an address attribute of either family.
func addr(v []byte) netip.Addr {
	switch len(v) {
	case 4:
		return netip.AddrFrom4([4]byte(v))
	case 16:
		return netip.AddrFrom16([16]byte(v))
	}
	return netip.Addr{}
}

// message applies one notification (under mu).
func (w *kernelWatch) message(typ uint16, b []byte) {
	switch typ {
	case unix.RTM_NEWROUTE, unix.RTM_DELROUTE:
		if len(b) < unix.SizeofRtMsg {
			return
		}
		family, dstLen, table, proto := b[0], int(b[1]), uint32(b[4]), b[5]
		if family != unix.AF_INET && family != unix.AF_INET6 || proto != byte(dataplane.RouteProtocol) {
			return
		}
		var dst netip.Addr
		attrs(b[unix.SizeofRtMsg:], func(t uint16, v []byte) {
			switch {
			case t == unix.RTA_DST:
				dst = addr(v)
			case t == unix.RTA_TABLE && len(v) == 4:
				table = native.Uint32(v)
			}
		})
		if !dst.IsValid() || dst.Is6() != (family == unix.AF_INET6) || table != unix.RT_TABLE_MAIN {
			return
		}
		p := netip.PrefixFrom(dst, dstLen)
		had := w.routes[p]
		if typ == unix.RTM_NEWROUTE {
			if !had {
				w.routes[p] = true
				w.n[fam(dst)][kindRoute]++
			}
		} else if had {
			delete(w.routes, p)
			w.n[fam(dst)][kindRoute]--
		}
	case unix.RTM_NEWNEIGH, unix.RTM_DELNEIGH:
		if len(b) < unix.SizeofNdMsg {
			return
		}
		family, state, flags := b[0], native.Uint16(b[8:10]), b[10]
		var ip netip.Addr
		var mac dataplane.MAC
		attrs(b[unix.SizeofNdMsg:], func(t uint16, v []byte) {
			switch {
			case t == unix.NDA_DST:
				ip = addr(v)
			case t == unix.NDA_LLADDR && len(v) == 6:
				mac = dataplane.MAC(v)
			}
		})
		if !ip.IsValid() {
			return
		}
		switch family {
		case unix.AF_INET, unix.AF_INET6:
			if !benchNetwork.Contains(ip) && !benchNetworkV6.Contains(ip) {
				return
			}
			_, had := w.neighs[ip]
			if typ == unix.RTM_DELNEIGH || state&unix.NUD_PERMANENT == 0 {
				if had {
					delete(w.neighs, ip)
					w.n[fam(ip)][kindNeigh]--
				}
				return
			}
			if !had {
				w.n[fam(ip)][kindNeigh]++
			}
			w.neighs[ip] = mac
		case unix.AF_BRIDGE:
			if flags&unix.NTF_SELF == 0 {
				return
			}
			old, had := w.fdb[mac]
			if typ == unix.RTM_DELNEIGH {
				if had && old == ip {
					delete(w.fdb, mac)
					w.n[fam(old)][kindFDB]--
				}
				return
			}
			if had {
				w.n[fam(old)][kindFDB]--
			}
			w.fdb[mac] = ip
			w.n[fam(ip)][kindFDB]++
		}
	}
}

// check runs under mu after every change.
func (w *kernelWatch) check() {
	now := time.Now()
	if w.count > 0 {
		for f := range w.n {
			for k, n := range w.n[f] {
				if _, done := w.reached[kindNames[f][k]]; !done && n >= w.count {
					w.reached[kindNames[f][k]] = now
				}
			}
		}
	}
	if w.pred != nil && w.pred(w) {
		w.pred = nil
		w.met <- now
	}
}

// trackCount records when each kind of each family first reaches n entries.
func (w *kernelWatch) trackCount(n int) {
	w.mu.Lock()
	w.count = n
	clear(w.reached)
	w.mu.Unlock()
}

func (w *kernelWatch) reachedAt(kind string) (time.Time, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	t, ok := w.reached[kind]
	return t, ok
}

// await waits until pred holds (it runs under the watch's lock, after each
// notification) and returns the time of the notification that made it hold.
func (w *kernelWatch) await(ctx context.Context, timeout time.Duration, what string, pred func(*kernelWatch) bool) (time.Time, error) {
	w.mu.Lock()
	if w.err != nil {
		err := w.err
		w.mu.Unlock()
		return time.Time{}, err
	}
	if pred(w) {
		w.mu.Unlock()
		return time.Now(), nil
	}
	w.pred = pred
	w.mu.Unlock()
	t := time.NewTimer(timeout)
	defer t.Stop()
	poll := time.NewTicker(100 * time.Millisecond)
	defer poll.Stop()
	for {
		select {
		case at := <-w.met:
			return at, nil
		case <-ctx.Done():
			w.clearPred()
			return time.Time{}, ctx.Err()
		case <-t.C:
			w.clearPred()
			return time.Time{}, fmt.Errorf("timed out after %s waiting for %s (%s)", timeout, what, w.summary())
		case <-poll.C:
			w.mu.Lock()
			err := w.err
			w.mu.Unlock()
			if err != nil {
				w.clearPred()
				return time.Time{}, fmt.Errorf("waiting for %s: %w", what, err)
			}
		}
	}
}

func (w *kernelWatch) clearPred() {
	w.mu.Lock()
	w.pred = nil
	w.mu.Unlock()
	select {
	case <-w.met:
	default:
	}
}

func (w *kernelWatch) summary() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	v4, v6 := w.n[0], w.n[1]
	return fmt.Sprintf("%d routes, %d neighbours, %d FDB entries seen; IPv6: %d, %d, %d",
		v4[kindRoute], v4[kindNeigh], v4[kindFDB], v6[kindRoute], v6[kindNeigh], v6[kindFDB])
}

// Predicates over the watched state (called with the lock held).

// allAtLeast: n routes, neighbours and FDB entries of IPv4, and of IPv6 too
// when dual.
func allAtLeast(n int, dual bool) func(*kernelWatch) bool {
	families := 1
	if dual {
		families = 2
	}
	return func(w *kernelWatch) bool {
		for _, c := range w.n[:families] {
			if c[kindRoute] < n || c[kindNeigh] < n || c[kindFDB] < n {
				return false
			}
		}
		return true
	}
}

// peerPresent: route, neighbour and FDB entry of p, with its MAC and public IP.
func peerPresent(p fakePeer) func(*kernelWatch) bool {
	return func(w *kernelWatch) bool {
		mac, ok := w.neighs[p.Subnet.Addr()]
		return w.routes[p.Subnet] && ok && mac == p.MAC && w.fdb[p.MAC] == p.PublicIP
	}
}

// peerAbsent: none of p's entries is left.
func peerAbsent(p fakePeer) func(*kernelWatch) bool {
	return func(w *kernelWatch) bool {
		_, n := w.neighs[p.Subnet.Addr()]
		_, f := w.fdb[p.MAC]
		return !w.routes[p.Subnet] && !n && !f
	}
}
