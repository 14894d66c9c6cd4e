package plugin_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"

	"github.com/twillnet/twill/internal/tools/testenv"
	"github.com/twillnet/twill/subnet"
)

// The twill binary is built once per test run, from this checkout, so the
// tests never depend on a stale `make build`.
var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// twillBinary returns the path of a freshly built twill plugin.
func twillBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "twill-plugin-bin-")
		if buildErr != nil {
			return
		}
		goTool, err := exec.LookPath("go")
		if err != nil {
			goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
		}
		cmd := exec.Command(goTool, "build", "-o", filepath.Join(buildDir, "twill"), "./cmd/twill")
		cmd.Dir = testenv.RepoRoot()
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/twill: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(buildDir, "twill")
}

const netName = "twill-test"

// defaultEnv is the node the integration tests pretend to be.
var defaultEnv = subnet.Env{
	Network: netip.MustParsePrefix("10.244.0.0/16"),
	Subnet:  netip.MustParsePrefix("10.244.7.1/24"),
	MTU:     1400,
	IPMasq:  true,
}

// node is one simulated host: its own network namespace (where the bridge
// goes), env file, twill dataDir, host-local store and libcni cache. Nothing
// is created in the machine's root network namespace or under /var/lib/cni.
type node struct {
	t        *testing.T
	hostNS   ns.NetNS
	dir      string
	envFile  string
	dataDir  string
	ipamDir  string
	cacheDir string
	path     []string
	cni      *libcni.CNIConfig
	env      subnet.Env
}

func newNode(t *testing.T, env subnet.Env) *node {
	t.Helper()
	testenv.RequireRoot(t)
	twill := twillBinary(t)
	n := &node{t: t, dir: t.TempDir(), env: env}
	n.envFile = filepath.Join(n.dir, "run", "subnet.env")
	n.dataDir = filepath.Join(n.dir, "twill")
	n.ipamDir = filepath.Join(n.dir, "host-local")
	n.cacheDir = filepath.Join(n.dir, "cache")
	n.path = []string{filepath.Dir(twill), testenv.CNIBinDir(t)}
	n.cni = libcni.NewCNIConfigWithCacheDir(n.path, n.cacheDir, nil)
	hostNS, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	// The bridge and the host ends of the veths live in hostNS and go with it.
	t.Cleanup(func() {
		hostNS.Close()
		testutils.UnmountNS(hostNS)
	})
	n.hostNS = hostNS
	n.writeEnv(env)
	return n
}

func (n *node) writeEnv(e subnet.Env) {
	n.t.Helper()
	if err := subnet.WriteEnv(n.envFile, e); err != nil {
		n.t.Fatal(err)
	}
}

// confList is what a runtime would load from /etc/cni/net.d: twill, then
// portmap, with host-local's store in the test's directory.
func (n *node) confList(cniVersion string) *libcni.NetworkConfigList {
	return n.confListWith(cniVersion, nil)
}

// confListWith is confList with more keys in twill's delegate object.
func (n *node) confListWith(cniVersion string, delegate map[string]any) *libcni.NetworkConfigList {
	n.t.Helper()
	d := map[string]any{"bridge": "cni0", "hairpinMode": true}
	for k, v := range delegate {
		d[k] = v
	}
	raw, err := json.Marshal(map[string]any{
		"cniVersion": cniVersion,
		"name":       netName,
		"plugins": []any{
			map[string]any{
				"type":       "twill",
				"subnetFile": n.envFile,
				"dataDir":    n.dataDir,
				"delegate":   d,
				"ipam":       map[string]any{"dataDir": n.ipamDir},
			},
			map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}},
		},
	})
	if err != nil {
		n.t.Fatal(err)
	}
	list, err := libcni.NetworkConfFromBytes(raw)
	if err != nil {
		n.t.Fatal(err)
	}
	return list
}

// inHost runs f in the node's network namespace, the way a runtime on that
// host calls libcni: the plugins it execs inherit the namespace.
func (n *node) inHost(f func() error) error {
	return n.hostNS.Do(func(ns.NetNS) error { return f() })
}

// pod is a container: a network namespace and an ID.
type pod struct {
	id  string
	ns  ns.NetNS
	ip  netip.Prefix // the IPv4 address and gateway from the ADD result
	gw  netip.Addr
	ip6 netip.Prefix // the IPv6 ones
	gw6 netip.Addr
}

func (n *node) newPod(id string) *pod {
	n.t.Helper()
	podNS, err := testutils.NewNS()
	if err != nil {
		n.t.Fatal(err)
	}
	p := &pod{id: id, ns: podNS}
	n.t.Cleanup(func() { p.removeNS() })
	return p
}

// removeNS deletes the pod's namespace (and with it the pod end of its veth);
// calling it twice is harmless.
func (p *pod) removeNS() {
	if p.ns == nil {
		return
	}
	p.ns.Close()
	// A plugin killed a moment ago may still be dying with the namespace
	// open, which makes the unmount fail with EBUSY for a while.
	for try := 0; ; try++ {
		err := testutils.UnmountNS(p.ns)
		if err == nil || try == 100 {
			if err != nil {
				fmt.Fprintf(os.Stderr, "remove namespace of %s: %v\n", p.id, err)
			}
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	p.ns = nil
}

func (p *pod) nsPath(n *node) string {
	if p.ns == nil {
		return filepath.Join(n.dir, "gone-netns-"+p.id)
	}
	return p.ns.Path()
}

func (n *node) rt(p *pod) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{ContainerID: p.id, NetNS: p.nsPath(n), IfName: "eth0"}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

func (n *node) add(list *libcni.NetworkConfigList, p *pod) (types.Result, error) {
	var res types.Result
	err := n.inHost(func() (err error) {
		res, err = n.cni.AddNetworkList(ctx(n.t), list, n.rt(p))
		return err
	})
	if err != nil {
		return nil, err
	}
	cur, err := current.NewResultFromResult(res)
	if err != nil {
		return nil, fmt.Errorf("convert result: %w", err)
	}
	for _, ipc := range cur.IPs {
		ip, _ := netip.ParsePrefix(ipc.Address.String())
		gw, _ := netip.ParseAddr(ipc.Gateway.String())
		if ip.Addr().Is4() {
			p.ip, p.gw = ip, gw
		} else {
			p.ip6, p.gw6 = ip, gw
		}
	}
	return res, nil
}

func (n *node) check(list *libcni.NetworkConfigList, p *pod) error {
	return n.inHost(func() error { return n.cni.CheckNetworkList(ctx(n.t), list, n.rt(p)) })
}

func (n *node) del(list *libcni.NetworkConfigList, p *pod) error {
	return n.inHost(func() error { return n.cni.DelNetworkList(ctx(n.t), list, n.rt(p)) })
}

// stateFiles lists every file under the twill dataDir, relative to it.
func (n *node) stateFiles() []string {
	n.t.Helper()
	var out []string
	filepath.WalkDir(n.dataDir, func(path string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			rel, _ := filepath.Rel(n.dataDir, path)
			out = append(out, rel)
		}
		return nil
	})
	sort.Strings(out)
	return out
}

// reservations lists host-local's reserved addresses. Its store also holds
// "lock" and "last_reserved_ip.<range>", which are bookkeeping, not
// reservations; anything else in the directory is a reservation (a file
// named by the address, holding "<containerID>\r\n<ifname>").
func (n *node) reservations() map[string]string {
	n.t.Helper()
	dir := filepath.Join(n.ipamDir, netName)
	entries, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		n.t.Fatal(err)
	}
	out := map[string]string{}
	for _, e := range entries {
		if e.Name() == "lock" || strings.HasPrefix(e.Name(), "last_reserved_ip.") {
			continue
		}
		data, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		out[e.Name()] = strings.ReplaceAll(string(data), "\r\n", "/")
	}
	return out
}
