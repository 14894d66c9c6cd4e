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
)

// Defaults applied by ParseConfig.
const (
	DefaultSubnetLen = 24
	DefaultBackend   = BackendVXLAN
	DefaultVNI       = 1
	DefaultVXLANPort = 8472
)

// backendOptions lists, per backend type, the options it accepts besides Type.
// An option given to a backend that does not use it is an error, so a typo or a
// setting meant for another backend is never silently ignored.
var backendOptions = map[string][]string{
	BackendVXLAN:  {"VNI", "Port", "DirectRouting", "MTU"},
	BackendHostGW: {"MTU"},
	BackendAlloc:  {},
}

// Config is the network configuration shared by every node of a twill network.
// Its JSON form is the net-conf.json schema flannel users know.
type Config struct {
	Network   netip.Prefix
	SubnetLen int
	SubnetMin netip.Addr
	SubnetMax netip.Addr
	Backend   BackendConfig
}

// BackendConfig selects the datapath and its options. Zero values mean "default".
type BackendConfig struct {
	Type          string
	VNI           int
	Port          int
	DirectRouting bool
	MTU           int
}

// configJSON is the wire form; strings keep parse errors under our control.
type configJSON struct {
	Network   string          `json:"Network"`
	SubnetLen *int            `json:"SubnetLen,omitempty"`
	SubnetMin string          `json:"SubnetMin,omitempty"`
	SubnetMax string          `json:"SubnetMax,omitempty"`
	Backend   json.RawMessage `json:"Backend,omitempty"`
}

type backendJSON struct {
	Type          string `json:"Type,omitempty"`
	VNI           *int   `json:"VNI,omitempty"`
	Port          *int   `json:"Port,omitempty"`
	DirectRouting *bool  `json:"DirectRouting,omitempty"`
	MTU           *int   `json:"MTU,omitempty"`
}

// ParseConfig decodes and validates a network configuration. Unknown fields are
// rejected: a misspelt "SubnetLenn" would otherwise silently give every node the
// default. Errors name the field and the problem.
func ParseConfig(data []byte) (*Config, error) {
	var raw configJSON
	if err := decodeStrict(data, &raw); err != nil {
		return nil, fmt.Errorf("network config: %w", err)
	}
	cfg := &Config{SubnetLen: DefaultSubnetLen}
	var err error
	if strings.TrimSpace(raw.Network) == "" {
		return nil, errors.New("network config: Network: required (an IPv4 CIDR such as 10.244.0.0/16)")
	}
	if cfg.Network, err = netip.ParsePrefix(raw.Network); err != nil {
		return nil, fmt.Errorf("network config: Network: %q is not a CIDR: %w", raw.Network, err)
	}
	if raw.SubnetLen != nil {
		cfg.SubnetLen = *raw.SubnetLen
	}
	if raw.SubnetMin != "" {
		if cfg.SubnetMin, err = netip.ParseAddr(raw.SubnetMin); err != nil {
			return nil, fmt.Errorf("network config: SubnetMin: %q is not an IP address", raw.SubnetMin)
		}
	}
	if raw.SubnetMax != "" {
		if cfg.SubnetMax, err = netip.ParseAddr(raw.SubnetMax); err != nil {
			return nil, fmt.Errorf("network config: SubnetMax: %q is not an IP address", raw.SubnetMax)
		}
	}
	if cfg.Backend, err = parseBackend(raw.Backend); err != nil {
		return nil, fmt.Errorf("network config: %w", err)
	}
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("network config: %w", err)
	}
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
	return b, nil
}

func (c *Config) validate() error {
	if !c.Network.Addr().Is4() {
		return fmt.Errorf("Network: %s is not an IPv4 CIDR", c.Network)
	}
	if c.Network.Masked() != c.Network {
		return fmt.Errorf("Network: %s has host bits set (did you mean %s?)", c.Network, c.Network.Masked())
	}
	if c.SubnetLen < 1 || c.SubnetLen > 30 {
		return fmt.Errorf("SubnetLen: %d is out of range (1 to 30; a subnet needs room for a gateway and pods)", c.SubnetLen)
	}
	if c.SubnetLen <= c.Network.Bits() {
		return fmt.Errorf("SubnetLen: %d must be longer than the Network's prefix length %d, or the network holds fewer than two subnets", c.SubnetLen, c.Network.Bits())
	}
	for _, f := range []struct {
		name string
		addr netip.Addr
	}{{"SubnetMin", c.SubnetMin}, {"SubnetMax", c.SubnetMax}} {
		if !f.addr.IsValid() {
			continue
		}
		if !c.Network.Contains(f.addr) {
			return fmt.Errorf("%s: %s is outside Network %s", f.name, f.addr, c.Network)
		}
		if p := netip.PrefixFrom(f.addr, c.SubnetLen).Masked(); p.Addr() != f.addr {
			return fmt.Errorf("%s: %s is not aligned to SubnetLen %d (nearest: %s)", f.name, f.addr, c.SubnetLen, p.Addr())
		}
	}
	if c.SubnetMin.IsValid() && c.SubnetMax.IsValid() && c.SubnetMax.Less(c.SubnetMin) {
		return fmt.Errorf("SubnetMax: %s is below SubnetMin %s", c.SubnetMax, c.SubnetMin)
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
	if b.MTU != 0 && (b.MTU < 576 || b.MTU > 65535) {
		return fmt.Errorf("Backend.MTU: %d is out of range (576 to 65535, or 0 for automatic)", b.MTU)
	}
	return nil
}

// FirstSubnet and LastSubnet bound the subnets a node may lease: SubnetMin and
// SubnetMax when set, else the whole Network.
func (c *Config) FirstSubnet() netip.Prefix {
	if c.SubnetMin.IsValid() {
		return netip.PrefixFrom(c.SubnetMin, c.SubnetLen)
	}
	return netip.PrefixFrom(c.Network.Addr(), c.SubnetLen)
}

// LastSubnet is the highest subnet a node may lease.
func (c *Config) LastSubnet() netip.Prefix {
	if c.SubnetMax.IsValid() {
		return netip.PrefixFrom(c.SubnetMax, c.SubnetLen)
	}
	return netip.PrefixFrom(lastAddr(c.Network), c.SubnetLen).Masked()
}

// Contains reports whether p is a subnet of the right size inside the leasable range.
func (c *Config) Contains(p netip.Prefix) bool {
	return p.Bits() == c.SubnetLen && p.Masked() == p && c.Network.Contains(p.Addr()) &&
		!p.Addr().Less(c.FirstSubnet().Addr()) && !c.LastSubnet().Addr().Less(p.Addr())
}

// MarshalJSON writes the net-conf.json form with defaults filled in.
func (c Config) MarshalJSON() ([]byte, error) {
	out := map[string]any{"Network": c.Network.String(), "SubnetLen": c.SubnetLen}
	if c.SubnetMin.IsValid() {
		out["SubnetMin"] = c.SubnetMin.String()
	}
	if c.SubnetMax.IsValid() {
		out["SubnetMax"] = c.SubnetMax.String()
	}
	b := map[string]any{"Type": c.Backend.Type}
	if c.Backend.Type == BackendVXLAN {
		b["VNI"], b["Port"], b["DirectRouting"] = c.Backend.VNI, c.Backend.Port, c.Backend.DirectRouting
	}
	if c.Backend.MTU != 0 {
		b["MTU"] = c.Backend.MTU
	}
	out["Backend"] = b
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

func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As4()
	hostBits := 32 - p.Bits()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v |= uint32(1)<<hostBits - 1
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}
