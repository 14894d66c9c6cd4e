package helm

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"helm.sh/helm/v3/pkg/chart/loader"
	"helm.sh/helm/v3/pkg/chartutil"
	"helm.sh/helm/v3/pkg/engine"
	"helm.sh/helm/v3/pkg/lint"
	"helm.sh/helm/v3/pkg/lint/support"
	"helm.sh/helm/v3/pkg/releaseutil"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/twillnet/twill/deploy"
	"github.com/twillnet/twill/internal/tools/kubeapi"
)

// The release the tests render, as Documentation/kubernetes.md installs it:
// `helm install twill deploy/helm/twill --namespace kube-twill`.
const (
	chartDir    = "twill"
	releaseName = "twill"
	releaseNS   = "kube-twill"
)

// rendering is what `helm install` would send to the API server.
type rendering struct {
	// crds are the chart's crds/ files, which Helm installs first, as they are.
	crds []*unstructured.Unstructured
	// objs are the rendered templates' objects, in Helm's install order.
	objs []*unstructured.Unstructured
	// notes is the rendered NOTES.txt.
	notes string
	// manifest is every object as YAML, CRDs first, then the templates in
	// Helm's install order.
	manifest []byte
}

// tryRender renders the chart as Helm's install does (the chart's values
// coalesced with valuesYAML, the release options, the templates sorted in
// Helm's install order), without a cluster.
func tryRender(valuesYAML string) (rendering, error) {
	var r rendering
	ch, err := loader.Load(chartDir)
	if err != nil {
		return r, err
	}
	vals, err := chartutil.ReadValues([]byte(valuesYAML))
	if err != nil {
		return r, fmt.Errorf("values: %w", err)
	}
	caps := chartutil.DefaultCapabilities
	rv, err := chartutil.ToRenderValues(ch, vals, chartutil.ReleaseOptions{
		Name: releaseName, Namespace: releaseNS, Revision: 1, IsInstall: true,
	}, caps)
	if err != nil {
		return r, err
	}
	files, err := engine.Render(ch, rv)
	if err != nil {
		return r, err
	}
	for name, text := range files {
		if strings.HasSuffix(name, "/NOTES.txt") {
			r.notes = text
			delete(files, name)
		}
	}
	_, manifests, err := releaseutil.SortManifests(files, caps.APIVersions, releaseutil.InstallOrder)
	if err != nil {
		return r, err
	}
	var buf bytes.Buffer
	for _, crd := range ch.CRDObjects() {
		objs, err := kubeapi.Decode(crd.File.Data)
		if err != nil {
			return r, fmt.Errorf("%s: %w", crd.Filename, err)
		}
		r.crds = append(r.crds, objs...)
		buf.Write(crd.File.Data)
		buf.WriteString("\n---\n")
	}
	for _, m := range manifests {
		objs, err := kubeapi.Decode([]byte(m.Content))
		if err != nil {
			return r, fmt.Errorf("%s: %w\n%s", m.Name, err, m.Content)
		}
		r.objs = append(r.objs, objs...)
		buf.WriteString(m.Content)
		buf.WriteString("\n---\n")
	}
	r.manifest = buf.Bytes()
	return r, nil
}

func render(t *testing.T, valuesYAML string) rendering {
	t.Helper()
	r, err := tryRender(valuesYAML)
	if err != nil {
		t.Fatalf("render the chart with values %q: %v", valuesYAML, err)
	}
	return r
}

func key(o *unstructured.Unstructured) string {
	if o.GetNamespace() == "" {
		return o.GetKind() + " " + o.GetName()
	}
	return o.GetKind() + " " + o.GetNamespace() + "/" + o.GetName()
}

// comparable is an object as the comparison sees it: a ConfigMap's JSON
// values (net-conf.json, cni-conf.json) parsed, so that their layout does
// not matter. Nothing else is changed: the chart adds no Helm labels or
// annotations to its objects (Helm adds its ownership annotations itself, at
// install time, not in the rendering), so the rest must be equal as is.
func comparable(t *testing.T, o *unstructured.Unstructured) map[string]any {
	t.Helper()
	c := o.DeepCopy().Object
	if o.GetKind() != "ConfigMap" {
		return c
	}
	data, _ := c["data"].(map[string]any)
	for k, v := range data {
		s, ok := v.(string)
		if !ok || !strings.HasSuffix(k, ".json") {
			continue
		}
		var parsed any
		if err := json.Unmarshal([]byte(s), &parsed); err != nil {
			t.Errorf("%s: %s is not JSON: %v\n%s", key(o), k, err, s)
			continue
		}
		data[k] = parsed
	}
	return c
}

// With its default values the chart gives the objects of
// deploy/kube-twill.yaml, each equal in every field, and nothing else, but
// the Namespace, which the chart leaves to the user (Helm cannot label a
// namespace it creates with --create-namespace): its NOTES and
// Documentation/kubernetes.md say how to label it as the manifest does.
func TestDefaultsRenderTheManifest(t *testing.T) {
	r := render(t, "")
	want, err := kubeapi.Decode(deploy.KubeManifest)
	if err != nil {
		t.Fatal(err)
	}

	got := map[string]*unstructured.Unstructured{}
	for _, o := range append(slices.Clone(r.crds), r.objs...) {
		if _, dup := got[key(o)]; dup {
			t.Errorf("the chart renders %s twice", key(o))
		}
		got[key(o)] = o
	}
	for _, o := range r.crds {
		if o.GetKind() != "CustomResourceDefinition" {
			t.Errorf("crds/ holds %s, not a CustomResourceDefinition", key(o))
		}
	}
	for _, o := range r.objs {
		if o.GetKind() == "CustomResourceDefinition" {
			t.Errorf("%s is rendered from templates/: a CRD goes in crds/, which Helm installs before the templates", key(o))
		}
	}

	var compared []string
	for _, w := range want {
		k := key(w)
		if w.GetKind() == "Namespace" {
			if w.GetName() != releaseNS {
				t.Errorf("the manifest's namespace is %s, the tests' release namespace %s", w.GetName(), releaseNS)
			}
			if _, ok := got[k]; ok {
				t.Errorf("the chart renders %s; it is meant to leave the namespace to the user", k)
			}
			delete(got, k)
			for lk, lv := range w.GetLabels() {
				if label := lk + "=" + lv; !strings.Contains(r.notes, label) {
					t.Errorf("NOTES.txt does not tell to label the namespace %s as the manifest does:\n%s", label, r.notes)
				}
			}
			continue
		}
		g, ok := got[k]
		if !ok {
			t.Errorf("the chart does not render %s of deploy/kube-twill.yaml", k)
			continue
		}
		delete(got, k)
		if d := cmp.Diff(comparable(t, w), comparable(t, g)); d != "" {
			t.Errorf("%s: the chart's differs from deploy/kube-twill.yaml's (-manifest +chart):\n%s", k, d)
		}
		compared = append(compared, k)
	}
	for k := range got {
		t.Errorf("the chart renders %s, which deploy/kube-twill.yaml has not", k)
	}
	sort.Strings(compared)
	t.Logf("compared with deploy/kube-twill.yaml's: %s", strings.Join(compared, "; "))
	for _, kind := range []string{"ServiceAccount", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
		"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "ConfigMap", "DaemonSet"} {
		if !slices.ContainsFunc(compared, func(k string) bool { return strings.HasPrefix(k, kind+" ") }) {
			t.Errorf("no %s compared", kind)
		}
	}
}

// `helm lint` (Helm's linter, as a library) finds nothing to say but
// information (the chart has no icon).
func TestHelmLint(t *testing.T) {
	kv := &chartutil.KubeVersion{Version: "v1.37.0", Major: "1", Minor: "37"}
	l := lint.AllWithKubeVersion(chartDir, nil, releaseNS, kv)
	for _, m := range l.Messages {
		if m.Severity > support.InfoSev {
			t.Errorf("helm lint: %v", m)
		} else {
			t.Logf("helm lint: %v", m)
		}
	}
}
