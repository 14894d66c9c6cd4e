package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/internal/tools/testenv"
)

// pki makes a CA and certificates signed by it, as PEM files in dir.
type pki struct {
	t    *testing.T
	dir  string
	ca   *x509.Certificate
	key  *ecdsa.PrivateKey
	next int64
}

func newPKI(t *testing.T, dir string) *pki {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "twill test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(der)
	p := &pki{t: t, dir: dir, ca: ca, key: key, next: 2}
	p.write("ca.crt", "CERTIFICATE", der, 0o644)
	return p
}

func (p *pki) write(name, typ string, der []byte, mode os.FileMode) string {
	path := filepath.Join(p.dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode); err != nil {
		p.t.Fatal(err)
	}
	return path
}

// issue writes name.crt and name.key: a certificate for cn, for a server at
// ips when there are any, else for a client. etcd takes a client
// certificate's CN as the user name.
func (p *pki) issue(name, cn string, ips ...net.IP) (cert, key string) {
	p.t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		p.t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(p.next), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	p.next++
	if len(ips) > 0 {
		tmpl.IPAddresses = ips
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &k.PublicKey, p.key)
	if err != nil {
		p.t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		p.t.Fatal(err)
	}
	return p.write(name+".crt", "CERTIFICATE", der, 0o644), p.write(name+".key", "EC PRIVATE KEY", kder, 0o600)
}

const etcdTestPassword = "s3cret-for-twill-only"

// twill's keys in etcd are reachable only with TLS and a client
// certificate, with authentication on, through a role that may read and
// write the twill prefix and nothing else: twilld (by certificate or by
// password) and twillctl work with exactly that; a client without a
// certificate, with an unknown user, or writing outside the prefix is
// refused. Secrets never reach the logs. twilld also runs with no
// capability but NET_ADMIN and NET_RAW, and its HTTP endpoints listen on the
// node's loopback only.
func TestEtcdTLSAndLeastPrivilege(t *testing.T) {
	testenv.RequireRoot(t)
	etcdBin, etcdctlBin := testenv.Tool(t, "etcd"), testenv.Tool(t, "etcdctl")
	c := &cluster{
		t:       t,
		topo:    lab.Topology{Prefix: nsPrefix(), Hosts: 2},
		dir:     t.TempDir(),
		daemons: map[int]*proc{},
	}
	t.Cleanup(func() {
		if err := c.topo.Down(context.Background()); err != nil {
			t.Errorf("remove namespaces: %v", err)
		}
	})
	if err := c.topo.Up(context.Background()); err != nil {
		t.Fatal(err)
	}
	certs := filepath.Join(c.dir, "pki")
	os.Mkdir(certs, 0o700)
	p := newPKI(t, certs)
	ca := filepath.Join(certs, "ca.crt")
	srvCert, srvKey := p.issue("etcd", "etcd", net.ParseIP(lab.WorldAddr.String()), net.ParseIP("127.0.0.1"))
	rootCert, rootKey := p.issue("root", "root")
	twillCert, twillKey := p.issue("twill", "twill")
	otherCert, otherKey := p.issue("intruder", "intruder")

	c.etcdURL = "https://" + net.JoinHostPort(lab.WorldAddr.String(), "2379")
	c.start("etcd", c.topo.UnderlayNS(), etcdBin,
		"--name", "tls", "--data-dir", filepath.Join(c.dir, "etcd"),
		"--listen-client-urls", c.etcdURL, "--advertise-client-urls", c.etcdURL,
		"--cert-file", srvCert, "--key-file", srvKey, "--trusted-ca-file", ca, "--client-cert-auth",
		"--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
		"--initial-cluster", "tls=http://127.0.0.1:2380", "--log-level", "warn")
	etcdctl := func(cert, key string, args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		return lab.InNS(ctx, c.topo.UnderlayNS(), etcdctlBin, append([]string{"--endpoints", c.etcdURL, "--cacert", ca, "--cert", cert, "--key", key}, args...)...)
	}
	c.eventually("etcd to serve over TLS", 30*time.Second, func() error {
		_, err := etcdctl(rootCert, rootKey, "endpoint", "health")
		return err
	})
	// The commands of Documentation/security.md.
	for _, args := range [][]string{
		{"user", "add", "root", "--no-password"},
		{"role", "add", "twill"},
		{"role", "grant-permission", "twill", "--prefix=true", "readwrite", "/twill.io/network/"},
		{"user", "add", "twill", "--no-password"},
		{"user", "grant-role", "twill", "twill"},
		{"user", "add", "twill-pw", "--new-user-password", etcdTestPassword},
		{"user", "grant-role", "twill-pw", "twill"},
		{"auth", "enable"},
	} {
		if out, err := etcdctl(rootCert, rootKey, args...); err != nil {
			t.Fatalf("etcdctl %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}

	ctl := func(cert, key string, args ...string) (string, error) {
		return c.ctl(append(args, "--etcd-cafile", ca, "--etcd-certfile", cert, "--etcd-keyfile", key)...)
	}
	conf := filepath.Join(c.dir, "net-conf.json")
	os.WriteFile(conf, []byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`), 0o644)
	if out, err := ctl(twillCert, twillKey, "config", "set", "--file", conf); err != nil {
		t.Fatalf("twillctl config set as twill: %v\n%s", err, out)
	}

	// What is refused.
	if out, err := ctl(otherCert, otherKey, "leases", "list"); err == nil || !strings.Contains(out+err.Error(), "permission denied") {
		t.Errorf("twillctl as a user without the role: %v %s; want permission denied", err, out)
	}
	if out, err := etcdctl(twillCert, twillKey, "put", "/registry/x", "y"); err == nil || !strings.Contains(out+err.Error(), "permission denied") {
		t.Errorf("the twill role wrote outside its prefix: %v %s", err, out)
	}
	if out, err := c.ctl("leases", "list", "--etcd-cafile", ca, "--timeout", "3s"); err == nil {
		t.Errorf("twillctl without a client certificate was let in: %s", out)
	}

	// h1 authenticates with its certificate (user twill), h2 with a
	// password (user twill-pw) over a certificate whose CN has no role.
	// h1 runs with only NET_ADMIN and NET_RAW, and on the default
	// --http-addr.
	for i := 1; i <= 2; i++ {
		os.MkdirAll(c.hostDir(i), 0o755)
	}
	tlsArgs := func(cert, key string) []string {
		return []string{"--etcd-endpoints", c.etcdURL, "--etcd-cafile", ca, "--etcd-certfile", cert, "--etcd-keyfile", key}
	}
	twilld := testenv.Binary(t, "twilld")
	args1 := append([]string{"--bounding-set=-all,+net_admin,+net_raw", "--", twilld, "--subnet-file", c.envFile(1), "--node-name", "h1", "--lease-ttl", "6s", "--ip-masq"},
		tlsArgs(twillCert, twillKey)...)
	c.daemons[1] = c.start("twilld-h1", c.topo.HostNS(1), "setpriv", args1...)
	t.Setenv("ETCD_PASSWORD", etcdTestPassword)
	args2 := append([]string{"--subnet-file", c.envFile(2), "--node-name", "h2", "--lease-ttl", "6s", "--http-addr", "127.0.0.1:9867", "--log-level", "debug",
		"--etcd-username", "twill-pw"}, tlsArgs(otherCert, otherKey)...)
	c.daemons[2] = c.start("twilld-h2", c.topo.HostNS(2), twilld, args2...)
	e1, e2 := c.waitEnv(1), c.waitEnv(2)
	if e1.Subnet.Masked() == e2.Subnet.Masked() {
		t.Fatalf("both nodes got %s", e1.Subnet.Masked())
	}
	for i := 1; i <= 2; i++ {
		hn := c.topo.HostNS(i)
		waitFor(t, fmt.Sprintf("h%d to renew its lease and see its peer", i), 20*time.Second, func() error {
			if v, err := metricValue(hn, "twill_lease_renewals_total"); err != nil || v < 1 {
				return fmt.Errorf("renewals %v (%v)", v, err)
			}
			if v, err := metricValue(hn, `twill_peers{backend="vxlan",family="ipv4"}`); err != nil || v != 1 {
				return fmt.Errorf("peers %v (%v)", v, err)
			}
			return nil
		})
	}
	// A lease deleted by an operator (as twill) is taken again, which
	// revokes the old etcd lease: all within the role.
	if out, err := ctl(twillCert, twillKey, "leases", "delete", e2.Subnet.Masked().String()); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	c.eventually("h2 to take its lease again", 15*time.Second, func() error {
		out, err := ctl(twillCert, twillKey, "leases", "list")
		if err == nil && !strings.Contains(out, e2.Subnet.Masked().String()) {
			err = fmt.Errorf("leases:\n%s", out)
		}
		return err
	})

	// The capabilities h1's twilld runs with.
	pid := c.daemons[1].cmd.Process.Pid
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	const netAdminRaw = "0000000000003000" // CAP_NET_ADMIN (12) and CAP_NET_RAW (13)
	if !strings.Contains(string(status), "CapEff:\t"+netAdminRaw) || !strings.Contains(string(status), "CapBnd:\t"+netAdminRaw) {
		t.Errorf("h1's twilld capabilities:\n%s", grepLines(string(status), "Cap"))
	}

	// ... and does all of its work with them: the VXLAN device (checked by
	// the peers above), the masquerade chains, IP forwarding.
	h1 := c.topo.HostNS(1)
	c.eventually("h1's masquerade rules", 10*time.Second, func() error {
		out, err := lab.InNS(context.Background(), h1, "iptables", "-w", "-t", "nat", "-S", "TWILL-POSTRTG")
		if err == nil && !strings.Contains(out, "MASQUERADE") {
			err = fmt.Errorf("TWILL-POSTRTG:\n%s", out)
		}
		return err
	})
	if out, err := lab.InNS(context.Background(), h1, "sysctl", "-n", "net.ipv4.ip_forward"); err != nil || strings.TrimSpace(out) != "1" {
		t.Errorf("ip_forward in h1: %q (%v)", out, err)
	}
	if log, _ := os.ReadFile(filepath.Join(c.dir, "twilld-h1.log")); strings.Contains(string(log), "level=ERROR") {
		t.Errorf("h1's twilld, with two capabilities, logged errors:\n%s", grepLines(string(log), "time"))
	}

	// The default --http-addr is the node's loopback: nothing answers on
	// its underlay address.
	if code, _, err := c.httpGet(1, 9867, "/readyz"); err != nil || code != 200 {
		t.Errorf("h1's readyz on 127.0.0.1:9867: %d %v", code, err)
	}
	if err := dialFromNS(c.topo.UnderlayNS(), net.JoinHostPort(c.topo.HostAddr(1).String(), "9867")); err == nil {
		t.Error("h1's twilld answers on its underlay address; the default --http-addr must be loopback only")
	}

	// No secret in any log.
	for _, name := range []string{"twilld-h1", "twilld-h2", "etcd"} {
		data, _ := os.ReadFile(filepath.Join(c.dir, name+".log"))
		for _, secret := range []string{etcdTestPassword, "PRIVATE KEY"} {
			if strings.Contains(string(data), secret) {
				t.Errorf("%s's log contains %q", name, secret)
			}
		}
	}
}

func grepLines(s, prefix string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// dialFromNS opens (and closes) a TCP connection to addr from inside netns.
func dialFromNS(netns, addr string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	conn, err := lab.DialInNS(netns)(ctx, "tcp", addr)
	if err == nil {
		conn.Close()
	}
	return err
}
