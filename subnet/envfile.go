package subnet

import (
	"bufio"
	"bytes"
	"errors"
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
// a pod an address of each family on this node.
type Env struct {
	// Network is the whole IPv4 cluster network, e.g. 10.244.0.0/16; zero
	// when the network has no IPv4 (IPv6-only).
	Network netip.Prefix
	// Subnet is the node's IPv4 gateway address with the subnet's length,
	// e.g. 10.244.7.1/24: the bridge's address. Zero without IPv4.
	Subnet netip.Prefix
	// IPv6Network and IPv6Subnet are the same for IPv6 (the gateway is the
	// subnet's first address after the network address, e.g.
	// fd00:10:244:7::1/64); zero without IPv6.
	IPv6Network netip.Prefix
	IPv6Subnet  netip.Prefix
	// MTU is what pod interfaces must use.
	MTU int
	// IPMasq is true when twilld masquerades traffic leaving the network.
	IPMasq bool
}

// NewEnv builds the env for a node's lease: each family the lease has gets
// its network from cfg and its subnet's first usable address as gateway.
func NewEnv(cfg *Config, own Lease, mtu int, ipMasq bool) Env {
	e := Env{MTU: mtu, IPMasq: ipMasq}
	if own.Subnet.IsValid() {
		e.Network, e.Subnet = cfg.Network, gateway(own.Subnet)
	}
	if own.IPv6Subnet.IsValid() {
		e.IPv6Network, e.IPv6Subnet = cfg.IPv6Network, gateway(own.IPv6Subnet)
	}
	return e
}

func gateway(leased netip.Prefix) netip.Prefix {
	return netip.PrefixFrom(leased.Masked().Addr().Next(), leased.Bits())
}

// Render writes the env file body. The keys of a family the node has no
// subnet of are left out.
func (e Env) Render() []byte { return e.render("TWILL_") }

// RenderFlannel writes the same with flannel's names (FLANNEL_NETWORK,
// FLANNEL_SUBNET, FLANNEL_IPV6_NETWORK, FLANNEL_IPV6_SUBNET, FLANNEL_MTU,
// FLANNEL_IPMASQ), in the order flanneld writes them: what flannel's CNI
// plugin and scripts such as mk-docker-opts.sh read.
func (e Env) RenderFlannel() []byte { return e.render("FLANNEL_") }

func (e Env) render(prefix string) []byte {
	var b bytes.Buffer
	if e.Subnet.IsValid() {
		fmt.Fprintf(&b, "%sNETWORK=%s\n", prefix, e.Network)
		fmt.Fprintf(&b, "%sSUBNET=%s\n", prefix, e.Subnet)
	}
	if e.IPv6Subnet.IsValid() {
		fmt.Fprintf(&b, "%sIPV6_NETWORK=%s\n", prefix, e.IPv6Network)
		fmt.Fprintf(&b, "%sIPV6_SUBNET=%s\n", prefix, e.IPv6Subnet)
	}
	fmt.Fprintf(&b, "%sMTU=%d\n", prefix, e.MTU)
	fmt.Fprintf(&b, "%sIPMASQ=%t\n", prefix, e.IPMasq)
	return b.Bytes()
}

// MaxEnvFileSize bounds what ParseEnv reads; the real file is about 150 bytes.
const MaxEnvFileSize = 16 << 10

// ParseEnv reads an env file body. TWILL_MTU and TWILL_IPMASQ are required,
// and the network and subnet of at least one family (both of a family, or
// neither); unknown TWILL_ variables are an error (a newer twilld than this
// plugin), other lines that are blank or comments are ignored. Each subnet
// must lie in its network and leave room for pods.
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
			e.Network, err = parseEnvNetwork(val, false)
		case "TWILL_SUBNET":
			e.Subnet, err = parseEnvSubnet(val, false)
		case "TWILL_IPV6_NETWORK":
			e.IPv6Network, err = parseEnvNetwork(val, true)
		case "TWILL_IPV6_SUBNET":
			e.IPv6Subnet, err = parseEnvSubnet(val, true)
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
	for _, pair := range [][2]string{{"TWILL_NETWORK", "TWILL_SUBNET"}, {"TWILL_IPV6_NETWORK", "TWILL_IPV6_SUBNET"}} {
		if seen[pair[0]] != seen[pair[1]] {
			missing := pair[0]
			if seen[missing] {
				missing = pair[1]
			}
			return e, fmt.Errorf("subnet env file: %s is missing", missing)
		}
	}
	if !seen["TWILL_SUBNET"] && !seen["TWILL_IPV6_SUBNET"] {
		return e, errors.New("subnet env file: TWILL_NETWORK is missing (and there is no TWILL_IPV6_NETWORK either)")
	}
	for _, k := range []string{"TWILL_MTU", "TWILL_IPMASQ"} {
		if !seen[k] {
			return e, fmt.Errorf("subnet env file: %s is missing", k)
		}
	}
	if e.Subnet.IsValid() {
		if err := checkEnvSubnet("TWILL_SUBNET", e.Subnet, "TWILL_NETWORK", e.Network, 30); err != nil {
			return e, err
		}
	}
	if e.IPv6Subnet.IsValid() {
		if err := checkEnvSubnet("TWILL_IPV6_SUBNET", e.IPv6Subnet, "TWILL_IPV6_NETWORK", e.IPv6Network, 126); err != nil {
			return e, err
		}
	}
	return e, nil
}

// FamilyName is "IPv6" when v6, else "IPv4".
func FamilyName(v6 bool) string {
	if v6 {
		return "IPv6"
	}
	return "IPv4"
}

func parseEnvNetwork(val string, v6 bool) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(val)
	if err == nil && (p.Addr().Is6() != v6 || p.Addr().Is4In6() || p.Masked() != p) {
		err = fmt.Errorf("not an %s network address", FamilyName(v6))
	}
	return p, err
}

func parseEnvSubnet(val string, v6 bool) (netip.Prefix, error) {
	p, err := netip.ParsePrefix(val)
	if err == nil && (p.Addr().Is6() != v6 || p.Addr().Is4In6()) {
		err = fmt.Errorf("not %s", FamilyName(v6))
	}
	return p, err
}

// checkEnvSubnet checks that a family's gateway/length lies in its network,
// leaves room for pods, and is neither the network nor (IPv4) the broadcast
// address.
func checkEnvSubnet(key string, sn netip.Prefix, netKey string, network netip.Prefix, maxBits int) error {
	if !network.Contains(sn.Addr()) || sn.Bits() < network.Bits() {
		return fmt.Errorf("subnet env file: %s %s lies outside %s %s", key, sn, netKey, network)
	}
	if sn.Bits() > maxBits {
		return fmt.Errorf("subnet env file: %s %s leaves no room for pods (at most /%d)", key, sn, maxBits)
	}
	if a := sn.Addr(); a == sn.Masked().Addr() || (a.Is4() && a == LastAddr(sn)) {
		return fmt.Errorf("subnet env file: %s %s is the subnet's network or broadcast address, not a gateway", key, sn)
	}
	return nil
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
func WriteEnv(path string, e Env) error { return writeEnvFile(path, e.Render()) }

// WriteFlannelEnv writes the env in flannel's format (RenderFlannel) the same
// way.
func WriteFlannelEnv(path string, e Env) error { return writeEnvFile(path, e.RenderFlannel()) }

func writeEnvFile(path string, body []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("write subnet env file: %w", err)
	}
	return atomicfile.Write(path, body, 0o644)
}
