package subnet

import (
	"net/netip"
	"strings"
	"testing"
)

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
			if c.FirstSubnet() != netip.MustParsePrefix("10.244.0.0/24") || c.LastSubnet() != netip.MustParsePrefix("10.244.255.0/24") {
				t.Errorf("range = %s..%s", c.FirstSubnet(), c.LastSubnet())
			}
		}},
		{name: "full vxlan", in: `{"Network":"10.1.0.0/16","SubnetLen":26,"SubnetMin":"10.1.1.0","SubnetMax":"10.1.2.192","Backend":{"Type":"vxlan","VNI":42,"Port":4789,"DirectRouting":true,"MTU":1400}}`,
			check: func(t *testing.T, c *Config) {
				want := BackendConfig{Type: "vxlan", VNI: 42, Port: 4789, DirectRouting: true, MTU: 1400}
				if c.Backend != want || c.SubnetLen != 26 {
					t.Errorf("got %+v", c)
				}
				if c.FirstSubnet() != netip.MustParsePrefix("10.1.1.0/26") || c.LastSubnet() != netip.MustParsePrefix("10.1.2.192/26") {
					t.Errorf("range = %s..%s", c.FirstSubnet(), c.LastSubnet())
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
		{name: "too small for SubnetLen", in: `{"Network":"10.1.0.0/24","SubnetLen":24}`, wantErr: "SubnetLen: 24 must be longer"},
		{name: "SubnetLen out of range", in: `{"Network":"10.0.0.0/8","SubnetLen":31}`, wantErr: "SubnetLen: 31 is out of range"},
		{name: "min outside", in: `{"Network":"10.1.0.0/16","SubnetMin":"10.2.0.0"}`, wantErr: "SubnetMin: 10.2.0.0 is outside Network"},
		{name: "max unaligned", in: `{"Network":"10.1.0.0/16","SubnetMax":"10.1.5.7"}`, wantErr: "SubnetMax: 10.1.5.7 is not aligned to SubnetLen 24 (nearest: 10.1.5.0)"},
		{name: "max below min", in: `{"Network":"10.1.0.0/16","SubnetMin":"10.1.9.0","SubnetMax":"10.1.5.0"}`, wantErr: "below SubnetMin"},
		{name: "bad min", in: `{"Network":"10.1.0.0/16","SubnetMin":"ten"}`, wantErr: `SubnetMin: "ten" is not an IP address`},
		{name: "unknown backend", in: `{"Network":"10.1.0.0/16","Backend":{"Type":"udp"}}`, wantErr: `Backend.Type: unknown backend "udp" (known: alloc, host-gw, vxlan)`},
		{name: "option of another backend", in: `{"Network":"10.1.0.0/16","Backend":{"Type":"host-gw","VNI":3}}`, wantErr: `Backend.VNI: not an option of backend "host-gw"`},
		{name: "unknown top-level field", in: `{"Network":"10.1.0.0/16","SubnetLenn":20}`, wantErr: `unknown field "SubnetLenn"`},
		{name: "unknown backend field", in: `{"Network":"10.1.0.0/16","Backend":{"Type":"vxlan","GBP":true}}`, wantErr: `unknown field "GBP"`},
		{name: "VNI range", in: `{"Network":"10.1.0.0/16","Backend":{"VNI":16777216}}`, wantErr: "Backend.VNI: 16777216 is out of range"},
		{name: "port range", in: `{"Network":"10.1.0.0/16","Backend":{"Port":0}}`, wantErr: "Backend.Port: 0 is not a UDP port"},
		{name: "MTU range", in: `{"Network":"10.1.0.0/16","Backend":{"MTU":100}}`, wantErr: "Backend.MTU: 100 is out of range"},
		{name: "not json", in: `Network: 10.1.0.0/16`, wantErr: "invalid JSON"},
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
		if !c.Contains(c.FirstSubnet()) || !c.Contains(c.LastSubnet()) {
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
