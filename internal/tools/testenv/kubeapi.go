package testenv

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"

	"k8s.io/client-go/rest"

	"github.com/twillnet/twill/internal/tools/kubeapi"
)

// KubeAPIOptions places and wires a test kube-apiserver. The zero value is a
// server on a free port of 127.0.0.1 storing into a fresh in-process etcd.
type KubeAPIOptions struct {
	// Host is the address the API server listens on and advertises;
	// default 127.0.0.1.
	Host string
	// Port is its secure port; default a free one. With Wrap set and Host not
	// an address of the test's own namespace, a port free on the test's
	// loopback is used, which in a fresh namespace is free too.
	Port int

	// EtcdURL is the etcd to store into. Empty: a fresh etcd for this server,
	// in this process (testenv.Etcd) unless EtcdProcess is set.
	EtcdURL string
	// EtcdProcess runs that fresh etcd as a child process (bin/tools/etcd,
	// launched through Wrap like the API server, listening on Host) instead
	// of in this process: it keeps etcd's memory out of the test's heap and
	// puts etcd in the same namespace as the API server. Wrap without an
	// EtcdURL implies it, since an in-process etcd would be out of reach.
	EtcdProcess bool
	// EtcdPrefix is the key prefix of the API server's objects; default
	// /registry. Distinct prefixes let API servers share one etcd.
	EtcdPrefix string

	// Wrap is a command prefix the programs are launched through, such as
	// {"ip", "netns", "exec", "ns1"} to run them inside a network namespace.
	Wrap []string
	// Dial, when set, makes every connection to the API server: the readiness
	// probe and every rest.Config returned (so a test can reach a server that
	// listens inside a namespace).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)

	// Args are extra kube-apiserver flags, appended last.
	Args []string
	// StartTimeout bounds the wait for /readyz; default 60s.
	StartTimeout time.Duration
}

// KubeAPI is a running kube-apiserver (the real binary from `make tools`) with
// RBAC on, a static admin token (group system:masters), service account
// tokens (TokenRequest) and a self-signed serving certificate. It is killed
// when the test ends; its log is printed if the test failed.
//
// On a 2-core VM the API server is ready 2.0-3.4 s after it is started (a
// restart: about 2.5 s), thanks to --endpoint-reconciler-type=none; the
// embedded etcd and the key add about 1 s to StartKubeAPI. StartupTime holds
// the last measured time. Stop (graceful) takes about 1 s.
type KubeAPI struct {
	// URL is https://host:port.
	URL string
	// EtcdURL is the etcd the server stores into.
	EtcdURL string
	// Dir holds the certificates, keys, token file and logs.
	Dir string
	// StartupTime is how long the last Start took until /readyz answered ok.
	StartupTime time.Duration

	opts       KubeAPIOptions
	srv        kubeapi.Server
	adminToken string
	args       []string
	logPath    string

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// AdminUser is the user of the static admin token; it is in system:masters.
const AdminUser = kubeapi.AdminUser

// StartKubeAPI starts a kube-apiserver for the test and waits until it is ready.
func StartKubeAPI(t TB, o KubeAPIOptions) *KubeAPI {
	t.Helper()
	bin := Tool(t, "kube-apiserver")
	if o.Host == "" {
		o.Host = "127.0.0.1"
	}
	if o.StartTimeout == 0 {
		o.StartTimeout = 60 * time.Second
	}
	if len(o.Wrap) > 0 && o.EtcdURL == "" {
		o.EtcdProcess = true
	}
	if o.Port == 0 {
		o.Port = freePort(t, o.Host)
	}
	dir := t.TempDir()
	k := &KubeAPI{Dir: dir, opts: o, logPath: filepath.Join(dir, "kube-apiserver.log")}
	k.URL = "https://" + net.JoinHostPort(o.Host, strconv.Itoa(o.Port))

	switch {
	case o.EtcdURL != "":
		k.EtcdURL = o.EtcdURL
	case o.EtcdProcess:
		k.EtcdURL = startEtcdProcess(t, o, dir)
	default:
		k.EtcdURL = Etcd(t)
	}

	k.srv = kubeapi.Server{Binary: bin, Dir: dir, Host: o.Host, Port: o.Port, EtcdURL: k.EtcdURL, EtcdPrefix: o.EtcdPrefix}
	argv, token, err := k.srv.Prepare()
	if err != nil {
		t.Fatalf("prepare kube-apiserver: %v", err)
	}
	k.adminToken = token
	k.args = append(append([]string{}, o.Wrap...), argv...)
	k.args = append(k.args, o.Args...)

	t.Cleanup(func() {
		// The test is over: no need for a graceful shutdown (which takes ~1 s).
		k.kill()
		if t.Failed() {
			t.Logf("kube-apiserver log (%s), last lines:\n%s", k.logPath, tail(k.logPath, 60))
		}
	})
	k.Start(t)
	return k
}

// Start (re)starts a stopped server with the same flags, certificates and
// etcd, and waits until it is ready.
func (k *KubeAPI) Start(t TB) {
	t.Helper()
	k.mu.Lock()
	if k.cmd != nil {
		k.mu.Unlock()
		t.Fatal("kube-apiserver: Start while running")
	}
	logf, err := os.OpenFile(k.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		k.mu.Unlock()
		t.Fatal(err)
	}
	cmd := exec.Command(k.args[0], k.args[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group, so a Wrap that forks is stopped with it.
	start := time.Now()
	if err := startProcess(cmd); err != nil {
		logf.Close()
		k.mu.Unlock()
		t.Fatalf("start kube-apiserver: %v", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(done) }()
	k.cmd, k.done = cmd, done
	k.mu.Unlock()

	if err := k.waitReady(done); err != nil {
		t.Fatalf("kube-apiserver at %s: %v\nlast lines of its log:\n%s", k.URL, err, tail(k.logPath, 60))
	}
	k.StartupTime = time.Since(start)
	t.Logf("kube-apiserver ready at %s in %v", k.URL, k.StartupTime.Round(time.Millisecond))
}

// Stop terminates the server (SIGTERM, then SIGKILL after 10 s) and waits for
// it to exit. Its etcd keeps running; Start brings it back.
func (k *KubeAPI) Stop(t TB) {
	t.Helper()
	k.stop()
	t.Logf("kube-apiserver at %s stopped", k.URL)
}

func (k *KubeAPI) kill() {
	k.mu.Lock()
	cmd, done := k.cmd, k.done
	k.cmd, k.done = nil, nil
	k.mu.Unlock()
	if cmd != nil {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
}

func (k *KubeAPI) stop() {
	k.mu.Lock()
	cmd, done := k.cmd, k.done
	k.cmd, k.done = nil, nil
	k.mu.Unlock()
	if cmd == nil {
		return
	}
	terminateGroup(cmd, done, 10*time.Second)
}

// waitReady polls /readyz until it answers ok, the process exits or the
// deadline passes.
func (k *KubeAPI) waitReady(exited <-chan struct{}) error {
	ctx, cancel := context.WithTimeout(context.Background(), k.opts.StartTimeout)
	defer cancel()
	hc := k.httpClient()
	defer hc.CloseIdleConnections()
	last := errors.New("no answer yet")
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, k.URL+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+k.adminToken)
		if resp, err := hc.Do(req); err != nil {
			last = err
		} else {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Errorf("/readyz: %s: %s", resp.Status, bytes.TrimSpace(body))
		}
		t := time.NewTimer(100 * time.Millisecond)
		select {
		case <-exited:
			t.Stop()
			return errors.New("exited before it was ready")
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("not ready after %v: %w", k.opts.StartTimeout, last)
		case <-t.C:
		}
	}
}

// httpClient talks to the server through Dial. The serving certificate is
// not verified: it may not exist yet when the probe starts.
func (k *KubeAPI) httpClient() *http.Client {
	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}
	if k.opts.Dial != nil {
		tr.DialContext = k.opts.Dial
	}
	return &http.Client{Transport: tr, Timeout: 5 * time.Second}
}

// CAData is the PEM certificate bundle that verifies the serving certificate
// (the self-signed one kube-apiserver generated in its cert dir).
func (k *KubeAPI) CAData() []byte { return k.srv.CAData() }

// AdminConfig is a client config of the system:masters admin, rate limits
// raised for tests that create many objects.
func (k *KubeAPI) AdminConfig() *rest.Config { return k.ConfigForToken(k.adminToken) }

// ConfigForToken is a client config authenticating with a bearer token.
func (k *KubeAPI) ConfigForToken(token string) *rest.Config {
	return &rest.Config{
		Host:            k.URL,
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{CAData: k.CAData()},
		Dial:            k.opts.Dial,
		// No Timeout: it would cut every watch and every long list.
		QPS:   1000,
		Burst: 2000,
	}
}

// AdminClient is a clientset of the admin.
func (k *KubeAPI) AdminClient(t TB) kubernetes.Interface {
	t.Helper()
	cs, err := kubernetes.NewForConfig(k.AdminConfig())
	if err != nil {
		t.Fatal(err)
	}
	return cs
}

// Kubeconfig writes a kubeconfig file for the server that authenticates with
// token and verifies the server with the embedded CA (for programs such as
// twilld, which cannot be handed a dialer: run them where URL is reachable).
func (k *KubeAPI) Kubeconfig(path, token string) error { return k.srv.WriteKubeconfig(path, token) }

// ServiceAccountToken returns a one-hour token of an existing service account,
// issued through the TokenRequest API.
func (k *KubeAPI) ServiceAccountToken(t TB, ns, name string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	token, err := kubeapi.ServiceAccountToken(ctx, k.AdminClient(t), ns, name, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return token
}

// startEtcdProcess runs bin/tools/etcd through Wrap, listening on Host.
func startEtcdProcess(t TB, o KubeAPIOptions, dir string) string {
	t.Helper()
	bin := Tool(t, "etcd")
	client := "http://" + net.JoinHostPort(o.Host, strconv.Itoa(freePort(t, o.Host)))
	peer := "http://" + net.JoinHostPort(o.Host, strconv.Itoa(freePort(t, o.Host)))
	logPath := filepath.Join(dir, "etcd.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	args := append(append([]string{}, o.Wrap...), bin,
		"--name=twill-test", "--data-dir="+filepath.Join(dir, "etcd"),
		"--listen-client-urls="+client, "--advertise-client-urls="+client,
		"--listen-peer-urls="+peer, "--initial-advertise-peer-urls="+peer,
		"--initial-cluster=twill-test="+peer, "--log-level=warn",
		"--quota-backend-bytes=8589934592",
	)
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := startProcess(cmd); err != nil {
		logf.Close()
		t.Fatalf("start etcd: %v", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(done) }()
	t.Cleanup(func() {
		terminateGroup(cmd, done, 10*time.Second)
		if t.Failed() {
			t.Logf("etcd log (%s), last lines:\n%s", logPath, tail(logPath, 30))
		}
	})
	// No wait here: the API server retries etcd, and its /readyz covers it.
	return client
}

// startProcess starts cmd in its own process group (so a Wrap that forks is
// stopped with it), killed if the test binary dies. It forks from a fresh
// goroutine: that one never runs on a thread locked into another network
// namespace, nor on one that exits (Pdeathsig fires when the forking thread,
// not the process, ends).
func startProcess(cmd *exec.Cmd) error {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	errc := make(chan error, 1)
	go func() { errc <- cmd.Start() }()
	return <-errc
}

// terminateGroup stops the process group that startProcess made: SIGTERM,
// then SIGKILL after grace. It returns once done is closed (the process was
// waited for), and reports whether SIGTERM sufficed.
func terminateGroup(cmd *exec.Cmd, done <-chan struct{}, grace time.Duration) bool {
	syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-done:
		return true
	case <-time.After(grace):
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		return false
	}
}

// freePort returns a port free on host, or, when host is not an address of
// this namespace (a server run inside another namespace through Wrap), one
// free on this namespace's loopback.
func freePort(t TB, host string) int {
	t.Helper()
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		if l, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatalf("find a free port: %v", err)
		}
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	f, err := os.Open(path)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if len(lines) > n {
			lines = lines[1:]
		}
	}
	return strings.Join(lines, "\n")
}

// PodBoundToken returns a one-hour token of an existing service account
// bound to a Pod on node (kubeapi.PodBoundToken: the Pod is made, Pending,
// when missing), as the kubelet gives a DaemonSet pod on that node.
func (k *KubeAPI) PodBoundToken(t TB, ns, sa, pod, node string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	token, err := kubeapi.PodBoundToken(ctx, k.AdminClient(t), ns, sa, pod, node, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return token
}

// StartControllerManager runs the real kube-controller-manager (from `make
// tools`) against the server as its admin, with only the given controllers
// (such as "garbagecollector"), no leader election and no serving port. It
// is killed when the test ends; its log is printed if the test failed.
func (k *KubeAPI) StartControllerManager(t TB, controllers ...string) {
	t.Helper()
	bin := Tool(t, "kube-controller-manager")
	dir := t.TempDir()
	kubeconfig := filepath.Join(dir, "admin.kubeconfig")
	if err := k.Kubeconfig(kubeconfig, k.adminToken); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "kube-controller-manager.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	args := append(append([]string{}, k.opts.Wrap...), bin,
		"--kubeconfig="+kubeconfig, "--controllers="+strings.Join(controllers, ","),
		"--leader-elect=false", "--secure-port=0", "--use-service-account-credentials=false")
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := startProcess(cmd); err != nil {
		logf.Close()
		t.Fatalf("start kube-controller-manager: %v", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(done) }()
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		if t.Failed() {
			t.Logf("kube-controller-manager log (%s), last lines:\n%s", logPath, tail(logPath, 40))
		}
	})
}
