package deploy

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"k8s.io/apimachinery/pkg/util/yaml"

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

// The admission policy names twill's ServiceAccount by its user name: it
// must be the manifest's ServiceAccount, the one the ClusterRoleBinding
// binds and the DaemonSet runs as, or the policy would guard nothing.
func TestPolicyNamesTheServiceAccount(t *testing.T) {
	dec := yaml.NewYAMLOrJSONDecoder(bytes.NewReader(KubeManifest), 4096)
	var sa, bound, runs, policy string
	for {
		var obj struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Name, Namespace string
			} `json:"metadata"`
			Subjects []struct{ Kind, Name, Namespace string } `json:"subjects"`
			Spec     struct {
				MatchConditions []struct{ Expression string } `json:"matchConditions"`
				Template        struct {
					Spec struct {
						ServiceAccountName string `json:"serviceAccountName"`
					} `json:"spec"`
				} `json:"template"`
			} `json:"spec"`
		}
		if err := dec.Decode(&obj); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		switch obj.Kind {
		case "ServiceAccount":
			sa = "system:serviceaccount:" + obj.Metadata.Namespace + ":" + obj.Metadata.Name
		case "ClusterRoleBinding":
			for _, s := range obj.Subjects {
				bound = "system:serviceaccount:" + s.Namespace + ":" + s.Name
			}
		case "DaemonSet":
			runs = "system:serviceaccount:" + obj.Metadata.Namespace + ":" + obj.Spec.Template.Spec.ServiceAccountName
		case "ValidatingAdmissionPolicy":
			for _, c := range obj.Spec.MatchConditions {
				policy += c.Expression
			}
		}
	}
	if sa == "" || bound != sa || runs != sa || !strings.Contains(policy, "'"+sa+"'") {
		t.Errorf("ServiceAccount %q, bound %q, DaemonSet runs as %q, policy matches %q: all must name the same", sa, bound, runs, policy)
	}
}
