package lab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// This file holds what the fault tests do to a lab: crash a daemon, stop
// etcd or one of its members, tear a host down and bring it back.

// HostDir is host i's folder: its env file, twilld's log and pid, the CNI
// plugin's state (cni-state), host-local's store (ipam) and libcni's cache.
// On a real node the first three live under /run and the rest under
// /var/lib, which is what a simulated reboot keeps.
func (l *Lab) HostDir(i int) string { return l.hostDir(i) }

// DaemonPID is the pid of host i's twilld.
func (l *Lab) DaemonPID(i int) (int, error) {
	return readPid(filepath.Join(l.hostDir(i), "twilld.pid"))
}

// KillDaemon kills host i's twilld with SIGKILL, as a crash or the OOM
// killer would: nothing is cleaned up and the lease is not touched.
func (l *Lab) KillDaemon(ctx context.Context, i int) error {
	return killPid(ctx, filepath.Join(l.hostDir(i), "twilld.pid"))
}

// StopEtcd stops the lab's single etcd (SIGTERM); StartEtcd starts it again
// on the same data. Clients see the server gone and then back, at the same
// address, with every key and lease it had.
func (l *Lab) StopEtcd(ctx context.Context) error {
	if l.EtcdMembers > 1 {
		return errors.New("the lab runs an etcd cluster: stop its members one by one")
	}
	return stopPid(ctx, filepath.Join(l.Dir, "etcd.pid"))
}

// StartEtcd starts the lab's single etcd again and waits until it serves.
func (l *Lab) StartEtcd(ctx context.Context) error {
	if l.EtcdMembers > 1 {
		return errors.New("the lab runs an etcd cluster: start its members one by one")
	}
	return l.startEtcd(ctx)
}

// EtcdEndpoints is the comma-separated client URLs of the lab's etcd: the
// embedded one, or every member of the cluster.
func (l *Lab) EtcdEndpoints() string {
	if l.EtcdMembers <= 1 {
		return EtcdURL()
	}
	urls := make([]string, l.EtcdMembers)
	for k := range urls {
		urls[k] = l.EtcdMemberURL(k + 1)
	}
	return strings.Join(urls, ",")
}

// etcdMemberAddr is member k's address in the underlay: member 1 on
// WorldAddr (so EtcdURL reaches it), the others just below.
func etcdMemberAddr(k int) netip.Addr {
	a := WorldAddr.As4()
	a[3] -= byte(k - 1)
	return netip.AddrFrom4(a)
}

// EtcdMemberURL is the client URL of member k (from 1) of the cluster.
func (l *Lab) EtcdMemberURL(k int) string {
	return "http://" + net.JoinHostPort(etcdMemberAddr(k).String(), strconv.Itoa(EtcdPort))
}

func etcdMemberName(k int) string { return fmt.Sprintf("etcd-m%d", k) }

// startEtcdCluster starts EtcdMembers members of the real etcd in the
// underlay namespace, each on an address of its own, and waits until the
// cluster serves.
func (l *Lab) startEtcdCluster(ctx context.Context) error {
	if l.EtcdMembers > 250-l.Hosts-1 {
		return fmt.Errorf("%d etcd members do not fit the underlay next to %d hosts", l.EtcdMembers, l.Hosts)
	}
	var initial []string
	for k := 1; k <= l.EtcdMembers; k++ {
		initial = append(initial, fmt.Sprintf("%s=http://%s", etcdMemberName(k), net.JoinHostPort(etcdMemberAddr(k).String(), "2380")))
		if k > 1 {
			if _, err := IP(ctx, "-n", l.Topology().UnderlayNS(), "addr", "add", netip.PrefixFrom(etcdMemberAddr(k), Underlay.Bits()).String(), "dev", "underlay"); err != nil {
				return err
			}
		}
	}
	for k := 1; k <= l.EtcdMembers; k++ {
		if err := l.startEtcdMember(k, strings.Join(initial, ","), "new"); err != nil {
			return err
		}
	}
	return poll(ctx, 60*time.Second, "the etcd cluster to serve", func() error {
		_, err := l.Ctl(ctx, "leases", "list")
		return err
	})
}

func (l *Lab) startEtcdMember(k int, initial, state string) error {
	name := etcdMemberName(k)
	addr := etcdMemberAddr(k).String()
	client := "http://" + net.JoinHostPort(addr, strconv.Itoa(EtcdPort))
	peer := "http://" + net.JoinHostPort(addr, "2380")
	return l.spawn(name, l.Topology().UnderlayNS(), l.EtcdBinary,
		"--name", name, "--data-dir", filepath.Join(l.Dir, name),
		"--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
		"--initial-cluster", initial, "--initial-cluster-state", state, "--initial-cluster-token", l.Prefix+"etcd",
		"--log-level", "warn")
}

// KillEtcdMember kills member k of the cluster with SIGKILL: a member lost
// to a crash or a dead machine.
func (l *Lab) KillEtcdMember(ctx context.Context, k int) error {
	if k < 1 || k > l.EtcdMembers {
		return fmt.Errorf("no etcd member %d", k)
	}
	return killPid(ctx, filepath.Join(l.Dir, etcdMemberName(k)+".pid"))
}

// StartEtcdMember starts member k again on its data: it rejoins the cluster.
func (l *Lab) StartEtcdMember(k int) error {
	if k < 1 || k > l.EtcdMembers {
		return fmt.Errorf("no etcd member %d", k)
	}
	var initial []string
	for m := 1; m <= l.EtcdMembers; m++ {
		initial = append(initial, fmt.Sprintf("%s=http://%s", etcdMemberName(m), net.JoinHostPort(etcdMemberAddr(m).String(), "2380")))
	}
	return l.startEtcdMember(k, strings.Join(initial, ","), "existing")
}

func readPid(path string) (int, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil || pid <= 1 {
		return 0, fmt.Errorf("pid file %s: %q is not a pid", path, data)
	}
	return pid, nil
}

// killPid kills the process named in a pid file with SIGKILL, waits until it
// is gone and removes the file.
func killPid(ctx context.Context, path string) error {
	pid, err := readPid(path)
	if err != nil {
		return err
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill %d: %w", pid, err)
	}
	if err := poll(ctx, 10*time.Second, "process "+strconv.Itoa(pid)+" to die", func() error {
		if syscall.Kill(pid, 0) != nil || isZombie(pid) {
			return nil
		}
		return errors.New("still running")
	}); err != nil {
		return err
	}
	return os.Remove(path)
}
