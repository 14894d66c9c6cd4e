package plugin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
)

// scriptPlugin writes an executable shell script named name into dir: a
// stand-in delegate for the default Exec, which starts real processes.
func scriptPlugin(t *testing.T, dir, name, body string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestDefaultExecStdio(t *testing.T) {
	dir := t.TempDir()
	// Echo stdin back with the verb, write to stderr, exit 0.
	path := scriptPlugin(t, dir, "echo", `printf '{"verb":"%s","conf":' "$CNI_COMMAND"; cat; printf "}"`)
	out, err := defaultExec{}.ExecPlugin(context.Background(), path, []byte(`{"a":1}`), delegateEnv("CHECK"))
	if err != nil {
		t.Fatal(err)
	}
	if string(out) != `{"verb":"CHECK","conf":{"a":1}}` {
		t.Errorf("stdout %q", out)
	}
}

func TestDelegateEnvReplacesCommand(t *testing.T) {
	t.Setenv("CNI_COMMAND", "ADD")
	env := delegateEnv("DEL")
	n := 0
	for _, kv := range env {
		if strings.HasPrefix(kv, "CNI_COMMAND=") {
			n++
			if kv != "CNI_COMMAND=DEL" {
				t.Errorf("%s", kv)
			}
		}
	}
	if n != 1 {
		t.Errorf("%d CNI_COMMAND entries in %q", n, env)
	}
}

func TestDefaultExecLargeOutput(t *testing.T) {
	// More than a pipe holds (64 KiB), before the plugin exits: memory
	// files never block the writer.
	path := scriptPlugin(t, t.TempDir(), "big", `head -c 300000 /dev/zero | tr '\0' x; head -c 300000 /dev/zero >&2`)
	// The plugin's stderr is passed on to ours; keep it out of the test log.
	devNull, err := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer devNull.Close()
	stderr := os.Stderr
	os.Stderr = devNull
	defer func() { os.Stderr = stderr }()
	out, err := defaultExec{}.ExecPlugin(context.Background(), path, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 300000 {
		t.Errorf("%d bytes of stdout, want 300000", len(out))
	}
}

func TestDefaultExecErrors(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, body string
		code       uint
		msg        string
	}{
		{"cni-error", `echo '{"cniVersion":"1.1.0","code":11,"msg":"busy","details":"lock"}'; exit 1`, 11, "busy"},
		{"stderr-only", `echo 'it broke' >&2; exit 3`, 0, `netplugin failed: "it broke\n": exit status 3`},
		{"silent", `exit 2`, 0, "netplugin failed with no error message: exit status 2"},
		{"garbage", `echo 'not json'; exit 1`, 0, "error parsing its diagnostic message"},
		{"signal", `kill -9 $$`, 0, "signal: killed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := scriptPlugin(t, dir, tc.name, tc.body)
			_, err := defaultExec{}.ExecPlugin(context.Background(), path, nil, nil)
			var te *types.Error
			if !errors.As(err, &te) {
				t.Fatalf("error %v (%T), want a CNI error", err, err)
			}
			if te.Code != tc.code || !strings.Contains(te.Msg, tc.msg) {
				t.Errorf("code %d msg %q, want %d and %q", te.Code, te.Msg, tc.code, tc.msg)
			}
		})
	}
	_, err := defaultExec{}.ExecPlugin(context.Background(), filepath.Join(dir, "missing"), nil, nil)
	if err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("missing plugin: %v", err)
	}
}

func TestDefaultExecContextKills(t *testing.T) {
	path := scriptPlugin(t, t.TempDir(), "slow", `exec sleep 30`)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := defaultExec{}.ExecPlugin(ctx, path, nil, nil)
	if err == nil || !strings.Contains(err.Error(), "signal: killed") {
		t.Errorf("error %v, want the plugin killed", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("took %s", d)
	}
}

func TestFindInPath(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	scriptPlugin(t, b, "bridge", "exit 0")
	os.Mkdir(filepath.Join(a, "bridge"), 0o755) // a directory is not a plugin
	got, err := defaultExec{}.FindInPath("bridge", []string{a, b})
	if err != nil || got != filepath.Join(b, "bridge") {
		t.Errorf("FindInPath = %q, %v", got, err)
	}
	for _, name := range []string{"", "../bridge", "nope"} {
		if _, err := (defaultExec{}).FindInPath(name, []string{a, b}); err == nil {
			t.Errorf("FindInPath(%q) found something", name)
		}
	}
}

func TestResultVersion(t *testing.T) {
	for _, tc := range []struct{ in, want, out string }{
		{`{"cniVersion":"0.4.0","ips":[]}`, "0.4.0", `{"cniVersion":"0.4.0","ips":[]}`},
		{`{"ips":[]}`, "1.1.0", `{"cniVersion":"1.1.0","ips":[]}`},
		{`{"cniVersion":"","ips":[]}`, "1.1.0", `{"cniVersion":"1.1.0","ips":[]}`},
		{`null`, "1.1.0", `{"cniVersion":"1.1.0"}`},
	} {
		ver, out, err := resultVersion("1.1.0", []byte(tc.in))
		if err != nil || ver != tc.want || string(out) != tc.out {
			t.Errorf("resultVersion(%s) = %q, %s, %v; want %q, %s", tc.in, ver, out, err, tc.want, tc.out)
		}
	}
	for _, bad := range []string{`{"cniVersion":`, `[1]`, `"1.1.0"`, `{"cniVersion":"1.1.0"} x`} {
		if _, _, err := resultVersion("1.1.0", []byte(bad)); err == nil {
			t.Errorf("result %s was accepted", bad)
		}
	}
}

// realDelegates points CNI_PATH at script delegates that log their verbs, so
// a Plugin with the default Exec runs real processes.
func realDelegates(t *testing.T, addBody string) (logFile string) {
	dir := t.TempDir()
	logFile = filepath.Join(dir, "log")
	scriptPlugin(t, dir, "bridge", `cat >/dev/null; echo "bridge $CNI_COMMAND" >>`+logFile+`
if [ "$CNI_COMMAND" = ADD ]; then `+addBody+`; fi`)
	t.Setenv("CNI_PATH", dir)
	return logFile
}

func loggedVerbs(t *testing.T, logFile string) []string {
	t.Helper()
	b, err := os.ReadFile(logFile)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return strings.Fields(strings.ReplaceAll(string(b), "bridge ", "bridge_"))
}

func TestAddWithRealExec(t *testing.T) {
	const result = `{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/run/netns/x"}],"ips":[{"interface":0,"address":"10.244.7.9/24","gateway":"10.244.7.1"}]}`
	log := realDelegates(t, `echo '`+result+`'`)
	f := newFixture(t)
	f.p.Exec = nil
	if err := f.p.Add(f.args("c1", f.conf("1.0.0", ""))); err != nil {
		t.Fatal(err)
	}
	// Same version: the delegate's result as it printed it.
	if strings.TrimSpace(f.out.String()) != result {
		t.Errorf("stdout %q", f.out.String())
	}
	if !f.stateExists("c1") {
		t.Error("no state after ADD")
	}
	// Another version: converted.
	f.out.Reset()
	if err := f.p.Add(f.args("c2", f.conf("0.4.0", ""))); err != nil {
		t.Fatal(err)
	}
	var res map[string]any
	if err := json.Unmarshal(f.out.Bytes(), &res); err != nil || res["cniVersion"] != "0.4.0" {
		t.Errorf("result %s (%v), want version 0.4.0", f.out.String(), err)
	}
	if err := f.p.Del(f.args("c1", f.conf("1.0.0", ""))); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(loggedVerbs(t, log), " "); got != "bridge_ADD bridge_ADD bridge_DEL" {
		t.Errorf("delegate ran %q", got)
	}
}

func TestAddWithRealExecSaveFails(t *testing.T) {
	log := realDelegates(t, `echo '{"cniVersion":"1.1.0"}'`)
	f := newFixture(t)
	f.p.Exec = nil
	// A directory where the state file goes: the rename fails after the
	// delegate was started, so its ADD is undone.
	if err := os.MkdirAll(filepath.Join(f.statePath("c1"), "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	wantCode(t, f.p.Add(f.args("c1", f.conf("1.1.0", ""))), types.ErrIOFailure)
	if got := strings.Join(loggedVerbs(t, log), " "); got != "bridge_ADD bridge_DEL" {
		t.Errorf("delegate ran %q, want ADD then the rollback DEL", got)
	}
	if f.out.Len() != 0 {
		t.Errorf("stdout %q after a failed ADD", f.out.String())
	}
}

func TestAddWithRealExecBadResult(t *testing.T) {
	log := realDelegates(t, `echo 'not a result'`)
	f := newFixture(t)
	f.p.Exec = nil
	wantCode(t, f.p.Add(f.args("c1", f.conf("1.1.0", ""))), types.ErrInternal)
	if got := strings.Join(loggedVerbs(t, log), " "); got != "bridge_ADD bridge_DEL" {
		t.Errorf("delegate ran %q", got)
	}
	if f.stateExists("c1") || f.out.Len() != 0 {
		t.Errorf("state %v, stdout %q after a failed ADD", f.stateExists("c1"), f.out.String())
	}
}

func TestDelInTheRuntimesVersion(t *testing.T) {
	f := newFixture(t)
	if err := f.p.Add(f.args("c1", f.conf("1.0.0", ""))); err != nil {
		t.Fatal(err)
	}
	// The runtime was upgraded between ADD and DEL.
	if err := f.p.Del(f.args("c1", f.conf("1.1.0", ""))); err != nil {
		t.Fatal(err)
	}
	sameVerbs(t, f.exec.verbs(), "bridge ADD", "bridge DEL")
	add, del := f.exec.calls[0].conf, f.exec.calls[1].conf
	if add["cniVersion"] != "1.0.0" || del["cniVersion"] != "1.1.0" {
		t.Errorf("ADD got version %v, DEL %v; want 1.0.0 and 1.1.0", add["cniVersion"], del["cniVersion"])
	}
	delete(add, "cniVersion")
	delete(del, "cniVersion")
	if fmt.Sprint(add) != fmt.Sprint(del) {
		t.Errorf("DEL config %v differs from ADD config %v beyond the version", del, add)
	}
}

// A delegate that never returns is killed at delegateTimeout: ADD fails with
// a CNI error that says so, the rollback DEL runs, and no process is left.
func TestDelegateTimeout(t *testing.T) {
	pidFile := filepath.Join(t.TempDir(), "pid")
	log := realDelegates(t, `echo $$ >`+pidFile+`; exec sleep 600`)
	f := newFixture(t)
	f.p.Exec = nil
	err := f.p.Add(f.args("c1", f.conf("1.1.0", `"delegateTimeout":"1s"`)))
	wantCode(t, err, types.ErrInternal)
	var te *types.Error
	errors.As(err, &te)
	if !strings.Contains(te.Msg, "delegate bridge ADD") || !strings.Contains(te.Details, "did not finish within 1s (delegateTimeout), killed") {
		t.Errorf("error %q / %q, want it to name the delegate and the deadline", te.Msg, te.Details)
	}
	if got := strings.Join(loggedVerbs(t, log), " "); got != "bridge_ADD bridge_DEL" {
		t.Errorf("delegate ran %q, want ADD then the rollback DEL", got)
	}
	if f.stateExists("c1") || f.out.Len() != 0 {
		t.Errorf("state %v, stdout %q after a killed ADD", f.stateExists("c1"), f.out.String())
	}
	pid, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat("/proc/" + strings.TrimSpace(string(pid))); err == nil {
		t.Errorf("the hung delegate (pid %s) is still there", strings.TrimSpace(string(pid)))
	}

	// A DEL that hangs keeps the state, for the runtime to retry.
	f2 := newFixture(t)
	if err := f2.p.Add(f2.args("c2", f2.conf("1.1.0", ""))); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	scriptPlugin(t, dir, "bridge", `exec sleep 600`)
	t.Setenv("CNI_PATH", dir)
	f2.p.Exec = nil
	err = f2.p.Del(f2.args("c2", f2.conf("1.1.0", `"delegateTimeout":"1s"`)))
	wantCode(t, err, types.ErrInternal)
	if !f2.stateExists("c2") {
		t.Error("the state of a DEL whose delegate hung was removed")
	}
}

// A delegate binary being written ("text file busy") is tried again a second
// later, as invoke does, and runs once the writer is done.
func TestDefaultExecWaitsForABusyBinary(t *testing.T) {
	path := scriptPlugin(t, t.TempDir(), "busy", `echo '{"ok":true}'`)
	w, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	go func() { time.Sleep(300 * time.Millisecond); w.Close() }()
	out, err := defaultExec{}.ExecPlugin(context.Background(), path, nil, nil)
	if err != nil || strings.TrimSpace(string(out)) != `{"ok":true}` {
		t.Fatalf("ExecPlugin = %q, %v; want the plugin's output once the writer closed it", out, err)
	}
}
