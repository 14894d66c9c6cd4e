package daemon

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/twillnet/twill/deploy"
	"github.com/twillnet/twill/internal/tools/kubeapi"
	"github.com/twillnet/twill/internal/tools/testenv"
)

// The second /metrics listener on a real kube-apiserver with the manifests
// as shipped: twilld checks tokens with its own ServiceAccount's (bound to a
// pod on its node, as the DaemonSet's), so the ClusterRole is proven to
// allow the reviews. A scraper bound to monitoring.yaml's ClusterRole gets
// the metrics; a ServiceAccount without it 403; no token or a bad one 401.
func TestSecureMetricsOnAPIServer(t *testing.T) {
	api := testenv.StartKubeAPI(t, testenv.KubeAPIOptions{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	admin := api.AdminConfig()
	if _, err := kubeapi.Apply(ctx, admin, deploy.KubeManifest, false); err != nil {
		t.Fatal(err)
	}
	// monitoring.yaml but the PodMonitor, whose CRD belongs to the
	// Prometheus Operator, and the token Secret, which a controller fills.
	rbac, err := kubeapi.Without(deploy.MonitoringManifest, "PodMonitor", "Secret")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kubeapi.Apply(ctx, admin, rbac, false); err != nil {
		t.Fatal(err)
	}
	cs := api.AdminClient(t)
	if _, err := cs.CoreV1().Nodes().Create(ctx, node("a"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().ServiceAccounts("kube-twill").Create(ctx, serviceAccount("nobody"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	twilld := api.ConfigForToken(api.PodBoundToken(t, "kube-twill", "twill", "twill-a", "a"))
	rv, err := newReviewer(twilld, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	met := newMetrics()
	addr, stop, err := serveSecureMetrics("127.0.0.1:0", "", "", "a", []netip.Addr{netip.MustParseAddr("127.0.0.1")}, rv, met)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	get := func(token string) (int, string) {
		t.Helper()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+addr.String()+"/metrics", nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	scraper := api.ServiceAccountToken(t, "kube-twill", "twill-scraper")
	nobody := api.ServiceAccountToken(t, "kube-twill", "nobody")
	// The RBAC authorizer learns new bindings through an informer.
	deadline := time.Now().Add(20 * time.Second)
	for code, _ := get(scraper); code != http.StatusOK; code, _ = get(scraper) {
		if time.Now().After(deadline) {
			t.Fatalf("the scraper's token still gets %d", code)
		}
		clear(rv.cache)
		time.Sleep(200 * time.Millisecond)
	}
	if code, body := get(scraper); code != http.StatusOK || !strings.Contains(body, "twill_reconcile_total") {
		t.Errorf("scraper: %d %.200s", code, body)
	}
	if code, body := get(nobody); code != http.StatusForbidden || !strings.Contains(body, "system:serviceaccount:kube-twill:nobody may not get /metrics") {
		t.Errorf("a ServiceAccount without the right: %d %s", code, body)
	}
	if code, _ := get(""); code != http.StatusUnauthorized {
		t.Errorf("no token: %d", code)
	}
	if code, _ := get("not-a-token"); code != http.StatusUnauthorized {
		t.Errorf("a bad token: %d", code)
	}
	if len(rv.cache) != 3 {
		t.Errorf("%d answers cached, want 3 (scraper, nobody, the bad token)", len(rv.cache))
	}
}

func node(name string) *corev1.Node { return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}} }

func serviceAccount(name string) *corev1.ServiceAccount {
	return &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}
}
