package plugin

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestStateFileName(t *testing.T) {
	hex64 := strings.Repeat("0123456789abcdef", 4)
	for _, tc := range []struct {
		id, ifName string
		want       string // "" means rejected
	}{
		{hex64, "eth0", hex64 + "@eth0"},
		{"pod-1_a.b", "net1", "pod-1_a.b@net1"},
		{"a", "e", "a@e"},
		{strings.Repeat("a", MaxContainerIDLen), "eth0", strings.Repeat("a", MaxContainerIDLen) + "@eth0"},
		{"abc", strings.Repeat("e", MaxIfNameLen), "abc@" + strings.Repeat("e", MaxIfNameLen)},
		// container IDs that must not become paths
		{"", "eth0", ""},
		{"../../etc/passwd", "eth0", ""},
		{"a/b", "eth0", ""},
		{"..", "eth0", ""},
		{"a..b", "eth0", ""},
		{".hidden", "eth0", ""},
		{"-flag", "eth0", ""},
		{"a b", "eth0", ""},
		{"a\x00b", "eth0", ""},
		{"a\nb", "eth0", ""},
		{"a@b", "eth0", ""},
		{"a:b", "eth0", ""},
		{"caf\u00e9", "eth0", ""},
		{strings.Repeat("a", MaxContainerIDLen+1), "eth0", ""},
		// interface names likewise
		{"abc", "", ""},
		{"abc", "..", ""},
		{"abc", ".", ""},
		{"abc", "eth/0", ""},
		{"abc", "eth@0", ""},
		{"abc", "eth0\x00", ""},
		{"abc", "eth 0", ""},
		{"abc", strings.Repeat("e", MaxIfNameLen+1), ""},
	} {
		got, err := StateFileName(tc.id, tc.ifName)
		if tc.want == "" {
			if err == nil {
				t.Errorf("StateFileName(%q, %q) = %q, want an error", tc.id, tc.ifName, got)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("StateFileName(%q, %q) = %q, %v; want %q", tc.id, tc.ifName, got, err, tc.want)
			continue
		}
		id, ifn, ok := ParseStateFileName(got)
		if !ok || id != tc.id || ifn != tc.ifName {
			t.Errorf("ParseStateFileName(%q) = %q, %q, %v", got, id, ifn, ok)
		}
	}
	for _, name := range []string{"", "abc", "abc@", "@eth0", "a@b@c", ".abc@eth0", "abc@eth0/x", "lock"} {
		if id, ifn, ok := ParseStateFileName(name); ok {
			t.Errorf("ParseStateFileName(%q) = %q, %q, ok; want not ok", name, id, ifn)
		}
	}
}

func TestStoreSaveLoadRemove(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "var", "lib", "cni", "twill")
	s, err := NewStore(dataDir, "net1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load("c1", "eth0"); !errors.Is(err, ErrNoState) {
		t.Fatalf("Load before Save: %v, want ErrNoState", err)
	}
	if _, err := os.Stat(dataDir); !os.IsNotExist(err) {
		t.Fatalf("Load created dataDir: %v", err)
	}
	st := &State{ContainerID: "c1", IfName: "eth0", Env: recordEnv(testEnv), Delegate: []byte(`{"type":"bridge","name":"net1"}`)}
	if err := s.Save(st); err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]os.FileMode{
		dataDir:                        0o700 | os.ModeDir,
		filepath.Join(dataDir, "net1"): 0o700 | os.ModeDir,
		filepath.Join(dataDir, "net1", "c1@eth0"): 0o600,
	} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != want {
			t.Errorf("%s: mode %v, want %v", path, fi.Mode(), want)
		}
	}
	got, err := s.Load("c1", "eth0")
	if err != nil {
		t.Fatal(err)
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, got.Delegate); err != nil {
		t.Fatal(err)
	}
	if got.Network != "net1" || got.Env != st.Env || compact.String() != `{"type":"bridge","name":"net1"}` {
		t.Errorf("Load = %+v, want %+v", got, st)
	}
	// Another network in the same dataDir does not see it.
	other, _ := NewStore(dataDir, "net2")
	if _, err := other.Load("c1", "eth0"); !errors.Is(err, ErrNoState) {
		t.Errorf("other network's Load: %v, want ErrNoState", err)
	}
	if err := s.Remove("c1", "eth0"); err != nil {
		t.Fatal(err)
	}
	if err := s.Remove("c1", "eth0"); err != nil {
		t.Errorf("second Remove: %v", err)
	}
	if _, err := s.Load("c1", "eth0"); !errors.Is(err, ErrNoState) {
		t.Errorf("Load after Remove: %v, want ErrNoState", err)
	}
}

func TestStoreRejectsBadNames(t *testing.T) {
	dataDir := t.TempDir()
	if _, err := NewStore(dataDir, "../escape"); err == nil {
		t.Error("NewStore accepted network name ../escape")
	}
	if _, err := NewStore("relative", "net1"); err == nil {
		t.Error("NewStore accepted a relative dataDir")
	}
	s, _ := NewStore(dataDir, "net1")
	st := &State{ContainerID: "../../x", IfName: "eth0", Delegate: []byte(`{"type":"bridge"}`)}
	if err := s.Save(st); err == nil {
		t.Error("Save accepted container ID ../../x")
	}
	if _, err := s.Load("..", "eth0"); err == nil || errors.Is(err, ErrNoState) {
		t.Errorf("Load(..): %v, want a validation error", err)
	}
	if err := s.Remove("a/b", "eth0"); err == nil {
		t.Error("Remove accepted container ID a/b")
	}
	if entries, _ := os.ReadDir(dataDir); len(entries) != 0 {
		t.Errorf("dataDir has %d entries after rejected names", len(entries))
	}
}

func TestStoreLoadCorrupt(t *testing.T) {
	s, _ := NewStore(t.TempDir(), "net1")
	good := &State{ContainerID: "c1", IfName: "eth0", Env: recordEnv(testEnv), Delegate: []byte(`{"type":"bridge"}`)}
	if err := s.Save(good); err != nil {
		t.Fatal(err)
	}
	path, _ := s.Path("c1", "eth0")
	for name, content := range map[string]string{
		"empty":            "",
		"garbage":          "\x00\x01not json",
		"truncated":        `{"version":1,"network":"net1","containerID":"c1"`,
		"wrong version":    `{"version":2,"network":"net1","containerID":"c1","ifName":"eth0","env":{"subnet":"10.244.7.1/24"},"delegate":{"type":"bridge"}}`,
		"other attachment": `{"version":1,"network":"net1","containerID":"c2","ifName":"eth0","env":{"subnet":"10.244.7.1/24"},"delegate":{"type":"bridge"}}`,
		"other network":    `{"version":1,"network":"net9","containerID":"c1","ifName":"eth0","env":{"subnet":"10.244.7.1/24"},"delegate":{"type":"bridge"}}`,
		"no delegate":      `{"version":1,"network":"net1","containerID":"c1","ifName":"eth0","env":{"subnet":"10.244.7.1/24"}}`,
		"delegate no type": `{"version":1,"network":"net1","containerID":"c1","ifName":"eth0","env":{"subnet":"10.244.7.1/24"},"delegate":{"name":"x"}}`,
		"delegate path":    `{"version":1,"network":"net1","containerID":"c1","ifName":"eth0","env":{"subnet":"10.244.7.1/24"},"delegate":{"type":"/bin/sh"}}`,
		"bad subnet":       `{"version":1,"network":"net1","containerID":"c1","ifName":"eth0","env":{"subnet":"x"},"delegate":{"type":"bridge"}}`,
	} {
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Load("c1", "eth0"); !errors.Is(err, ErrCorruptState) {
			t.Errorf("%s: Load error %v, want ErrCorruptState", name, err)
		}
	}
}

func TestStoreEntries(t *testing.T) {
	s, _ := NewStore(t.TempDir(), "net1")
	if e, err := s.Entries(); err != nil || len(e) != 0 {
		t.Fatalf("Entries of a missing dir: %v, %v", e, err)
	}
	for _, id := range []string{"c1", "c2"} {
		if err := s.Save(&State{ContainerID: id, IfName: "eth0", Delegate: []byte(`{"type":"bridge"}`)}); err != nil {
			t.Fatal(err)
		}
	}
	// A temp file left by an interrupted Save, and files that are not ours.
	for _, name := range []string{".c3@eth0.tmp-12345", "README", ".hidden", "x@y@z"} {
		os.WriteFile(filepath.Join(s.Dir(), name), nil, 0o600)
	}
	os.Mkdir(filepath.Join(s.Dir(), "c4@eth0"), 0o700)
	entries, err := s.Entries()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, e := range entries {
		got[e.Name] = e.ContainerID + "/" + e.IfName
	}
	want := map[string]string{"c1@eth0": "c1/eth0", "c2@eth0": "c2/eth0", ".c3@eth0.tmp-12345": "c3/eth0"}
	if len(got) != len(want) {
		t.Fatalf("Entries = %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("Entries[%s] = %q, want %q", k, got[k], v)
		}
	}
	for _, e := range entries {
		if err := s.RemoveEntry(e); err != nil {
			t.Fatal(err)
		}
	}
	left, _ := os.ReadDir(s.Dir())
	if len(left) != 4 { // README, .hidden, x@y@z, c4@eth0/
		t.Errorf("after removing entries %d files are left, want the 4 that are not ours", len(left))
	}
}
