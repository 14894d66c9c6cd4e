// Package testenv finds the real programs that tests run (built by `make tools`
// and `make build`) and states the preconditions of tests that need root.
//
// A test that needs something missing fails rather than skips when the
// environment says it must run (TWILL_REQUIRE_ALL=1, set by `make test`), so a
// broken tool build can never turn into a green run of skipped tests.
package testenv

import (
	"os"
	"path/filepath"
	"runtime"
	"testing"
)

// RepoRoot is the checkout this package was compiled from.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..", "..")
}

// strict reports whether missing prerequisites are failures.
func strict() bool { return os.Getenv("TWILL_REQUIRE_ALL") == "1" }

func missing(t testing.TB, format string, args ...any) {
	t.Helper()
	if strict() {
		t.Fatalf(format+" (TWILL_REQUIRE_ALL=1: this test must run)", args...)
	}
	t.Skipf(format, args...)
}

// RequireRoot skips (or, under `make test`, fails) a test that needs root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		missing(t, "needs root")
	}
}

// Tool returns the path of a program from `make tools` (etcd, etcdctl,
// kube-apiserver).
func Tool(t testing.TB, name string) string {
	t.Helper()
	return requireFile(t, filepath.Join(RepoRoot(), "bin", "tools", name), "make tools")
}

// CNIBinDir returns the directory holding the reference CNI plugins from
// `make tools` and, once built, twill's own plugin.
func CNIBinDir(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(RepoRoot(), "bin", "cni")
	requireFile(t, filepath.Join(dir, "bridge"), "make tools")
	return dir
}

// Binary returns the path of one of twill's programs from `make build`
// (twilld, twillctl, twill).
func Binary(t testing.TB, name string) string {
	t.Helper()
	return requireFile(t, filepath.Join(RepoRoot(), "bin", name), "make build")
}

func requireFile(t testing.TB, path, how string) string {
	t.Helper()
	if _, err := os.Stat(path); err != nil {
		missing(t, "%s not found; run `%s`", path, how)
	}
	return path
}
