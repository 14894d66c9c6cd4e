package daemon

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
)

// The second /metrics listener (--secure-metrics-addr), for a Prometheus in
// the cluster: TLS, and every request's bearer token checked by the API
// server the way Kubernetes components and kube-rbac-proxy check theirs:
// TokenReview says who it is, SubjectAccessReview whether that user may
// "get" the non-resource URL /metrics. No token: 401; a token the API server
// does not accept: 401; a user without the right: 403.

// reviewer asks the API server about bearer tokens and caches the answers
// briefly, so a scrape every few seconds costs two reviews a minute.
type reviewer struct {
	client *http.Client
	host   string // the API server's URL
	log    *slog.Logger

	// How long an answer is reused: an allowed token for okTTL, a refused
	// one for badTTL (a token just granted the right is not kept waiting
	// long).
	okTTL, badTTL time.Duration

	mu    sync.Mutex
	cache map[[32]byte]verdict
}

// verdict is what the API server said of a token: the HTTP status to answer
// (200, 401 or 403), why, and until when it holds.
type verdict struct {
	code   int
	reason string
	until  time.Time
}

// maxCached bounds the cache; when full it is emptied.
const maxCached = 1024

func newReviewer(rc *rest.Config, log *slog.Logger) (*reviewer, error) {
	hc, err := rest.HTTPClientFor(rc)
	if err != nil {
		return nil, fmt.Errorf("client for token reviews: %w", err)
	}
	hc.Timeout = 10 * time.Second
	return &reviewer{client: hc, host: strings.TrimRight(rc.Host, "/"), log: log,
		okTTL: time.Minute, badTTL: 10 * time.Second, cache: map[[32]byte]verdict{}}, nil
}

// check returns the status a request with this bearer token gets.
func (r *reviewer) check(ctx context.Context, token string) verdict {
	key := sha256.Sum256([]byte(token))
	now := time.Now()
	r.mu.Lock()
	v, ok := r.cache[key]
	r.mu.Unlock()
	if ok && now.Before(v.until) {
		return v
	}
	v = r.review(ctx, token)
	if v.code == 0 { // the API server did not answer: try again next time
		v.code = http.StatusServiceUnavailable
		return v
	}
	v.until = now.Add(r.badTTL)
	if v.code == http.StatusOK {
		v.until = now.Add(r.okTTL)
	}
	r.mu.Lock()
	if len(r.cache) >= maxCached {
		clear(r.cache)
	}
	r.cache[key] = v
	r.mu.Unlock()
	return v
}

// review asks TokenReview, then SubjectAccessReview. A zero code means the
// API server could not be asked.
func (r *reviewer) review(ctx context.Context, token string) verdict {
	tr := authenticationv1.TokenReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "authentication.k8s.io/v1", Kind: "TokenReview"},
		Spec:     authenticationv1.TokenReviewSpec{Token: token},
	}
	if err := r.post(ctx, "/apis/authentication.k8s.io/v1/tokenreviews", &tr); err != nil {
		r.log.Warn("secure metrics: token review failed", "err", err)
		return verdict{reason: "token review failed"}
	}
	if !tr.Status.Authenticated {
		return verdict{code: http.StatusUnauthorized, reason: "the API server does not accept this token"}
	}
	u := tr.Status.User
	extra := map[string]authorizationv1.ExtraValue{}
	for k, v := range u.Extra {
		extra[k] = authorizationv1.ExtraValue(v)
	}
	sar := authorizationv1.SubjectAccessReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "authorization.k8s.io/v1", Kind: "SubjectAccessReview"},
		Spec: authorizationv1.SubjectAccessReviewSpec{
			User: u.Username, UID: u.UID, Groups: u.Groups, Extra: extra,
			NonResourceAttributes: &authorizationv1.NonResourceAttributes{Path: "/metrics", Verb: "get"},
		},
	}
	if err := r.post(ctx, "/apis/authorization.k8s.io/v1/subjectaccessreviews", &sar); err != nil {
		r.log.Warn("secure metrics: access review failed", "err", err)
		return verdict{reason: "access review failed"}
	}
	if !sar.Status.Allowed {
		return verdict{code: http.StatusForbidden, reason: fmt.Sprintf("%s may not get /metrics", u.Username)}
	}
	return verdict{code: http.StatusOK}
}

// post creates obj (a review) and decodes the answer into it.
func (r *reviewer) post(ctx context.Context, path string, obj any) error {
	body, err := json.Marshal(obj)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, r.host+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := r.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s: %s", path, resp.Status, bytes.TrimSpace(b))
	}
	return json.Unmarshal(b, obj)
}

// secureMetrics is the handler of the second listener.
func secureMetrics(rv *reviewer, m *metrics) http.Handler {
	metricsHandler := promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.URL.Path != "/metrics" {
			http.NotFound(w, req)
			return
		}
		token, ok := strings.CutPrefix(req.Header.Get("Authorization"), "Bearer ")
		if !ok || token == "" {
			w.Header().Set("WWW-Authenticate", `Bearer realm="twilld"`)
			http.Error(w, "Unauthorized: a bearer token is needed", http.StatusUnauthorized)
			return
		}
		v := rv.check(req.Context(), token)
		if v.code != http.StatusOK {
			http.Error(w, http.StatusText(v.code)+": "+v.reason, v.code)
			return
		}
		metricsHandler.ServeHTTP(w, req)
	})
}

// serveSecureMetrics serves /metrics over TLS on addr until stopped. The
// certificate is certFile/keyFile, or, without them, a self-signed one made
// now for the node's name and addresses (a scraper then skips verification
// or pins it, as for a kubelet's self-signed serving certificate).
func serveSecureMetrics(addr, certFile, keyFile, node string, ips []netip.Addr, rv *reviewer, m *metrics) (net.Addr, func(), error) {
	var cert tls.Certificate
	var err error
	if certFile != "" || keyFile != "" {
		cert, err = tls.LoadX509KeyPair(certFile, keyFile)
	} else {
		cert, err = selfSigned(node, ips)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("secure metrics certificate: %w", err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("listen for secure metrics on %s: %w", addr, err)
	}
	srv := &http.Server{
		Handler:           secureMetrics(rv, m),
		ReadHeaderTimeout: 5 * time.Second,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
	}
	return ln.Addr(), serve(srv, ln), nil
}

// selfSigned makes a one-year ECDSA certificate for the node.
func selfSigned(node string, ips []netip.Addr) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "twilld " + node},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{node},
	}
	for _, ip := range ips {
		if ip.IsValid() && !ip.IsUnspecified() {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip.AsSlice())
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
