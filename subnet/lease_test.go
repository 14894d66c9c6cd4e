package subnet

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
)

// Lease key names in flannel's form, single- and dual-stack.
func TestLeaseKeyNames(t *testing.T) {
	v4, v6 := netip.MustParsePrefix("10.244.7.0/24"), netip.MustParsePrefix("fd00:10:244:7::/64")
	for _, tc := range []struct {
		v4, v6 netip.Prefix
		name   string
	}{
		{v4, netip.Prefix{}, "10.244.7.0-24"},
		{v4, v6, "10.244.7.0-24&fd00:10:244:7::-64"},
		{netip.Prefix{}, v6, "0.0.0.0-0&fd00:10:244:7::-64"},
	} {
		if got := LeaseKeyName(tc.v4, tc.v6); got != tc.name {
			t.Errorf("LeaseKeyName(%s, %s) = %q, want %q", tc.v4, tc.v6, got, tc.name)
		}
		a, b, err := ParseLeaseKey(tc.name)
		if err != nil || a != tc.v4 || b != tc.v6 {
			t.Errorf("ParseLeaseKey(%q) = %s, %s, %v", tc.name, a, b, err)
		}
	}
	for _, bad := range []string{"10.244.7.0-24&", "10.244.7.0-24&fd00::", "10.244.7.0-24&fd00::1-64", "10.244.7.0-24&10.1.0.0-16", "10.244.7.0-24&fd00::-129", "10.244.7.0-24&fe80::%eth0-64"} {
		if _, _, err := ParseLeaseKey(bad); err == nil {
			t.Errorf("ParseLeaseKey(%q) accepted", bad)
		}
	}
}

// flannel's dual-stack lease value: both public addresses and both backend
// data; its IPv4-only value writes "PublicIPv6":null. twill's own value has
// no PublicIPv6 at all.
func TestParseLeaseAttrsDualStack(t *testing.T) {
	a, err := ParseLeaseAttrs([]byte(`{"PublicIP":"198.18.0.5","PublicIPv6":"fd00:198:18::5","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:05"},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:00:06:05"}}`))
	if err != nil || a.PublicIPv6 != netip.MustParseAddr("fd00:198:18::5") || len(a.BackendV6Data) == 0 {
		t.Fatalf("dual-stack value: %+v, %v", a, err)
	}
	b, err := ParseLeaseAttrs([]byte(`{"PublicIP":"198.18.0.6","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:06"}}`))
	if err != nil || b.PublicIPv6.IsValid() {
		t.Fatalf("IPv4 value with a null PublicIPv6: %+v, %v", b, err)
	}
	if _, err := ParseLeaseAttrs([]byte(`{"PublicIP":"198.18.0.6","PublicIPv6":"10.0.0.1","BackendType":"vxlan"}`)); err == nil {
		t.Fatal("an IPv4 PublicIPv6 accepted")
	}
	out, _ := json.Marshal(b)
	if strings.Contains(string(out), "PublicIPv6") || strings.Contains(string(out), "BackendV6Data") {
		t.Fatalf("an IPv4 lease marshals IPv6 fields: %s", out)
	}
}
