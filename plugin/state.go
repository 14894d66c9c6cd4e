package plugin

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/twillnet/twill/internal/atomicfile"
	"github.com/twillnet/twill/subnet"
)

// Bounds on the names that become parts of state file paths. Runtimes use 64
// hex digits for container IDs; the kernel allows 15 bytes for an interface
// name. The longest state file name, 200+1+15 bytes plus atomicfile's temp
// prefix and suffix, stays under the 255 bytes a file name may have.
const (
	MaxContainerIDLen = 200
	MaxIfNameLen      = 15
	MaxNetworkNameLen = 200
)

// stateSep joins container ID and interface name in a state file name. It is
// not in the character set of either, so a file name maps back to exactly one
// attachment.
const stateSep = "@"

// stateVersion is the format of the state files this plugin writes.
const stateVersion = 1

// maxStateSize bounds what Load reads; a state file is about 1 KiB.
const maxStateSize = 1 << 20

var (
	// ErrNoState means no state file exists for the attachment.
	ErrNoState = errors.New("no saved state")
	// ErrCorruptState means a state file exists but cannot be used.
	ErrCorruptState = errors.New("saved state is corrupt")
)

// validName checks a runtime-supplied name before it becomes part of a path:
// letters, digits, '_', '-', '.', starting with a letter or digit, no "..".
func validName(what, s string, max int) error {
	if s == "" {
		return fmt.Errorf("%s is empty", what)
	}
	if len(s) > max {
		return fmt.Errorf("%s is %d bytes, more than %d", what, len(s), max)
	}
	if strings.Contains(s, "..") {
		return fmt.Errorf("%s %q contains %q", what, s, "..")
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if alnum || i > 0 && (c == '_' || c == '-' || c == '.') {
			continue
		}
		return fmt.Errorf("%s %q: character %q at %d is not allowed (letters, digits, '_', '-', '.'; a letter or digit first)", what, s, c, i)
	}
	return nil
}

// ValidateContainerID checks a container ID before it names a state file.
func ValidateContainerID(id string) error { return validName("container ID", id, MaxContainerIDLen) }

// ValidateIfName checks an interface name before it names a state file.
func ValidateIfName(name string) error { return validName("interface name", name, MaxIfNameLen) }

// ValidateNetworkName checks the network name, which names the state directory.
func ValidateNetworkName(name string) error {
	return validName("network name", name, MaxNetworkNameLen)
}

// StateFileName is the file name of an attachment's state, or an error if the
// container ID or interface name cannot safely be part of a path.
func StateFileName(containerID, ifName string) (string, error) {
	if err := ValidateContainerID(containerID); err != nil {
		return "", err
	}
	if err := ValidateIfName(ifName); err != nil {
		return "", err
	}
	return containerID + stateSep + ifName, nil
}

// ParseStateFileName is the inverse of StateFileName; ok is false for any name
// StateFileName would not produce.
func ParseStateFileName(name string) (containerID, ifName string, ok bool) {
	containerID, ifName, found := strings.Cut(name, stateSep)
	if !found || ValidateContainerID(containerID) != nil || ValidateIfName(ifName) != nil {
		return "", "", false
	}
	return containerID, ifName, true
}

// State is what ADD records for one attachment.
type State struct {
	Version     int       `json:"version"`
	Network     string    `json:"network"`
	ContainerID string    `json:"containerID"`
	IfName      string    `json:"ifName"`
	Env         EnvRecord `json:"env"`
	// Delegate is the exact configuration the delegate got on ADD.
	Delegate json.RawMessage `json:"delegate"`
}

// EnvRecord is the env file as it was at ADD. A family the node had no
// subnet of is left out. The IPv6 fields came after the first release, which
// wrote IPv4 alone: its files read as records without IPv6, which is what
// they describe, so the format version stayed 1.
type EnvRecord struct {
	Network     string `json:"network,omitempty"`
	Subnet      string `json:"subnet,omitempty"`
	IPv6Network string `json:"ipv6Network,omitempty"`
	IPv6Subnet  string `json:"ipv6Subnet,omitempty"`
	MTU         int    `json:"mtu"`
	IPMasq      bool   `json:"ipMasq"`
}

func recordEnv(e subnet.Env) EnvRecord {
	return EnvRecord{
		Network: prefixString(e.Network), Subnet: prefixString(e.Subnet),
		IPv6Network: prefixString(e.IPv6Network), IPv6Subnet: prefixString(e.IPv6Subnet),
		MTU: e.MTU, IPMasq: e.IPMasq,
	}
}

func prefixString(p netip.Prefix) string {
	if !p.IsValid() {
		return ""
	}
	return p.String()
}

// wiring is what a pod was wired with and cannot change under it: the node
// subnet of each family (its address and gateway) and the MTU.
func (e EnvRecord) wiring() string {
	or := func(s string) string {
		if s == "" {
			return "none"
		}
		return s
	}
	return fmt.Sprintf("subnet %s, IPv6 subnet %s, mtu %d", or(e.Subnet), or(e.IPv6Subnet), e.MTU)
}

// check is decodeState's test of the record: at least one family, and every
// subnet a prefix.
func (e EnvRecord) check() error {
	if e.Subnet == "" && e.IPv6Subnet == "" {
		return errors.New("env has neither subnet nor ipv6Subnet")
	}
	for _, f := range []struct{ key, v string }{{"subnet", e.Subnet}, {"ipv6Subnet", e.IPv6Subnet}} {
		if f.v == "" {
			continue
		}
		if _, err := netip.ParsePrefix(f.v); err != nil {
			return fmt.Errorf("env %s: %w", f.key, err)
		}
	}
	return nil
}

// Store keeps state files for one network: <dataDir>/<network>/<containerID>@<ifName>.
// The per-network directory keeps GC of one network from touching another's
// attachments when several networks share a dataDir.
type Store struct {
	DataDir string
	Network string
}

// NewStore returns the store of a network; nothing is created until Save.
func NewStore(dataDir, network string) (*Store, error) {
	if err := ValidateNetworkName(network); err != nil {
		return nil, err
	}
	if !filepath.IsAbs(dataDir) {
		return nil, fmt.Errorf("dataDir %q is not absolute", dataDir)
	}
	return &Store{DataDir: filepath.Clean(dataDir), Network: network}, nil
}

// Dir is the directory holding the network's state files.
func (s *Store) Dir() string { return filepath.Join(s.DataDir, s.Network) }

// Path is the state file of an attachment.
func (s *Store) Path(containerID, ifName string) (string, error) {
	name, err := StateFileName(containerID, ifName)
	if err != nil {
		return "", err
	}
	return filepath.Join(s.Dir(), name), nil
}

// MakeDir creates dataDir and the network directory with mode 0700 if they
// do not exist; Save does it too.
func (s *Store) MakeDir() error {
	if err := os.MkdirAll(s.Dir(), 0o700); err != nil {
		return fmt.Errorf("create state directory: %w", err)
	}
	return nil
}

// Save writes an attachment's state atomically, mode 0600, creating dataDir
// and the network directory with mode 0700 if they do not exist. Existing
// directories keep their mode: dataDir may be shared.
func (s *Store) Save(st *State) error {
	path, err := s.Path(st.ContainerID, st.IfName)
	if err != nil {
		return err
	}
	if err := s.MakeDir(); err != nil {
		return err
	}
	st.Version = stateVersion
	st.Network = s.Network
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encode state: %w", err)
	}
	return writeState(path, append(data, '\n'))
}

// writeState writes a state file with atomicfile.Replace: a temp file in the
// same directory, renamed over path (atomicfile's temp names, so Entries
// finds what an interrupted write left), without fsync.
//
// The rename alone makes the write atomic for every reader and across the
// plugin being killed: a reader sees no file, the old file or the whole new
// one. fsync would add durability across a kernel crash or power loss only,
// for 0.3 ms per ADD (two fsyncs, file and directory; several ms when the
// disk is busy), and it would buy nothing there:
//   - the veth, the bridge's iptables rules and the network namespace do not
//     survive a reboot; what does is host-local's reservation file, which
//     host-local writes without fsync, so a crash within the seconds before
//     writeback loses or empties it whatever twill's state file holds. The
//     runtime's GC (valid attachments) cleans up after that, and twill's GC
//     passes it on to host-local.
//   - a state file that lost its data in the crash is corrupt to Load, and a
//     lost one missing: DEL then rebuilds the config from the env file, which
//     releases the address (host-local releases by container ID and interface
//     in the network's store, whatever the subnet), or answers "try again
//     later" (11) and keeps a corrupt file while the env file is missing.
//   - a temp file left behind is removed by GC, as after a killed plugin.
func writeState(path string, data []byte) error {
	return atomicfile.Replace(path, data, 0o600)
}

// Load reads an attachment's state. The error wraps ErrNoState when there is
// no file and ErrCorruptState when the file cannot be used; anything else is
// an I/O error.
func (s *Store) Load(containerID, ifName string) (*State, error) {
	path, err := s.Path(containerID, ifName)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", path, ErrNoState)
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxStateSize+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	st, err := decodeState(data)
	if err == nil && (st.Network != s.Network || st.ContainerID != containerID || st.IfName != ifName) {
		err = fmt.Errorf("it belongs to %s/%s@%s", st.Network, st.ContainerID, st.IfName)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %v", path, ErrCorruptState, err)
	}
	return st, nil
}

func decodeState(data []byte) (*State, error) {
	if len(data) > maxStateSize {
		return nil, fmt.Errorf("%d bytes, more than %d", len(data), maxStateSize)
	}
	var st State
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&st); err != nil {
		return nil, err
	}
	if st.Version != stateVersion {
		return nil, fmt.Errorf("format version %d, this plugin reads %d", st.Version, stateVersion)
	}
	if err := st.Env.check(); err != nil {
		return nil, err
	}
	if _, err := delegateType(st.Delegate); err != nil {
		return nil, err
	}
	return &st, nil
}

// delegateType is the plugin a delegate configuration names.
func delegateType(conf []byte) (string, error) {
	typ, _, err := delegateHeader(conf)
	return typ, err
}

// delegateHeader returns the plugin a delegate configuration names and its
// cniVersion.
func delegateHeader(conf []byte) (typ, cniVersion string, err error) {
	var d struct {
		Type       string `json:"type"`
		CNIVersion string `json:"cniVersion"`
	}
	if err := json.Unmarshal(conf, &d); err != nil {
		return "", "", fmt.Errorf("delegate config: %w", err)
	}
	if d.Type == "" || strings.ContainsAny(d.Type, `/\`) {
		return "", "", fmt.Errorf("delegate config has no usable type (%q)", d.Type)
	}
	return d.Type, d.CNIVersion, nil
}

// Remove deletes an attachment's state; a missing file is not an error.
func (s *Store) Remove(containerID, ifName string) error {
	path, err := s.Path(containerID, ifName)
	if err != nil {
		return err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

// Entry is one file in the state directory that belongs to an attachment: its
// state file, or a temp file an interrupted Save left behind.
type Entry struct {
	Name        string
	ContainerID string
	IfName      string
}

// Entries lists the network's state directory. Files that are not state files
// (or their temp files) are left out. A missing directory is empty.
func (s *Store) Entries() ([]Entry, error) {
	des, err := os.ReadDir(s.Dir())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Entry
	for _, de := range des {
		if !de.Type().IsRegular() {
			continue
		}
		name := de.Name()
		base := name
		// atomicfile's temp files are "." + name + ".tmp-" + random.
		if strings.HasPrefix(name, ".") {
			if i := strings.LastIndex(name, ".tmp-"); i > 0 {
				base = name[1:i]
			}
		}
		id, ifn, ok := ParseStateFileName(base)
		if !ok {
			continue
		}
		out = append(out, Entry{Name: name, ContainerID: id, IfName: ifn})
	}
	return out, nil
}

// RemoveEntry deletes a file Entries listed.
func (s *Store) RemoveEntry(e Entry) error {
	if err := os.Remove(filepath.Join(s.Dir(), e.Name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}
