package testenv

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
)

// Session is a TB for running the harness outside `go test`, as twillctl's
// guided lab runs do: the same Start functions, with the same clean-up.
// Its Fatal (and Skip: a guided run has nothing to skip to) ends the
// function given to Run, which then undoes everything registered with
// Cleanup, last first, and returns the error.
type Session struct {
	// BinDir is the folder of twill's programs, holding tools/, cni/ and
	// image/ as `make tools`, `make build` and `make image` leave them.
	BinDir string
	// Dir is where TempDir makes folders; they are removed at the end,
	// unless the session failed: the programs' logs are in them.
	Dir string
	// Out receives Log and Logf lines, and the errors.
	Out io.Writer

	ctx      context.Context
	mu       sync.Mutex
	cleanups []func()
	errs     []string
	temps    int
}

// fatal is the panic with which Fatal ends the function Run runs.
type fatal struct{}

// Run calls f with the session, then runs the clean-ups. The error names
// every failure f reported (Error, Fatal), or is nil.
func (s *Session) Run(ctx context.Context, f func(TB)) (err error) {
	s.ctx = ctx
	defer func() {
		if r := recover(); r != nil {
			if _, ok := r.(fatal); !ok {
				s.cleanup()
				panic(r)
			}
		}
		s.cleanup()
		if s.Failed() {
			err = errors.New(strings.Join(s.errs, "\n"))
		}
	}()
	f(s)
	return nil
}

func (s *Session) cleanup() {
	for {
		s.mu.Lock()
		if len(s.cleanups) == 0 {
			s.mu.Unlock()
			return
		}
		c := s.cleanups[len(s.cleanups)-1]
		s.cleanups = s.cleanups[:len(s.cleanups)-1]
		s.mu.Unlock()
		func() {
			defer func() {
				if r := recover(); r != nil {
					if _, ok := r.(fatal); !ok {
						s.fail(fmt.Sprint("clean-up panicked: ", r))
					}
				}
			}()
			c()
		}()
	}
}

func (s *Session) fail(msg string) {
	s.mu.Lock()
	s.errs = append(s.errs, msg)
	s.mu.Unlock()
	fmt.Fprintln(s.Out, "ERROR:", msg)
}

// Helper does nothing: a session's lines have no test file positions.
func (s *Session) Helper() {}

// Cleanup registers f to run when Run ends, after those registered later.
func (s *Session) Cleanup(f func()) {
	s.mu.Lock()
	s.cleanups = append(s.cleanups, f)
	s.mu.Unlock()
}

// Context is Run's context.
func (s *Session) Context() context.Context { return s.ctx }

// TempDir makes a new folder under Dir, removed at the end if the session
// did not fail.
func (s *Session) TempDir() string {
	s.mu.Lock()
	s.temps++
	dir := filepath.Join(s.Dir, fmt.Sprintf("tmp%03d", s.temps))
	s.mu.Unlock()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		s.Fatal(err)
	}
	s.Cleanup(func() {
		if !s.Failed() {
			os.RemoveAll(dir)
		}
	})
	return dir
}

func (s *Session) Log(args ...any) {
	fmt.Fprintln(s.Out, strings.TrimSuffix(fmt.Sprintln(args...), "\n"))
}
func (s *Session) Logf(format string, args ...any) {
	fmt.Fprintln(s.Out, strings.TrimSuffix(fmt.Sprintf(format, args...), "\n"))
}
func (s *Session) Error(args ...any)                 { s.fail(strings.TrimSuffix(fmt.Sprintln(args...), "\n")) }
func (s *Session) Errorf(format string, args ...any) { s.fail(fmt.Sprintf(format, args...)) }
func (s *Session) Fatal(args ...any)                 { s.Error(args...); panic(fatal{}) }
func (s *Session) Fatalf(format string, args ...any) { s.Errorf(format, args...); panic(fatal{}) }

// Skipf is Fatalf: what a test would skip for (no root, a tool not built)
// stops a guided run.
func (s *Session) Skipf(format string, args ...any) { s.Fatalf(format, args...) }

// Failed reports whether a failure was reported.
func (s *Session) Failed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.errs) > 0
}
