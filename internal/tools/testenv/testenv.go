// Package testenv finds the real programs that tests run (built by `make tools`
// and `make build`), starts them (etcd, kube-apiserver and the rest of a
// control plane, containerd, kubelets), and states the preconditions of tests
// that need root.
//
// A test that needs something missing fails rather than skips when the
// environment says it must run (TWILL_REQUIRE_ALL=1, set by `make test`), so a
// broken tool build can never turn into a green run of skipped tests.
//
// The same harness runs outside `go test` in a Session (`twillctl lab run
// --kubelet`), so what users watch is what the tests prove.
package testenv

import (
	"context"
	"os"
	"path/filepath"
	"runtime"
)

// TB is the part of testing.TB the harness uses: a *testing.T, *testing.B or
// a Session.
type TB interface {
	Helper()
	Cleanup(func())
	Context() context.Context
	TempDir() string
	Log(args ...any)
	Logf(format string, args ...any)
	Error(args ...any)
	Errorf(format string, args ...any)
	Fatal(args ...any)
	Fatalf(format string, args ...any)
	Skipf(format string, args ...any)
	Failed() bool
}

// RepoRoot is the checkout this package was compiled from.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "..")
}

// strict reports whether missing prerequisites are failures.
func strict() bool { return os.Getenv("TWILL_REQUIRE_ALL") == "1" }

func missing(t TB, format string, args ...any) {
	t.Helper()
	if strict() {
		t.Fatalf(format+" (TWILL_REQUIRE_ALL=1: this test must run)", args...)
	}
	t.Skipf(format, args...)
}

// RequireRoot skips (or, under `make test`, fails) a test that needs root.
func RequireRoot(t TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		missing(t, "needs root")
	}
}

// binDir is the folder of twill's programs and `make tools`' (bin/ of the
// checkout), or a Session's BinDir.
func binDir(t TB) string {
	if s, ok := t.(*Session); ok {
		return s.BinDir
	}
	return filepath.Join(RepoRoot(), "bin")
}

// Tool returns the path of a program from `make tools` (etcd, etcdctl,
// kube-apiserver).
func Tool(t TB, name string) string {
	t.Helper()
	return requireFile(t, filepath.Join(binDir(t), "tools", name), "make tools")
}

// CNIBinDir returns the directory holding the reference CNI plugins from
// `make tools` and, once built, twill's own plugin.
func CNIBinDir(t TB) string {
	t.Helper()
	dir := filepath.Join(binDir(t), "cni")
	requireFile(t, filepath.Join(dir, "bridge"), "make tools")
	return dir
}

// Binary returns the path of one of twill's programs from `make build`
// (twilld, twillctl, twill).
func Binary(t TB, name string) string {
	t.Helper()
	return requireFile(t, filepath.Join(binDir(t), name), "make build")
}

// Image returns the path of an image tarball (or the workload's binary) from
// `make image`.
func Image(t TB, name string) string {
	t.Helper()
	return requireFile(t, filepath.Join(binDir(t), "image", name), "make image")
}

func requireFile(t TB, path, how string) string {
	t.Helper()
	if _, err := os.Stat(path); err != nil {
		missing(t, "%s not found; run `%s`", path, how)
	}
	return path
}
