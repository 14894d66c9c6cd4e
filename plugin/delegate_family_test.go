package plugin

import (
	"encoding/json"
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/twillnet/twill/subnet"
)

// dualEnv and v6Env are testEnv's node with IPv6 added, and with IPv6 alone.
var (
	dualEnv = subnet.Env{
		Network:     netip.MustParsePrefix("10.244.0.0/16"),
		Subnet:      netip.MustParsePrefix("10.244.7.1/24"),
		IPv6Network: netip.MustParsePrefix("fd00:10:244::/48"),
		IPv6Subnet:  netip.MustParsePrefix("fd00:10:244:7::1/64"),
		MTU:         1400,
		IPMasq:      true,
	}
	v6Env = subnet.Env{
		IPv6Network: dualEnv.IPv6Network,
		IPv6Subnet:  dualEnv.IPv6Subnet,
		MTU:         1400,
		IPMasq:      true,
	}
)

// buildFor builds the delegate config for a plugin config (without
// cniVersion, name and type) on a node with env.
func buildFor(t *testing.T, conf string, env subnet.Env) (map[string]any, error) {
	t.Helper()
	raw := `{"cniVersion": "1.0.0", "name": "net1", "type": "twill"`
	if conf != "" {
		raw += ", " + conf
	}
	c, err := ParseConf([]byte(raw + "}"))
	if err != nil {
		return nil, err
	}
	d, err := BuildDelegate(c, env)
	if err != nil {
		return nil, err
	}
	enc, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	return normalise(t, enc), nil
}

// TestBuildDelegateDualStack pins the delegate config of the deployed
// conflist's twill entry on a dual-stack node: a range set per family, a
// route to each cluster network, and no default route (the bridge adds one
// per family for isDefaultGateway).
func TestBuildDelegateDualStack(t *testing.T) {
	got, err := buildFor(t, `"delegate": {"bridge": "cni0", "hairpinMode": true, "isDefaultGateway": true}`, dualEnv)
	if err != nil {
		t.Fatal(err)
	}
	want := `{
	  "cniVersion": "1.0.0",
	  "name": "net1",
	  "type": "bridge",
	  "bridge": "cni0",
	  "hairpinMode": true,
	  "isDefaultGateway": true,
	  "isGateway": true,
	  "ipMasq": false,
	  "mtu": 1400,
	  "ipam": {
	    "type": "host-local",
	    "ranges": [
	      [{"subnet": "10.244.7.0/24", "gateway": "10.244.7.1"}],
	      [{"subnet": "fd00:10:244:7::/64", "gateway": "fd00:10:244:7::1"}]
	    ],
	    "routes": [{"dst": "10.244.0.0/16"}, {"dst": "fd00:10:244::/48"}]
	  }
	}`
	if w := normalise(t, []byte(want)); !reflect.DeepEqual(got, w) {
		g, _ := json.Marshal(got)
		t.Errorf("delegate config\n got %s\nwant %s", g, want)
	}
}

// TestBuildDelegateIPv6Only pins the delegate config on a node without IPv4.
func TestBuildDelegateIPv6Only(t *testing.T) {
	got, err := buildFor(t, "", v6Env)
	if err != nil {
		t.Fatal(err)
	}
	want := `{
	  "cniVersion": "1.0.0",
	  "name": "net1",
	  "type": "bridge",
	  "bridge": "cni0",
	  "isGateway": true,
	  "ipMasq": false,
	  "mtu": 1400,
	  "ipam": {
	    "type": "host-local",
	    "ranges": [[{"subnet": "fd00:10:244:7::/64", "gateway": "fd00:10:244:7::1"}]],
	    "routes": [{"dst": "fd00:10:244::/48"}]
	  }
	}`
	if w := normalise(t, []byte(want)); !reflect.DeepEqual(got, w) {
		g, _ := json.Marshal(got)
		t.Errorf("delegate config\n got %s\nwant %s", g, want)
	}
}

func TestBuildDelegateFamilies(t *testing.T) {
	const (
		v4Set   = `[{"subnet": "10.244.7.0/24", "gateway": "10.244.7.1"}]`
		v6Set   = `[{"subnet": "fd00:10:244:7::/64", "gateway": "fd00:10:244:7::1"}]`
		routes  = `"routes": [{"dst": "10.244.0.0/16"}, {"dst": "fd00:10:244::/48"}]`
		v6Route = `"routes": [{"dst": "fd00:10:244::/48"}]`
	)
	for _, tc := range []struct {
		name    string
		env     subnet.Env
		conf    string
		want    string // the ipam object, or another top-level key
		wantErr string
	}{
		// Range sets: one per family, given in any order, IPv4 first in the
		// delegate config; a family without a set gets its whole subnet.
		{name: "IPv6 set only", env: dualEnv, conf: `"ipam": {"ranges": [[{"rangeStart": "fd00:10:244:7::100", "rangeEnd": "fd00:10:244:7::1ff"}]]}`,
			want: `{"ipam": {"type": "host-local", "ranges": [` + v4Set + `, [{"subnet": "fd00:10:244:7::/64", "rangeStart": "fd00:10:244:7::100", "rangeEnd": "fd00:10:244:7::1ff", "gateway": "fd00:10:244:7::1"}]], ` + routes + `}}`},
		{name: "IPv4 set only", env: dualEnv, conf: `"ipam": {"ranges": [[{"rangeStart": "10.244.7.10"}]]}`,
			want: `{"ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.7.0/24", "rangeStart": "10.244.7.10", "gateway": "10.244.7.1"}], ` + v6Set + `], ` + routes + `}}`},
		{name: "both sets, IPv6 first", env: dualEnv, conf: `"ipam": {"ranges": [[{"subnet": "fd00:10:244:7::/120"}], [{"rangeEnd": "10.244.7.99"}]]}`,
			want: `{"ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.7.0/24", "rangeEnd": "10.244.7.99", "gateway": "10.244.7.1"}], [{"subnet": "fd00:10:244:7::/120", "gateway": "fd00:10:244:7::1"}]], ` + routes + `}}`},
		{name: "IPv6 set of two ranges", env: dualEnv, conf: `"ipam": {"ranges": [[{"rangeStart": "fd00:10:244:7::10", "rangeEnd": "fd00:10:244:7::1f"}, {"rangeStart": "fd00:10:244:7::30"}]]}`,
			want: `{"ipam": {"type": "host-local", "ranges": [` + v4Set + `, [{"subnet": "fd00:10:244:7::/64", "rangeStart": "fd00:10:244:7::10", "rangeEnd": "fd00:10:244:7::1f", "gateway": "fd00:10:244:7::1"}, {"subnet": "fd00:10:244:7::/64", "rangeStart": "fd00:10:244:7::30", "gateway": "fd00:10:244:7::1"}]], ` + routes + `}}`},
		{name: "IPv6 gateway may be the subnet's last address", env: subnet.Env{IPv6Network: v6Env.IPv6Network, IPv6Subnet: netip.MustParsePrefix("fd00:10:244:7::3/126"), MTU: 1400},
			want: `{"ipam": {"type": "host-local", "ranges": [[{"subnet": "fd00:10:244:7::/126", "gateway": "fd00:10:244:7::3"}]], ` + v6Route + `}}`},
		{name: "set naming no address on an IPv6-only node", env: v6Env, conf: `"ipam": {"ranges": [[{}]]}`,
			want: `{"ipam": {"type": "host-local", "ranges": [` + v6Set + `], ` + v6Route + `}}`},
		{name: "set naming no address on a dual-stack node", env: dualEnv, conf: `"ipam": {"ranges": [[{}]]}`,
			wantErr: "ipam.ranges[0] names no address, so its family is unknown, and the node has an IPv4 and an IPv6 subnet"},
		{name: "two sets, one naming no address", env: dualEnv, conf: `"ipam": {"ranges": [[{}], [{"rangeStart": "fd00:10:244:7::10"}]]}`,
			wantErr: "ipam.ranges[0] names no address, so its family is unknown"},
		{name: "two IPv6 sets", env: dualEnv, conf: `"ipam": {"ranges": [[{"rangeStart": "fd00:10:244:7::10"}], [{"rangeStart": "fd00:10:244:7::20"}]]}`,
			wantErr: "ipam.ranges[0] and ipam.ranges[1] are both IPv6"},
		{name: "three sets", env: dualEnv, conf: `"ipam": {"ranges": [[{"rangeStart": "10.244.7.10"}], [{"rangeStart": "fd00:10:244:7::20"}], [{"rangeStart": "10.244.7.20"}]]}`,
			wantErr: "ipam.ranges has 3 range sets"},
		{name: "set of two families", env: dualEnv, conf: `"ipam": {"ranges": [[{"rangeStart": "10.244.7.10"}, {"rangeStart": "fd00:10:244:7::10"}]]}`,
			wantErr: "ipam.ranges[0][1] is IPv6, but ipam.ranges[0][0] is IPv4"},
		{name: "range of two families", env: dualEnv, conf: `"ipam": {"ranges": [[{"subnet": "10.244.7.0/24", "rangeStart": "fd00:10:244:7::10"}]]}`,
			wantErr: "ipam.ranges[0][0].rangeStart fd00:10:244:7::10 is IPv6, but its subnet is IPv4"},
		{name: "IPv6 subnet outside the node's", env: dualEnv, conf: `"ipam": {"ranges": [[{"subnet": "fd00:10:244:8::/64"}]]}`,
			wantErr: "ipam.ranges[0][0].subnet fd00:10:244:8::/64 lies outside the node subnet fd00:10:244:7::/64"},
		{name: "IPv6 subnet larger than the node's", env: dualEnv, conf: `"ipam": {"ranges": [[{"subnet": "fd00:10:244::/48"}]]}`,
			wantErr: "lies outside the node subnet fd00:10:244:7::/64"},
		{name: "IPv6 subnet without the gateway", env: dualEnv, conf: `"ipam": {"ranges": [[{"subnet": "fd00:10:244:7::100/120"}]]}`,
			wantErr: "ipam.ranges[0][0].subnet fd00:10:244:7::100/120 does not hold the node's gateway fd00:10:244:7::1"},
		{name: "IPv6 subnet too small", env: dualEnv, conf: `"ipam": {"ranges": [[{"subnet": "fd00:10:244:7::/127"}]]}`,
			wantErr: "ipam.ranges[0][0].subnet fd00:10:244:7::/127 is too small for host-local to allocate from (at most /126)"},
		{name: "IPv6 rangeStart outside", env: dualEnv, conf: `"ipam": {"ranges": [[{"rangeStart": "10.244.7.10"}], [{"rangeStart": "fd00:10:244:8::5"}]]}`,
			wantErr: "ipam.ranges[1][0].rangeStart fd00:10:244:8::5 lies outside fd00:10:244:7::/64"},
		{name: "IPv6 rangeEnd before rangeStart", env: dualEnv, conf: `"ipam": {"ranges": [[{"rangeStart": "fd00:10:244:7::50", "rangeEnd": "fd00:10:244:7::40"}]]}`,
			wantErr: "ipam.ranges[0][0].rangeEnd fd00:10:244:7::40 comes before rangeStart fd00:10:244:7::50"},
		{name: "IPv6 range with another gateway", env: dualEnv, conf: `"ipam": {"ranges": [[{"gateway": "fd00:10:244:7::fe"}]]}`,
			wantErr: "ipam.ranges[0][0].gateway fd00:10:244:7::fe: the gateway is the node's bridge address fd00:10:244:7::1"},
		{name: "IPv4-mapped range", env: dualEnv, conf: `"ipam": {"ranges": [[{"rangeStart": "::ffff:10.244.7.10"}]]}`,
			wantErr: "ipam.ranges[0][0].rangeStart: ::ffff:10.244.7.10 is an IPv4-mapped IPv6 address"},
		{name: "IPv4 set on an IPv6-only node", env: v6Env, conf: `"ipam": {"ranges": [[{"rangeStart": "10.244.7.10"}]]}`,
			wantErr: "ipam.ranges[0] is IPv4, but the node has no IPv4 subnet (the env file has no TWILL_SUBNET)"},

		// Routes: the cluster network of each family first, then the user's,
		// each for its own family.
		{name: "IPv6 routes", env: dualEnv, conf: `"ipam": {"routes": [{"dst": "fd00:ffff::/64"}, {"dst": "2001:db8::/32", "gw": "fd00:10:244:7::fe"}, {"dst": "192.168.0.0/16"}]}`,
			want: `{"ipam": {"type": "host-local", "ranges": [` + v4Set + `, ` + v6Set + `], "routes": [{"dst": "10.244.0.0/16"}, {"dst": "fd00:10:244::/48"},
			  {"dst": "fd00:ffff::/64"}, {"dst": "2001:db8::/32", "gw": "fd00:10:244:7::fe"}, {"dst": "192.168.0.0/16"}]}}`},
		{name: "route to the IPv6 network via the gateway, spelt out", env: dualEnv, conf: `"ipam": {"routes": [{"dst": "fd00:10:244::/48", "gw": "fd00:10:244:7::1"}]}`,
			want: `{"ipam": {"type": "host-local", "ranges": [` + v4Set + `, ` + v6Set + `], ` + routes + `}}`},
		{name: "route to the IPv6 network via another gateway", env: dualEnv, conf: `"ipam": {"routes": [{"dst": "fd00:10:244::/48", "gw": "fd00:10:244:7::fe"}]}`,
			wantErr: "ipam.routes[0]: a route to fd00:10:244::/48 is already there (the cluster network is routed via the gateway fd00:10:244:7::1)"},
		{name: "IPv6 route via an IPv4 gateway", env: dualEnv, conf: `"ipam": {"routes": [{"dst": "fd00::/8", "gw": "10.244.7.254"}]}`,
			wantErr: "ipam.routes[0].gw 10.244.7.254 is IPv4, but its dst fd00::/8 is IPv6"},
		{name: "IPv6 route with host bits", env: dualEnv, conf: `"ipam": {"routes": [{"dst": "fd00::1/8"}]}`,
			wantErr: "ipam.routes[0].dst: fd00::1/8 has host bits set; did you mean fd00::/8?"},
		{name: "route gateway with a zone", env: dualEnv, conf: `"ipam": {"routes": [{"dst": "fd00::/8", "gw": "fe80::1%eth0"}]}`,
			wantErr: "ipam.routes[0].gw: fe80::1%eth0 has a zone"},
		{name: "IPv4 route on an IPv6-only node", env: v6Env, conf: `"ipam": {"routes": [{"dst": "0.0.0.0/0"}]}`,
			wantErr: "ipam.routes[0].dst 0.0.0.0/0 is IPv4, but the node has no IPv4 subnet"},
		{name: "default routes without isDefaultGateway stay", env: dualEnv, conf: `"ipam": {"routes": [{"dst": "::/0"}, {"dst": "0.0.0.0/0"}]}`,
			want: `{"ipam": {"type": "host-local", "ranges": [` + v4Set + `, ` + v6Set + `], "routes": [{"dst": "10.244.0.0/16"}, {"dst": "fd00:10:244::/48"}, {"dst": "::/0"}, {"dst": "0.0.0.0/0"}]}}`},
		// The bridge adds these itself; twice would fail its ADD.
		{name: "default routes the bridge adds for isDefaultGateway are dropped", env: dualEnv,
			conf: `"delegate": {"isDefaultGateway": true}, "ipam": {"routes": [{"dst": "::/0"}, {"dst": "0.0.0.0/0", "gw": "10.244.7.1"}, {"dst": "169.254.169.254/32"}]}`,
			want: `{"isDefaultGateway": true, "ipam": {"type": "host-local", "ranges": [` + v4Set + `, ` + v6Set + `], "routes": [{"dst": "10.244.0.0/16"}, {"dst": "fd00:10:244::/48"}, {"dst": "169.254.169.254/32"}]}}`},
		{name: "default route via another gateway with isDefaultGateway", env: dualEnv,
			conf:    `"delegate": {"isDefaultGateway": true}, "ipam": {"routes": [{"dst": "::/0", "gw": "fd00:10:244:7::fe"}]}`,
			wantErr: "ipam.routes[0]: a default route via fd00:10:244:7::fe, but isDefaultGateway makes the bridge route ::/0 via the gateway fd00:10:244:7::1"},
		{name: "isDefaultGateway not a bool", env: dualEnv, conf: `"delegate": {"isDefaultGateway": "yes"}`, wantErr: "delegate isDefaultGateway must be true or false"},
		{name: "isDefaultGateway spelt otherwise", env: dualEnv, conf: `"delegate": {"isdefaultgateway": true}`, wantErr: `delegate key "isdefaultgateway": spell it "isDefaultGateway"`},

		// MTU: IPv6 needs 1280.
		{name: "delegate mtu below 1280 on a dual-stack node", env: dualEnv, conf: `"delegate": {"mtu": 1200}`,
			wantErr: "delegate mtu 1200 is below 1280: the kernel turns IPv6 off on a link with a smaller MTU, and this node has an IPv6 subnet"},
		{name: "delegate mtu below 1280 on an IPv4 node", env: testEnv, conf: `"delegate": {"mtu": 1200}`, want: `{"mtu": 1200}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := buildFor(t, tc.conf, tc.env)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for k, w := range normalise(t, []byte(tc.want)) {
				if !reflect.DeepEqual(got[k], w) {
					gk, _ := json.Marshal(got[k])
					wk, _ := json.Marshal(w)
					t.Errorf("%s = %s\n want %s", k, gk, wk)
				}
			}
		})
	}
}

// TestBuildDelegateUnusableEnv: env files the plugin cannot wire a pod from
// are refused as the env file's fault (envError), naming the key.
func TestBuildDelegateUnusableEnv(t *testing.T) {
	v6 := func(network, sn string, mtu int) subnet.Env {
		e := subnet.Env{MTU: mtu}
		if network != "" {
			e.IPv6Network = netip.MustParsePrefix(network)
		}
		if sn != "" {
			e.IPv6Subnet = netip.MustParsePrefix(sn)
		}
		return e
	}
	withV4 := func(e subnet.Env) subnet.Env {
		e.Network, e.Subnet = testEnv.Network, testEnv.Subnet
		return e
	}
	for _, tc := range []struct {
		name    string
		env     subnet.Env
		wantErr string
	}{
		{"IPv6 subnet /127", v6("fd00:10:244::/48", "fd00:10:244:7::1/127", 1400), "TWILL_IPV6_SUBNET fd00:10:244:7::1/127 leaves no address for pods (host-local needs a /126 or shorter prefix)"},
		{"IPv6 subnet /128", withV4(v6("fd00:10:244::/48", "fd00:10:244:7::1/128", 1400)), "TWILL_IPV6_SUBNET fd00:10:244:7::1/128 leaves no address for pods"},
		{"IPv6 gateway outside its network", v6("fd00:10:244::/48", "fd00:99:0:7::1/64", 1400), "TWILL_IPV6_SUBNET fd00:99:0:7::1/64 lies outside TWILL_IPV6_NETWORK fd00:10:244::/48"},
		{"IPv6 subnet larger than its network", v6("fd00:10:244::/48", "fd00:10:244::1/40", 1400), "lies outside TWILL_IPV6_NETWORK"},
		{"IPv6 gateway is the subnet-router anycast address", v6("fd00:10:244::/48", "fd00:10:244:7::/64", 1400), "the gateway is the subnet's network address (the subnet-router anycast address)"},
		{"IPv6 link-local network", v6("fe80::/10", "fe80::1/64", 1400), "TWILL_IPV6_NETWORK fe80::/10 is not a unicast network pods can be routed in"},
		{"IPv6 multicast network", v6("ff00::/8", "ff00::1/64", 1400), "is not a unicast network"},
		{"IPv6 network with host bits", v6("fd00:10:244::1/48", "fd00:10:244:7::1/64", 1400), "TWILL_IPV6_NETWORK fd00:10:244::1/48 has host bits set"},
		{"IPv6 keys holding IPv4", v6("10.0.0.0/8", "10.1.0.1/16", 1400), "TWILL_IPV6_SUBNET 10.1.0.1/16 and TWILL_IPV6_NETWORK 10.0.0.0/8 must be IPv6"},
		{"IPv4-mapped IPv6", v6("::ffff:10.0.0.0/104", "::ffff:10.1.0.1/112", 1400), "must be IPv6"},
		{"IPv6 subnet without its network", withV4(v6("", "fd00:10:244:7::1/64", 1400)), "TWILL_IPV6_NETWORK is missing"},
		{"IPv6 network without a subnet", withV4(v6("fd00:10:244::/48", "", 1400)), "TWILL_IPV6_SUBNET is missing"},
		{"MTU below IPv6's minimum", withV4(v6("fd00:10:244::/48", "fd00:10:244:7::1/64", 1200)), "TWILL_MTU 1200 is below 1280, the smallest MTU IPv6 runs on"},
		{"no family", subnet.Env{MTU: 1400}, "neither TWILL_SUBNET nor TWILL_IPV6_SUBNET is set"},
		{"IPv4 broken on a dual-stack node", subnet.Env{Network: testEnv.Network, Subnet: netip.MustParsePrefix("10.244.7.1/31"), IPv6Network: dualEnv.IPv6Network, IPv6Subnet: dualEnv.IPv6Subnet, MTU: 1400}, "TWILL_SUBNET 10.244.7.1/31 leaves no address"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := buildFor(t, "", tc.env)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
			}
			if !errors.As(err, new(envError)) {
				t.Errorf("error %v is not an envError: it would be reported as the plugin config's fault", err)
			}
		})
	}
	// An MTU below 1280 is fine without IPv6 (TWILL_MTU allows 576).
	if _, err := buildFor(t, "", subnet.Env{Network: testEnv.Network, Subnet: testEnv.Subnet, MTU: 1200}); err != nil {
		t.Errorf("IPv4-only node with MTU 1200: %v", err)
	}
}
