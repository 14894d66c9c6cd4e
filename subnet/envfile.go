package subnet

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/twillnet/twill/internal/atomicfile"
)

// DefaultEnvFile is where twilld writes the node's subnet for the CNI plugin.
const DefaultEnvFile = "/run/twill/subnet.env"

// Env is the content of the subnet env file: what the CNI plugin needs to give
// a pod an address on this node.
type Env struct {
	// Network is the whole cluster network, e.g. 10.244.0.0/16.
	Network netip.Prefix
	// Subnet is the node's gateway address with the subnet's length,
	// e.g. 10.244.7.1/24: the bridge's address.
	Subnet netip.Prefix
	// MTU is what pod interfaces must use.
	MTU int
	// IPMasq is true when twilld masquerades traffic leaving the network.
	IPMasq bool
}

// NewEnv builds the env for a leased subnet: the gateway is the subnet's first
// usable address.
func NewEnv(network, leased netip.Prefix, mtu int, ipMasq bool) Env {
	return Env{Network: network, Subnet: netip.PrefixFrom(leased.Masked().Addr().Next(), leased.Bits()), MTU: mtu, IPMasq: ipMasq}
}

// Render writes the env file body.
func (e Env) Render() []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "TWILL_NETWORK=%s\n", e.Network)
	fmt.Fprintf(&b, "TWILL_SUBNET=%s\n", e.Subnet)
	fmt.Fprintf(&b, "TWILL_MTU=%d\n", e.MTU)
	fmt.Fprintf(&b, "TWILL_IPMASQ=%t\n", e.IPMasq)
	return b.Bytes()
}

// MaxEnvFileSize bounds what ParseEnv reads; the real file is about 100 bytes.
const MaxEnvFileSize = 16 << 10

// ParseEnv reads an env file body. All four variables are required; unknown
// TWILL_ variables are an error (a newer twilld than this plugin), other lines
// that are blank or comments are ignored. The subnet must lie in the network.
func ParseEnv(data []byte) (Env, error) {
	var e Env
	if len(data) > MaxEnvFileSize {
		return e, fmt.Errorf("subnet env file is %d bytes, more than %d", len(data), MaxEnvFileSize)
	}
	seen := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		key, val, ok := strings.Cut(line, "=")
		if !ok {
			return e, fmt.Errorf("subnet env file line %d: %q is not KEY=VALUE", n, line)
		}
		if seen[key] {
			return e, fmt.Errorf("subnet env file line %d: %s set twice", n, key)
		}
		seen[key] = true
		var err error
		switch key {
		case "TWILL_NETWORK":
			e.Network, err = netip.ParsePrefix(val)
			if err == nil && (!e.Network.Addr().Is4() || e.Network.Masked() != e.Network) {
				err = fmt.Errorf("not an IPv4 network address")
			}
		case "TWILL_SUBNET":
			e.Subnet, err = netip.ParsePrefix(val)
			if err == nil && !e.Subnet.Addr().Is4() {
				err = fmt.Errorf("not IPv4")
			}
		case "TWILL_MTU":
			e.MTU, err = strconv.Atoi(val)
			if err == nil && (e.MTU < 576 || e.MTU > 65535) {
				err = fmt.Errorf("out of range 576..65535")
			}
		case "TWILL_IPMASQ":
			e.IPMasq, err = strconv.ParseBool(val)
		default:
			if strings.HasPrefix(key, "TWILL_") {
				return e, fmt.Errorf("subnet env file line %d: unknown variable %s", n, key)
			}
		}
		if err != nil {
			return e, fmt.Errorf("subnet env file line %d: %s=%q: %w", n, key, val, err)
		}
	}
	if err := sc.Err(); err != nil {
		return e, fmt.Errorf("subnet env file: %w", err)
	}
	for _, k := range []string{"TWILL_NETWORK", "TWILL_SUBNET", "TWILL_MTU", "TWILL_IPMASQ"} {
		if !seen[k] {
			return e, fmt.Errorf("subnet env file: %s is missing", k)
		}
	}
	if !e.Network.Contains(e.Subnet.Addr()) || e.Subnet.Bits() < e.Network.Bits() {
		return e, fmt.Errorf("subnet env file: TWILL_SUBNET %s lies outside TWILL_NETWORK %s", e.Subnet, e.Network)
	}
	if e.Subnet.Bits() > 30 {
		return e, fmt.Errorf("subnet env file: TWILL_SUBNET %s leaves no room for pods (at most /30)", e.Subnet)
	}
	if a := e.Subnet.Addr(); a == e.Subnet.Masked().Addr() || a == lastAddr(e.Subnet) {
		return e, fmt.Errorf("subnet env file: TWILL_SUBNET %s is the subnet's network or broadcast address, not a gateway", e.Subnet)
	}
	return e, nil
}

// ReadEnv reads and parses the env file at path.
func ReadEnv(path string) (Env, error) {
	f, err := os.Open(path)
	if err != nil {
		return Env{}, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxEnvFileSize+1))
	if err != nil {
		return Env{}, fmt.Errorf("read %s: %w", path, err)
	}
	e, err := ParseEnv(data)
	if err != nil {
		return Env{}, fmt.Errorf("%s: %w", path, err)
	}
	return e, nil
}

// WriteEnv writes the env file atomically, mode 0644, creating its directory if
// needed. A reader sees the old file or the new one, never half of one.
func WriteEnv(path string, e Env) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("write subnet env file: %w", err)
	}
	return atomicfile.Write(path, e.Render(), 0o644)
}
