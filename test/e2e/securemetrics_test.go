package e2e

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/twillnet/twill/deploy"
	"github.com/twillnet/twill/internal/tools/kubeapi"
	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/internal/tools/testenv"
)

// A scraper in another network namespace (the lab's underlay) reads h1's
// /metrics from --secure-metrics-addr on h1's underlay address, over TLS,
// with a token allowed by deploy/monitoring.yaml's ClusterRole; a
// ServiceAccount without it gets 403, no token 401. twilld runs with its
// token bound to a pod on h1, under the manifest's RBAC, and checks the
// scrapers' tokens with the lab's real kube-apiserver.
func TestSecureMetricsFromAnotherNamespace(t *testing.T) {
	l := newLab(t, lab.Options{Hosts: 1, PodsPerHost: 0, Backend: "vxlan",
		Datastore: "kube", KubeAPIServer: testenv.Tool(t, "kube-apiserver")})
	ctx := ctxFor(t, 2*time.Minute)
	if err := l.StopDaemon(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if err := l.StartDaemon(1, "--secure-metrics-addr", ":9868"); err != nil {
		t.Fatal(err)
	}
	cfg := l.KubeServer().Config(l.KubeAdminToken, lab.DialInNS(l.Topology().UnderlayNS()))
	rbac, err := kubeapi.Without(deploy.MonitoringManifest, "PodMonitor", "Secret")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kubeapi.Apply(ctx, cfg, rbac, false); err != nil {
		t.Fatal(err)
	}
	cs, err := l.KubeClient()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().ServiceAccounts("kube-twill").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "nobody"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	scraper, err := kubeapi.ServiceAccountToken(ctx, cs, "kube-twill", "twill-scraper", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	nobody, err := kubeapi.ServiceAccountToken(ctx, cs, "kube-twill", "nobody", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	dial := lab.DialInNS(l.Topology().UnderlayNS())
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: dial, TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	url := fmt.Sprintf("https://%s:9868/metrics", l.Topology().HostAddr(1))
	get := func(token string) (int, string, error) {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := client.Do(req)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), nil
	}
	// twilld listens once it has its lease; the RBAC authorizer learns the
	// new binding through an informer (refusals are cached 10 s).
	waitFor(t, "the scraper to get h1's metrics", 40*time.Second, func() error {
		code, body, err := get(scraper)
		if err == nil && (code != http.StatusOK || !strings.Contains(body, "twill_ready 1")) {
			err = fmt.Errorf("%d %.300s", code, body)
		}
		return err
	})
	if code, body, err := get(nobody); err != nil || code != http.StatusForbidden {
		t.Errorf("a ServiceAccount without the right: %d %s %v", code, body, err)
	}
	if code, _, err := get(""); err != nil || code != http.StatusUnauthorized {
		t.Errorf("no token: %d %v", code, err)
	}
	// The certificate names the node and its address.
	conn, err := dial(context.Background(), "tcp", fmt.Sprintf("%s:9868", l.Topology().HostAddr(1)))
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(conn, &tls.Config{InsecureSkipVerify: true})
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	cert := tc.ConnectionState().PeerCertificates[0]
	tc.Close()
	if len(cert.DNSNames) == 0 || cert.DNSNames[0] != "h1" || len(cert.IPAddresses) == 0 || cert.IPAddresses[0].String() != l.Topology().HostAddr(1).String() {
		t.Errorf("certificate names %v %v, want h1 and %s", cert.DNSNames, cert.IPAddresses, l.Topology().HostAddr(1))
	}
}
