package subnet

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
)

// testPSK is a pre-shared key as `wg genpsk` prints one.
const testPSK = "FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE="

func TestParseConfig(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		wantErr string // substring; empty means valid
		check   func(t *testing.T, c *Config)
	}{
		{name: "defaults", in: `{"Network":"10.244.0.0/16"}`, check: func(t *testing.T, c *Config) {
			if c.SubnetLen != 24 || c.Backend.Type != "vxlan" || c.Backend.VNI != 1 || c.Backend.Port != 8472 {
				t.Errorf("defaults not applied: %+v", c)
			}
			// The first subnet is not handed out (as in flannel) but stays
			// valid for a node that holds it.
			if c.Range(false).First() != netip.MustParsePrefix("10.244.1.0/24") || c.Range(false).Last() != netip.MustParsePrefix("10.244.255.0/24") {
				t.Errorf("range = %s..%s", c.Range(false).First(), c.Range(false).Last())
			}
			if !c.Range(false).Contains(netip.MustParsePrefix("10.244.0.0/24")) {
				t.Error("a node on the first subnet would lose it")
			}
		}},
		// flannel's SubnetLen default: 24, or a quarter of a Network smaller than a /22.
		{name: "SubnetLen default for a /23", in: `{"Network":"10.1.0.0/23"}`, check: func(t *testing.T, c *Config) {
			if c.SubnetLen != 25 || c.Range(false).First() != netip.MustParsePrefix("10.1.0.128/25") {
				t.Errorf("SubnetLen %d, first %s; want 25 and 10.1.0.128/25", c.SubnetLen, c.Range(false).First())
			}
		}},
		{name: "SubnetLen default for a /28", in: `{"Network":"10.1.0.0/28"}`, check: func(t *testing.T, c *Config) {
			if c.SubnetLen != 30 {
				t.Errorf("SubnetLen %d, want 30", c.SubnetLen)
			}
		}},
		{name: "a /29 is too small", in: `{"Network":"10.1.0.0/29"}`, wantErr: "SubnetLen: 31 is out of range"},
		{name: "IPv6SubnetLen default for a /63", in: `{"Network":"10.1.0.0/16","IPv6Network":"fd00::/63"}`, check: func(t *testing.T, c *Config) {
			if c.IPv6SubnetLen != 65 {
				t.Errorf("IPv6SubnetLen %d, want 65", c.IPv6SubnetLen)
			}
		}},
		{name: "full vxlan", in: `{"Network":"10.1.0.0/16","SubnetLen":26,"SubnetMin":"10.1.1.0","SubnetMax":"10.1.2.192","Backend":{"Type":"vxlan","VNI":42,"Port":4789,"DirectRouting":true,"MTU":1400}}`,
			check: func(t *testing.T, c *Config) {
				want := BackendConfig{Type: "vxlan", VNI: 42, Port: 4789, DirectRouting: true, MTU: 1400}
				if c.Backend != want || c.SubnetLen != 26 {
					t.Errorf("got %+v", c)
				}
				if c.Range(false).First() != netip.MustParsePrefix("10.1.1.0/26") || c.Range(false).Last() != netip.MustParsePrefix("10.1.2.192/26") {
					t.Errorf("range = %s..%s", c.Range(false).First(), c.Range(false).Last())
				}
			}},
		{name: "host-gw", in: `{"Network":"10.1.0.0/16","Backend":{"Type":"host-gw"}}`, check: func(t *testing.T, c *Config) {
			if c.Backend.Type != "host-gw" || c.Backend.VNI != 0 {
				t.Errorf("got %+v", c.Backend)
			}
		}},
		{name: "alloc", in: `{"Network":"10.1.0.0/16","Backend":{"Type":"alloc"}}`},
		{name: "missing network", in: `{"SubnetLen":24}`, wantErr: "Network: required"},
		{name: "malformed CIDR", in: `{"Network":"10.1.0.0/33"}`, wantErr: `Network: "10.1.0.0/33" is not a CIDR`},
		{name: "ipv6", in: `{"Network":"fd00::/48"}`, wantErr: "not an IPv4 CIDR"},
		{name: "host bits", in: `{"Network":"10.1.2.0/16"}`, wantErr: "host bits set"},
		{name: "too small for SubnetLen", in: `{"Network":"10.1.0.0/24","SubnetLen":24}`, wantErr: "SubnetLen: 24 must be at least 2 longer than the Network's prefix length 24"},
		{name: "two subnets are too few", in: `{"Network":"10.1.0.0/23","SubnetLen":24}`, wantErr: "must hold four subnets or more"},
		{name: "SubnetLen out of range", in: `{"Network":"10.0.0.0/8","SubnetLen":31}`, wantErr: "SubnetLen: 31 is out of range"},
		{name: "min outside", in: `{"Network":"10.1.0.0/16","SubnetMin":"10.2.0.0"}`, wantErr: "SubnetMin: 10.2.0.0 is outside Network"},
		{name: "max unaligned", in: `{"Network":"10.1.0.0/16","SubnetMax":"10.1.5.7"}`, wantErr: "SubnetMax: 10.1.5.7 is not aligned to SubnetLen 24 (nearest: 10.1.5.0)"},
		{name: "max below min", in: `{"Network":"10.1.0.0/16","SubnetMin":"10.1.9.0","SubnetMax":"10.1.5.0"}`, wantErr: "below SubnetMin"},
		{name: "bad min", in: `{"Network":"10.1.0.0/16","SubnetMin":"ten"}`, wantErr: `SubnetMin: "ten" is not an IP address`},
		{name: "unknown backend", in: `{"Network":"10.1.0.0/16","Backend":{"Type":"bogus"}}`, wantErr: `Backend.Type: unknown backend "bogus" (known: alloc, host-gw, vxlan, wireguard)`},
		{name: "option of another backend", in: `{"Network":"10.1.0.0/16","Backend":{"Type":"host-gw","VNI":3}}`, wantErr: `Backend.VNI: not an option of backend "host-gw"`},
		{name: "unknown top-level field", in: `{"Network":"10.1.0.0/16","SubnetLenn":20}`, wantErr: `unknown field "SubnetLenn"`},
		{name: "unknown backend field", in: `{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","GPB":true}}`, wantErr: `unknown field "GPB"`},
		{name: "flannel's GBP", in: `{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","GBP":true}}`, wantErr: "Backend.GBP: flannel's option is not supported by twill: VXLAN Group Based Policy is not implemented; remove the option"},
		{name: "flannel's Learning", in: `{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","Learning":false}}`, wantErr: "Backend.Learning: flannel's option is not supported by twill"},
		{name: "VNI range", in: `{"Network":"10.1.0.0/16","Backend":{"VNI":16777216}}`, wantErr: "Backend.VNI: 16777216 is out of range"},
		{name: "port range", in: `{"Network":"10.1.0.0/16","Backend":{"Port":0}}`, wantErr: "Backend.Port: 0 is not a UDP port"},
		{name: "MTU range", in: `{"Network":"10.1.0.0/16","Backend":{"MTU":100}}`, wantErr: "Backend.MTU: 100 is out of range"},
		// The family keys (flannel's names).
		{name: "EnableIPv4 true", in: `{"EnableIPv4":true,"Network":"10.1.0.0/16"}`, check: func(t *testing.T, c *Config) {
			if !c.EnableIPv4 || c.EnableIPv6 || c.IPv6SubnetLen != DefaultIPv6SubnetLen {
				t.Errorf("families %v/%v, IPv6SubnetLen %d", c.EnableIPv4, c.EnableIPv6, c.IPv6SubnetLen)
			}
		}},
		{name: "IPv6 keys of a family that is off are checked, not used", in: `{"Network":"10.1.0.0/16","EnableIPv6":false,"IPv6Network":"fd00:10::/56"}`},
		{name: "IPv6 link-local network", in: `{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fe80::/56"}`, wantErr: "IPv6Network: fe80::/56 is not a unicast range"},
		{name: "IPv6 with a small MTU", in: `{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56","Backend":{"Type":"vxlan","MTU":1200}}`, wantErr: "Backend.MTU: 1200 is below 1280"},
		{name: "both families off", in: `{"EnableIPv4":false,"EnableIPv6":false}`, wantErr: "EnableIPv4, EnableIPv6: both are false"},
		{name: "IPv6 without IPv6Network", in: `{"Network":"10.1.0.0/16","EnableIPv6":true}`, wantErr: "IPv6Network: required when EnableIPv6 is true"},
		{name: "IPv6Network not IPv6", in: `{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"10.2.0.0/16"}`, wantErr: "IPv6Network: 10.2.0.0/16 is not an IPv6 CIDR"},
		{name: "IPv6Network malformed", in: `{"Network":"10.1.0.0/16","IPv6Network":"fd00::/129"}`, wantErr: `IPv6Network: "fd00::/129" is not a CIDR`},
		{name: "IPv6Network host bits", in: `{"Network":"10.1.0.0/16","IPv6Network":"fd00::1/64"}`, wantErr: "IPv6Network: fd00::1/64 has host bits set"},
		{name: "IPv6SubnetLen not longer", in: `{"Network":"10.1.0.0/16","IPv6Network":"fd00::/64","IPv6SubnetLen":64}`, wantErr: "IPv6SubnetLen: 64 must be at least 2 longer than the IPv6Network's prefix length 64"},
		{name: "IPv6SubnetLen too long", in: `{"Network":"10.1.0.0/16","IPv6Network":"fd00::/56","IPv6SubnetLen":127}`, wantErr: "IPv6SubnetLen: 127 is out of range (1 to 126"},
		{name: "IPv6SubnetMin outside", in: `{"Network":"10.1.0.0/16","IPv6Network":"fd00::/56","IPv6SubnetMin":"fd01::"}`, wantErr: "IPv6SubnetMin: fd01:: is outside IPv6Network fd00::/56"},
		{name: "IPv6SubnetMax unaligned", in: `{"Network":"10.1.0.0/16","IPv6Network":"fd00::/56","IPv6SubnetMax":"fd00:0:0:5::1"}`, wantErr: "IPv6SubnetMax: fd00:0:0:5::1 is not aligned to IPv6SubnetLen 64"},
		{name: "IPv6SubnetMax below min", in: `{"Network":"10.1.0.0/16","IPv6Network":"fd00::/56","IPv6SubnetMin":"fd00:0:0:9::","IPv6SubnetMax":"fd00:0:0:5::"}`, wantErr: "IPv6SubnetMax: fd00:0:0:5:: is below IPv6SubnetMin"},
		{name: "IPv6 range without network", in: `{"Network":"10.1.0.0/16","IPv6SubnetMin":"fd00::"}`, wantErr: "set without IPv6Network"},
		{name: "dual-stack", in: `{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/56"}`, check: func(t *testing.T, c *Config) {
			if !c.EnableIPv4 || !c.EnableIPv6 || c.IPv6SubnetLen != 64 || len(c.Families()) != 2 {
				t.Errorf("got %+v", c)
			}
			r := c.Range(true)
			if r.First() != netip.MustParsePrefix("fd00:10:0:1::/64") || r.Last() != netip.MustParsePrefix("fd00:10:0:ff::/64") {
				t.Errorf("IPv6 range %s..%s", r.First(), r.Last())
			}
		}},
		{name: "flannel's stock config", in: `{"Network":"10.244.0.0/16","EnableNFTables":false,"Backend":{"Type":"vxlan"}}`, check: func(t *testing.T, c *Config) {
			if c.EnableNFTables == nil || *c.EnableNFTables {
				t.Errorf("EnableNFTables %v, want false", c.EnableNFTables)
			}
		}},
		{name: "nftables", in: `{"Network":"10.244.0.0/16","EnableNFTables":true}`, check: func(t *testing.T, c *Config) {
			if c.EnableNFTables == nil || !*c.EnableNFTables {
				t.Errorf("EnableNFTables %v, want true", c.EnableNFTables)
			}
		}},
		{name: "rules by what the host has", in: `{"Network":"10.244.0.0/16"}`, check: func(t *testing.T, c *Config) {
			if c.EnableNFTables != nil {
				t.Errorf("EnableNFTables %v, want nil (not set)", *c.EnableNFTables)
			}
		}},
		{name: "EnableNFTables not a bool", in: `{"Network":"10.244.0.0/16","EnableNFTables":"yes"}`, wantErr: "EnableNFTables"},
		{name: "IPv6-only", in: `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10::/56"}`, check: func(t *testing.T, c *Config) {
			if c.EnableIPv4 || !c.EnableIPv6 || c.Network.IsValid() || len(c.Families()) != 1 {
				t.Errorf("got %+v", c)
			}
		}},
		{name: "not json", in: `Network: 10.1.0.0/16`, wantErr: "invalid JSON"},
		{name: "flannel's udp backend", in: `{"Network":"10.1.0.0/16","Backend":{"Type":"udp"}}`, wantErr: `Backend.Type: flannel's "udp" backend is not in twill: use vxlan`},
		{name: "wireguard defaults", in: `{"Network":"10.1.0.0/16","Backend":{"Type":"wireguard"}}`, check: func(t *testing.T, c *Config) {
			b := c.Backend
			if b.ListenPort != 51820 || b.ListenPortV6 != 51821 || b.Mode != "separate" || b.PSK != "" || b.PersistentKeepaliveInterval != 0 || b.VNI != 0 {
				t.Errorf("wireguard defaults: %v", b)
			}
		}},
		{name: "wireguard options", in: `{"Network":"10.1.0.0/16","Backend":{"Type":"wireguard","ListenPort":51000,"PSK":"` + testPSK + `","PersistentKeepaliveInterval":25,"MTU":1400}}`, check: func(t *testing.T, c *Config) {
			b := c.Backend
			if b.ListenPort != 51000 || b.PSK != testPSK || b.PersistentKeepaliveInterval != 25 || b.MTU != 1400 {
				t.Errorf("wireguard options: %v", b)
			}
			if strings.Contains(b.String(), testPSK) || strings.Contains(fmt.Sprint(b), testPSK) || strings.Contains(fmt.Sprintf("%+v", b), testPSK) {
				t.Errorf("the PSK shows in %v", b)
			}
		}},
		{name: "wireguard PSK not a key", in: `{"Network":"10.1.0.0/16","Backend":{"Type":"wireguard","PSK":"c2VjcmV0"}}`, wantErr: "Backend.PSK: not a WireGuard key"},
		{name: "wireguard one port for both families", in: `{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/56","Backend":{"Type":"wireguard","ListenPortV6":51820}}`, wantErr: "ListenPortV6: 51820 is ListenPort too"},
		{name: "wireguard auto mode", in: `{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/56","Backend":{"Type":"wireguard","Mode":"auto"}}`, check: func(t *testing.T, c *Config) {
			if c.Backend.Mode != "auto" {
				t.Errorf("Mode %q", c.Backend.Mode)
			}
		}},
		{name: "wireguard ipv6 mode without IPv6", in: `{"Network":"10.1.0.0/16","Backend":{"Type":"wireguard","Mode":"ipv6"}}`, wantErr: `"ipv6" reaches peers over IPv6, and EnableIPv6 is not true`},
		{name: "wireguard unknown mode", in: `{"Network":"10.1.0.0/16","Backend":{"Type":"wireguard","Mode":"both"}}`, wantErr: `Backend.Mode: unknown mode "both"`},
		{name: "wireguard port out of range", in: `{"Network":"10.1.0.0/16","Backend":{"Type":"wireguard","ListenPort":70000}}`, wantErr: "Backend.ListenPort: 70000 is not a UDP port"},
		{name: "wireguard option on vxlan", in: `{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","ListenPort":51820}}`, wantErr: `Backend.ListenPort: not an option of backend "vxlan"`},
		{name: "trailing data", in: `{"Network":"10.1.0.0/16"} {}`, wantErr: "trailing data"},
		{name: "backend not object", in: `{"Network":"10.1.0.0/16","Backend":"vxlan"}`, wantErr: "Backend: must be an object"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := ParseConfig([]byte(tt.in))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want it to contain %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if tt.check != nil {
				tt.check(t, c)
			}
		})
	}
}

// A config written back by MarshalJSON parses to the same config.
func TestConfigRoundTrip(t *testing.T) {
	for _, in := range []string{
		`{"Network":"10.244.0.0/16"}`,
		`{"Network":"10.1.0.0/16","SubnetLen":26,"SubnetMin":"10.1.1.0","SubnetMax":"10.1.2.192","Backend":{"Type":"vxlan","VNI":42,"Port":4789,"DirectRouting":true,"MTU":1400}}`,
		`{"Network":"172.16.0.0/12","Backend":{"Type":"host-gw","MTU":9000}}`,
		`{"EnableIPv4":true,"Network":"10.1.0.0/16","EnableIPv6":false,"IPv6Network":"fd00:10::/56","IPv6SubnetLen":72,"IPv6SubnetMin":"fd00:10:0:1::"}`,
		`{"Network":"10.1.0.0/16","EnableNFTables":true,"Backend":{"Type":"wireguard","ListenPort":51999,"PSK":"` + testPSK + `","PersistentKeepaliveInterval":25,"MTU":1400}}`,
		`{"Network":"10.1.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10::/56","EnableNFTables":false,"Backend":{"Type":"wireguard","Mode":"auto","ListenPortV6":51820}}`,
	} {
		c, err := ParseConfig([]byte(in))
		if err != nil {
			t.Fatal(err)
		}
		out, err := c.MarshalJSON()
		if err != nil {
			t.Fatal(err)
		}
		c2, err := ParseConfig(out)
		if err != nil {
			t.Fatalf("reparse %s: %v", out, err)
		}
		if (c.EnableNFTables == nil) != (c2.EnableNFTables == nil) || c.EnableNFTables != nil && *c.EnableNFTables != *c2.EnableNFTables {
			t.Errorf("round trip of %s: EnableNFTables %v != %v", in, c.EnableNFTables, c2.EnableNFTables)
		}
		c.EnableNFTables, c2.EnableNFTables = nil, nil
		if *c != *c2 {
			t.Errorf("round trip of %s: %+v != %+v", in, c, c2)
		}
	}
}

func FuzzParseConfig(f *testing.F) {
	f.Add([]byte(`{"Network":"10.244.0.0/16"}`))
	f.Add([]byte(`{"Network":"10.1.0.0/16","SubnetLen":26,"SubnetMin":"10.1.1.0","SubnetMax":"10.1.2.192","Backend":{"Type":"vxlan","VNI":42}}`))
	f.Add([]byte(`{"Network":"10.0.0.0/8","Backend":{"Type":"host-gw"}}`))
	f.Add([]byte(`{"Network":"0.0.0.0/0","SubnetLen":30}`))
	f.Add([]byte(`{"Backend":null}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseConfig(data)
		if err != nil {
			return
		}
		// Whatever parses must describe a usable range.
		if !c.Range(false).Contains(c.Range(false).First()) || !c.Range(false).Contains(c.Range(false).Last()) {
			t.Fatalf("accepted config with an empty range: %+v", c)
		}
		out, err := c.MarshalJSON()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ParseConfig(out); err != nil {
			t.Fatalf("accepted config does not round-trip: %s: %v", out, err)
		}
	})
}
