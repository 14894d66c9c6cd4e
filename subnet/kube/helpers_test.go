package kube

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
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

// dualConfig is the network of the dual-stack tests: 10.244.0.0/16 and
// fd00:10:244::/56, or the IPv6 one alone when v6only.
func dualConfig(t testing.TB, v6only bool) *subnet.Config {
	t.Helper()
	conf := `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}`
	if v6only {
		conf = `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}`
	}
	cfg, err := subnet.ParseConfig([]byte(conf))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// The VTEP MACs of the tests' VXLAN backend data, one per family.
const (
	vxlanData   = `{"VNI":1,"VtepMAC":"ae:12:34:56:78:9a"}`
	vxlanV6Data = `{"VNI":1,"VtepMAC":"ae:12:34:56:78:9b"}`
)

func vxlanAttrs(ip string) subnet.LeaseAttrs {
	return subnet.LeaseAttrs{
		PublicIP:    netip.MustParseAddr(ip),
		BackendType: "vxlan",
		BackendData: []byte(vxlanData),
	}
}

// dualAttrs are what the daemon passes for a node with an address of each
// family; ip "" makes an IPv6-only node's, whose PublicIP is 0.0.0.0.
func dualAttrs(ip, ip6 string) subnet.LeaseAttrs {
	a := vxlanAttrs("0.0.0.0")
	if ip != "" {
		a = vxlanAttrs(ip)
	} else {
		a.BackendData = nil
	}
	a.PublicIPv6, a.BackendV6Data = netip.MustParseAddr(ip6), []byte(vxlanV6Data)
	return a
}

// node is a Node with an optional podCIDR and annotations.
func node(name, podCIDR string, ann map[string]string) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: ann}}
	if podCIDR != "" {
		n.Spec.PodCIDR, n.Spec.PodCIDRs = podCIDR, []string{podCIDR}
	}
	return n
}

// nodeCIDRs is a Node with the podCIDRs given (spec.podCIDR is the first).
func nodeCIDRs(name string, cidrs []string, ann map[string]string) *corev1.Node {
	n := node(name, "", ann)
	if len(cidrs) > 0 {
		n.Spec.PodCIDR, n.Spec.PodCIDRs = cidrs[0], cidrs
	}
	return n
}

// published are the annotations a twilld on a node with public IP ip writes.
func published(ip string) map[string]string {
	return Keys("").owned(vxlanAttrs(ip))
}

// publishedDual are those of a twilld with an address of each family (ip ""
// for an IPv6-only node).
func publishedDual(ip, ip6 string) map[string]string {
	return Keys("").owned(dualAttrs(ip, ip6))
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

// peerMap is Peers as node name -> subnet and public IP of each family the
// lease has, IPv4 first: "10.244.2.0/24 192.0.2.2 fd00:10:244:2::/64 2001:db8::2".
func peerMap(m *Manager) (map[string]string, bool) {
	peers, synced := m.Peers()
	out := map[string]string{}
	for _, p := range peers {
		out[p.Attrs.NodeName] = familiesString(p)
	}
	return out, synced
}

func familiesString(l subnet.Lease) string {
	var f []string
	if l.Subnet.IsValid() {
		f = append(f, l.Subnet.String(), l.Attrs.PublicIP.String())
	}
	if l.IPv6Subnet.IsValid() {
		f = append(f, l.IPv6Subnet.String(), l.Attrs.PublicIPv6.String())
	}
	return strings.Join(f, " ")
}

// checkLease says what makes l unusable for a backend, or nil: each family it
// has is a network address with a public address peers can reach (and JSON
// or no backend data); the fields of a family it lacks are empty, PublicIP
// 0.0.0.0; it has a family, a backend type and a node name.
func checkLease(l subnet.Lease) error {
	var errs []error
	family := func(p netip.Prefix, ip netip.Addr, data []byte, v6 bool) {
		switch {
		case !p.IsValid():
			if (v6 && ip.IsValid()) || (!v6 && ip != netip.IPv4Unspecified()) || data != nil {
				errs = append(errs, fmt.Errorf("no %s subnet but address %v, data %q", subnet.FamilyName(v6), ip, data))
			}
		case p.Addr().Is4() == v6 || p.Addr().Is4In6() || p.Masked() != p:
			errs = append(errs, fmt.Errorf("%s subnet %s is not an %s network address", subnet.FamilyName(v6), p, subnet.FamilyName(v6)))
		default:
			if err := subnet.CheckPublicIP(ip, v6); err != nil {
				errs = append(errs, err)
			}
			if data != nil && !json.Valid(data) {
				errs = append(errs, fmt.Errorf("backend data %q is not JSON", data))
			}
		}
	}
	family(l.Subnet, l.Attrs.PublicIP, l.Attrs.BackendData, false)
	family(l.IPv6Subnet, l.Attrs.PublicIPv6, l.Attrs.BackendV6Data, true)
	if !l.Subnet.IsValid() && !l.IPv6Subnet.IsValid() {
		errs = append(errs, errors.New("no family"))
	}
	if l.Attrs.BackendType == "" || l.Attrs.NodeName == "" {
		errs = append(errs, fmt.Errorf("backend type %q, node name %q", l.Attrs.BackendType, l.Attrs.NodeName))
	}
	return errors.Join(errs...)
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// leaseEqual compares every field a parse yields (subnet.SameLease leaves
// out what does not change the datapath).
func leaseEqual(a, b subnet.Lease) bool {
	return a.Subnet == b.Subnet && a.IPv6Subnet == b.IPv6Subnet && a.Expires.Equal(b.Expires) &&
		a.Attrs.PublicIP == b.Attrs.PublicIP && a.Attrs.PublicIPv6 == b.Attrs.PublicIPv6 &&
		a.Attrs.BackendType == b.Attrs.BackendType && a.Attrs.NodeName == b.Attrs.NodeName &&
		bytes.Equal(a.Attrs.BackendData, b.Attrs.BackendData) && bytes.Equal(a.Attrs.BackendV6Data, b.Attrs.BackendV6Data)
}

// waitReasons counts the reasons a manager gives for waiting (Options.Waiting).
type waitReasons struct {
	mu sync.Mutex
	n  map[string]int
}

func (w *waitReasons) record(reason string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.n == nil {
		w.n = map[string]int{}
	}
	w.n[reason]++
}

// seen returns a condition: a reason containing sub was given times times.
func (w *waitReasons) seen(sub string, times int) func() bool {
	return func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		for r, n := range w.n {
			if strings.Contains(r, sub) && n >= times {
				return true
			}
		}
		return false
	}
}
