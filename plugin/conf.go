package plugin

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/twillnet/twill/subnet"
)

// Defaults for the plugin's own configuration keys.
const (
	DefaultSubnetFile   = subnet.DefaultEnvFile
	DefaultDataDir      = "/var/lib/cni/twill"
	DefaultDelegateType = "bridge"
	DefaultBridge       = "cni0"
	IPAMType            = "host-local"

	// DefaultDelegateTimeout bounds each run of a delegate: far above a
	// normal ADD (milliseconds), well below the kubelet's 4 minute CRI
	// deadline, so a hung delegate fails the verb instead of the runtime.
	DefaultDelegateTimeout = time.Minute
	// MaxDelegateTimeout is the most delegateTimeout may say.
	MaxDelegateTimeout = 10 * time.Minute
)

// SupportedVersions are the CNI spec versions the plugin accepts: every version
// the cni library implements from 0.3.0 on. Older ones have no interface list
// in their result, which the bridge delegate needs for CHECK.
var SupportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

// VersionInfo is what the plugin answers to VERSION.
func VersionInfo() version.PluginInfo { return version.PluginSupports(SupportedVersions...) }

// NetConf is the plugin's configuration as the runtime passes it on stdin.
type NetConf struct {
	CNIVersion string
	Name       string
	Type       string

	// SubnetFile is the env file twilld writes.
	SubnetFile string
	// DataDir holds the saved delegate configurations.
	DataDir string
	// Delegate is merged into the delegate configuration. Numbers are kept
	// as json.Number so they pass through unchanged.
	Delegate map[string]any
	// IPAM holds the additions to the host-local configuration.
	IPAM IPAMAdditions
	// DelegateTimeout bounds each run of a delegate; one that takes longer
	// is killed and the verb fails.
	DelegateTimeout time.Duration

	// Passed through to the delegate unchanged.
	RuntimeConfig map[string]any
	Args          map[string]any

	// PrevResult is the runtime's cached result, sent with CHECK.
	PrevResult map[string]any
	// ValidAttachments is sent with GC; nil means the key was absent.
	ValidAttachments *[]types.GCAttachment
}

// IPAMAdditions is the `ipam` object of the plugin configuration. It does not
// replace host-local's configuration; it adds to the one built from the env
// file.
type IPAMAdditions struct {
	// Type may only be host-local (or empty).
	Type string `json:"type,omitempty"`
	// DataDir is host-local's store; empty means host-local's default.
	DataDir string `json:"dataDir,omitempty"`
	// Routes are added after the routes to the cluster networks; each
	// goes to the pods of its destination's family.
	Routes []Route `json:"routes,omitempty"`
	// Ranges, when set, hold at most one range set per family; a set
	// replaces that family's default range (the whole node subnet), and
	// every range must lie inside the node subnet of its family. A set's
	// family is the one of the addresses it names.
	Ranges [][]Range `json:"ranges,omitempty"`
}

// Route is a route host-local hands to the pod.
type Route struct {
	Dst string `json:"dst"`
	GW  string `json:"gw,omitempty"`
}

// Range is one host-local range. Subnet defaults to the node subnet of the
// range's family; Gateway, if given, must be that family's node gateway (the
// bridge's address).
type Range struct {
	Subnet     string `json:"subnet,omitempty"`
	RangeStart string `json:"rangeStart,omitempty"`
	RangeEnd   string `json:"rangeEnd,omitempty"`
	Gateway    string `json:"gateway,omitempty"`
}

// rawConf is the wire form; ipam is decoded separately and strictly.
type rawConf struct {
	CNIVersion          string                `json:"cniVersion"`
	Name                string                `json:"name"`
	Type                string                `json:"type"`
	SubnetFile          string                `json:"subnetFile"`
	DataDir             string                `json:"dataDir"`
	Delegate            json.RawMessage       `json:"delegate"`
	IPAM                json.RawMessage       `json:"ipam"`
	DelegateTimeout     string                `json:"delegateTimeout"`
	RuntimeConfig       map[string]any        `json:"runtimeConfig"`
	Args                map[string]any        `json:"args"`
	PrevResult          map[string]any        `json:"prevResult"`
	ValidAttachments    *[]types.GCAttachment `json:"cni.dev/valid-attachments"`
	LegacyValidAttachts *[]types.GCAttachment `json:"cni.dev/attachments"`
}

// delegateReserved are keys the plugin always sets itself; a delegate object
// that sets them is rejected rather than silently overridden.
var delegateReserved = []string{"name", "cniVersion", "ipam", "prevResult", "runtimeConfig", "args",
	"cni.dev/valid-attachments", "cni.dev/attachments"}

// delegateDefaulted are keys the delegate object may set; twill fills in a
// default otherwise.
var delegateDefaulted = []string{"type", "bridge", "isGateway", "ipMasq", "mtu"}

// delegateRead are keys twill reads from the delegate object, so they must be
// spelt as the delegate spells them: the defaulted ones, and isDefaultGateway,
// which decides who adds the default routes (see buildIPAM).
var delegateRead = slices.Concat(delegateDefaulted, []string{"isDefaultGateway"})

// MaxConfSize bounds the configuration the plugin accepts.
const MaxConfSize = 1 << 20

// ParseConf decodes and validates the plugin configuration. It checks
// everything that does not depend on the env file; BuildDelegate checks the
// rest.
func ParseConf(data []byte) (*NetConf, error) {
	if len(data) > MaxConfSize {
		return nil, fmt.Errorf("network config is %d bytes, more than %d", len(data), MaxConfSize)
	}
	var raw rawConf
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	if err := dec.Decode(&raw); err != nil {
		return nil, fmt.Errorf("decode network config: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("decode network config: data after the JSON object")
	}
	c := &NetConf{
		CNIVersion:       raw.CNIVersion,
		Name:             raw.Name,
		Type:             raw.Type,
		SubnetFile:       raw.SubnetFile,
		DataDir:          raw.DataDir,
		RuntimeConfig:    raw.RuntimeConfig,
		Args:             raw.Args,
		PrevResult:       raw.PrevResult,
		ValidAttachments: raw.ValidAttachments,
	}
	if c.ValidAttachments == nil {
		// libcni sends both spellings; the spec's first draft used this one.
		c.ValidAttachments = raw.LegacyValidAttachts
	}
	if err := ValidateNetworkName(c.Name); err != nil {
		return nil, err
	}
	var err error
	if c.SubnetFile, err = absPath("subnetFile", c.SubnetFile, DefaultSubnetFile); err != nil {
		return nil, err
	}
	if c.DataDir, err = absPath("dataDir", c.DataDir, DefaultDataDir); err != nil {
		return nil, err
	}
	if c.Delegate, err = parseDelegate(raw.Delegate, c.Type); err != nil {
		return nil, err
	}
	if c.IPAM, err = parseIPAM(raw.IPAM); err != nil {
		return nil, err
	}
	if c.DelegateTimeout, err = parseTimeout(raw.DelegateTimeout); err != nil {
		return nil, err
	}
	return c, nil
}

func parseTimeout(s string) (time.Duration, error) {
	if s == "" {
		return DefaultDelegateTimeout, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < time.Second || d > MaxDelegateTimeout {
		return 0, fmt.Errorf("delegateTimeout %q is not a duration from 1s to %s (e.g. \"90s\")", s, MaxDelegateTimeout)
	}
	return d, nil
}

func absPath(key, p, def string) (string, error) {
	if p == "" {
		return def, nil
	}
	if !filepath.IsAbs(p) || strings.ContainsRune(p, 0) {
		return "", fmt.Errorf("%s %q must be an absolute path", key, p)
	}
	return filepath.Clean(p), nil
}

func isNull(raw json.RawMessage) bool {
	return len(raw) == 0 || string(bytes.TrimSpace(raw)) == "null"
}

func parseDelegate(raw json.RawMessage, ownType string) (map[string]any, error) {
	d := map[string]any{}
	if !isNull(raw) {
		dec := json.NewDecoder(bytes.NewReader(raw))
		dec.UseNumber()
		if err := dec.Decode(&d); err != nil {
			return nil, fmt.Errorf("delegate must be a JSON object: %w", err)
		}
	}
	for k := range d {
		for _, r := range delegateReserved {
			if strings.EqualFold(k, r) {
				return nil, fmt.Errorf("delegate may not set %q: twill sets %q itself (ipam additions go in the plugin's own ipam object)", k, r)
			}
		}
		// Go plugins match JSON keys case-insensitively, so "MTU" next to
		// twill's "mtu" would be ambiguous.
		for _, r := range delegateRead {
			if k != r && strings.EqualFold(k, r) {
				return nil, fmt.Errorf("delegate key %q: spell it %q", k, r)
			}
		}
	}
	if v, ok := d["type"]; ok {
		t, ok := v.(string)
		if !ok || t == "" || strings.ContainsAny(t, `/\`) || t == "." || t == ".." || strings.ContainsRune(t, 0) {
			return nil, fmt.Errorf("delegate type %v is not a plugin name", v)
		}
		if t == "twill" || t == ownType {
			return nil, fmt.Errorf("delegate type %q would call twill itself", t)
		}
	}
	if v, ok := d["bridge"]; ok {
		b, ok := v.(string)
		if !ok || ValidateIfName(b) != nil {
			return nil, fmt.Errorf("delegate bridge %v is not an interface name", v)
		}
	}
	for _, k := range []string{"isGateway", "ipMasq", "isDefaultGateway"} {
		if v, ok := d[k]; ok {
			if _, ok := v.(bool); !ok {
				return nil, fmt.Errorf("delegate %s must be true or false, not %v", k, v)
			}
		}
	}
	if v, ok := d["mtu"]; ok {
		if _, err := delegateMTU(v); err != nil {
			return nil, err
		}
	}
	return d, nil
}

// delegateMTU reads the delegate's mtu override; BuildDelegate checks it
// against the env file's MTU.
func delegateMTU(v any) (int, error) {
	n, ok := v.(json.Number)
	if !ok {
		return 0, fmt.Errorf("delegate mtu must be a number, not %v", v)
	}
	m, err := n.Int64()
	if err != nil || m < 68 || m > 65535 {
		return 0, fmt.Errorf("delegate mtu %s is not an MTU (68..65535)", n)
	}
	return int(m), nil
}

func parseIPAM(raw json.RawMessage) (IPAMAdditions, error) {
	var a IPAMAdditions
	if isNull(raw) {
		return a, nil
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&a); err != nil {
		return a, fmt.Errorf("ipam (allowed keys: type, dataDir, routes, ranges): %w", err)
	}
	if a.Type != "" && a.Type != IPAMType {
		return a, fmt.Errorf("ipam type %q: twill only delegates to %s", a.Type, IPAMType)
	}
	if a.DataDir != "" {
		p, err := absPath("ipam dataDir", a.DataDir, "")
		if err != nil {
			return a, err
		}
		a.DataDir = p
	}
	for i, r := range a.Routes {
		if _, _, err := r.parse(i); err != nil {
			return a, err
		}
	}
	if _, err := rangeSetFamilies(a.Ranges); err != nil {
		return a, err
	}
	return a, nil
}

// The families of addresses in the plugin config.
const (
	famNone = 0 // a range that names no address
	famV4   = 4
	famV6   = 6
)

func familyOf(a netip.Addr) int {
	if a.Is6() {
		return famV6
	}
	return famV4
}

func familyName(f int) string {
	switch f {
	case famV4:
		return "IPv4"
	case famV6:
		return "IPv6"
	}
	return "of no family"
}

// parse checks a route's syntax: dst a prefix, gw (optional) an address of
// dst's family. i is the route's index in ipam.routes, for errors.
func (r Route) parse(i int) (dst netip.Prefix, gw netip.Addr, err error) {
	if dst, err = parsePrefix(r.Dst); err != nil {
		return dst, gw, fmt.Errorf("ipam.routes[%d].dst: %w", i, err)
	}
	if r.GW == "" {
		return dst, gw, nil
	}
	if gw, err = parseAddr(r.GW); err != nil {
		return dst, gw, fmt.Errorf("ipam.routes[%d].gw: %w", i, err)
	}
	if familyOf(gw) != familyOf(dst.Addr()) {
		return dst, gw, fmt.Errorf("ipam.routes[%d].gw %s is %s, but its dst %s is %s", i, gw, familyName(familyOf(gw)), dst, familyName(familyOf(dst.Addr())))
	}
	return dst, gw, nil
}

// family checks a range's syntax and returns the family of the addresses it
// names, famNone if it names none. where names the range in errors.
func (r Range) family(where string) (int, error) {
	fam, first := famNone, ""
	for _, f := range []struct {
		name, v string
		prefix  bool
	}{{"subnet", r.Subnet, true}, {"rangeStart", r.RangeStart, false}, {"rangeEnd", r.RangeEnd, false}, {"gateway", r.Gateway, false}} {
		if f.v == "" {
			continue
		}
		var a netip.Addr
		if f.prefix {
			p, err := parsePrefix(f.v)
			if err != nil {
				return fam, fmt.Errorf("%s.%s: %w", where, f.name, err)
			}
			a = p.Addr()
		} else {
			var err error
			if a, err = parseAddr(f.v); err != nil {
				return fam, fmt.Errorf("%s.%s: %w", where, f.name, err)
			}
		}
		switch {
		case fam == famNone:
			fam, first = familyOf(a), f.name
		case familyOf(a) != fam:
			return fam, fmt.Errorf("%s.%s %s is %s, but its %s is %s: a range is of one family", where, f.name, f.v, familyName(familyOf(a)), first, familyName(fam))
		}
	}
	return fam, nil
}

// rangeSetFamilies checks the syntax of ipam.ranges and returns the family
// of each set: at most one set per family, a set's ranges all of one family.
// A set that names no address at all (famNone) is allowed only as the only
// set; buildIPAM gives it the node's family if the node has just one.
func rangeSetFamilies(sets [][]Range) ([]int, error) {
	if sets == nil {
		return nil, nil
	}
	if len(sets) == 0 || len(sets) > 2 {
		return nil, fmt.Errorf("ipam.ranges has %d range sets: give one per family, at most two (one IPv4, one IPv6), or leave ranges out for the whole node subnets", len(sets))
	}
	fams := make([]int, len(sets))
	for i, set := range sets {
		if len(set) == 0 {
			return nil, fmt.Errorf("ipam.ranges[%d] is an empty range set", i)
		}
		first := -1
		for j, r := range set {
			where := fmt.Sprintf("ipam.ranges[%d][%d]", i, j)
			f, err := r.family(where)
			if err != nil {
				return nil, err
			}
			switch {
			case f == famNone:
			case fams[i] == famNone:
				fams[i], first = f, j
			case f != fams[i]:
				return nil, fmt.Errorf("%s is %s, but ipam.ranges[%d][%d] is %s: a range set is of one family (give each family its own set)", where, familyName(f), i, first, familyName(fams[i]))
			}
		}
	}
	if len(sets) == 2 {
		for i, f := range fams {
			if f == famNone {
				return nil, fmt.Errorf("ipam.ranges[%d] names no address, so its family is unknown: with two range sets give each a subnet, rangeStart or rangeEnd", i)
			}
		}
		if fams[0] == fams[1] {
			return nil, fmt.Errorf("ipam.ranges[0] and ipam.ranges[1] are both %s: give at most one range set per family (a pod gets one address of each family)", familyName(fams[0]))
		}
	}
	return fams, nil
}

// parsePrefix parses a network address of either family. IPv4-mapped IPv6
// is refused: host-local and the kernel would treat it as IPv4.
func parsePrefix(s string) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return p, err
	}
	if p.Addr().Is4In6() {
		return p, fmt.Errorf("%s is an IPv4-mapped IPv6 prefix; write it as IPv4", s)
	}
	if p.Masked() != p {
		return p, fmt.Errorf("%s has host bits set; did you mean %s?", s, p.Masked())
	}
	return p, nil
}

// parseAddr parses an address of either family, without a zone.
func parseAddr(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return a, err
	}
	if a.Zone() != "" {
		return a, fmt.Errorf("%s has a zone; pods' addresses and gateways have none", s)
	}
	if a.Is4In6() {
		return a, fmt.Errorf("%s is an IPv4-mapped IPv6 address; write it as IPv4", s)
	}
	return a, nil
}
