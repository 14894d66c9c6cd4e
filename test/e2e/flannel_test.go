package e2e

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/subnet"
)

// Leases in flannel's dual-stack format (one key for both subnets,
// "10.244.7.0-24&fd00:...-64", with PublicIPv6 and BackendV6Data in its
// value), as a dual-stack flanneld writes them, are programmed in both
// families. In an IPv4 network h2's lease is rewritten in that format with
// made-up IPv6 fields while h2's twilld is stopped (its datapath stays): h1
// programs h2's IPv4 part from it again. In a dual-stack network h2's lease
// is replaced by one with exactly flannel's fields (no NodeName): h1
// programs both families from it, and the pods reach each other in both.
func TestFlannelDualStackLeaseIsProgrammed(t *testing.T) {
	t.Run("ipv4 network", func(t *testing.T) {
		l := newLab(t, lab.Options{Hosts: 2, PodsPerHost: 1, Backend: "vxlan", DaemonArgs: []string{"--resync-interval", "1s"}})
		ctx := ctxFor(t, time.Minute)
		waitCounts(t, l, 1, expected("vxlan", 1), 10*time.Second)
		if err := l.StopDaemon(ctx, 2); err != nil {
			t.Fatal(err)
		}
		h2 := hostEnv(t, l, 2).Subnet.Masked()
		key := "/twill.io/network/subnets/" + subnet.KeyName(h2)
		attrs := leaseValue(t, l, key)
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
	})
	t.Run("dual-stack network", func(t *testing.T) {
		l := newLab(t, lab.Options{Hosts: 2, PodsPerHost: 1, Backend: "vxlan", IPFamily: "dual", DaemonArgs: []string{"--resync-interval", "1s"}})
		ctx := ctxFor(t, time.Minute)
		for _, v6 := range l.Families() {
			waitFamilyEntries(t, l, 1, v6, 10*time.Second)
		}
		if err := l.StopDaemon(ctx, 2); err != nil {
			t.Fatal(err)
		}
		env := hostEnv(t, l, 2)
		key := "/twill.io/network/subnets/" + subnet.LeaseKeyName(env.Subnet.Masked(), env.IPv6Subnet.Masked())
		attrs := leaseValue(t, l, key)
		if attrs["PublicIPv6"] != l.Topology().HostAddrV6(2).String() || attrs["BackendV6Data"] == nil {
			t.Fatalf("h2's lease %v lacks its IPv6 fields", attrs)
		}
		labEtcdctl(t, l, "del", key)
		waitFor(t, "h1 to forget h2", 10*time.Second, func() error {
			if e := readFamilyEntries(t, l.Topology().HostNS(1), true); len(e.Routes) > 0 {
				return fmt.Errorf("IPv6 entries %+v", e)
			}
			return nil
		})
		flannel := map[string]any{}
		for _, k := range []string{"PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data"} {
			flannel[k] = attrs[k]
		}
		value, _ := json.Marshal(flannel)
		labEtcdctl(t, l, "put", key, string(value))
		for _, v6 := range l.Families() {
			waitFamilyEntries(t, l, 1, v6, 10*time.Second)
		}
		requireMatrix(t, l)
	})
}

// leaseValue reads a lease's value from the lab's etcd as JSON fields.
func leaseValue(t *testing.T, l *lab.Lab, key string) map[string]any {
	t.Helper()
	value := strings.TrimSpace(labEtcdctl(t, l, "get", "--print-value-only", key))
	var attrs map[string]any
	if err := json.Unmarshal([]byte(value), &attrs); err != nil {
		t.Fatalf("lease %s %q: %v", key, value, err)
	}
	return attrs
}
