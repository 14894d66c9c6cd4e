package testenv

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"testing"
)

// The record of what kubelet nodes changed on the machine outlives a holder
// that died without its clean-up: the dead process is dropped, and the
// settings from before any node are kept (not read again from a machine the
// dead one's kubelets changed), for the next holder to restore.
func TestMachineRecordDropsDeadHolders(t *testing.T) {
	machineDir = t.TempDir()
	t.Cleanup(func() { machineDir = "/run/twill-testenv" })
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	before := map[string]string{"kernel/panic": "1", "kernel/panic_on_oops": "0", "vm/overcommit_memory": "0"}
	data, _ := json.Marshal(machineRecord{Holders: map[int]int{dead.Process.Pid: 2, os.Getpid(): 1}, Kernel: before, Created: []string{"/var/lib/kubelet"}})
	if err := os.WriteFile(filepath.Join(machineDir, "nodes.json"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	err := withMachineRecord(func(r *machineRecord) error {
		if !reflect.DeepEqual(r.Holders, map[int]int{os.Getpid(): 1}) {
			t.Errorf("holders %v, want only this process", r.Holders)
		}
		if !reflect.DeepEqual(r.Kernel, before) || !reflect.DeepEqual(r.Created, []string{"/var/lib/kubelet"}) {
			t.Errorf("record %+v lost what was saved before the first node", r)
		}
		r.Holders = nil
		r.Kernel = nil
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// Nothing left to restore: the record is gone.
	if _, err := os.Stat(filepath.Join(machineDir, "nodes.json")); !os.IsNotExist(err) {
		t.Errorf("an empty record was kept (%v)", err)
	}
	// A corrupt record is an error naming the file, not a fresh start
	// that would take the changed settings for the machine's own.
	os.WriteFile(filepath.Join(machineDir, "nodes.json"), []byte("{"), 0o644)
	if err := withMachineRecord(func(*machineRecord) error { return nil }); err == nil {
		t.Error("a corrupt record was accepted")
	}
}
