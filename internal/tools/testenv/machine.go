package testenv

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// What kubelet nodes change on the machine itself, outside every namespace,
// kept so that it is undone after the last node of the machine stops,
// whichever process (a test binary, a guided lab run) started it:
//
//   - the mount points of NodeMounts: each node's mount namespace mounts its
//     own folders onto them, so they must exist on the machine. Those
//     missing are made (empty) and removed, if still empty, at the end.
//   - the kernel settings a kubelet with protectKernelDefaults false sets
//     (not namespaced): saved before the first node, restored after the
//     last.
//
// The record is a file under machineDir, changed under an flock. A holder
// is a process id; holders no longer running are dropped, so a process
// killed before its clean-up leaves the record (with the settings as they
// were before any node) to the next, which restores them when it ends.
var machineDir = "/run/twill-testenv"

// kernelSettings are the sysctls (paths under /proc/sys) the kubelet sets.
var kernelSettings = []string{"kernel/panic", "kernel/panic_on_oops", "vm/overcommit_memory"}

// machineRecord is the file's content.
type machineRecord struct {
	// Holders counts each process's running nodes.
	Holders map[int]int `json:"holders"`
	// Kernel holds the settings from before the first node.
	Kernel map[string]string `json:"kernel"`
	// Created are the mount points made, parents first.
	Created []string `json:"created"`
}

// withMachineRecord runs f on the record under the lock and saves it;
// a record with no holders is removed instead.
func withMachineRecord(f func(r *machineRecord) error) error {
	if err := os.MkdirAll(machineDir, 0o755); err != nil {
		return err
	}
	lock, err := os.OpenFile(filepath.Join(machineDir, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return err
	}
	path := filepath.Join(machineDir, "nodes.json")
	r := &machineRecord{}
	if data, err := os.ReadFile(path); err == nil {
		if err := json.Unmarshal(data, r); err != nil {
			return fmt.Errorf("%s: %w (remove it once no kubelet of a test runs)", path, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if r.Holders == nil {
		r.Holders = map[int]int{}
	}
	for pid := range r.Holders {
		if syscall.Kill(pid, 0) == syscall.ESRCH {
			delete(r.Holders, pid)
		}
	}
	if err := f(r); err != nil {
		return err
	}
	if len(r.Holders) == 0 && r.Kernel == nil {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	data, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return os.WriteFile(path, data, 0o644)
}

// acquireMachine records a node of this process, saving the kernel settings
// and making the mount points first when it is the machine's first.
func acquireMachine(t TB) {
	t.Helper()
	err := withMachineRecord(func(r *machineRecord) error {
		if r.Kernel == nil {
			r.Kernel = map[string]string{}
			for _, k := range kernelSettings {
				v, err := os.ReadFile("/proc/sys/" + k)
				if err != nil {
					return err
				}
				r.Kernel[k] = strings.TrimSpace(string(v))
			}
		}
		r.Holders[os.Getpid()]++
		for _, m := range NodeMounts {
			made, err := makeMountPoint(m)
			r.Created = append(r.Created, made...)
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("record the machine's state before a kubelet node: %v", err)
	}
}

// makeMountPoint makes path (a file for /run/xtables.lock) and its missing
// parents, and returns what it made, parents first.
func makeMountPoint(path string) ([]string, error) {
	var missing []string
	for p := path; ; p = filepath.Dir(p) {
		if _, err := os.Stat(p); err == nil {
			break
		}
		missing = append([]string{p}, missing...)
	}
	var made []string
	for _, p := range missing {
		var err error
		if p == "/run/xtables.lock" {
			err = os.WriteFile(p, nil, 0o600)
		} else {
			err = os.Mkdir(p, 0o755)
		}
		if err != nil {
			return made, fmt.Errorf("make mount point %s: %w", p, err)
		}
		made = append(made, p)
	}
	return made, nil
}

// releaseMachine drops a node of this process; after the machine's last, it
// restores the kernel settings and removes the mount points made (if
// empty: nothing of the machine's is lost).
func releaseMachine(t TB) {
	err := withMachineRecord(func(r *machineRecord) error {
		if r.Holders[os.Getpid()]--; r.Holders[os.Getpid()] <= 0 {
			delete(r.Holders, os.Getpid())
		}
		if len(r.Holders) > 0 {
			return nil
		}
		var errs []error
		for _, k := range kernelSettings {
			if v, ok := r.Kernel[k]; ok {
				if err := os.WriteFile("/proc/sys/"+k, []byte(v), 0o644); err != nil {
					errs = append(errs, fmt.Errorf("restore %s to %s: %w", k, v, err))
				}
			}
		}
		for i := len(r.Created) - 1; i >= 0; i-- {
			os.Remove(r.Created[i])
		}
		*r = machineRecord{}
		return errors.Join(errs...)
	})
	if err != nil {
		t.Errorf("restore the machine after the last kubelet node: %v", err)
	}
}
