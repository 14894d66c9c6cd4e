package plugin

import (
	"encoding/json"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/twillnet/twill/subnet"
)

var testEnv = subnet.Env{
	Network: netip.MustParsePrefix("10.244.0.0/16"),
	Subnet:  netip.MustParsePrefix("10.244.7.1/24"),
	MTU:     1400,
	IPMasq:  true,
}

// normalise decodes JSON into plain Go values so two encodings compare equal.
func normalise(t *testing.T, data []byte) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(data, &m); err != nil {
		t.Fatalf("decode %s: %v", data, err)
	}
	return m
}

// TestBuildDelegateDefaults pins the full delegate config for a plugin config
// that sets nothing; Documentation/cni-plugin.md shows the same example.
func TestBuildDelegateDefaults(t *testing.T) {
	conf, err := ParseConf([]byte(`{"cniVersion":"1.1.0","name":"twill","type":"twill"}`))
	if err != nil {
		t.Fatal(err)
	}
	if conf.SubnetFile != "/run/twill/subnet.env" || conf.DataDir != "/var/lib/cni/twill" {
		t.Errorf("defaults: subnetFile %q dataDir %q", conf.SubnetFile, conf.DataDir)
	}
	d, err := BuildDelegate(conf, testEnv)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := json.Marshal(d)
	want := `{
	  "cniVersion": "1.1.0",
	  "name": "twill",
	  "type": "bridge",
	  "bridge": "cni0",
	  "isGateway": true,
	  "ipMasq": false,
	  "mtu": 1400,
	  "ipam": {
	    "type": "host-local",
	    "ranges": [[{"subnet": "10.244.7.0/24", "gateway": "10.244.7.1"}]],
	    "routes": [{"dst": "10.244.0.0/16"}]
	  }
	}`
	if g, w := normalise(t, got), normalise(t, []byte(want)); !reflect.DeepEqual(g, w) {
		t.Errorf("delegate config\n got %s\nwant %s", got, want)
	}
}

func TestBuildDelegate(t *testing.T) {
	for _, tc := range []struct {
		name string
		conf string // the plugin config without cniVersion/name/type
		env  *subnet.Env
		// want lists top-level keys of the delegate config and their exact
		// values; keys not listed are not compared.
		want    string
		wantErr string // substring of the error from ParseConf or BuildDelegate
	}{
		{name: "ipMasq follows TWILL_IPMASQ=false", env: &subnet.Env{Network: testEnv.Network, Subnet: testEnv.Subnet, MTU: 9000, IPMasq: false},
			want: `{"ipMasq": true, "mtu": 9000}`},
		{name: "bridge name", conf: `"delegate": {"bridge": "twill0"}`, want: `{"bridge": "twill0", "type": "bridge"}`},
		{name: "pass-through keys", conf: `"delegate": {"hairpinMode": true, "isDefaultGateway": true, "promiscMode": true, "vlan": 100}`,
			want: `{"hairpinMode": true, "isDefaultGateway": true, "promiscMode": true, "vlan": 100, "isGateway": true}`},
		{name: "isGateway override", conf: `"delegate": {"isGateway": false}`, want: `{"isGateway": false}`},
		{name: "ipMasq override", conf: `"delegate": {"ipMasq": true}`, want: `{"ipMasq": true}`},
		{name: "smaller mtu", conf: `"delegate": {"mtu": 1300}`, want: `{"mtu": 1300}`},
		{name: "mtu above TWILL_MTU", conf: `"delegate": {"mtu": 1500}`, wantErr: "larger than the network's MTU"},
		{name: "mtu not a number", conf: `"delegate": {"mtu": "1300"}`, wantErr: "must be a number"},
		{name: "mtu fraction", conf: `"delegate": {"mtu": 1300.5}`, wantErr: "is not an MTU"},
		{name: "other delegate type", conf: `"delegate": {"type": "ptp"}`, want: `{"type": "ptp", "mtu": 1400}`},
		{name: "delegate type twill", conf: `"delegate": {"type": "twill"}`, wantErr: "would call twill itself"},
		{name: "delegate type path", conf: `"delegate": {"type": "../bin/sh"}`, wantErr: "not a plugin name"},
		{name: "delegate sets name", conf: `"delegate": {"name": "x"}`, wantErr: `may not set "name"`},
		{name: "delegate sets cniVersion", conf: `"delegate": {"cniVersion": "0.3.1"}`, wantErr: `may not set "cniVersion"`},
		{name: "delegate sets ipam in another case", conf: `"delegate": {"IPAM": {"type": "dhcp"}}`, wantErr: `may not set "IPAM"`},
		{name: "delegate sets cniVersion in another case", conf: `"delegate": {"cniversion": "0.3.1"}`, wantErr: `may not set "cniversion"`},
		{name: "delegate isGateway in another case", conf: `"delegate": {"isgateway": false}`, wantErr: `spell it "isGateway"`},
		{name: "delegate sets ipam", conf: `"delegate": {"ipam": {"type": "dhcp"}}`, wantErr: `may not set "ipam"`},
		{name: "delegate bridge too long", conf: `"delegate": {"bridge": "a-very-long-bridge-name"}`, wantErr: "not an interface name"},
		{name: "delegate isGateway string", conf: `"delegate": {"isGateway": "yes"}`, wantErr: "must be true or false"},
		{name: "delegate not an object", conf: `"delegate": ["bridge"]`, wantErr: "must be a JSON object"},
		{name: "delegate null", conf: `"delegate": null`, want: `{"type": "bridge"}`},
		{name: "runtimeConfig and args pass through", conf: `"runtimeConfig": {"mac": "0a:58:0a:f4:07:09"}, "args": {"cni": {"ips": ["10.244.7.9"]}}`,
			want: `{"runtimeConfig": {"mac": "0a:58:0a:f4:07:09"}, "args": {"cni": {"ips": ["10.244.7.9"]}}}`},
		{name: "ipam dataDir", conf: `"ipam": {"dataDir": "/var/lib/cni/networks-twill/"}`,
			want: `{"ipam": {"type": "host-local", "dataDir": "/var/lib/cni/networks-twill", "ranges": [[{"subnet": "10.244.7.0/24", "gateway": "10.244.7.1"}]], "routes": [{"dst": "10.244.0.0/16"}]}}`},
		{name: "ipam dataDir relative", conf: `"ipam": {"dataDir": "ipam"}`, wantErr: "must be an absolute path"},
		{name: "ipam type host-local", conf: `"ipam": {"type": "host-local"}`, want: `{"ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.7.0/24", "gateway": "10.244.7.1"}]], "routes": [{"dst": "10.244.0.0/16"}]}}`},
		{name: "ipam type other", conf: `"ipam": {"type": "dhcp"}`, wantErr: "only delegates to host-local"},
		{name: "ipam unknown key", conf: `"ipam": {"subnet": "10.244.7.0/24"}`, wantErr: "unknown field"},
		{name: "extra routes", conf: `"ipam": {"routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.244.7.254"}, {"dst": "10.244.0.0/16"}, {"dst": "0.0.0.0/0"}]}`,
			want: `{"ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.7.0/24", "gateway": "10.244.7.1"}]],
			  "routes": [{"dst": "10.244.0.0/16"}, {"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.244.7.254"}]}}`},
		{name: "route conflicting with the network route", conf: `"ipam": {"routes": [{"dst": "10.244.0.0/16", "gw": "10.244.7.254"}]}`, wantErr: "already there"},
		{name: "route with host bits", conf: `"ipam": {"routes": [{"dst": "192.168.1.1/16"}]}`, wantErr: "host bits set"},
		{name: "IPv6 route on an IPv4 node", conf: `"ipam": {"routes": [{"dst": "fd00::/8"}]}`, wantErr: "ipam.routes[0].dst fd00::/8 is IPv6, but the node has no IPv6 subnet (the env file has no TWILL_IPV6_SUBNET)"},
		{name: "route without dst", conf: `"ipam": {"routes": [{"gw": "10.244.7.254"}]}`, wantErr: "ipam.routes[0].dst"},
		{name: "range narrowed by start and end", conf: `"ipam": {"ranges": [[{"rangeStart": "10.244.7.100", "rangeEnd": "10.244.7.199"}]]}`,
			want: `{"ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.7.0/24", "rangeStart": "10.244.7.100", "rangeEnd": "10.244.7.199", "gateway": "10.244.7.1"}]], "routes": [{"dst": "10.244.0.0/16"}]}}`},
		{name: "range narrower subnet holding the gateway", conf: `"ipam": {"ranges": [[{"subnet": "10.244.7.0/25", "gateway": "10.244.7.1"}]]}`,
			want: `{"ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.7.0/25", "gateway": "10.244.7.1"}]], "routes": [{"dst": "10.244.0.0/16"}]}}`},
		{name: "two ranges in one set", conf: `"ipam": {"ranges": [[{"rangeStart": "10.244.7.10", "rangeEnd": "10.244.7.19"}, {"rangeStart": "10.244.7.30", "rangeEnd": "10.244.7.39"}]]}`,
			want: `{"ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.7.0/24", "rangeStart": "10.244.7.10", "rangeEnd": "10.244.7.19", "gateway": "10.244.7.1"},
			  {"subnet": "10.244.7.0/24", "rangeStart": "10.244.7.30", "rangeEnd": "10.244.7.39", "gateway": "10.244.7.1"}]], "routes": [{"dst": "10.244.0.0/16"}]}}`},
		{name: "range outside the node subnet", conf: `"ipam": {"ranges": [[{"subnet": "10.244.8.0/24"}]]}`, wantErr: "ipam.ranges[0][0].subnet 10.244.8.0/24 lies outside the node subnet 10.244.7.0/24"},
		{name: "range larger than the node subnet", conf: `"ipam": {"ranges": [[{"subnet": "10.244.0.0/16"}]]}`, wantErr: "lies outside the node subnet"},
		{name: "range without the gateway", conf: `"ipam": {"ranges": [[{"subnet": "10.244.7.128/25"}]]}`, wantErr: "does not hold the node's gateway"},
		{name: "range with another gateway", conf: `"ipam": {"ranges": [[{"gateway": "10.244.7.254"}]]}`, wantErr: "the gateway is the node's bridge address"},
		{name: "rangeStart outside", conf: `"ipam": {"ranges": [[{"rangeStart": "10.244.8.10"}]]}`, wantErr: "ipam.ranges[0][0].rangeStart 10.244.8.10 lies outside 10.244.7.0/24"},
		{name: "rangeEnd outside", conf: `"ipam": {"ranges": [[{"rangeEnd": "10.245.7.10"}]]}`, wantErr: "ipam.ranges[0][0].rangeEnd 10.245.7.10 lies outside 10.244.7.0/24"},
		{name: "rangeEnd before rangeStart", conf: `"ipam": {"ranges": [[{"rangeStart": "10.244.7.50", "rangeEnd": "10.244.7.40"}]]}`, wantErr: "comes before"},
		{name: "two IPv4 range sets", conf: `"ipam": {"ranges": [[{"rangeStart": "10.244.7.10"}], [{"rangeStart": "10.244.7.20"}]]}`, wantErr: "ipam.ranges[0] and ipam.ranges[1] are both IPv4"},
		{name: "empty range set", conf: `"ipam": {"ranges": [[]]}`, wantErr: "ipam.ranges[0] is an empty range set"},
		{name: "IPv6 range on an IPv4 node", conf: `"ipam": {"ranges": [[{"subnet": "fd00::/64"}]]}`, wantErr: "ipam.ranges[0] is IPv6, but the node has no IPv6 subnet"},
		{name: "unknown range key", conf: `"ipam": {"ranges": [[{"start": "10.244.7.10"}]]}`, wantErr: "unknown field"},
		{name: "relative subnetFile", conf: `"subnetFile": "subnet.env"`, wantErr: "must be an absolute path"},
		{name: "env subnet too small", env: &subnet.Env{Network: testEnv.Network, Subnet: netip.MustParsePrefix("10.244.7.1/31"), MTU: 1400}, wantErr: "leaves no address"},
		{name: "env gateway is the network address", env: &subnet.Env{Network: testEnv.Network, Subnet: netip.MustParsePrefix("10.244.7.0/24"), MTU: 1400}, wantErr: "network or broadcast"},
		{name: "env gateway is the broadcast address", env: &subnet.Env{Network: testEnv.Network, Subnet: netip.MustParsePrefix("10.244.7.255/24"), MTU: 1400}, wantErr: "network or broadcast"},
		{name: "env subnet outside network", env: &subnet.Env{Network: testEnv.Network, Subnet: netip.MustParsePrefix("10.99.7.1/24"), MTU: 1400}, wantErr: "lies outside TWILL_NETWORK"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw := `{"cniVersion": "0.4.0", "name": "net1", "type": "twill"`
			if tc.conf != "" {
				raw += ", " + tc.conf
			}
			raw += "}"
			env := testEnv
			if tc.env != nil {
				env = *tc.env
			}
			conf, err := ParseConf([]byte(raw))
			var d map[string]any
			if err == nil {
				d, err = BuildDelegate(conf, env)
			}
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			enc, err := json.Marshal(d)
			if err != nil {
				t.Fatal(err)
			}
			got := normalise(t, enc)
			// What every delegate config has, whatever the options.
			if got["name"] != "net1" || got["cniVersion"] != "0.4.0" {
				t.Errorf("name %v cniVersion %v, want the conf's", got["name"], got["cniVersion"])
			}
			for k, w := range normalise(t, []byte(tc.want)) {
				if !reflect.DeepEqual(got[k], w) {
					gk, _ := json.Marshal(got[k])
					wk, _ := json.Marshal(w)
					t.Errorf("%s = %s, want %s", k, gk, wk)
				}
			}
		})
	}
}

func TestParseConfDelegateTimeout(t *testing.T) {
	for conf, want := range map[string]time.Duration{
		`{"name":"n"}`:                         DefaultDelegateTimeout,
		`{"name":"n","delegateTimeout":"90s"}`: 90 * time.Second,
		`{"name":"n","delegateTimeout":"10m"}`: 10 * time.Minute,
	} {
		c, err := ParseConf([]byte(conf))
		if err != nil {
			t.Fatalf("%s: %v", conf, err)
		}
		if c.DelegateTimeout != want {
			t.Errorf("%s: timeout %v, want %v", conf, c.DelegateTimeout, want)
		}
	}
}

func TestParseConfRejects(t *testing.T) {
	for _, tc := range []struct{ name, conf, wantErr string }{
		{"not JSON", `{"name":`, "decode network config"},
		{"trailing data", `{"name":"n"} {}`, "data after the JSON object"},
		{"no name", `{"cniVersion":"1.1.0"}`, "network name is empty"},
		{"name with slash", `{"name":"a/b"}`, "not allowed"},
		{"name with dots", `{"name":"a..b"}`, `contains ".."`},
		{"dataDir relative", `{"name":"n","dataDir":"var/lib"}`, "must be an absolute path"},
		{"dataDir wrong type", `{"name":"n","dataDir":7}`, "decode network config"},
		{"valid-attachments wrong type", `{"name":"n","cni.dev/valid-attachments":{}}`, "decode network config"},
		{"delegateTimeout not a duration", `{"name":"n","delegateTimeout":"soon"}`, `delegateTimeout "soon" is not a duration`},
		{"delegateTimeout a number", `{"name":"n","delegateTimeout":60}`, "decode network config"},
		{"delegateTimeout too short", `{"name":"n","delegateTimeout":"10ms"}`, "from 1s to 10m0s"},
		{"delegateTimeout too long", `{"name":"n","delegateTimeout":"1h"}`, "from 1s to 10m0s"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConf([]byte(tc.conf))
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
}

func TestParseConfValidAttachments(t *testing.T) {
	for _, tc := range []struct {
		conf string
		want *int // nil: the key was absent
	}{
		{`{"name":"n"}`, nil},
		{`{"name":"n","cni.dev/valid-attachments":null}`, nil},
		{`{"name":"n","cni.dev/valid-attachments":[]}`, ptr(0)},
		{`{"name":"n","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}`, ptr(1)},
		{`{"name":"n","cni.dev/attachments":[{"containerID":"a","ifname":"eth0"},{"containerID":"b","ifname":"eth0"}]}`, ptr(2)},
	} {
		c, err := ParseConf([]byte(tc.conf))
		if err != nil {
			t.Fatalf("%s: %v", tc.conf, err)
		}
		switch {
		case tc.want == nil && c.ValidAttachments != nil:
			t.Errorf("%s: got %v attachments, want the key absent", tc.conf, *c.ValidAttachments)
		case tc.want != nil && (c.ValidAttachments == nil || len(*c.ValidAttachments) != *tc.want):
			t.Errorf("%s: got %v, want %d attachments", tc.conf, c.ValidAttachments, *tc.want)
		}
	}
}

func ptr[T any](v T) *T { return &v }
