package plugin

import (
	"encoding/json"
	"net/netip"
	"testing"
)

// FuzzParseConf feeds arbitrary stdin to the config parser and, when it
// accepts, to BuildDelegate, and checks what must hold for any accepted
// config: no panic, and a delegate config that keeps pods inside the node
// subnet on host-local with the network's MTU. Seeds: testdata/fuzz/FuzzParseConf.
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
		d, err := BuildDelegate(conf, testEnv)
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
		if got.MTU < 68 || got.MTU > testEnv.MTU {
			t.Fatalf("delegate mtu %d, network MTU %d", got.MTU, testEnv.MTU)
		}
		if got.IPAM.Type != IPAMType || len(got.IPAM.Ranges) != 1 || len(got.IPAM.Ranges[0]) == 0 {
			t.Fatalf("ipam %s", enc)
		}
		node := testEnv.Subnet.Masked()
		for _, r := range got.IPAM.Ranges[0] {
			p, err := netip.ParsePrefix(r.Subnet)
			if err != nil || p.Bits() < node.Bits() || !node.Contains(p.Addr()) {
				t.Fatalf("range subnet %q outside the node subnet %s", r.Subnet, node)
			}
			if r.Gateway != testEnv.Subnet.Addr().String() {
				t.Fatalf("range gateway %q, want %s", r.Gateway, testEnv.Subnet.Addr())
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
		if len(got.IPAM.Routes) == 0 || got.IPAM.Routes[0] != (Route{Dst: testEnv.Network.String()}) {
			t.Fatalf("first route %v, want the cluster network", got.IPAM.Routes)
		}
	})
}
