package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/internal/tools/testenv"
)

const allocConf = `{"Network":"10.244.0.0/16","Backend":{"Type":"alloc"}}`

// Two daemons with different public IPs get different subnets, write correct
// env files, and keep their subnet across SIGTERM and restart.
func TestTwoDaemonsLeaseAndRestart(t *testing.T) {
	c := newCluster(t, 2)
	// The daemons start before the config exists: they wait, not crash.
	d1 := c.startDaemon(1, "--lease-ttl", "1m")
	c.eventually("h1 to say it waits for the config", 15*time.Second, func() error {
		code, body, err := c.httpGet(1, 9867, "/readyz")
		if err != nil {
			return err
		}
		if code != 503 || !strings.Contains(body, "waiting for the network config") {
			return fmt.Errorf("readyz = %d %q", code, body)
		}
		return nil
	})
	if d1.exited() {
		t.Fatal("twilld exited while waiting for the config")
	}
	c.setConfig(allocConf)
	c.startDaemon(2, "--lease-ttl", "1m")

	e1, e2 := c.waitEnv(1), c.waitEnv(2)
	network := netip.MustParsePrefix("10.244.0.0/16")
	if e1.Network != network || e2.Network != network {
		t.Fatalf("networks: %s, %s", e1.Network, e2.Network)
	}
	if e1.Subnet.Masked() == e2.Subnet.Masked() {
		t.Fatalf("both hosts got %s", e1.Subnet.Masked())
	}
	for _, e := range []netip.Prefix{e1.Subnet, e2.Subnet} {
		if e.Bits() != 24 || e.Addr() != e.Masked().Addr().Next() {
			t.Fatalf("TWILL_SUBNET %s is not the first address of a /24", e)
		}
	}
	if e1.MTU != 1500 || e1.IPMasq {
		t.Fatalf("h1 env: %+v (alloc backend on a 1500 MTU veth, no --ip-masq)", e1)
	}

	ls := c.leases()
	if len(ls) != 2 {
		t.Fatalf("leases: %+v", ls)
	}
	byIP := map[string]leaseJSON{}
	for _, l := range ls {
		byIP[l.PublicIP] = l
	}
	if byIP["198.18.0.1"].Subnet != e1.Subnet.Masked().String() || byIP["198.18.0.2"].Subnet != e2.Subnet.Masked().String() {
		t.Fatalf("leases do not match env files: %+v; h1 %s, h2 %s", ls, e1.Subnet, e2.Subnet)
	}
	if byIP["198.18.0.1"].NodeName != "h1" || byIP["198.18.0.1"].BackendType != "alloc" || byIP["198.18.0.1"].TTLSeconds <= 0 {
		t.Fatalf("h1's lease: %+v", byIP["198.18.0.1"])
	}
	code, _, err := c.httpGet(1, 9867, "/readyz")
	if err != nil || code != 200 {
		t.Fatalf("h1 readyz = %d, %v", code, err)
	}
	code, body, err := c.httpGet(1, 9867, "/metrics")
	if err != nil || code != 200 || !strings.Contains(body, "twill_ready 1") {
		t.Fatalf("h1 metrics = %d, %v:\n%s", code, err, body)
	}

	// twillctl status on the node summarises it.
	out, err := lab.InNS(context.Background(), c.topo.HostNS(1), testenv.Binary(t, "twillctl"), "status", "--subnet-file", c.envFile(1))
	if err != nil {
		t.Fatalf("twillctl status: %v\n%s", err, out)
	}
	for _, want := range []string{"twilld          ready", "subnet          " + e1.Subnet.String(), "lease           expires in", "peers           1 (backend alloc, ipv4)", "last reconcile  ", "datastore       connected"} {
		if !strings.Contains(out, want) {
			t.Errorf("twillctl status lacks %q:\n%s", want, out)
		}
	}

	// SIGTERM keeps the lease; a restart (env file removed, so the lease is
	// found by public IP) gets the same subnet.
	d1.stop(t)
	if len(c.leases()) != 2 {
		t.Fatal("SIGTERM released the lease")
	}
	removeFile(t, c.envFile(1))
	c.startDaemon(1, "--lease-ttl", "1m")
	if again := c.waitEnv(1); again != e1 {
		t.Fatalf("after restart h1 has %+v, before %+v", again, e1)
	}
	if len(c.leases()) != 2 {
		t.Fatalf("restart left %d leases", len(c.leases()))
	}

	// --release-on-exit gives the subnet back.
	c.daemons[2].stop(t)
	c.startDaemon(2, "--lease-ttl", "1m", "--release-on-exit")
	c.waitEnv(2)
	c.eventually("h2 ready", 10*time.Second, func() error {
		code, _, err := c.httpGet(2, 9867, "/readyz")
		if err == nil && code != 200 {
			err = fmt.Errorf("readyz %d", code)
		}
		return err
	})
	c.daemons[2].stop(t)
	if ls := c.leases(); len(ls) != 1 || ls[0].PublicIP != "198.18.0.1" {
		t.Fatalf("after --release-on-exit: %+v", ls)
	}
}

// An invalid stored config is reported with its exact problem; the daemon waits.
func TestInvalidConfigIsReported(t *testing.T) {
	c := newCluster(t, 1)
	// twillctl refuses it, so write it the way a careless operator would: with etcdctl.
	out, err := c.etcdctl("put", "/twill.io/network/config", `{"Network":"10.244.0.0/16","SubnetLen":8}`)
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	d := c.startDaemon(1)
	c.eventually("readyz to name the problem", 15*time.Second, func() error {
		code, body, err := c.httpGet(1, 9867, "/readyz")
		if err != nil {
			return err
		}
		if code != 503 || !strings.Contains(body, "SubnetLen: 8 must be at least 2 longer") {
			return fmt.Errorf("readyz = %d %q", code, body)
		}
		return nil
	})
	if d.exited() {
		t.Fatal("twilld exited on an invalid config")
	}
	c.setConfig(allocConf)
	c.waitEnv(1)
}

func removeFile(t *testing.T, path string) {
	t.Helper()
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
}
