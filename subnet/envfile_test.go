package subnet

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var envTestConfig = &Config{EnableIPv4: true, EnableIPv6: true,
	Network: netip.MustParsePrefix("10.244.0.0/16"), IPv6Network: netip.MustParsePrefix("fd00:10:244::/56")}

func TestEnvRenderParse(t *testing.T) {
	v4, v6 := netip.MustParsePrefix("10.244.7.0/24"), netip.MustParsePrefix("fd00:10:244:7::/64")
	for _, tt := range []struct {
		name string
		own  Lease
		want string
	}{
		{"ipv4", Lease{Subnet: v4}, "TWILL_NETWORK=10.244.0.0/16\nTWILL_SUBNET=10.244.7.1/24\nTWILL_MTU=1450\nTWILL_IPMASQ=true\n"},
		{"dual", Lease{Subnet: v4, IPv6Subnet: v6}, "TWILL_NETWORK=10.244.0.0/16\nTWILL_SUBNET=10.244.7.1/24\n" +
			"TWILL_IPV6_NETWORK=fd00:10:244::/56\nTWILL_IPV6_SUBNET=fd00:10:244:7::1/64\nTWILL_MTU=1450\nTWILL_IPMASQ=true\n"},
		{"ipv6", Lease{IPv6Subnet: v6}, "TWILL_IPV6_NETWORK=fd00:10:244::/56\nTWILL_IPV6_SUBNET=fd00:10:244:7::1/64\nTWILL_MTU=1450\nTWILL_IPMASQ=true\n"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e := NewEnv(envTestConfig, tt.own, 1450, true)
			if got := string(e.Render()); got != tt.want {
				t.Fatalf("Render:\n%s\nwant:\n%s", got, tt.want)
			}
			back, err := ParseEnv(e.Render())
			if err != nil || back != e {
				t.Fatalf("ParseEnv = %+v, %v; want %+v", back, err, e)
			}
		})
	}
}

// The flannel-format file has flannel's keys, in flanneld's order, with the
// same values.
func TestRenderFlannel(t *testing.T) {
	e := NewEnv(envTestConfig, Lease{Subnet: netip.MustParsePrefix("10.244.7.0/24"), IPv6Subnet: netip.MustParsePrefix("fd00:10:244:7::/64")}, 1450, true)
	want := "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
	if got := string(e.RenderFlannel()); got != want {
		t.Fatalf("RenderFlannel:\n%s\nwant:\n%s", got, want)
	}
	path := filepath.Join(t.TempDir(), "flannel", "subnet.env")
	if err := WriteFlannelEnv(path, e); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(path); err != nil || string(got) != want {
		t.Fatalf("written %q, %v", got, err)
	}
}

func TestParseEnvErrors(t *testing.T) {
	good := "TWILL_NETWORK=10.244.0.0/16\nTWILL_SUBNET=10.244.7.1/24\nTWILL_MTU=1450\nTWILL_IPMASQ=false\n"
	tests := []struct{ name, in, want string }{
		{"missing var", strings.Replace(good, "TWILL_MTU=1450\n", "", 1), "TWILL_MTU is missing"},
		{"not key=value", good + "garbage\n", `"garbage" is not KEY=VALUE`},
		{"twice", good + "TWILL_MTU=1400\n", "TWILL_MTU set twice"},
		{"bad mtu", strings.Replace(good, "1450", "big", 1), `TWILL_MTU="big"`},
		{"mtu range", strings.Replace(good, "1450", "100", 1), "out of range"},
		{"bad bool", strings.Replace(good, "false", "maybe", 1), `TWILL_IPMASQ="maybe"`},
		{"subnet outside network", strings.Replace(good, "10.244.7.1/24", "10.9.7.1/24", 1), "lies outside TWILL_NETWORK"},
		{"subnet wider than network", strings.Replace(good, "10.244.7.1/24", "10.244.7.1/8", 1), "lies outside"},
		{"unknown twill var", good + "TWILL_FOO=1\n", "unknown variable TWILL_FOO"},
		{"network host bits", strings.Replace(good, "10.244.0.0/16", "10.244.0.1/16", 1), "not an IPv4 network address"},
		{"empty", "", "TWILL_NETWORK is missing"},
		{"gateway is the network address", strings.Replace(good, "10.244.7.1/24", "10.244.7.0/24", 1), "network or broadcast address"},
		{"gateway is the broadcast address", strings.Replace(good, "10.244.7.1/24", "10.244.7.255/24", 1), "network or broadcast address"},
		{"subnet too small", strings.Replace(good, "10.244.7.1/24", "10.244.7.1/31", 1), "no room for pods"},
		{"v6 network without subnet", good + "TWILL_IPV6_NETWORK=fd00::/56\n", "TWILL_IPV6_SUBNET is missing"},
		{"v6 subnet without network", good + "TWILL_IPV6_SUBNET=fd00::1/64\n", "TWILL_IPV6_NETWORK is missing"},
		{"v6 network is v4", good + "TWILL_IPV6_NETWORK=10.0.0.0/8\nTWILL_IPV6_SUBNET=fd00::1/64\n", "not an IPv6 network address"},
		{"v4 subnet is v6", strings.Replace(good, "10.244.7.1/24", "fd00::1/64", 1), "not IPv4"},
		{"v6 subnet outside", good + "TWILL_IPV6_NETWORK=fd00::/56\nTWILL_IPV6_SUBNET=fd01::1/64\n", "TWILL_IPV6_SUBNET fd01::1/64 lies outside TWILL_IPV6_NETWORK"},
		{"v6 gateway is network address", good + "TWILL_IPV6_NETWORK=fd00::/56\nTWILL_IPV6_SUBNET=fd00::/64\n", "not a gateway"},
		{"v6 subnet too small", good + "TWILL_IPV6_NETWORK=fd00::/56\nTWILL_IPV6_SUBNET=fd00::1/127\n", "at most /126"},
		{"no family", "TWILL_MTU=1450\nTWILL_IPMASQ=false\n", "TWILL_NETWORK is missing"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseEnv([]byte(tt.in))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want %q", err, tt.want)
			}
		})
	}
	// Comments, blank lines and foreign variables are fine.
	if _, err := ParseEnv([]byte("# written by twilld\n\nFOO=bar\n" + good)); err != nil {
		t.Fatal(err)
	}
}

func TestWriteEnvAtomicAndMode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run", "twill", "subnet.env")
	e := NewEnv(envTestConfig, Lease{Subnet: netip.MustParsePrefix("10.244.7.0/24")}, 1450, true)
	if err := WriteEnv(path, e); err != nil {
		t.Fatal(err)
	}
	e.MTU = 1400
	if err := WriteEnv(path, e); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o644 {
		t.Fatalf("mode = %v, want 0644", st.Mode().Perm())
	}
	got, err := ReadEnv(path)
	if err != nil || got != e {
		t.Fatalf("ReadEnv = %+v, %v", got, err)
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Fatalf("temp files left behind: %v", entries)
	}
}
