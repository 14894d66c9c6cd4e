package testenv

import (
	"bytes"
	"context"
	"os"
	"reflect"
	"strings"
	"testing"
)

// A Fatal ends the session's function; every clean-up runs, last first,
// the error names what failed, and the folders (with the logs) stay.
func TestSessionFatalRunsCleanups(t *testing.T) {
	var out bytes.Buffer
	s := &Session{Dir: t.TempDir(), Out: &out}
	var order []string
	var dir string
	reached := false
	err := s.Run(context.Background(), func(tb TB) {
		dir = tb.TempDir()
		tb.Cleanup(func() { order = append(order, "first") })
		tb.Cleanup(func() { order = append(order, "second") })
		tb.Logf("step %d", 1)
		tb.Fatalf("kubelet %s did not start", "h1")
		reached = true
	})
	if err == nil || !strings.Contains(err.Error(), "kubelet h1 did not start") {
		t.Fatalf("err = %v, want the Fatalf message", err)
	}
	if reached {
		t.Error("the function went on after Fatalf")
	}
	if !reflect.DeepEqual(order, []string{"second", "first"}) {
		t.Errorf("clean-ups ran %v, want [second first]", order)
	}
	if _, err := os.Stat(dir); err != nil {
		t.Errorf("TempDir %s of a failed session (the logs) removed: %v", dir, err)
	}
	if !strings.Contains(out.String(), "step 1\n") || !strings.Contains(out.String(), "ERROR: kubelet h1 did not start") {
		t.Errorf("output:\n%s", out.String())
	}
}

// Errors let the function finish and fail the session; a clean run returns
// nil and removes its folders; a Skip stops the run (a guided run has nothing to skip to).
func TestSessionErrorsAndSkip(t *testing.T) {
	s := &Session{Dir: t.TempDir(), Out: &bytes.Buffer{}}
	finished := false
	err := s.Run(context.Background(), func(tb TB) {
		tb.Errorf("probe %d failed", 1)
		tb.Error("probe 2 failed")
		finished = true
	})
	if !finished || err == nil || err.Error() != "probe 1 failed\nprobe 2 failed" {
		t.Errorf("finished %v, err %v", finished, err)
	}
	var dir string
	if err := (&Session{Dir: t.TempDir(), Out: &bytes.Buffer{}}).Run(context.Background(), func(tb TB) { dir = tb.TempDir() }); err != nil {
		t.Errorf("a clean run: %v", err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("TempDir %s still there after a clean session (%v)", dir, err)
	}
	err = (&Session{Dir: t.TempDir(), Out: &bytes.Buffer{}}).Run(context.Background(), func(tb TB) {
		tb.Skipf("needs root")
		t.Error("went on after Skipf")
	})
	if err == nil || err.Error() != "needs root" {
		t.Errorf("Skipf: %v", err)
	}
}

// A panic other than Fatal's still runs the clean-ups, and goes on up.
func TestSessionPanicRunsCleanups(t *testing.T) {
	s := &Session{Dir: t.TempDir(), Out: &bytes.Buffer{}}
	cleaned := false
	defer func() {
		if r := recover(); r != "boom" {
			t.Errorf("recovered %v, want boom", r)
		}
		if !cleaned {
			t.Error("clean-up did not run")
		}
	}()
	s.Run(context.Background(), func(tb TB) {
		tb.Cleanup(func() { cleaned = true })
		panic("boom")
	})
}
