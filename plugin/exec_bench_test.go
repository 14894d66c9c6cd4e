package plugin

import (
	"context"
	"os/exec"
	"testing"
)

// What the plugin's own exec path (memory files, syscall.ForkExec) buys over
// os/exec with pipes, the fallback it keeps: each runs /bin/true with a
// delegate-sized configuration on stdin.
func BenchmarkExecMemfd(b *testing.B) { benchExec(b, defaultExec{}.ExecPlugin) }

func BenchmarkExecPipes(b *testing.B) { benchExec(b, execPipes) }

func benchExec(b *testing.B, run func(context.Context, string, []byte, []string) ([]byte, error)) {
	path, err := exec.LookPath("true")
	if err != nil {
		b.Skip("no true(1)")
	}
	conf := make([]byte, 600)
	ctx := context.Background()
	for b.Loop() {
		if _, err := run(ctx, path, conf, nil); err != nil {
			b.Fatal(err)
		}
	}
}
