package helm

import (
	"context"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/twillnet/twill/internal/tools/kubeapi"
	"github.com/twillnet/twill/internal/tools/testenv"
)

// A real kube-apiserver (bin/tools/kube-apiserver, `make tools`) admits
// what the chart renders: the CRD of crds/ first, then the templates in
// Helm's install order, each with a server-side apply dry run (schema,
// defaulting, field validation, CEL compilation of the admission policy).
// The namespace is made for real beforehand, labelled, as
// Documentation/kubernetes.md tells users to make it.
func TestAPIServerAdmitsTheRendering(t *testing.T) {
	api := testenv.StartKubeAPI(t, testenv.KubeAPIOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
		Name:   releaseNS,
		Labels: map[string]string{"pod-security.kubernetes.io/enforce": "privileged"},
	}}
	if _, err := api.AdminClient(t).CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, values string }{
		{"defaults", ""},
		{"etcd with TLS", `
datastore: {type: etcd, etcd: {endpoints: [https://10.0.0.10:2379], tlsSecret: twill-etcd-client}}
nodeSelector: {kubernetes.io/os: linux}
`},
		{"dual-stack wireguard", `
podCidrv6: fd00:10:244::/56
enableNFTables: true
backend: {type: wireguard}
mountDevNetTun: true
`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := render(t, tc.values)
			applied, err := kubeapi.Apply(ctx, api.AdminConfig(), r.manifest, true)
			if err != nil {
				t.Fatalf("server-side apply (dry run): %v\napplied before: %v", err, applied)
			}
			if want := len(r.crds) + len(r.objs); len(applied) != want {
				t.Errorf("applied %d objects, the chart renders %d: %v", len(applied), want, applied)
			}
			t.Logf("the API server admits: %v", applied)
		})
	}
}
