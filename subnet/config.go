// Package subnet holds the concepts every part of twill shares: the network
// configuration (net-conf.json), a node's lease on a pod subnet, the choice of a
// free subnet, and the subnet env file that twilld writes for the CNI plugin.
//
// Everything here is pure logic over net/netip values, so the datastores
// (subnet/etcd, later subnet/kube) and the backends agree on one representation
// and the rules are unit-tested without a kernel or a server.
package subnet

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
)

// Backend types twill knows.
const (
	BackendVXLAN  = "vxlan"
	BackendHostGW = "host-gw"
	BackendAlloc  = "alloc"
	// BackendWireGuard encrypts pod traffic between nodes.
	BackendWireGuard = "wireguard"
)

// Defaults applied by ParseConfig.
const (
	DefaultSubnetLen     = 24
	DefaultIPv6SubnetLen = 64
	DefaultBackend       = BackendVXLAN
	DefaultVNI           = 1
	DefaultVXLANPort     = 8472
	// WireGuard's listen ports, flannel's defaults.
	DefaultWireGuardPort   = 51820
	DefaultWireGuardPortV6 = 51821
	// WireGuardModeSeparate gives each IP family a device of its own.
	WireGuardModeSeparate = "separate"
)

// backendOptions lists, per backend type, the options it accepts besides Type.
// An option given to a backend that does not use it is an error, so a typo or a
// setting meant for another backend is never silently ignored.
var backendOptions = map[string][]string{
	BackendVXLAN:     {"VNI", "Port", "DirectRouting", "MTU"},
	BackendHostGW:    {"MTU"},
	BackendAlloc:     {},
	BackendWireGuard: {"ListenPort", "ListenPortV6", "PSK", "PersistentKeepaliveInterval", "MTU", "Mode"},
}

// Config is the network configuration shared by every node of a twill network.
// Its JSON form is the net-conf.json schema flannel users know.
type Config struct {
	// EnableIPv4 and EnableIPv6 say which families pods get (flannel's keys;
	// IPv4 only by default). The keys of a family that is off are checked
	// but not used, as flannel ignores them.
	EnableIPv4 bool
	EnableIPv6 bool

	Network   netip.Prefix
	SubnetLen int
	SubnetMin netip.Addr
	SubnetMax netip.Addr

	IPv6Network   netip.Prefix
	IPv6SubnetLen int
	IPv6SubnetMin netip.Addr
	IPv6SubnetMax netip.Addr

	Backend BackendConfig

	// EnableNFTables chooses how twilld writes its masquerade and forward
	// rules (flannel's key): true for nftables, false for iptables, nil
	// (the key absent) for iptables where an iptables program is installed
	// and nftables where none is.
	EnableNFTables *bool
}

// BackendConfig selects the datapath and its options. Zero values mean "default".
type BackendConfig struct {
	Type          string
	VNI           int
	Port          int
	DirectRouting bool
	MTU           int

	// WireGuard's options, flannel's names. ListenPort and ListenPortV6
	// are the UDP ports of the IPv4 and IPv6 devices; PSK is an optional
	// pre-shared key (base64, as `wg genpsk` prints it) all nodes share;
	// PersistentKeepaliveInterval is in seconds (0: none); Mode is
	// "separate" (a device per family) or, for one device carrying both
	// families, "auto", "ipv4" or "ipv6" (which family reaches the peers).
	ListenPort                  int
	ListenPortV6                int
	PSK                         string
	PersistentKeepaliveInterval int
	Mode                        string
}

// String shows the options without the PSK's value, for logs.
func (b BackendConfig) String() string {
	psk := ""
	if b.PSK != "" {
		psk = "(set)"
	}
	return fmt.Sprintf("{Type:%s VNI:%d Port:%d DirectRouting:%t MTU:%d ListenPort:%d ListenPortV6:%d PSK:%s PersistentKeepaliveInterval:%d Mode:%s}",
		b.Type, b.VNI, b.Port, b.DirectRouting, b.MTU, b.ListenPort, b.ListenPortV6, psk, b.PersistentKeepaliveInterval, b.Mode)
}

// flannelOnlyOptions are backend options flannel documents that twill does
// not have, with what to do about each.
var flannelOnlyOptions = map[string]string{
	"GBP":       "VXLAN Group Based Policy is not implemented; remove the option (false is what twill does)",
	"Learning":  "twill writes every peer's FDB entry itself and runs VXLAN without learning; remove the option",
	"MacPrefix": "twill uses the VTEP MAC the kernel gives its device; remove the option",
}

// flannelOnlyBackends are backend types flannel has and twill has not, with
// what to use instead.
var flannelOnlyBackends = map[string]string{
	"udp":         "use vxlan, which the kernel encapsulates (flannel deprecates udp too)",
	"ipsec":       "use wireguard, which encrypts pod traffic between nodes",
	"extension":   "twill runs no external commands; use vxlan or host-gw",
	"ali-vpc":     "let the cloud route the subnets and use twill's alloc backend",
	"aws-vpc":     "let the cloud route the subnets and use twill's alloc backend",
	"gce":         "let the cloud route the subnets and use twill's alloc backend",
	"tencent-vpc": "let the cloud route the subnets and use twill's alloc backend",
}

// configJSON is the wire form; strings keep parse errors under our control.
type configJSON struct {
	EnableIPv4     *bool           `json:"EnableIPv4,omitempty"`
	EnableNFTables *bool           `json:"EnableNFTables,omitempty"`
	EnableIPv6     *bool           `json:"EnableIPv6,omitempty"`
	Network        string          `json:"Network"`
	SubnetLen      *int            `json:"SubnetLen,omitempty"`
	SubnetMin      string          `json:"SubnetMin,omitempty"`
	SubnetMax      string          `json:"SubnetMax,omitempty"`
	IPv6Network    string          `json:"IPv6Network,omitempty"`
	IPv6SubnetLen  *int            `json:"IPv6SubnetLen,omitempty"`
	IPv6SubnetMin  string          `json:"IPv6SubnetMin,omitempty"`
	IPv6SubnetMax  string          `json:"IPv6SubnetMax,omitempty"`
	Backend        json.RawMessage `json:"Backend,omitempty"`
}

type backendJSON struct {
	Type          string `json:"Type,omitempty"`
	VNI           *int   `json:"VNI,omitempty"`
	Port          *int   `json:"Port,omitempty"`
	DirectRouting *bool  `json:"DirectRouting,omitempty"`
	MTU           *int   `json:"MTU,omitempty"`

	ListenPort                  *int    `json:"ListenPort,omitempty"`
	ListenPortV6                *int    `json:"ListenPortV6,omitempty"`
	PSK                         *string `json:"PSK,omitempty"`
	PersistentKeepaliveInterval *int    `json:"PersistentKeepaliveInterval,omitempty"`
	Mode                        *string `json:"Mode,omitempty"`
}

// ParseConfig decodes and validates a network configuration. Unknown fields are
// rejected: a misspelt "SubnetLenn" would otherwise silently give every node the
// default. Errors name the field and the problem.
func ParseConfig(data []byte) (*Config, error) {
	var raw configJSON
	if err := decodeStrict(data, &raw); err != nil {
		return nil, fmt.Errorf("network config: %w", err)
	}
	cfg := &Config{EnableIPv4: true}
	if raw.EnableIPv4 != nil {
		cfg.EnableIPv4 = *raw.EnableIPv4
	}
	if raw.EnableIPv6 != nil {
		cfg.EnableIPv6 = *raw.EnableIPv6
	}
	if !cfg.EnableIPv4 && !cfg.EnableIPv6 {
		return nil, errors.New("network config: EnableIPv4, EnableIPv6: both are false; enable at least one family")
	}
	v4, err := parseFamily(ipv4Keys, cfg.EnableIPv4, raw.Network, raw.SubnetLen, raw.SubnetMin, raw.SubnetMax)
	if err != nil {
		return nil, fmt.Errorf("network config: %w", err)
	}
	v6, err := parseFamily(ipv6Keys, cfg.EnableIPv6, raw.IPv6Network, raw.IPv6SubnetLen, raw.IPv6SubnetMin, raw.IPv6SubnetMax)
	if err != nil {
		return nil, fmt.Errorf("network config: %w", err)
	}
	cfg.Network, cfg.SubnetLen, cfg.SubnetMin, cfg.SubnetMax = v4.network, v4.subnetLen, v4.min, v4.max
	cfg.IPv6Network, cfg.IPv6SubnetLen, cfg.IPv6SubnetMin, cfg.IPv6SubnetMax = v6.network, v6.subnetLen, v6.min, v6.max
	if cfg.Backend, err = parseBackend(raw.Backend); err != nil {
		return nil, fmt.Errorf("network config: %w", err)
	}
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("network config: %w", err)
	}
	cfg.EnableNFTables = raw.EnableNFTables
	return cfg, nil
}

func parseBackend(data json.RawMessage) (BackendConfig, error) {
	b := BackendConfig{Type: DefaultBackend}
	if len(bytes.TrimSpace(data)) == 0 || string(bytes.TrimSpace(data)) == "null" {
		b.VNI, b.Port = DefaultVNI, DefaultVXLANPort
		return b, nil
	}
	var present map[string]json.RawMessage
	if err := json.Unmarshal(data, &present); err != nil {
		return b, fmt.Errorf("Backend: must be an object: %w", err)
	}
	var typ string
	if json.Unmarshal(present["Type"], &typ) == nil {
		if why, ok := flannelOnlyBackends[typ]; ok {
			return b, fmt.Errorf("Backend.Type: flannel's %q backend is not in twill: %s", typ, why)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(present)) {
		if why, ok := flannelOnlyOptions[name]; ok {
			return b, fmt.Errorf("Backend.%s: flannel's option is not supported by twill: %s", name, why)
		}
	}
	var raw backendJSON
	if err := decodeStrict(data, &raw); err != nil {
		return b, fmt.Errorf("Backend: %w", err)
	}
	if raw.Type != "" {
		b.Type = raw.Type
	}
	allowed, ok := backendOptions[b.Type]
	if !ok {
		return b, fmt.Errorf("Backend.Type: unknown backend %q (known: %s)", b.Type, strings.Join(slices.Sorted(maps.Keys(backendOptions)), ", "))
	}
	for name := range present {
		if name != "Type" && !slices.Contains(allowed, name) {
			return b, fmt.Errorf("Backend.%s: not an option of backend %q", name, b.Type)
		}
	}
	if raw.VNI != nil {
		b.VNI = *raw.VNI
	}
	if raw.Port != nil {
		b.Port = *raw.Port
	}
	if raw.DirectRouting != nil {
		b.DirectRouting = *raw.DirectRouting
	}
	if raw.MTU != nil {
		b.MTU = *raw.MTU
	}
	if b.Type == BackendVXLAN {
		if raw.VNI == nil {
			b.VNI = DefaultVNI
		}
		if raw.Port == nil {
			b.Port = DefaultVXLANPort
		}
	}
	if b.Type == BackendWireGuard {
		b.ListenPort, b.ListenPortV6, b.Mode = DefaultWireGuardPort, DefaultWireGuardPortV6, WireGuardModeSeparate
		if raw.ListenPort != nil {
			b.ListenPort = *raw.ListenPort
		}
		if raw.ListenPortV6 != nil {
			b.ListenPortV6 = *raw.ListenPortV6
		}
		if raw.PSK != nil {
			b.PSK = *raw.PSK
		}
		if raw.PersistentKeepaliveInterval != nil {
			b.PersistentKeepaliveInterval = *raw.PersistentKeepaliveInterval
		}
		if raw.Mode != nil {
			b.Mode = *raw.Mode
		}
	}
	return b, nil
}

func (c *Config) validate() error {
	if c.Network.IsValid() {
		if err := validateFamily(ipv4Keys, family{c.Network, c.SubnetLen, c.SubnetMin, c.SubnetMax}); err != nil {
			return err
		}
	}
	if c.IPv6Network.IsValid() {
		if err := validateFamily(ipv6Keys, family{c.IPv6Network, c.IPv6SubnetLen, c.IPv6SubnetMin, c.IPv6SubnetMax}); err != nil {
			return err
		}
	} else if c.IPv6SubnetMin.IsValid() || c.IPv6SubnetMax.IsValid() {
		return errors.New("IPv6SubnetMin, IPv6SubnetMax: set without IPv6Network")
	}
	b := c.Backend
	if b.Type == BackendVXLAN {
		if b.VNI < 1 || b.VNI > 1<<24-1 {
			return fmt.Errorf("Backend.VNI: %d is out of range (1 to 16777215)", b.VNI)
		}
		if b.Port < 1 || b.Port > 65535 {
			return fmt.Errorf("Backend.Port: %d is not a UDP port", b.Port)
		}
	}
	if b.Type == BackendWireGuard {
		if err := validateWireGuard(c, b); err != nil {
			return err
		}
	}
	if b.MTU != 0 && (b.MTU < 576 || b.MTU > 65535) {
		return fmt.Errorf("Backend.MTU: %d is out of range (576 to 65535, or 0 for automatic)", b.MTU)
	}
	if c.EnableIPv6 && b.MTU != 0 && b.MTU < 1280 {
		return fmt.Errorf("Backend.MTU: %d is below 1280, the least IPv6 allows, and EnableIPv6 is true", b.MTU)
	}
	return nil
}

// defaultSubnetLen is flannel's default for a network: def (24, or 64 for
// IPv6) when the network holds at least four such subnets, else a quarter
// of the network. validateFamily refuses what is then too small.
func defaultSubnetLen(network netip.Prefix, def int) int {
	if network.Bits()+2 <= def {
		return def
	}
	return network.Bits() + 2
}

// familyKeys name one family's keys, and say what it defaults to.
type familyKeys struct {
	enable, network, subnetLen, subnetMin, subnetMax string
	v6                                               bool
	defaultLen, maxLen                               int
	example                                          string
}

var (
	ipv4Keys = familyKeys{"EnableIPv4", "Network", "SubnetLen", "SubnetMin", "SubnetMax", false, DefaultSubnetLen, 30, "10.244.0.0/16"}
	ipv6Keys = familyKeys{"EnableIPv6", "IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax", true, DefaultIPv6SubnetLen, 126, "fd00:10:244::/56"}
)

// family is one family's network and subnet range.
type family struct {
	network   netip.Prefix
	subnetLen int
	min, max  netip.Addr
}

// parseFamily reads one family's keys; the network is required when the
// family is enabled, and SubnetLen defaults as flannel's does.
func parseFamily(k familyKeys, enabled bool, network string, subnetLen *int, lo, hi string) (family, error) {
	var f family
	var err error
	if strings.TrimSpace(network) == "" {
		if enabled {
			return f, fmt.Errorf("%s: required when %s is true (a CIDR such as %s)", k.network, k.enable, k.example)
		}
	} else if f.network, err = netip.ParsePrefix(network); err != nil {
		return f, fmt.Errorf("%s: %q is not a CIDR: %w", k.network, network, err)
	}
	switch {
	case subnetLen != nil:
		f.subnetLen = *subnetLen
	case f.network.IsValid():
		f.subnetLen = defaultSubnetLen(f.network, k.defaultLen)
	default:
		f.subnetLen = k.defaultLen
	}
	for _, a := range []struct {
		name, s string
		to      *netip.Addr
	}{{k.subnetMin, lo, &f.min}, {k.subnetMax, hi, &f.max}} {
		if a.s == "" {
			continue
		}
		if *a.to, err = netip.ParseAddr(a.s); err != nil {
			return f, fmt.Errorf("%s: %q is not an IP address", a.name, a.s)
		}
	}
	return f, nil
}

// validateFamily checks one family's network, subnet length and range, with
// flannel's limits: a subnet is at most a /30 (/126 for IPv6), room for a
// gateway and a pod, and the network holds at least four subnets (the first
// is not handed out by default).
func validateFamily(k familyKeys, f family) error {
	if f.network.Addr().Is6() != k.v6 || f.network.Addr().Is4In6() {
		name := "IPv4"
		if k.v6 {
			name = "IPv6"
		}
		return fmt.Errorf("%s: %s is not an %s CIDR", k.network, f.network, name)
	}
	if a := f.network.Addr(); k.v6 && (a.IsLinkLocalUnicast() || a.IsMulticast() || a.IsLoopback() || a.IsUnspecified()) {
		return fmt.Errorf("%s: %s is not a unicast range pods can be addressed from (a unique local range such as %s, or a global one)", k.network, f.network, k.example)
	}
	if f.network.Masked() != f.network {
		return fmt.Errorf("%s: %s has host bits set (did you mean %s?)", k.network, f.network, f.network.Masked())
	}
	if f.subnetLen < 1 || f.subnetLen > k.maxLen {
		return fmt.Errorf("%s: %d is out of range (1 to %d; a subnet needs room for a gateway and pods)", k.subnetLen, f.subnetLen, k.maxLen)
	}
	if f.subnetLen < f.network.Bits()+2 {
		return fmt.Errorf("%s: %d must be at least 2 longer than the %s's prefix length %d: the network must hold four subnets or more", k.subnetLen, f.subnetLen, k.network, f.network.Bits())
	}
	for _, a := range []struct {
		name string
		addr netip.Addr
	}{{k.subnetMin, f.min}, {k.subnetMax, f.max}} {
		if !a.addr.IsValid() {
			continue
		}
		if !f.network.Contains(a.addr) {
			return fmt.Errorf("%s: %s is outside %s %s", a.name, a.addr, k.network, f.network)
		}
		if p := netip.PrefixFrom(a.addr, f.subnetLen).Masked(); p.Addr() != a.addr {
			return fmt.Errorf("%s: %s is not aligned to %s %d (nearest: %s)", a.name, a.addr, k.subnetLen, f.subnetLen, p.Addr())
		}
	}
	if f.min.IsValid() && f.max.IsValid() && f.max.Less(f.min) {
		return fmt.Errorf("%s: %s is below %s %s", k.subnetMax, f.max, k.subnetMin, f.min)
	}
	return nil
}

// Range is the part of one family's network that nodes lease subnets from.
type Range struct {
	Network   netip.Prefix
	SubnetLen int
	Min, Max  netip.Addr // SubnetMin and SubnetMax; zero when not set
}

// Range returns the IPv4 range (v6 false) or the IPv6 one. Its Network is
// zero when the config has none for that family.
func (c *Config) Range(v6 bool) Range {
	if v6 {
		return Range{c.IPv6Network, c.IPv6SubnetLen, c.IPv6SubnetMin, c.IPv6SubnetMax}
	}
	return Range{c.Network, c.SubnetLen, c.SubnetMin, c.SubnetMax}
}

// Families lists the enabled families, IPv4 first: false stands for IPv4,
// true for IPv6 (the argument of Range).
func (c *Config) Families() []bool {
	var out []bool
	if c.EnableIPv4 {
		out = append(out, false)
	}
	if c.EnableIPv6 {
		out = append(out, true)
	}
	return out
}

// First and Last bound the subnets handed out: Min and Max when set, else
// the whole Network but its first subnet, whose network address is the
// Network's own (flannel skips it too).
func (r Range) First() netip.Prefix {
	if r.Min.IsValid() {
		return netip.PrefixFrom(r.Min, r.SubnetLen)
	}
	second, _ := NextSubnet(netip.PrefixFrom(r.Network.Addr(), r.SubnetLen))
	return second
}

// Last is the highest subnet a node may lease.
func (r Range) Last() netip.Prefix {
	if r.Max.IsValid() {
		return netip.PrefixFrom(r.Max, r.SubnetLen)
	}
	return netip.PrefixFrom(LastAddr(r.Network), r.SubnetLen).Masked()
}

// Contains reports whether p is a subnet of the right size a node may hold:
// inside Min..Max when set. A node already holding the first subnet, which
// is no longer handed out by default, keeps it.
func (r Range) Contains(p netip.Prefix) bool {
	if !r.Network.IsValid() || !p.IsValid() {
		return false
	}
	first := r.First()
	if !r.Min.IsValid() {
		first = netip.PrefixFrom(r.Network.Addr(), r.SubnetLen)
	}
	return p.Bits() == r.SubnetLen && p.Masked() == p && r.Network.Contains(p.Addr()) &&
		!p.Addr().Less(first.Addr()) && !r.Last().Addr().Less(p.Addr())
}

// MarshalJSON writes the net-conf.json form with defaults filled in.
func (c Config) MarshalJSON() ([]byte, error) {
	out := map[string]any{"SubnetLen": c.SubnetLen}
	if c.Network.IsValid() {
		out["Network"] = c.Network.String()
	}
	if !c.EnableIPv4 {
		out["EnableIPv4"] = false
	}
	if c.EnableIPv6 {
		out["EnableIPv6"] = true
	}
	if c.SubnetMin.IsValid() {
		out["SubnetMin"] = c.SubnetMin.String()
	}
	if c.SubnetMax.IsValid() {
		out["SubnetMax"] = c.SubnetMax.String()
	}
	if c.IPv6Network.IsValid() {
		out["IPv6Network"], out["IPv6SubnetLen"] = c.IPv6Network.String(), c.IPv6SubnetLen
		if c.IPv6SubnetMin.IsValid() {
			out["IPv6SubnetMin"] = c.IPv6SubnetMin.String()
		}
		if c.IPv6SubnetMax.IsValid() {
			out["IPv6SubnetMax"] = c.IPv6SubnetMax.String()
		}
	}
	b := map[string]any{"Type": c.Backend.Type}
	if c.Backend.Type == BackendVXLAN {
		b["VNI"], b["Port"], b["DirectRouting"] = c.Backend.VNI, c.Backend.Port, c.Backend.DirectRouting
	}
	if c.Backend.Type == BackendWireGuard {
		b["ListenPort"], b["ListenPortV6"], b["Mode"] = c.Backend.ListenPort, c.Backend.ListenPortV6, c.Backend.Mode
		b["PersistentKeepaliveInterval"] = c.Backend.PersistentKeepaliveInterval
		if c.Backend.PSK != "" {
			b["PSK"] = c.Backend.PSK
		}
	}
	if c.Backend.MTU != 0 {
		b["MTU"] = c.Backend.MTU
	}
	out["Backend"] = b
	if c.EnableNFTables != nil {
		out["EnableNFTables"] = *c.EnableNFTables
	}
	return json.Marshal(out)
}

func decodeStrict(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("invalid JSON: %w", err)
	}
	if dec.More() {
		return errors.New("invalid JSON: trailing data after the object")
	}
	return nil
}

func validateWireGuard(c *Config, b BackendConfig) error {
	for _, p := range []struct {
		name string
		port int
	}{{"ListenPort", b.ListenPort}, {"ListenPortV6", b.ListenPortV6}} {
		if p.port < 1 || p.port > 65535 {
			return fmt.Errorf("Backend.%s: %d is not a UDP port", p.name, p.port)
		}
	}
	if c.EnableIPv4 && c.EnableIPv6 && b.Mode == WireGuardModeSeparate && b.ListenPort == b.ListenPortV6 {
		return fmt.Errorf("Backend.ListenPortV6: %d is ListenPort too; the IPv4 and IPv6 devices need ports of their own", b.ListenPort)
	}
	if b.PSK != "" {
		if k, err := base64.StdEncoding.DecodeString(b.PSK); err != nil || len(k) != 32 {
			// The value is a secret: the error does not repeat it.
			return errors.New("Backend.PSK: not a WireGuard key (the base64 of 32 bytes, as `wg genpsk` prints it)")
		}
	}
	if b.PersistentKeepaliveInterval < 0 || b.PersistentKeepaliveInterval > 65535 {
		return fmt.Errorf("Backend.PersistentKeepaliveInterval: %d is out of range (0 to 65535 seconds)", b.PersistentKeepaliveInterval)
	}
	switch b.Mode {
	case WireGuardModeSeparate, "auto":
	case "ipv4":
		if !c.EnableIPv4 {
			return errors.New(`Backend.Mode: "ipv4" reaches peers over IPv4, and EnableIPv4 is false`)
		}
	case "ipv6":
		if !c.EnableIPv6 {
			return errors.New(`Backend.Mode: "ipv6" reaches peers over IPv6, and EnableIPv6 is not true`)
		}
	default:
		return fmt.Errorf(`Backend.Mode: unknown mode %q (separate: a device per family; auto, ipv4, ipv6: one device for both, peers reached over the family auto picks, over IPv4, over IPv6)`, b.Mode)
	}
	return nil
}
