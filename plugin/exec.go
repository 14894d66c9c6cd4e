package plugin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"golang.org/x/sys/unix"

	"github.com/twillnet/twill/internal/retry"
)

// Exec finds and runs delegate plugins. It is the part of libcni's
// invoke.Exec the plugin uses, so invoke's and libcni's implementations (and
// test fakes written for them) fit.
//
// The plugin does not import invoke itself: since CNI 1.3 that package
// imports OpenTelemetry's propagation, and with it net/http, crypto/tls and
// 120 more packages (7.0 MB of binary instead of 4.5 MB). Their initialisers
// and pages cost every run of the plugin about 0.3 ms of a 2.2 ms process
// start, for trace propagation that never happens here: invoke only
// propagates a span found in the context, and the plugin has none. A trace
// context the runtime passes in the environment still reaches the delegate,
// which inherits the environment.
type Exec interface {
	ExecPlugin(ctx context.Context, pluginPath string, stdinData []byte, environ []string) ([]byte, error)
	FindInPath(plugin string, paths []string) (string, error)
}

// runDelegate finds the delegate in CNI_PATH and runs it for verb with conf
// on stdin and the plugin's own environment, CNI_COMMAND replaced. A
// delegate still running after timeout is killed.
func runDelegate(timeout time.Duration, verb, typ string, conf []byte, e Exec) ([]byte, error) {
	if e == nil {
		e = defaultExec{}
	}
	path, err := e.FindInPath(typ, filepath.SplitList(os.Getenv("CNI_PATH")))
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := e.ExecPlugin(ctx, path, conf, delegateEnv(verb))
	return out, timedOut(ctx, timeout, err)
}

// timedOut turns the error of a delegate that was killed at its deadline
// into one that says so. The delegate's own error is quoted, not wrapped:
// it is no CNI error of the delegate's, whose code the verb would pass on.
func timedOut(ctx context.Context, timeout time.Duration, err error) error {
	if err != nil && errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("did not finish within %s (delegateTimeout), killed: %v", timeout, err)
	}
	return err
}

// delegateEnv is the plugin's environment with CNI_COMMAND set to verb.
func delegateEnv(verb string) []string {
	env := os.Environ()
	out := make([]string, 0, len(env)+1)
	for _, kv := range env {
		if !strings.HasPrefix(kv, "CNI_COMMAND=") {
			out = append(out, kv)
		}
	}
	return append(out, "CNI_COMMAND="+verb)
}

// pending is a delegate the plugin started and has not waited for yet.
type pending struct {
	// started is false when the delegate has not run yet: wait runs it.
	started bool
	wait    func() ([]byte, error)
}

// startDelegate starts the delegate for verb and returns without waiting for
// it, so the plugin can do other work meanwhile; timeout counts from the
// start. Only the default Exec can start a plugin without waiting; with any
// other (test fakes) and when the start fails (e.g. "text file busy", which
// waiting retries), the delegate runs in wait, with the same errors
// runDelegate would return.
func startDelegate(timeout time.Duration, verb, typ string, conf []byte, e Exec) pending {
	run := pending{wait: func() ([]byte, error) { return runDelegate(timeout, verb, typ, conf, e) }}
	if e != nil {
		return run
	}
	path, err := defaultExec{}.FindInPath(typ, filepath.SplitList(os.Getenv("CNI_PATH")))
	if err != nil {
		return run
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	c, err := startChild(path, conf, delegateEnv(verb))
	if err != nil {
		cancel()
		return run
	}
	return pending{started: true, wait: func() ([]byte, error) {
		defer cancel()
		out, err := c.finish(ctx)
		return out, timedOut(ctx, timeout, err)
	}}
}

// resultVersion returns the version of a delegate's result, and the result
// with cniVersion set to the config's when the delegate left it out
// (containernetworking/cni#895), as invoke does.
func resultVersion(confVersion string, result []byte) (string, []byte, error) {
	var v struct {
		CNIVersion string `json:"cniVersion"`
	}
	if err := json.Unmarshal(result, &v); err != nil {
		return "", nil, fmt.Errorf("failed to unmarshal raw result: %w", err)
	}
	if v.CNIVersion != "" {
		return v.CNIVersion, result, nil
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(result, &m); err != nil {
		return "", nil, fmt.Errorf("failed to unmarshal raw result: %w", err)
	}
	if confVersion == "" {
		confVersion = "0.1.0" // what libcni reads an absent version as
	}
	if m == nil {
		m = map[string]json.RawMessage{} // the delegate printed "null"
	}
	m["cniVersion"], _ = json.Marshal(confVersion)
	b, err := json.Marshal(m)
	if err != nil {
		return "", nil, fmt.Errorf("failed to remarshal fixed result: %w", err)
	}
	return confVersion, b, nil
}

// defaultExec runs plugins from disk, as invoke.DefaultExec does.
type defaultExec struct{}

// FindInPath is invoke.FindInPath: the first regular file named plugin in
// paths.
func (defaultExec) FindInPath(plugin string, paths []string) (string, error) {
	if plugin == "" {
		return "", fmt.Errorf("no plugin name provided")
	}
	if strings.ContainsRune(plugin, os.PathSeparator) {
		return "", fmt.Errorf("invalid plugin name: %s", plugin)
	}
	if len(paths) == 0 {
		return "", fmt.Errorf("no paths provided")
	}
	for _, dir := range paths {
		full := filepath.Join(dir, plugin)
		if fi, err := os.Stat(full); err == nil && fi.Mode().IsRegular() {
			return full, nil
		}
	}
	return "", fmt.Errorf("failed to find plugin %q in path %s", plugin, paths)
}

// textBusyRetries: a plugin binary that is being replaced cannot be
// executed ("text file busy"); like invoke, wait for the writer, a second
// between attempts.
const textBusyRetries = 5

// ExecPlugin runs the plugin with stdin and environ and returns its stdout.
// A failure is the plugin's CNI error from stdout, or else an error quoting
// its stderr. The plugin's stderr goes on to ours.
func (defaultExec) ExecPlugin(ctx context.Context, pluginPath string, stdin []byte, environ []string) ([]byte, error) {
	busy := retry.Backoff{Min: time.Second}
	for attempt := 0; ; attempt++ {
		c, err := startChild(pluginPath, stdin, environ)
		switch {
		case err == nil:
			return c.finish(ctx)
		case errors.Is(err, errNoMemfd):
			return execPipes(ctx, pluginPath, stdin, environ)
		case errors.Is(err, syscall.ETXTBSY) && attempt < textBusyRetries:
			if err := busy.Wait(ctx); err != nil {
				return nil, err
			}
		default:
			return nil, pluginErr(err, nil, nil)
		}
	}
}

// execPipes runs the plugin with os/exec and pipes, where memory files are
// not available.
func execPipes(ctx context.Context, path string, stdin []byte, environ []string) ([]byte, error) {
	var stdout, stderr bytes.Buffer
	c := exec.CommandContext(ctx, path)
	c.Env = environ
	c.Stdin, c.Stdout, c.Stderr = bytes.NewReader(stdin), &stdout, &stderr
	if err := c.Run(); err != nil {
		return nil, pluginErr(err, stdout.Bytes(), stderr.Bytes())
	}
	if stderr.Len() > 0 {
		_, _ = os.Stderr.Write(stderr.Bytes()) // informational only
	}
	return stdout.Bytes(), nil
}

// child is a plugin process that was started and not waited for yet.
//
// Its stdin, stdout and stderr are memory files (memfd) rather than pipes,
// and it is started with syscall.ForkExec rather than os/exec. So no pipes,
// no copying goroutines (and the threads they would need) and no pidfd
// probe: os.StartProcess checks once per process that pidfds work, with three
// syscalls and a throw-away vfork, which a plugin that starts one process
// pays every time. A plugin writing much cannot block on a full pipe either.
type child struct {
	path          string
	pid           int
	in, out, errf *os.File
}

// errNoMemfd: memory files are not available (Linux before 3.17, or a
// seccomp filter); ExecPlugin falls back to pipes.
var errNoMemfd = errors.New("memfd_create not available")

// startChild starts path with stdin and environ.
func startChild(path string, stdin []byte, environ []string) (*child, error) {
	in, out, errf, ok := memFiles(stdin)
	if !ok {
		return nil, errNoMemfd
	}
	pid, err := syscall.ForkExec(path, []string{path},
		&syscall.ProcAttr{Env: environ, Files: []uintptr{in.Fd(), out.Fd(), errf.Fd()}})
	if err != nil {
		in.Close()
		out.Close()
		errf.Close()
		return nil, &os.PathError{Op: "fork/exec", Path: path, Err: err}
	}
	return &child{path: path, pid: pid, in: in, out: out, errf: errf}, nil
}

// finish waits for the child and returns its stdout; a failure is as
// ExecPlugin describes. The child is killed when ctx ends first.
func (c *child) finish(ctx context.Context) ([]byte, error) {
	defer c.in.Close()
	defer c.out.Close()
	defer c.errf.Close()
	err := c.wait(ctx)
	stdout, rerr := readMemFile(c.out)
	stderr, _ := readMemFile(c.errf)
	if err != nil {
		return nil, pluginErr(err, stdout, stderr)
	}
	if rerr != nil {
		return nil, fmt.Errorf("read the output of %s: %w", c.path, rerr)
	}
	if len(stderr) > 0 {
		_, _ = os.Stderr.Write(stderr) // informational only
	}
	return stdout, nil
}

// wait reaps the child; an error says how it ended unless it exited with 0.
func (c *child) wait(ctx context.Context) error {
	if done := ctx.Done(); done != nil {
		var mu sync.Mutex
		exited := false
		stop := make(chan struct{})
		defer close(stop)
		go func() {
			select {
			case <-done:
				mu.Lock()
				if !exited { // not reaped yet: pid still names the child
					_ = syscall.Kill(c.pid, syscall.SIGKILL)
				}
				mu.Unlock()
			case <-stop:
			}
		}()
		// Wait without reaping first, so the kill above never reaches
		// another process that got the pid after the child was reaped.
		var info unix.Siginfo
		for {
			err := unix.Waitid(unix.P_PID, c.pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
			if err != syscall.EINTR {
				break
			}
		}
		mu.Lock()
		exited = true
		mu.Unlock()
	}
	var ws syscall.WaitStatus
	var err error
	for {
		_, err = syscall.Wait4(c.pid, &ws, 0, nil)
		if err != syscall.EINTR {
			break
		}
	}
	switch {
	case err != nil:
		return fmt.Errorf("wait for %s: %w", c.path, err)
	case ws.Exited() && ws.ExitStatus() == 0:
		return nil
	case ws.Exited():
		return fmt.Errorf("exit status %d", ws.ExitStatus())
	case ws.Signaled():
		return fmt.Errorf("signal: %v", ws.Signal())
	default:
		return fmt.Errorf("wait status %#x", uint32(ws))
	}
}

// memFiles returns three memory files: the first holds stdin, positioned at
// its start; the others are empty.
func memFiles(stdin []byte) (in, out, errf *os.File, ok bool) {
	var fs [3]*os.File
	for i := range fs {
		f, err := memfd("twill-delegate")
		if err != nil {
			for _, g := range fs[:i] {
				g.Close()
			}
			return nil, nil, nil, false
		}
		fs[i] = f
	}
	if _, err := fs[0].Write(stdin); err == nil {
		if _, err = fs[0].Seek(0, 0); err == nil {
			return fs[0], fs[1], fs[2], true
		}
	}
	for _, f := range fs {
		f.Close()
	}
	return nil, nil, nil, false
}

// memfd creates an anonymous memory file, closed on exec.
func memfd(name string) (*os.File, error) {
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), name), nil
}

// readMemFile reads a memory file the child wrote, from its start.
func readMemFile(f *os.File) ([]byte, error) {
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	buf := make([]byte, fi.Size())
	n, err := f.ReadAt(buf, 0)
	if err != nil && n < len(buf) {
		return buf[:n], err
	}
	return buf[:n], nil
}

// pluginErr is invoke's error for a failed plugin: its CNI error object from
// stdout, else a message with its stderr.
func pluginErr(err error, stdout, stderr []byte) error {
	emsg := types.Error{}
	switch {
	case len(stdout) == 0 && len(stderr) == 0:
		emsg.Msg = fmt.Sprintf("netplugin failed with no error message: %v", err)
	case len(stdout) == 0:
		emsg.Msg = fmt.Sprintf("netplugin failed: %q: %v", string(stderr), err)
	default:
		if perr := json.Unmarshal(stdout, &emsg); perr != nil {
			emsg.Msg = fmt.Sprintf("netplugin failed but error parsing its diagnostic message %q: %v", string(stdout), perr)
		}
	}
	return &emsg
}
