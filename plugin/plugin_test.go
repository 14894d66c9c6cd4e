package plugin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/twillnet/twill/subnet"
)

// fakeExec stands in for the delegate plugins: it records every call and
// answers from a table, so the verbs' logic is tested without a kernel.
type fakeExec struct {
	version.PluginDecoder
	mu    sync.Mutex
	calls []call
	// fail maps "plugin VERB" to the error that call returns.
	fail map[string]error
}

type call struct {
	plugin, verb string
	conf         map[string]any
}

func (f *fakeExec) ExecPlugin(_ context.Context, path string, stdin []byte, environ []string) ([]byte, error) {
	verb := ""
	for _, e := range environ {
		if v, ok := strings.CutPrefix(e, "CNI_COMMAND="); ok {
			verb = v
		}
	}
	var conf map[string]any
	if err := json.Unmarshal(stdin, &conf); err != nil {
		return nil, fmt.Errorf("fake: stdin is not JSON: %v", err)
	}
	plugin := filepath.Base(path)
	f.mu.Lock()
	f.calls = append(f.calls, call{plugin, verb, conf})
	err := f.fail[plugin+" "+verb]
	f.mu.Unlock()
	if err != nil {
		return nil, err
	}
	if verb != "ADD" {
		return nil, nil
	}
	return []byte(`{"cniVersion":"1.1.0",
		"interfaces":[{"name":"cni0","mac":"0a:58:0a:f4:07:01"},{"name":"veth1","mac":"0a:58:0a:f4:07:02"},{"name":"eth0","mac":"0a:58:0a:f4:07:09","sandbox":"/run/netns/x"}],
		"ips":[{"interface":2,"address":"10.244.7.9/24","gateway":"10.244.7.1"}],
		"routes":[{"dst":"10.244.0.0/16","gw":"10.244.7.1"}]}`), nil
}

func (f *fakeExec) FindInPath(plugin string, _ []string) (string, error) {
	return "/fake/" + plugin, nil
}

func (f *fakeExec) verbs() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, c := range f.calls {
		out = append(out, c.plugin+" "+c.verb)
	}
	return out
}

// fixture is a plugin with a fake delegate, an env file and a dataDir.
type fixture struct {
	t       *testing.T
	dir     string
	envFile string
	dataDir string
	exec    *fakeExec
	out     bytes.Buffer
	p       *Plugin
}

func newFixture(t *testing.T) *fixture {
	f := &fixture{t: t, dir: t.TempDir(), exec: &fakeExec{fail: map[string]error{}}}
	f.envFile = filepath.Join(f.dir, "run", "subnet.env")
	f.dataDir = filepath.Join(f.dir, "data")
	f.p = &Plugin{Exec: f.exec, Stdout: &f.out}
	f.writeEnv(testEnv)
	return f
}

func (f *fixture) writeEnv(e subnet.Env) {
	f.t.Helper()
	if err := subnet.WriteEnv(f.envFile, e); err != nil {
		f.t.Fatal(err)
	}
}

func (f *fixture) conf(version string, extra string) []byte {
	s := fmt.Sprintf(`{"cniVersion":%q,"name":"net1","type":"twill","subnetFile":%q,"dataDir":%q`, version, f.envFile, f.dataDir)
	if extra != "" {
		s += "," + extra
	}
	return []byte(s + "}")
}

func (f *fixture) args(id string, conf []byte) *skel.CmdArgs {
	return &skel.CmdArgs{ContainerID: id, Netns: "/run/netns/" + id, IfName: "eth0", StdinData: conf}
}

func (f *fixture) statePath(id string) string {
	return filepath.Join(f.dataDir, "net1", id+"@eth0")
}

func (f *fixture) stateExists(id string) bool {
	_, err := os.Stat(f.statePath(id))
	return err == nil
}

func wantCode(t *testing.T, err error, code uint) {
	t.Helper()
	var te *types.Error
	if !errors.As(err, &te) {
		t.Fatalf("error %v (%T), want a CNI error with code %d", err, err, code)
	}
	if te.Code != code {
		t.Fatalf("error code %d (%v), want %d", te.Code, te, code)
	}
}

func sameVerbs(t *testing.T, got []string, want ...string) {
	t.Helper()
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("delegate calls %q, want %q", got, want)
	}
}

func TestAddSavesStateAndPrintsResult(t *testing.T) {
	f := newFixture(t)
	if err := f.p.Add(f.args("c1", f.conf("0.4.0", ""))); err != nil {
		t.Fatal(err)
	}
	sameVerbs(t, f.exec.verbs(), "bridge ADD")
	sent := f.exec.calls[0].conf
	if sent["cniVersion"] != "0.4.0" || sent["bridge"] != "cni0" || sent["mtu"] != float64(1400) {
		t.Errorf("delegate got %v", sent)
	}
	// The result is printed in the requested version.
	var res map[string]any
	if err := json.Unmarshal(f.out.Bytes(), &res); err != nil {
		t.Fatalf("stdout %q: %v", f.out.String(), err)
	}
	if res["cniVersion"] != "0.4.0" {
		t.Errorf("result version %v, want 0.4.0", res["cniVersion"])
	}
	st, err := (&Store{DataDir: f.dataDir, Network: "net1"}).Load("c1", "eth0")
	if err != nil {
		t.Fatal(err)
	}
	var saved map[string]any
	json.Unmarshal(st.Delegate, &saved)
	if fmt.Sprint(saved) != fmt.Sprint(sent) {
		t.Errorf("saved delegate config %v differs from the one sent %v", saved, sent)
	}
	if st.Env.Subnet != "10.244.7.1/24" || st.Env.MTU != 1400 {
		t.Errorf("saved env %+v", st.Env)
	}
}

func TestAddDelegateFailureRollsBack(t *testing.T) {
	f := newFixture(t)
	f.exec.fail["bridge ADD"] = types.NewError(types.ErrTryAgainLater, "busy", "lock held")
	err := f.p.Add(f.args("c1", f.conf("1.1.0", "")))
	wantCode(t, err, types.ErrTryAgainLater) // the delegate's code survives
	sameVerbs(t, f.exec.verbs(), "bridge ADD", "bridge DEL")
	if f.stateExists("c1") {
		t.Error("state left behind after a failed ADD")
	}
	if f.out.Len() != 0 {
		t.Errorf("stdout %q after a failed ADD", f.out.String())
	}
}

func TestAddRollbackFailureKeepsState(t *testing.T) {
	f := newFixture(t)
	f.exec.fail["bridge ADD"] = errors.New("boom")
	f.exec.fail["bridge DEL"] = errors.New("boom again")
	err := f.p.Add(f.args("c1", f.conf("1.1.0", "")))
	wantCode(t, err, types.ErrInternal)
	if !f.stateExists("c1") {
		t.Error("state removed although the rollback DEL failed: the runtime's DEL would not know what to undo")
	}
}

func TestAddWithoutEnvFile(t *testing.T) {
	f := newFixture(t)
	os.Remove(f.envFile)
	wantCode(t, f.p.Add(f.args("c1", f.conf("1.1.0", ""))), types.ErrTryAgainLater)
	sameVerbs(t, f.exec.verbs())
	if _, err := os.Stat(f.dataDir); !os.IsNotExist(err) {
		t.Errorf("dataDir exists after a failed ADD: %v", err)
	}
}

func TestAddBadNames(t *testing.T) {
	f := newFixture(t)
	args := f.args("a..b", f.conf("1.1.0", ""))
	wantCode(t, f.p.Add(args), types.ErrInvalidEnvironmentVariables)
	args = f.args("abc", f.conf("1.1.0", ""))
	args.IfName = "eth@0"
	wantCode(t, f.p.Add(args), types.ErrInvalidEnvironmentVariables)
	sameVerbs(t, f.exec.verbs())
}

func TestDelUsesSavedConfig(t *testing.T) {
	f := newFixture(t)
	if err := f.p.Add(f.args("c1", f.conf("1.1.0", ""))); err != nil {
		t.Fatal(err)
	}
	// twilld leased another subnet and the env file is gone for a moment:
	// DEL must still undo what ADD did.
	os.Remove(f.envFile)
	if err := f.p.Del(f.args("c1", f.conf("1.1.0", ""))); err != nil {
		t.Fatal(err)
	}
	sameVerbs(t, f.exec.verbs(), "bridge ADD", "bridge DEL")
	add, del := f.exec.calls[0].conf, f.exec.calls[1].conf
	if fmt.Sprint(add) != fmt.Sprint(del) {
		t.Errorf("DEL config %v differs from ADD config %v", del, add)
	}
	if f.stateExists("c1") {
		t.Error("state left after DEL")
	}
	// Again: no state, no env file: nothing to undo, success.
	if err := f.p.Del(f.args("c1", f.conf("1.1.0", ""))); err != nil {
		t.Fatalf("second DEL: %v", err)
	}
	sameVerbs(t, f.exec.verbs(), "bridge ADD", "bridge DEL")
}

func TestDelWithoutStateRebuildsFromEnv(t *testing.T) {
	f := newFixture(t)
	if err := f.p.Del(f.args("c1", f.conf("1.1.0", ""))); err != nil {
		t.Fatal(err)
	}
	sameVerbs(t, f.exec.verbs(), "bridge DEL")
	if ipam, _ := f.exec.calls[0].conf["ipam"].(map[string]any); ipam["type"] != "host-local" {
		t.Errorf("rebuilt DEL config %v", f.exec.calls[0].conf)
	}
	if _, err := os.Stat(f.dataDir); !os.IsNotExist(err) {
		t.Errorf("DEL created dataDir: %v", err)
	}
}

func TestDelCorruptState(t *testing.T) {
	f := newFixture(t)
	if err := f.p.Add(f.args("c1", f.conf("1.1.0", ""))); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(f.statePath("c1"), []byte("{garbage"), 0o600)

	// Without the env file the config cannot be rebuilt: fail, keep the file.
	os.Remove(f.envFile)
	wantCode(t, f.p.Del(f.args("c1", f.conf("1.1.0", ""))), types.ErrTryAgainLater)
	if !f.stateExists("c1") {
		t.Fatal("corrupt state removed although nothing was deleted")
	}
	// With it, DEL delegates with the rebuilt config and removes the file.
	f.writeEnv(testEnv)
	if err := f.p.Del(f.args("c1", f.conf("1.1.0", ""))); err != nil {
		t.Fatal(err)
	}
	sameVerbs(t, f.exec.verbs(), "bridge ADD", "bridge DEL")
	if f.stateExists("c1") {
		t.Error("corrupt state left after a successful DEL")
	}
}

func TestDelDelegateFailureKeepsState(t *testing.T) {
	f := newFixture(t)
	if err := f.p.Add(f.args("c1", f.conf("1.1.0", ""))); err != nil {
		t.Fatal(err)
	}
	f.exec.fail["bridge DEL"] = types.NewError(types.ErrIOFailure, "disk", "")
	wantCode(t, f.p.Del(f.args("c1", f.conf("1.1.0", ""))), types.ErrIOFailure)
	if !f.stateExists("c1") {
		t.Fatal("state removed although the delegate DEL failed")
	}
	delete(f.exec.fail, "bridge DEL")
	if err := f.p.Del(f.args("c1", f.conf("1.1.0", ""))); err != nil {
		t.Fatal(err)
	}
	if f.stateExists("c1") {
		t.Error("state left after the retried DEL")
	}
}

func TestCheck(t *testing.T) {
	f := newFixture(t)
	if err := f.p.Add(f.args("c1", f.conf("1.0.0", ""))); err != nil {
		t.Fatal(err)
	}
	prev := `"prevResult":{"cniVersion":"1.1.0","ips":[{"address":"10.244.7.9/24"}]}`
	if err := f.p.Check(f.args("c1", f.conf("1.1.0", prev))); err != nil {
		t.Fatal(err)
	}
	sameVerbs(t, f.exec.verbs(), "bridge ADD", "bridge CHECK")
	got := f.exec.calls[1].conf
	if got["cniVersion"] != "1.1.0" || got["prevResult"] == nil {
		t.Errorf("CHECK config %v: want the request's cniVersion and prevResult", got)
	}

	changed := testEnv
	changed.MTU = 1450
	f.writeEnv(changed)
	err := f.p.Check(f.args("c1", f.conf("1.1.0", prev)))
	if err == nil || !strings.Contains(err.Error(), "mtu 1400") {
		t.Errorf("CHECK after an MTU change: %v", err)
	}
	changed = testEnv
	changed.Subnet = netip.MustParsePrefix("10.244.8.1/24")
	f.writeEnv(changed)
	if err := f.p.Check(f.args("c1", f.conf("1.1.0", prev))); err == nil || !strings.Contains(err.Error(), "subnet 10.244.7.1/24") {
		t.Errorf("CHECK after a subnet change: %v", err)
	}
	os.Remove(f.envFile)
	wantCode(t, f.p.Check(f.args("c1", f.conf("1.1.0", prev))), types.ErrTryAgainLater)
	wantCode(t, f.p.Check(f.args("c2", f.conf("1.1.0", prev))), types.ErrUnknownContainer)
	sameVerbs(t, f.exec.verbs(), "bridge ADD", "bridge CHECK")
}

func TestStatus(t *testing.T) {
	f := newFixture(t)
	if err := f.p.Status(&skel.CmdArgs{StdinData: f.conf("1.1.0", "")}); err != nil {
		t.Fatal(err)
	}
	sameVerbs(t, f.exec.verbs(), "bridge STATUS")

	os.WriteFile(f.envFile, []byte("TWILL_NETWORK=10.244.0.0/16\n"), 0o644)
	wantCode(t, f.p.Status(&skel.CmdArgs{StdinData: f.conf("1.1.0", "")}), types.ErrPluginNotAvailable)
	os.Remove(f.envFile)
	wantCode(t, f.p.Status(&skel.CmdArgs{StdinData: f.conf("1.1.0", "")}), types.ErrPluginNotAvailable)
	f.writeEnv(testEnv)
	wantCode(t, f.p.Status(&skel.CmdArgs{StdinData: f.conf("1.1.0", `"delegate":{"mtu":9000}`)}), types.ErrInvalidNetworkConfig)
	f.exec.fail["bridge STATUS"] = types.NewError(types.ErrLimitedConnectivity, "degraded", "")
	wantCode(t, f.p.Status(&skel.CmdArgs{StdinData: f.conf("1.1.0", "")}), types.ErrLimitedConnectivity)
}

func TestGC(t *testing.T) {
	f := newFixture(t)
	for _, id := range []string{"c1", "c2", "c3", "c4"} {
		if err := f.p.Add(f.args(id, f.conf("1.1.0", ""))); err != nil {
			t.Fatal(err)
		}
	}
	// An absent list is refused and removes nothing.
	wantCode(t, f.p.GC(&skel.CmdArgs{StdinData: f.conf("1.1.0", "")}), types.ErrInvalidNetworkConfig)
	for _, id := range []string{"c1", "c2", "c3", "c4"} {
		if !f.stateExists(id) {
			t.Fatalf("GC without a list removed %s", id)
		}
	}
	f.exec.calls = nil
	valid := `"cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"},{"containerID":"c3","ifname":"eth0"},{"containerID":"../x","ifname":"eth0"}]`
	if err := f.p.GC(&skel.CmdArgs{StdinData: f.conf("1.1.0", valid)}); err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]bool{"c1": true, "c2": false, "c3": true, "c4": false} {
		if f.stateExists(id) != want {
			t.Errorf("after GC state of %s exists=%v, want %v", id, !want, want)
		}
	}
	sameVerbs(t, f.exec.verbs(), "bridge GC", "host-local GC")
	for _, c := range f.exec.calls {
		list, _ := c.conf["cni.dev/valid-attachments"].([]any)
		if len(list) != 3 {
			t.Errorf("%s GC got valid-attachments %v", c.plugin, c.conf["cni.dev/valid-attachments"])
		}
	}

	// An empty list is meaningful: nothing is valid any more.
	if err := f.p.GC(&skel.CmdArgs{StdinData: f.conf("1.1.0", `"cni.dev/valid-attachments":[]`)}); err != nil {
		t.Fatal(err)
	}
	if e, _ := os.ReadDir(filepath.Join(f.dataDir, "net1")); len(e) != 0 {
		t.Errorf("%d state files left after GC with an empty list", len(e))
	}
}

func TestGCLeavesOtherNetworksAlone(t *testing.T) {
	f := newFixture(t)
	if err := f.p.Add(f.args("c1", f.conf("1.1.0", ""))); err != nil {
		t.Fatal(err)
	}
	other := []byte(strings.Replace(string(f.conf("1.1.0", `"cni.dev/valid-attachments":[]`)), `"name":"net1"`, `"name":"net2"`, 1))
	if err := f.p.GC(&skel.CmdArgs{StdinData: other}); err != nil {
		t.Fatal(err)
	}
	if !f.stateExists("c1") {
		t.Error("GC of net2 removed net1's state")
	}
}
