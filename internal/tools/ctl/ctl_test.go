package ctl

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/twillnet/twill/internal/tools/testenv"
)

func runCtl(t *testing.T, ep string, args ...string) (string, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out, errOut bytes.Buffer
	err := Main(ctx, append(args, "--etcd-endpoints", ep), &out, &errOut)
	return out.String(), errOut.String(), err
}

func writeFile(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "net-conf.json")
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConfigAndLeasesCommands(t *testing.T) {
	ep := testenv.Etcd(t)
	// Nothing stored yet.
	if _, _, err := runCtl(t, ep, "config", "get"); err == nil || !strings.Contains(err.Error(), "no network config") {
		t.Fatalf("config get on empty etcd: %v", err)
	}
	// Invalid input: a clear error, nothing written.
	_, _, err := runCtl(t, ep, "config", "set", "--file", writeFile(t, `{"Network":"10.244.0.0/16","SubnetLen":40}`))
	if err == nil || !strings.Contains(err.Error(), "SubnetLen: 40 is out of range") || !strings.Contains(err.Error(), "nothing was written") {
		t.Fatalf("config set invalid: %v", err)
	}
	if _, _, err := runCtl(t, ep, "config", "get"); err == nil {
		t.Fatal("invalid config was written")
	}
	good := `{"Network":"10.244.0.0/16","Backend":{"Type":"alloc"}}`
	out, _, err := runCtl(t, ep, "config", "set", "--file", writeFile(t, good))
	if err != nil || !strings.Contains(out, "network 10.244.0.0/16") {
		t.Fatalf("config set: %q, %v", out, err)
	}
	out, _, err = runCtl(t, ep, "config", "get")
	if err != nil || strings.TrimSpace(out) != good {
		t.Fatalf("config get = %q, %v", out, err)
	}

	cli := testenv.EtcdClient(t, ep)
	ctx := context.Background()
	lease, err := cli.Grant(ctx, 600)
	if err != nil {
		t.Fatal(err)
	}
	cli.Put(ctx, "/twill.io/network/subnets/10.244.3.0-24", `{"PublicIP":"198.18.0.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:03"},"NodeName":"n3"}`, clientWithLease(lease.ID))
	cli.Put(ctx, "/twill.io/network/subnets/10.244.1.0-24", `{"PublicIP":"198.18.0.1","BackendType":"alloc"}`)
	cli.Put(ctx, "/twill.io/network/subnets/junk", `{}`)

	out, errOut, err := runCtl(t, ep, "leases", "list")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "SUBNET") || !strings.HasPrefix(lines[1], "10.244.1.0/24") || !strings.Contains(lines[2], "VtepMAC=aa:bb:cc:00:00:03") {
		t.Fatalf("leases list:\n%s", out)
	}
	if !strings.Contains(errOut, "junk") {
		t.Fatalf("the malformed key was not named in a warning: %q", errOut)
	}
	out, _, err = runCtl(t, ep, "leases", "list", "-o", "json")
	var views []leaseView
	if err != nil || json.Unmarshal([]byte(out), &views) != nil || len(views) != 2 || views[1].TTLSeconds <= 0 || views[1].TTLSeconds > 600 {
		t.Fatalf("leases list -o json: %v\n%s", err, out)
	}
	out, _, err = runCtl(t, ep, "leases", "show", "10.244.3.0/24")
	if err != nil || !strings.Contains(out, `"nodeName": "n3"`) {
		t.Fatalf("leases show: %v\n%s", err, out)
	}
	if _, _, err := runCtl(t, ep, "leases", "delete", "10.244.3.0-24"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := runCtl(t, ep, "leases", "show", "10.244.3.0/24"); err == nil || !strings.Contains(err.Error(), "lease not found") {
		t.Fatalf("show after delete: %v", err)
	}
	if _, _, err := runCtl(t, ep, "leases", "delete", "10.244.3.7/24"); err == nil || !strings.Contains(err.Error(), "host bits") {
		t.Fatalf("delete with a bad subnet: %v", err)
	}
}

func TestUnreachableEtcdIsAnError(t *testing.T) {
	// Nothing listens on port 1 of loopback: the command fails within its bound.
	start := time.Now()
	_, _, err := runCtl(t, "http://127.0.0.1:1", "leases", "list", "--timeout", "2s")
	if err == nil || !strings.Contains(err.Error(), "no answer from etcd at http://127.0.0.1:1 within 2s") {
		t.Fatalf("err = %v", err)
	}
	t.Logf("error after %s: %v", time.Since(start).Round(time.Millisecond), err)
}

func TestUnknownCommand(t *testing.T) {
	var out, errOut bytes.Buffer
	err := Main(context.Background(), []string{"frobnicate"}, &out, &errOut)
	if err == nil || !strings.Contains(errOut.String(), "usage: twillctl") {
		t.Fatalf("err = %v, usage = %q", err, errOut.String())
	}
}

// `lab run --kubelet` runs the manifest's network: the flags that would
// change it are refused before anything is made.
func TestLabRunKubeletRefusesNetworkFlags(t *testing.T) {
	for _, args := range [][]string{
		{"--backend", "host-gw"},
		{"--datastore", "etcd"},
		{"--ip-family", "dual"},
		{"--pods-per-host", "1"},
	} {
		var out, errOut bytes.Buffer
		err := Main(context.Background(), append([]string{"lab", "run", "--kubelet", "--dir", t.TempDir()}, args...), &out, &errOut)
		if err == nil || !strings.Contains(err.Error(), "it does not take "+args[0]) {
			t.Errorf("lab run --kubelet %v: err = %v", args, err)
		}
	}
	var out, errOut bytes.Buffer
	err := Main(context.Background(), []string{"lab", "up", "--kubelet"}, &out, &errOut)
	if err == nil || !strings.Contains(errOut.String(), "flag provided but not defined: -kubelet") {
		t.Errorf("lab up --kubelet: err = %v, %s", err, errOut.String())
	}
}

func clientWithLease(id clientv3.LeaseID) clientv3.OpOption { return clientv3.WithLease(id) }

func TestInstallIsAtomicCopy(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "twill")
	if err := os.WriteFile(src, []byte("plugin"), 0o600); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "opt", "cni", "bin", "twill")
	var out, errOut bytes.Buffer
	if err := Main(context.Background(), []string{"install", "--src", src, "--dst", dst, "--mode", "0755"}, &out, &errOut); err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(dst)
	if err != nil || st.Mode().Perm() != 0o755 {
		t.Fatalf("installed file: %v, %v", st, err)
	}
	if err := Main(context.Background(), []string{"install", "--src", filepath.Join(dir, "missing"), "--dst", dst}, &out, &errOut); err == nil {
		t.Fatal("missing source accepted")
	}
	if data, _ := os.ReadFile(dst); string(data) != "plugin" {
		t.Fatalf("a failed install changed the destination: %q", data)
	}
}
