package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// goBenchPackages are the hot paths, by module (its folder in the checkout):
// the backends (kernel reconcile at 5,000 peers, cold and steady) and subnet
// (allocation) in twill's module, hotpath (the pure desired-state, diff and
// lease-decoding code at 5,000 peers) and kubeinformer in the bench module.
var goBenchPackages = []struct {
	dir  string
	pkgs []string
}{
	{".", []string{"./backend/...", "./subnet/..."}},
	{"bench", []string{"./..."}},
}

var benchLine = regexp.MustCompile(`^(Benchmark\S+?)(?:-\d+)?\s+(\d+)\s+(.*)$`)

// runGoBench runs the testing.B benchmarks once and puts each in the report.
// -run '^$' runs no tests (a pattern such as `-run x` would still match
// every test with an x in its name). A benchmark that needs minutes (the
// Kubernetes informer one in subnet/kube) skips itself unless named in
// -bench, so `-bench .` stays bounded.
func (h *Harness) runGoBench(ctx context.Context, sec *Section) error {
	cctx, cancel := context.WithTimeout(ctx, 20*time.Minute)
	defer cancel()
	for _, m := range goBenchPackages {
		if err := h.goBench(cctx, sec, filepath.Join(h.cfg.RepoRoot, m.dir), m.pkgs); err != nil {
			return err
		}
	}
	return nil
}

// goBench runs the benchmarks of pkgs in the module at dir.
func (h *Harness) goBench(ctx context.Context, sec *Section, dir string, pkgs []string) error {
	args := append([]string{"test", "-run", "^$", "-bench", ".", "-benchmem", "-count", "1", "-timeout", "10m"}, pkgs...)
	cmd := exec.CommandContext(ctx, h.cfg.Go, args...)
	cmd.Dir = dir
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	cmd.Stderr = h.log
	h.say("  %s %s", h.cfg.Go, strings.Join(args, " "))
	if err := cmd.Start(); err != nil {
		return err
	}
	pkg := ""
	sc := bufio.NewScanner(io.TeeReader(out, h.log))
	for sc.Scan() {
		line := sc.Text()
		if p, ok := strings.CutPrefix(line, "pkg: "); ok {
			pkg = path.Base(strings.TrimSpace(p))
			continue
		}
		m := benchLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		f := &Figure{Name: pkg + " " + m[1], Unit: "ms/op"}
		var extra []string
		fields := strings.Fields(m[3])
		for i := 0; i+1 < len(fields); i += 2 {
			v, err := strconv.ParseFloat(fields[i], 64)
			if err != nil {
				continue
			}
			switch unit := fields[i+1]; unit {
			case "ns/op":
				f.Value = newValue(v / 1e6)
			default:
				extra = append(extra, fmt.Sprintf("%s %s", trimFloat(v), unit))
			}
		}
		f.Note = fmt.Sprintf("%s iterations; %s", m[2], strings.Join(extra, ", "))
		h.add(sec, f)
	}
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("go %s: %w", strings.Join(args, " "), err)
	}
	return nil
}
