package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

// profiled runs f under a system-wide `perf record -g` when --perf is set,
// then writes perf's report of twilld's samples (flat, by symbol) beside the
// recording. Without --perf it just runs f.
func (h *Harness) profiled(ctx context.Context, name string, f func() error) error {
	if h.cfg.PerfDir == "" {
		return f()
	}
	if err := os.MkdirAll(h.cfg.PerfDir, 0o755); err != nil {
		return err
	}
	data := filepath.Join(h.cfg.PerfDir, name+".data")
	rec := exec.Command("perf", "record", "-a", "-g", "-F", "999", "-o", data)
	rec.Stdout, rec.Stderr = nil, nil
	rec.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := rec.Start(); err != nil {
		return fmt.Errorf("perf record: %w", err)
	}
	sleep(ctx, 500*time.Millisecond) // let perf attach before the work starts
	ferr := f()
	rec.Process.Signal(syscall.SIGINT)
	done := make(chan error, 1)
	go func() { done <- rec.Wait() }()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		rec.Process.Kill()
		<-done
	}
	rctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := run(rctx, "perf", "report", "-i", data, "--comm", "twilld", "--no-children", "--sort", "dso,symbol",
		"--percent-limit", "0.5", "--stdio", "-g", "none")
	if err == nil {
		err = os.WriteFile(filepath.Join(h.cfg.PerfDir, name+".txt"), []byte(out), 0o644)
	}
	h.say("  perf: %s (report of twilld's samples: %s.txt)", data, name)
	return errors.Join(ferr, err)
}
