package plugin

import (
	"encoding/json"
	"net/netip"
	"slices"
	"testing"

	"github.com/twillnet/twill/subnet"
)

// FuzzParseConf feeds arbitrary stdin to the config parser and, when it
// accepts, to BuildDelegate on an IPv4-only, a dual-stack and an IPv6-only
// node, and checks what must hold for any accepted config: no panic, and a
// delegate config that keeps pods inside the node subnets on host-local
// (one range set per family of the node, each inside that family's subnet
// with its gateway), routes the cluster networks first, and uses the
// network's MTU. Seeds: testdata/fuzz/FuzzParseConf.
func FuzzParseConf(f *testing.F) {
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"twill","type":"twill"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		conf, err := ParseConf(data)
		if err != nil {
			return
		}
		if ValidateNetworkName(conf.Name) != nil {
			t.Fatalf("accepted network name %q", conf.Name)
		}
		for _, env := range []subnet.Env{testEnv, dualEnv, v6Env} {
			checkDelegate(t, conf, env)
		}
	})
}

func checkDelegate(t *testing.T, conf *NetConf, env subnet.Env) {
	d, err := BuildDelegate(conf, env)
	if err != nil {
		return
	}
	enc, err := json.Marshal(d)
	if err != nil {
		t.Fatalf("delegate config does not encode: %v", err)
	}
	var got struct {
		Name       string `json:"name"`
		CNIVersion string `json:"cniVersion"`
		Type       string `json:"type"`
		MTU        int    `json:"mtu"`
		IPAM       struct {
			Type   string    `json:"type"`
			Ranges [][]Range `json:"ranges"`
			Routes []Route   `json:"routes"`
		} `json:"ipam"`
	}
	if err := json.Unmarshal(enc, &got); err != nil {
		t.Fatalf("delegate config %s does not decode: %v", enc, err)
	}
	if got.Name != conf.Name || got.CNIVersion != conf.CNIVersion {
		t.Fatalf("name/cniVersion %q/%q, conf has %q/%q", got.Name, got.CNIVersion, conf.Name, conf.CNIVersion)
	}
	if got.Type == "" || got.Type == "twill" {
		t.Fatalf("delegate type %q", got.Type)
	}
	if got.MTU < 68 || got.MTU > env.MTU || (env.IPv6Subnet.IsValid() && got.MTU < 1280) {
		t.Fatalf("delegate mtu %d, network MTU %d", got.MTU, env.MTU)
	}
	// The node's families, IPv4 first: the order of range sets and of the
	// first routes.
	var nodes, networks []netip.Prefix
	for _, fam := range [][2]netip.Prefix{{env.Subnet, env.Network}, {env.IPv6Subnet, env.IPv6Network}} {
		if fam[0].IsValid() {
			nodes, networks = append(nodes, fam[0]), append(networks, fam[1])
		}
	}
	if got.IPAM.Type != IPAMType || len(got.IPAM.Ranges) != len(nodes) {
		t.Fatalf("ipam %s on a node with subnets %v", enc, nodes)
	}
	for i, set := range got.IPAM.Ranges {
		node := nodes[i].Masked()
		if len(set) == 0 {
			t.Fatalf("empty range set %d: %s", i, enc)
		}
		for _, r := range set {
			p, err := netip.ParsePrefix(r.Subnet)
			if err != nil || p.Bits() < node.Bits() || !node.Contains(p.Addr()) {
				t.Fatalf("range subnet %q outside the node subnet %s", r.Subnet, node)
			}
			if r.Gateway != nodes[i].Addr().String() {
				t.Fatalf("range gateway %q, want %s", r.Gateway, nodes[i].Addr())
			}
			for _, a := range []string{r.RangeStart, r.RangeEnd} {
				if a == "" {
					continue
				}
				if ip, err := netip.ParseAddr(a); err != nil || !p.Contains(ip) {
					t.Fatalf("range bound %q outside %s", a, p)
				}
			}
		}
	}
	if len(got.IPAM.Routes) < len(networks) {
		t.Fatalf("routes %v, want the cluster networks %v first", got.IPAM.Routes, networks)
	}
	for i, n := range networks {
		if got.IPAM.Routes[i] != (Route{Dst: n.String()}) {
			t.Fatalf("routes %v, want the cluster networks %v first", got.IPAM.Routes, networks)
		}
	}
	for _, r := range got.IPAM.Routes {
		dst, err := netip.ParsePrefix(r.Dst)
		if err != nil || !slices.ContainsFunc(nodes, func(p netip.Prefix) bool { return p.Addr().Is6() == dst.Addr().Is6() }) {
			t.Fatalf("route %v of a family the node has no subnet of (%v)", r, nodes)
		}
	}
}
