package kube

import (
	"bytes"
	"context"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/twillnet/twill/subnet"
)

// testConfig is the network of every test: 10.244.0.0/16.
func testConfig(t testing.TB) *subnet.Config {
	t.Helper()
	cfg, err := subnet.ParseConfig([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func vxlanAttrs(ip string) subnet.LeaseAttrs {
	return subnet.LeaseAttrs{
		PublicIP:    netip.MustParseAddr(ip),
		BackendType: "vxlan",
		BackendData: []byte(`{"VNI":1,"VtepMAC":"ae:12:34:56:78:9a"}`),
	}
}

// node is a Node with an optional podCIDR and annotations.
func node(name, podCIDR string, ann map[string]string) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: ann}}
	if podCIDR != "" {
		n.Spec.PodCIDR, n.Spec.PodCIDRs = podCIDR, []string{podCIDR}
	}
	return n
}

// published are the annotations a twilld on a node with public IP ip writes.
func published(ip string) map[string]string {
	return Keys("").owned(vxlanAttrs(ip))
}

// logRecorder is a slog handler that passes records to t.Log and keeps their
// text for assertions.
type logRecorder struct {
	t     testing.TB
	mu    *sync.Mutex
	lines *[]string
	attrs []slog.Attr
}

func newLogRecorder(t testing.TB) *logRecorder {
	return &logRecorder{t: t, mu: &sync.Mutex{}, lines: new([]string)}
}

func (h *logRecorder) Enabled(context.Context, slog.Level) bool { return true }

func (h *logRecorder) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Level.String() + " " + r.Message)
	for _, a := range h.attrs {
		b.WriteString(" " + a.String())
	}
	r.Attrs(func(a slog.Attr) bool { b.WriteString(" " + a.String()); return true })
	h.mu.Lock()
	*h.lines = append(*h.lines, b.String())
	h.mu.Unlock()
	if r.Level >= slog.LevelInfo {
		h.t.Log(b.String())
	}
	return nil
}

func (h *logRecorder) WithAttrs(as []slog.Attr) slog.Handler {
	c := *h
	c.attrs = append(append([]slog.Attr{}, h.attrs...), as...)
	return &c
}

func (h *logRecorder) WithGroup(string) slog.Handler { return h }

// count is how many records contain all of subs.
func (h *logRecorder) count(subs ...string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
next:
	for _, l := range *h.lines {
		for _, s := range subs {
			if !strings.Contains(l, s) {
				continue next
			}
		}
		n++
	}
	return n
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// peerMap is Peers as node name -> subnet and public IP.
func peerMap(m *Manager) (map[string]string, bool) {
	peers, synced := m.Peers()
	out := map[string]string{}
	for _, p := range peers {
		out[p.Attrs.NodeName] = p.Subnet.String() + " " + p.Attrs.PublicIP.String()
	}
	return out, synced
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// leaseEqual compares every field a parse yields (subnet.SameLease leaves
// out what does not change the datapath).
func leaseEqual(a, b subnet.Lease) bool {
	return a.Subnet == b.Subnet && a.Expires.Equal(b.Expires) &&
		a.Attrs.PublicIP == b.Attrs.PublicIP && a.Attrs.BackendType == b.Attrs.BackendType &&
		a.Attrs.NodeName == b.Attrs.NodeName && bytes.Equal(a.Attrs.BackendData, b.Attrs.BackendData)
}
