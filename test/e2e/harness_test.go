// Package e2e runs twill's real programs on simulated hosts: network
// namespaces joined by an underlay bridge (internal/tools/lab's topology), a real
// etcd from `make tools` serving inside the underlay namespace, and twilld
// processes inside the host namespaces. Every test makes its own namespaces
// under a unique prefix and removes them, and every process it started, when
// it ends, pass or fail.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/internal/tools/testenv"
	"github.com/twillnet/twill/subnet"
)

var nsCounter atomic.Int32

// nsPrefix is a namespace name prefix of the test's own: the test process
// and a counter, so tests and test runs never share namespaces.
func nsPrefix() string { return fmt.Sprintf("tw%d-%d-", os.Getpid()%100000, nsCounter.Add(1)) }

// cluster is one test's hosts, etcd and daemons.
type cluster struct {
	t       *testing.T
	topo    lab.Topology
	dir     string
	etcdURL string
	daemons map[int]*proc
}

// newCluster makes n hosts and starts etcd in the underlay namespace.
func newCluster(t *testing.T, hosts int) *cluster {
	t.Helper()
	testenv.RequireRoot(t)
	etcdBin := testenv.Tool(t, "etcd")
	testenv.Binary(t, "twilld")
	c := &cluster{
		t:       t,
		topo:    lab.Topology{Prefix: nsPrefix(), Hosts: hosts},
		dir:     t.TempDir(),
		daemons: map[int]*proc{},
	}
	ctx := context.Background()
	t.Cleanup(func() {
		if err := c.topo.Down(context.Background()); err != nil {
			t.Errorf("remove namespaces: %v", err)
		}
	})
	if err := c.topo.Up(ctx); err != nil {
		t.Fatal(err)
	}
	c.etcdURL = "http://" + net.JoinHostPort(lab.WorldAddr.String(), "2379")
	c.start("etcd", c.topo.UnderlayNS(), etcdBin,
		"--name", "e2e", "--data-dir", filepath.Join(c.dir, "etcd"),
		"--listen-client-urls", c.etcdURL, "--advertise-client-urls", c.etcdURL,
		"--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
		"--initial-cluster", "e2e=http://127.0.0.1:2380", "--log-level", "warn")
	c.eventually("etcd to serve", 30*time.Second, func() error {
		_, err := c.ctl("leases", "list")
		return err
	})
	return c
}

// proc is a process started by the test, killed when the test ends.
type proc struct {
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

func (c *cluster) start(name, netns, bin string, args ...string) *proc {
	c.t.Helper()
	logPath := filepath.Join(c.dir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		c.t.Fatal(err)
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", netns, bin}, args...)...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		c.t.Fatalf("start %s: %v", name, err)
	}
	p := &proc{cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); f.Close(); close(p.done) }()
	c.t.Cleanup(func() {
		p.kill()
		if c.t.Failed() {
			data, _ := os.ReadFile(logPath)
			c.t.Logf("--- %s log ---\n%s", name, tail(string(data), 60))
		}
	})
	return p
}

// stop sends SIGTERM and waits for the process to exit.
func (p *proc) stop(t *testing.T) {
	t.Helper()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		p.kill()
		t.Fatalf("process did not exit within 20s of SIGTERM")
	}
}

func (p *proc) kill() {
	select {
	case <-p.done:
	default:
		p.cmd.Process.Kill()
		<-p.done
	}
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (c *cluster) hostDir(i int) string { return filepath.Join(c.dir, fmt.Sprintf("h%d", i)) }

func (c *cluster) envFile(i int) string { return filepath.Join(c.hostDir(i), "subnet.env") }

// startDaemon starts twilld on host i with the given extra flags.
func (c *cluster) startDaemon(i int, extra ...string) *proc {
	c.t.Helper()
	os.MkdirAll(c.hostDir(i), 0o755)
	args := append([]string{
		"--etcd-endpoints", c.etcdURL,
		"--subnet-file", c.envFile(i),
		"--http-addr", "127.0.0.1:9867",
		"--node-name", fmt.Sprintf("h%d", i),
		"--log-level", "debug",
	}, extra...)
	p := c.start(fmt.Sprintf("twilld-h%d", i), c.topo.HostNS(i), testenv.Binary(c.t, "twilld"), args...)
	c.daemons[i] = p
	return p
}

// ctl runs twillctl inside the underlay namespace, where etcd is.
func (c *cluster) ctl(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	bin := testenv.Binary(c.t, "twillctl")
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", c.topo.UnderlayNS(), bin}, append(args, "--etcd-endpoints", c.etcdURL)...)...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("twillctl %s: %w: %s%s", strings.Join(args, " "), err, out.String(), errOut.String())
	}
	return out.String(), nil
}

// etcdctl runs the real etcdctl inside the underlay namespace.
func (c *cluster) etcdctl(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	bin := testenv.Tool(c.t, "etcdctl")
	out, err := lab.InNS(ctx, c.topo.UnderlayNS(), bin, append([]string{"--endpoints", c.etcdURL}, args...)...)
	return out, err
}

func (c *cluster) setConfig(conf string) {
	c.t.Helper()
	path := filepath.Join(c.dir, "net-conf.json")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		c.t.Fatal(err)
	}
	if out, err := c.ctl("config", "set", "--file", path); err != nil {
		c.t.Fatalf("%v\n%s", err, out)
	}
}

type leaseJSON struct {
	Subnet      string          `json:"subnet"`
	PublicIP    string          `json:"publicIP"`
	BackendType string          `json:"backendType"`
	BackendData json.RawMessage `json:"backendData"`
	NodeName    string          `json:"nodeName"`
	TTLSeconds  int64           `json:"ttlSeconds"`
}

func (c *cluster) leases() []leaseJSON {
	c.t.Helper()
	out, err := c.ctl("leases", "list", "-o", "json")
	if err != nil {
		c.t.Fatal(err)
	}
	var ls []leaseJSON
	if err := json.Unmarshal([]byte(out), &ls); err != nil {
		c.t.Fatalf("parse leases list: %v\n%s", err, out)
	}
	return ls
}

// waitEnv waits for host i's env file and returns it.
func (c *cluster) waitEnv(i int) subnet.Env {
	c.t.Helper()
	var env subnet.Env
	c.eventually(fmt.Sprintf("h%d's subnet env file", i), 30*time.Second, func() error {
		var err error
		env, err = subnet.ReadEnv(c.envFile(i))
		return err
	})
	return env
}

// httpGet fetches http://127.0.0.1:port/path from inside host i's namespace.
func (c *cluster) httpGet(i int, port int, path string) (int, string, error) {
	return httpGetInNS(c.topo.HostNS(i), port, path)
}

// httpGetInNS fetches http://127.0.0.1:port/path from inside a namespace. The
// socket is made on the thread that entered the namespace; net/http would
// dial from another goroutine, in the test's own namespace.
func httpGetInNS(netns string, port int, path string) (int, string, error) {
	var code int
	var body string
	err := ns.WithNetNSPath("/run/netns/"+netns, func(ns.NetNS) error {
		conn, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
		if err != nil {
			return err
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(conn, "GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n", path)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		code, body = resp.StatusCode, string(b)
		return err
	})
	return code, body, err
}

// metric returns the value of one sample (name with its labels, as
// Prometheus' text format writes it) from twilld on host netns.
func metric(t *testing.T, netns, sample string) float64 {
	t.Helper()
	v, err := metricValue(netns, sample)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func metricValue(netns, sample string) (float64, error) {
	_, body, err := httpGetInNS(netns, 9867, "/metrics")
	if err != nil {
		return 0, fmt.Errorf("scrape %s: %w", netns, err)
	}
	for _, line := range strings.Split(body, "\n") {
		if rest, ok := strings.CutPrefix(line, sample+" "); ok {
			return strconv.ParseFloat(strings.TrimSpace(rest), 64)
		}
	}
	return 0, fmt.Errorf("no sample %s in /metrics of %s", sample, netns)
}

// eventually retries f until it succeeds or d passes.
func (c *cluster) eventually(what string, d time.Duration, f func() error) {
	c.t.Helper()
	waitFor(c.t, what, d, f)
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
