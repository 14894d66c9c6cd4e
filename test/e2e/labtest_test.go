package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/internal/tools/testenv"
)

// newLab builds a lab for one test (namespaces under a prefix of its own) and
// tears it down when the test ends; on failure the daemon logs are printed.
func newLab(t *testing.T, o lab.Options) *lab.Lab {
	t.Helper()
	testenv.RequireRoot(t)
	testenv.Binary(t, "twilld")
	testenv.Binary(t, "twill")
	o.Dir = t.TempDir()
	o.Prefix = nsPrefix()
	o.BinDir = filepath.Join(testenv.RepoRoot(), "bin")
	o.CNIBinDir = testenv.CNIBinDir(t)
	if !o.Network.IsValid() {
		o.Network = netip.MustParsePrefix("10.244.0.0/16")
	}
	if o.Datastore == "" {
		o.Datastore = "etcd"
	}
	var out bytes.Buffer
	l := lab.New(o, &out, slog.New(slog.DiscardHandler))
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("--- lab output ---\n%s", out.String())
			for i := 1; i <= o.Hosts; i++ {
				data, _ := os.ReadFile(l.DaemonLog(i))
				t.Logf("--- h%d twilld log ---\n%s", i, tail(string(data), 40))
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := l.Down(ctx, false); err != nil {
			t.Errorf("lab down: %v", err)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if err := l.Up(ctx); err != nil {
		t.Fatal(err)
	}
	return l
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// waitCounts waits until host i holds exactly the wanted entries.
func waitCounts(t *testing.T, l *lab.Lab, i int, want lab.HostCounts, d time.Duration) {
	t.Helper()
	ctx := ctxFor(t, d+5*time.Second)
	deadline := time.Now().Add(d)
	for {
		got, err := l.Counts(ctx, i)
		if err == nil && got.Routes == want.Routes && got.FDB == want.FDB && got.Neigh == want.Neigh && got.Peers == want.Peers {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("h%d: entries %+v (err %v), want %+v", i, got, err, want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// podsOn returns the lab's pods on host i.
func podsOn(l *lab.Lab, i int) []lab.Pod {
	var out []lab.Pod
	for _, p := range l.Pods {
		if p.Host == i {
			out = append(out, p)
		}
	}
	return out
}

// tcpTransfer sends size bytes from one namespace to a listener in another
// and checks that the same bytes arrived. It returns the source address the
// receiver saw. Sockets are made on threads inside the namespaces.
func tcpTransfer(t *testing.T, fromNS, toNS string, to netip.Addr, size int) netip.Addr {
	t.Helper()
	payload := make([]byte, size)
	for i := range payload {
		payload[i] = byte(i*7 + i/251)
	}
	return tcpSend(t, fromNS, toNS, to, payload)
}

// tcpSend is tcpTransfer of the given bytes.
func tcpSend(t *testing.T, fromNS, toNS string, to netip.Addr, payload []byte) netip.Addr {
	t.Helper()
	size := len(payload)
	var ln net.Listener
	err := ns.WithNetNSPath("/run/netns/"+toNS, func(ns.NetNS) error {
		var err error
		ln, err = net.Listen("tcp", net.JoinHostPort(to.String(), "0"))
		return err
	})
	if err != nil {
		t.Fatalf("listen in %s: %v", toNS, err)
	}
	defer ln.Close()
	type got struct {
		sum  [32]byte
		n    int64
		peer netip.Addr
		err  error
	}
	done := make(chan got, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- got{err: err}
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		h := sha256.New()
		n, err := io.Copy(h, c)
		var g got
		copy(g.sum[:], h.Sum(nil))
		g.n, g.err = n, err
		g.peer = c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
		done <- g
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	err = ns.WithNetNSPath("/run/netns/"+fromNS, func(ns.NetNS) error {
		c, err := net.DialTimeout("tcp", net.JoinHostPort(to.String(), fmt.Sprint(port)), 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		_, err = c.Write(payload)
		return err
	})
	if err != nil {
		t.Fatalf("send from %s to %s: %v", fromNS, to, err)
	}
	var g got
	select {
	case g = <-done:
	case <-time.After(40 * time.Second):
		t.Fatal("transfer did not finish")
	}
	if g.err != nil || g.n != int64(size) || g.sum != sha256.Sum256(payload) {
		t.Fatalf("transfer to %s: %d bytes, err %v, checksum match %v", to, g.n, g.err, g.sum == sha256.Sum256(payload))
	}
	return g.peer
}
