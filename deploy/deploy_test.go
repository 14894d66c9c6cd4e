package deploy

import (
	"encoding/json"
	"slices"
	"testing"

	"github.com/containernetworking/cni/libcni"

	"github.com/twillnet/twill/plugin"
)

// The shipped conflists must work on runtimes of both CNI library lines:
// 1.1.x (containerd 1.6 and 1.7) ignores cniVersions and takes cniVersion,
// whose results it accepts only up to 1.0.0; 1.2 and later take the highest
// entry of cniVersions it implements. The containerd test
// (test/e2e TestContainerdCRI) runs the ConfigMap's under a real containerd.
func TestShippedConflists(t *testing.T) {
	kube, err := KubeCNIConf()
	if err != nil {
		t.Fatal(err)
	}
	var chains [][]string
	for name, raw := range map[string][]byte{"10-twill.conflist": CNIConfList, "ConfigMap cni-conf.json": kube} {
		var conf struct {
			CNIVersion  string   `json:"cniVersion"`
			CNIVersions []string `json:"cniVersions"`
			Name        string   `json:"name"`
			Plugins     []struct {
				Type string `json:"type"`
			} `json:"plugins"`
		}
		if err := json.Unmarshal(raw, &conf); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if conf.CNIVersion != "1.0.0" {
			t.Errorf("%s: cniVersion %q; CNI library 1.1 runtimes (containerd 1.6/1.7) need 1.0.0", name, conf.CNIVersion)
		}
		newest := plugin.SupportedVersions[len(plugin.SupportedVersions)-1]
		if !slices.Contains(conf.CNIVersions, newest) || !slices.Contains(conf.CNIVersions, conf.CNIVersion) {
			t.Errorf("%s: cniVersions %v should offer %s (GC, STATUS) beside cniVersion %s", name, conf.CNIVersions, newest, conf.CNIVersion)
		}
		for _, v := range conf.CNIVersions {
			if !slices.Contains(plugin.SupportedVersions, v) {
				t.Errorf("%s: cniVersions offers %s, which twill does not speak", name, v)
			}
		}
		list, err := libcni.ConfListFromBytes(raw)
		if err != nil {
			t.Fatalf("%s: libcni: %v", name, err)
		}
		if list.CNIVersion != newest {
			t.Errorf("%s: this CNI library chose version %s, want %s", name, list.CNIVersion, newest)
		}
		if conf.Name != "twill" {
			t.Errorf("%s: network name %q, want twill", name, conf.Name)
		}
		var chain []string
		for _, p := range conf.Plugins {
			chain = append(chain, p.Type)
		}
		chains = append(chains, chain)
	}
	if !slices.Equal(chains[0], chains[1]) || !slices.Equal(chains[0], []string{"twill", "portmap"}) {
		t.Errorf("plugin chains %v, want twill then portmap in both", chains)
	}
}
