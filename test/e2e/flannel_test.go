package e2e

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/subnet"
)

// A lease in flannel's dual-stack format (one key for both subnets,
// "10.244.7.0-24&fd00:...-64", with PublicIPv6 and BackendV6Data in its
// value), as a dual-stack flanneld writes it, is read and its IPv4 part
// programmed: h2's lease is rewritten in that format while h2's twilld is
// stopped (its datapath stays), and h1 programs h2 from it again, so the
// pods on the two hosts reach each other.
func TestFlannelDualStackLeaseIsProgrammed(t *testing.T) {
	l := newLab(t, lab.Options{Hosts: 2, PodsPerHost: 1, Backend: "vxlan", DaemonArgs: []string{"--resync-interval", "1s"}})
	ctx := ctxFor(t, time.Minute)
	waitCounts(t, l, 1, expected("vxlan", 1), 10*time.Second)
	if err := l.StopDaemon(ctx, 2); err != nil {
		t.Fatal(err)
	}
	h2 := hostEnv(t, l, 2).Subnet.Masked()
	key := "/twill.io/network/subnets/" + subnet.KeyName(h2)
	value := strings.TrimSpace(labEtcdctl(t, l, "get", "--print-value-only", key))
	var attrs map[string]any
	if err := json.Unmarshal([]byte(value), &attrs); err != nil {
		t.Fatalf("h2's lease %q: %v", value, err)
	}
	labEtcdctl(t, l, "del", key)
	waitCounts(t, l, 1, lab.HostCounts{}, 10*time.Second) // h1 forgot h2

	attrs["PublicIPv6"] = "fd00:198:18::2"
	attrs["BackendV6Data"] = map[string]any{"VNI": 1, "VtepMAC": "aa:bb:cc:00:06:02"}
	dual, _ := json.Marshal(attrs)
	v6 := "fd00:10:244:" + strings.Split(h2.Addr().String(), ".")[2] + "::-64"
	labEtcdctl(t, l, "put", key+"&"+v6, string(dual))
	waitCounts(t, l, 1, expected("vxlan", 1), 10*time.Second)
	requireMatrix(t, l)
	out := ipn(t, l.Topology().HostNS(1), "route", "show", "proto", "116")
	if !strings.Contains(out, h2.String()) {
		t.Fatalf("h1 has no route to h2's %s from the dual-stack lease:\n%s", h2, out)
	}
}
