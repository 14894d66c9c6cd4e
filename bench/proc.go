package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/twillnet/twill/internal/retry"
)

// Proc is a long-lived program the harness started inside a namespace. It is
// killed if the harness dies (parent-death signal) and stopped explicitly
// otherwise.
type Proc struct {
	Name    string
	Log     string
	Started time.Time // just before the fork
	cmd     *exec.Cmd
	done    chan struct{}
	err     error
}

// startInNS starts bin in the named network namespace. The fork happens on a
// thread that has entered the namespace, so the program starts there directly,
// as a service manager would start it, with no `ip netns exec` in front: the
// time from Started is the program's own.
func startInNS(netns, logPath, bin string, args ...string) (*Proc, error) {
	return startInNSEnv(netns, logPath, nil, bin, args...)
}

// startInNSEnv is startInNS with extra environment variables.
func startInNSEnv(netns, logPath string, env []string, bin string, args ...string) (*Proc, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	p := &Proc{Name: filepath.Base(bin), Log: logPath, cmd: cmd, done: make(chan struct{})}
	err = ns.WithNetNSPath(nsPath(netns), func(ns.NetNS) error {
		p.Started = time.Now()
		return cmd.Start()
	})
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s in %s: %w", bin, netns, err)
	}
	go func() { p.err = cmd.Wait(); f.Close(); close(p.done) }()
	return p, nil
}

func nsPath(name string) string { return "/run/netns/" + name }

// Pid is the program's process id.
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Exited reports whether the program has ended.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Stop sends SIGTERM and waits up to 15 s, then kills.
func (p *Proc) Stop() error {
	if p == nil || p.Exited() {
		return nil
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(15 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("%s did not stop within 15 s of SIGTERM; killed", p.Name)
	}
}

// ProcUsage is what /proc says about a process.
type ProcUsage struct {
	CPUSeconds  float64 // user + system, all threads
	UserSeconds float64
	SysSeconds  float64
	// ChildSeconds is the user + system time of the process's children
	// that it has waited for (cutime + cstime): the programs it ran.
	ChildSeconds float64
	RSSMiB       float64 // VmRSS
	HWMMiB       float64 // VmHWM: peak RSS
	AnonMiB      float64 // RssAnon: Go heap, stacks, runtime
	FileMiB      float64 // RssFile + RssShmem: the binary's pages
}

// clockTick is USER_HZ, the unit of utime and stime in /proc/<pid>/stat;
// it is 100 on every Linux architecture Go supports.
const clockTick = 100

// usage reads the CPU time and memory of pid.
func usage(pid int) (ProcUsage, error) {
	var u ProcUsage
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return u, err
	}
	// Fields after the command name, which is in parentheses and may hold spaces.
	s := string(stat)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return u, errors.New("unexpected /proc/pid/stat")
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); utime is field 14, stime 15, cutime 16,
	// cstime 17.
	if len(f) < 15 {
		return u, errors.New("short /proc/pid/stat")
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	cut, _ := strconv.ParseFloat(f[13], 64)
	cst, _ := strconv.ParseFloat(f[14], 64)
	u.UserSeconds, u.SysSeconds = ut/clockTick, st/clockTick
	u.CPUSeconds = (ut + st) / clockTick
	u.ChildSeconds = (cut + cst) / clockTick
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return u, err
	}
	for _, line := range strings.Split(string(status), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		var kb float64
		fmt.Sscanf(strings.TrimSpace(v), "%f kB", &kb)
		switch k {
		case "VmRSS":
			u.RSSMiB = kb / 1024
		case "VmHWM":
			u.HWMMiB = kb / 1024
		case "RssAnon":
			u.AnonMiB = kb / 1024
		case "RssFile", "RssShmem":
			u.FileMiB += kb / 1024
		}
	}
	return u, nil
}

// run runs a short command and returns its output; the error carries stderr.
func run(ctx context.Context, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(errOut.String()))
	}
	return out.String(), nil
}

// ipCmd runs iproute2's ip with a bound on its run time.
func ipCmd(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	return run(ctx, "ip", args...)
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) error { return retry.Sleep(ctx, d) }

// readBytes is rchar of /proc/<pid>/io: the bytes the process has read
// through read(2) and its kin since it started, from files and from sockets
// alike (a Go program reads its TCP connections with read(2); netlink
// replies, received with recvmsg(2), are not counted).
func readBytes(pid int) (float64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "rchar:"); ok {
			return strconv.ParseFloat(strings.TrimSpace(v), 64)
		}
	}
	return 0, errors.New("no rchar in /proc/pid/io")
}
