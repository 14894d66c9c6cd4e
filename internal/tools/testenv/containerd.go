package testenv

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// PauseImage is the name of the sandbox image the test runtimes use: the
// static program of test/pause, packed by the test (nothing can be pulled).
const PauseImage = "localhost/twill-test/pause:1"

// Containerd is a containerd with its CRI plugin that a test runs as one
// node's container runtime: its own root, state, socket and CNI directories
// under Dir, started in a network namespace of the test's, with runc.
//
// It is started with nsenter --net, not `ip netns exec`: the latter also
// gives the process a private mount namespace with /sys remounted, where
// /sys/fs/cgroup is empty (runc cannot make cgroups) and where the pod
// namespaces that containerd bind-mounts under /run/netns stay invisible to
// the test.
type Containerd struct {
	Dir        string // everything of this runtime's
	NetNS      string // the network namespace it runs in (name under /run/netns)
	Socket     string // its CRI and containerd API socket
	CNIBinDir  string // where it looks for CNI plugins (the node's /opt/cni/bin)
	CNIConfDir string // where it looks for conflists (the node's /etc/cni/net.d)
	// CgroupParent is the cgroup (in every v1 hierarchy) that pods given it
	// as linux.cgroup_parent are put under, removed when the test ends.
	CgroupParent string

	containerd, ctr string // the programs
	config, log     string
	// mountNS is the mount namespace (a path such as /proc/<pid>/ns/mnt)
	// containerd runs in, "" for the test's own; cniBinPath and cniConfPath
	// are the CNI directories as containerd sees them there.
	mountNS                 string
	cniBinPath, cniConfPath string
	proc                    *exec.Cmd
	done                    chan struct{}
	answered                bool // it has started and answered once
}

// containerdBinaries returns the paths of containerd and ctr in binDir, or,
// with binDir empty, Debian's (hack/install-deps.sh installs them). It
// checks that containerd's shim and runc are there too.
func containerdBinaries(t TB, binDir string) (containerd, ctr string) {
	t.Helper()
	for _, name := range []string{"runc", "nsenter"} {
		if _, err := exec.LookPath(name); err != nil {
			missing(t, "%s not found; run `make deps`", name)
		}
	}
	paths := map[string]string{}
	for _, name := range []string{"containerd", "ctr", "containerd-shim-runc-v2"} {
		if binDir == "" {
			p, err := exec.LookPath(name)
			if err != nil {
				missing(t, "%s not found; run `make deps` (Debian package containerd)", name)
			}
			paths[name] = p
		} else {
			paths[name] = requireFile(t, filepath.Join(binDir, name), "make tools")
		}
	}
	return paths["containerd"], paths["ctr"]
}

// StartContainerd starts a containerd for one node in netns, keeping its
// files in dir, and imports the pause image into its k8s.io namespace. The
// programs are Debian's, or with binDir set, the containerd, ctr and shim
// there (`make tools` builds containerd 2.x into bin/tools/containerd2). The
// CNI directories are made empty: the caller installs plugins and a conflist
// the way the DaemonSet does. Everything it starts (containerd, the shims
// of pods still running) is stopped when the test ends.
func StartContainerd(t TB, netns, dir, binDir string) *Containerd {
	t.Helper()
	return StartContainerdWith(t, ContainerdOptions{NetNS: netns, Dir: dir, BinDir: binDir})
}

// ContainerdOptions are StartContainerdWith's: StartContainerd's arguments,
// and optionally a mount namespace of the node's own.
type ContainerdOptions struct {
	NetNS  string // the network namespace (name under /run/netns)
	Dir    string // everything of this runtime's
	BinDir string // "" for Debian's programs, else containerd, ctr and shim there

	// MountNS, when set, is the node's mount namespace (a path such as
	// /proc/<pid>/ns/mnt, see StartKubeNode) that containerd runs in. Its
	// configuration then names /opt/cni/bin and /etc/cni/net.d as they are
	// in that namespace, and CNIBinDir and CNIConfDir must be the folders
	// of the test's own namespace that are bind-mounted there.
	MountNS               string
	CNIBinDir, CNIConfDir string
}

// StartContainerdWith is StartContainerd with options.
func StartContainerdWith(t TB, o ContainerdOptions) *Containerd {
	t.Helper()
	RequireRoot(t)
	containerd, ctr := containerdBinaries(t, o.BinDir)
	dir, netns := o.Dir, o.NetNS
	c := &Containerd{
		containerd:   containerd,
		ctr:          ctr,
		Dir:          dir,
		NetNS:        netns,
		Socket:       filepath.Join(dir, "containerd.sock"),
		CNIBinDir:    filepath.Join(dir, "opt", "cni", "bin"),
		CNIConfDir:   filepath.Join(dir, "etc", "cni", "net.d"),
		CgroupParent: "/" + netns,
		config:       filepath.Join(dir, "containerd.toml"),
		log:          filepath.Join(dir, "containerd.log"),
	}
	c.cniBinPath, c.cniConfPath = c.CNIBinDir, c.CNIConfDir
	if o.MountNS != "" {
		if o.CNIBinDir == "" || o.CNIConfDir == "" {
			t.Fatal("StartContainerdWith: MountNS needs CNIBinDir and CNIConfDir")
		}
		c.mountNS = o.MountNS
		c.CNIBinDir, c.CNIConfDir = o.CNIBinDir, o.CNIConfDir
		c.cniBinPath, c.cniConfPath = "/opt/cni/bin", "/etc/cni/net.d"
	}
	for _, d := range []string{c.CNIBinDir, c.CNIConfDir, filepath.Join(dir, "pod-logs")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(c.config, []byte(c.configTOML()), 0o644); err != nil {
		t.Fatal(err)
	}
	// crictl's own config file, so that the machine's /etc/crictl.yaml is not read.
	crictl := "runtime-endpoint: unix://" + c.Socket + "\nimage-endpoint: unix://" + c.Socket + "\ntimeout: 60\n"
	if err := os.WriteFile(c.crictlConfig(), []byte(crictl), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.cleanup(t) })
	c.Start(t)
	image := filepath.Join(dir, "pause.tar")
	if err := writePauseImage(image, Tool(t, "pause")); err != nil {
		t.Fatal(err)
	}
	if out, err := c.Ctr("-n", "k8s.io", "images", "import", image); err != nil {
		t.Fatalf("import the pause image: %v\n%s", err, out)
	}
	return c
}

// configTOML is containerd 1.6's configuration (version 2 format, which 1.7
// and 2.x still read) for a node of the test.
func (c *Containerd) configTOML() string {
	q := strconv.Quote
	return `version = 2
root = ` + q(filepath.Join(c.Dir, "root")) + `
state = ` + q(filepath.Join(c.Dir, "state")) + `
# Snapshotters this machine has no use for; they only log errors.
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = ` + q(c.Socket) + `

[plugins."io.containerd.internal.v1.opt"]
  path = ` + q(filepath.Join(c.Dir, "opt", "containerd")) + `

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = ` + q(PauseImage) + `
  # Root here lacks CAP_SYS_RESOURCE: lowering a process's OOM score
  # adjustment below its parent's is refused, so clamp instead of failing.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = ` + q(c.cniBinPath) + `
    conf_dir = ` + q(c.cniConfPath) + `
    max_conf_num = 1
`
}

// Start starts containerd (again, after Stop) and waits until it answers.
func (c *Containerd) Start(t TB) {
	t.Helper()
	logf, err := os.OpenFile(c.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	nsArgs := []string{"--net=/run/netns/" + c.NetNS}
	if c.mountNS != "" {
		nsArgs = append([]string{"--mount=" + c.mountNS}, nsArgs...)
	}
	cmd := exec.Command("nsenter", append(nsArgs, c.containerd, "--config", c.config)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	// containerd looks its shim up in PATH: the one beside it comes first.
	cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(c.containerd)+":"+os.Getenv("PATH"))
	if err := startProcess(cmd); err != nil {
		logf.Close()
		t.Fatalf("start containerd: %v", err)
	}
	c.proc, c.done = cmd, make(chan struct{})
	done := c.done
	go func() { cmd.Wait(); logf.Close(); close(done) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := c.Ctr("version")
		if err == nil {
			c.answered = true
			return
		}
		select {
		case <-done:
			t.Fatalf("containerd exited at start: %v\n%s", cmd.ProcessState, tail(c.log, 30))
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd did not answer within 30s: %v\n%s", err, tail(c.log, 30))
		}
	}
}

// Stop stops containerd with SIGTERM and waits for it. The shims, and so the
// pods, keep running, as they do when a node's containerd restarts.
func (c *Containerd) Stop(t TB) {
	t.Helper()
	if c.proc == nil {
		return
	}
	if !terminateGroup(c.proc, c.done, 20*time.Second) {
		t.Errorf("containerd did not exit within 20s of SIGTERM")
	}
	c.proc = nil
}

// Ctr runs ctr against this containerd.
func (c *Containerd) Ctr(args ...string) (string, error) {
	return run(c.ctr, append([]string{"--address", c.Socket}, args...)...)
}

// Crictl runs crictl (built by `make tools`) against this containerd's CRI,
// as a kubelet would talk to it, and returns what it printed on stdout. The
// error carries stderr, where crictl writes the runtime's errors.
func (c *Containerd) Crictl(t TB, args ...string) (string, error) {
	t.Helper()
	return run(Tool(t, "crictl"), append([]string{"--config", c.crictlConfig()}, args...)...)
}

func (c *Containerd) crictlConfig() string { return filepath.Join(c.Dir, "crictl.yaml") }

// Version is what containerd says of its version.
func (c *Containerd) Version(t TB) string {
	out, err := run(c.containerd, "--version")
	if err != nil {
		return err.Error()
	}
	return strings.TrimSpace(out)
}

// run runs a program with a deadline and returns its stdout; a failure's
// error carries its stderr.
func run(bin string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	var out, errOut bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %w: %s", filepath.Base(bin), strings.Join(args, " "), err, strings.TrimSpace(errOut.String()))
	}
	return out.String(), nil
}

// cleanup removes every pod sandbox through the CRI (so the CNI chain's DEL
// runs and nothing is left in the node's namespace), stops containerd, and
// kills any shim of this containerd still alive.
func (c *Containerd) cleanup(t TB) {
	if t.Failed() {
		t.Logf("containerd log (%s), last lines:\n%s", c.log, tail(c.log, 40))
	}
	if c.proc == nil && c.answered {
		// Stopped by the test (which then failed before starting it again):
		// start it to remove the pods, so the CNI chain's DEL runs.
		c.Start(t)
	}
	if c.proc != nil {
		if out, err := c.Crictl(t, "rmp", "--all", "--force"); err != nil {
			t.Errorf("remove the pods of %s: %v\n%s", c.NetNS, err, out)
		}
		c.Stop(t)
	}
	// A shim is started with the containerd socket's address in its arguments.
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(cmdline, []byte("containerd-shim")) || !bytes.Contains(cmdline, []byte(c.Socket)) {
			continue
		}
		t.Errorf("a shim of %s was left running (pid %d); killing it", c.NetNS, pid)
		syscall.Kill(pid, syscall.SIGKILL)
	}
	// runc leaves the (empty) cgroups of the pods' parent in every hierarchy.
	hierarchies, _ := filepath.Glob("/sys/fs/cgroup/*" + c.CgroupParent)
	for _, h := range hierarchies {
		os.Remove(h)
	}
	// Sandboxes' root file systems are overlay mounts under root/; a pod
	// removed through the CRI has none left, but unmount whatever is.
	mounts, _ := os.ReadFile("/proc/self/mounts")
	for _, line := range strings.Split(string(mounts), "\n") {
		if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], c.Dir+"/") {
			syscall.Unmount(f[1], syscall.MNT_DETACH)
		}
	}
}

// writePauseImage packs the pause program as an image in the format of
// `docker save` (manifest.json, a config and one layer), which `ctr images
// import` reads, tagged PauseImage.
func writePauseImage(path, pauseBin string) error {
	bin, err := os.ReadFile(pauseBin)
	if err != nil {
		return fmt.Errorf("read the pause program: %w", err)
	}
	var layer bytes.Buffer
	lw := tar.NewWriter(&layer)
	if err := lw.WriteHeader(&tar.Header{Name: "pause", Mode: 0o755, Size: int64(len(bin)), Typeflag: tar.TypeReg}); err != nil {
		return err
	}
	if _, err := lw.Write(bin); err != nil {
		return err
	}
	if err := lw.Close(); err != nil {
		return err
	}
	layerSum := sha256.Sum256(layer.Bytes())
	config, err := json.Marshal(map[string]any{
		"architecture": runtime.GOARCH,
		"os":           "linux",
		"config":       map[string]any{"Entrypoint": []string{"/pause"}},
		"rootfs":       map[string]any{"type": "layers", "diff_ids": []string{"sha256:" + hex.EncodeToString(layerSum[:])}},
	})
	if err != nil {
		return err
	}
	configSum := sha256.Sum256(config)
	configName := hex.EncodeToString(configSum[:]) + ".json"
	manifest, err := json.Marshal([]map[string]any{{
		"Config":   configName,
		"RepoTags": []string{PauseImage},
		"Layers":   []string{"layer.tar"},
	}})
	if err != nil {
		return err
	}
	var out bytes.Buffer
	w := tar.NewWriter(&out)
	for _, f := range []struct {
		name string
		data []byte
	}{{"layer.tar", layer.Bytes()}, {configName, config}, {"manifest.json", manifest}} {
		if err := w.WriteHeader(&tar.Header{Name: f.name, Mode: 0o644, Size: int64(len(f.data)), Typeflag: tar.TypeReg}); err != nil {
			return err
		}
		if _, err := w.Write(f.data); err != nil {
			return err
		}
	}
	if err := w.Close(); err != nil {
		return err
	}
	if err := os.WriteFile(path, out.Bytes(), 0o644); err != nil {
		return errors.Join(errors.New("write the pause image"), err)
	}
	return nil
}
