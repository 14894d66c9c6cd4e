// Package kubeapi runs and talks to a real kube-apiserver (the binary built by
// `make tools`) for the lab and the tests: the files it needs (an admin
// token, service account keys), its flags, readiness, client configs that can
// reach it inside a network namespace, and server-side apply of manifests.
package kubeapi

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// AdminUser is the user of the static admin token, in group system:masters.
const AdminUser = "twill-admin"

// Server describes one API server.
type Server struct {
	Binary  string // kube-apiserver
	Dir     string // certificates, keys, token file
	Host    string // listen and advertise address
	Port    int    // secure port
	EtcdURL string
	// EtcdPrefix is the key prefix of its objects; default /registry.
	EtcdPrefix string
	Extra      []string // more flags, last
}

// URL is the server's https URL.
func (s Server) URL() string { return "https://" + net.JoinHostPort(s.Host, strconv.Itoa(s.Port)) }

// Prepare writes the admin token file and the service account key pair into
// Dir and returns the command line and the admin token. Files left by an
// earlier Prepare are kept, so a restarted server accepts the tokens it
// issued before.
func (s Server) Prepare() (argv []string, adminToken string, err error) {
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return nil, "", err
	}
	tokensFile := filepath.Join(s.Dir, "tokens.csv")
	if data, err := os.ReadFile(tokensFile); err == nil {
		adminToken, _, _ = strings.Cut(string(data), ",")
	} else {
		b := make([]byte, 16)
		if _, err := rand.Read(b); err != nil {
			return nil, "", err
		}
		adminToken = hex.EncodeToString(b)
		tokens := fmt.Sprintf("%s,%s,%s,\"system:masters\"\n", adminToken, AdminUser, AdminUser)
		if err := os.WriteFile(tokensFile, []byte(tokens), 0o600); err != nil {
			return nil, "", err
		}
	}
	if _, err := os.Stat(filepath.Join(s.Dir, "sa.key")); err != nil {
		if err := writeServiceAccountKey(s.Dir); err != nil {
			return nil, "", err
		}
	}
	argv = []string{s.Binary,
		"--etcd-servers=" + s.EtcdURL,
		"--storage-backend=etcd3",
		"--bind-address=" + s.Host,
		"--advertise-address=" + s.Host,
		"--secure-port=" + strconv.Itoa(s.Port),
		"--cert-dir=" + filepath.Join(s.Dir, "certs"),
		"--authorization-mode=RBAC",
		"--token-auth-file=" + filepath.Join(s.Dir, "tokens.csv"),
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + filepath.Join(s.Dir, "sa.pub"),
		"--service-account-signing-key-file=" + filepath.Join(s.Dir, "sa.key"),
		"--service-cluster-ip-range=10.96.0.0/16",
		// The endpoint reconciler would wait for the server's own endpoint
		// to be reachable; without it startup takes about 2 s, not 10.
		"--endpoint-reconciler-type=none",
		"--profiling=false",
		// On SIGTERM the server waits for its open watches for up to
		// --request-timeout (60 s); ending them itself, it exits in ~3 s.
		"--shutdown-watch-termination-grace-period=2s",
	}
	if s.EtcdPrefix != "" {
		argv = append(argv, "--etcd-prefix="+s.EtcdPrefix)
	}
	return append(argv, s.Extra...), adminToken, nil
}

// CAData is the PEM bundle that verifies the server's self-signed certificate
// (written by the server at start-up).
func (s Server) CAData() []byte {
	data, _ := os.ReadFile(filepath.Join(s.Dir, "certs", "apiserver.crt"))
	return data
}

// Dialer makes connections; see lab.DialInNS for one that reaches inside a
// network namespace.
type Dialer func(ctx context.Context, network, addr string) (net.Conn, error)

// Config is a client config with a bearer token.
func (s Server) Config(token string, dial Dialer) *rest.Config {
	return &rest.Config{
		Host:            s.URL(),
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAData: s.CAData()},
		Dial:            dial,
		QPS:             200,
		Burst:           400,
		// No Timeout: it would cut watches and long lists short.
	}
}

// WaitReady polls /readyz until the server answers ok, ctx ends, or d passes.
// The certificate does not exist before the server writes it, so the probe
// skips verification; it sends no credentials.
func WaitReady(ctx context.Context, url string, dial Dialer, d time.Duration) error {
	cfg := &rest.Config{Host: url, Dial: dial, TLSClientConfig: rest.TLSClientConfig{Insecure: true}, Timeout: 5 * time.Second}
	cl, err := rest.UnversionedRESTClientFor(withCodec(cfg))
	if err != nil {
		return err
	}
	deadline := time.Now().Add(d)
	for {
		body, err := cl.Get().AbsPath("/readyz").DoRaw(ctx)
		if err == nil && string(body) == "ok" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kube-apiserver at %s not ready after %s: %v %s", url, d, err, body)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// WriteKubeconfig writes a kubeconfig for the server and a token, as twilld's
// --kubeconfig reads it.
func (s Server) WriteKubeconfig(path, token string) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["twill"] = &clientcmdapi.Cluster{Server: s.URL(), CertificateAuthorityData: s.CAData()}
	cfg.AuthInfos["twill"] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts["twill"] = &clientcmdapi.Context{Cluster: "twill", AuthInfo: "twill"}
	cfg.CurrentContext = "twill"
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return fmt.Errorf("write kubeconfig %s: %w", path, err)
	}
	return nil
}

// ServiceAccountToken issues a token of a service account (TokenRequest API).
func ServiceAccountToken(ctx context.Context, cs kubernetes.Interface, ns, name string, ttl time.Duration) (string, error) {
	exp := int64(ttl.Seconds())
	tr, err := cs.CoreV1().ServiceAccounts(ns).CreateToken(ctx, name,
		&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &exp}}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token of service account %s/%s: %w", ns, name, err)
	}
	return tr.Status.Token, nil
}

// PodBoundToken issues a token of a service account bound to a Pod that
// runs on node, as the kubelet projects one into a twilld pod: the API server
// adds the Pod's node (authentication.kubernetes.io/node-name) to the
// token's user info, which deploy/kube-twill.yaml's admission policy
// compares with the objects the token writes, and the token is valid while
// the Pod exists. Where no kubelet runs (the lab, the bench, tests) the Pod,
// named pod, is created with spec.nodeName set and stays Pending; an existing
// one is reused.
func PodBoundToken(ctx context.Context, cs kubernetes.Interface, ns, sa, pod, node string, ttl time.Duration) (string, error) {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: pod, Namespace: ns},
		Spec: corev1.PodSpec{
			NodeName: node, ServiceAccountName: sa,
			// Never started: no kubelet runs where this is used.
			Containers: []corev1.Container{{Name: "twilld", Image: "twill"}},
		},
	}
	got, err := cs.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		got, err = cs.CoreV1().Pods(ns).Get(ctx, pod, metav1.GetOptions{})
	}
	if err != nil {
		return "", fmt.Errorf("pod %s/%s for a token bound to node %s: %w", ns, pod, node, err)
	}
	if got.Spec.NodeName != node {
		return "", fmt.Errorf("pod %s/%s runs on node %q, not %s", ns, pod, got.Spec.NodeName, node)
	}
	exp := int64(ttl.Seconds())
	tr, err := cs.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		ExpirationSeconds: &exp,
		BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: got.Name, UID: got.UID},
	}}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token of service account %s/%s bound to pod %s: %w", ns, sa, pod, err)
	}
	return tr.Status.Token, nil
}

// writeServiceAccountKey writes the RSA key pair that signs (sa.key) and
// verifies (sa.pub) service account tokens.
func writeServiceAccountKey(dir string) error {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "sa.key"), pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}), 0o600); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o600)
}
