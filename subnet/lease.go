package subnet

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// Lease is one node's claim on a pod subnet.
type Lease struct {
	Subnet netip.Prefix
	Attrs  LeaseAttrs
	// Expires is when the datastore drops the lease unless it is renewed; zero
	// when unknown or never.
	Expires time.Time
	// Claimed orders claims on addresses: the datastore's order of creation
	// (etcd: the key's create revision), 0 when unknown. When two leases
	// overlap, the earlier claim is the one peers program (FilterPeers).
	Claimed int64
}

// LeaseAttrs is what a node publishes with its lease; peers program their
// datapath from it. Its JSON form is the value stored in etcd.
type LeaseAttrs struct {
	PublicIP    netip.Addr      `json:"PublicIP"`
	BackendType string          `json:"BackendType"`
	BackendData json.RawMessage `json:"BackendData,omitempty"`
	// NodeName is informational: it helps an operator reading the datastore.
	NodeName string `json:"NodeName,omitempty"`
}

// MaxLeaseValueSize bounds a stored lease value; anything larger is not a lease
// twill wrote and is skipped rather than decoded.
const MaxLeaseValueSize = 64 << 10

// ParseLeaseAttrs decodes and checks a stored lease value.
func ParseLeaseAttrs(data []byte) (LeaseAttrs, error) {
	var a LeaseAttrs
	if len(data) > MaxLeaseValueSize {
		return a, fmt.Errorf("lease value is %d bytes, more than the %d allowed", len(data), MaxLeaseValueSize)
	}
	if err := json.Unmarshal(data, &a); err != nil {
		return a, fmt.Errorf("lease value is not valid JSON: %w", err)
	}
	if !a.PublicIP.IsValid() {
		return a, fmt.Errorf("lease value has no PublicIP")
	}
	if err := CheckPublicIP(a.PublicIP); err != nil {
		return a, fmt.Errorf("lease PublicIP: %w", err)
	}
	if a.BackendType == "" {
		return a, fmt.Errorf("lease value has no BackendType")
	}
	return a, nil
}

// CheckPublicIP says whether ip can be where peers send a node's traffic:
// an IPv4 unicast address, not unspecified, loopback or broadcast.
func CheckPublicIP(ip netip.Addr) error {
	switch {
	case !ip.Is4():
		return fmt.Errorf("%v is not IPv4", ip)
	case ip.IsUnspecified(), ip.IsLoopback(), ip.IsMulticast(), ip == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return fmt.Errorf("%s is not a unicast address another host can reach", ip)
	}
	return nil
}

// KeyName is the datastore name of a subnet: "10.244.7.0-24". A slash would
// nest keys, so the prefix length follows a dash.
func KeyName(p netip.Prefix) string {
	return p.Addr().String() + "-" + strconv.Itoa(p.Bits())
}

// ParseKeyName is the inverse of KeyName. It also accepts the CIDR form
// "10.244.7.0/24", which is what users type.
func ParseKeyName(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		if p.Masked() != p {
			return netip.Prefix{}, fmt.Errorf("subnet %q has host bits set", s)
		}
		return p, nil
	}
	addr, bits, ok := strings.Cut(s, "-")
	if !ok {
		return netip.Prefix{}, fmt.Errorf("subnet %q is neither ADDR-LEN nor a CIDR", s)
	}
	a, err := netip.ParseAddr(addr)
	if err != nil || !a.Is4() {
		return netip.Prefix{}, fmt.Errorf("subnet %q: %q is not an IPv4 address", s, addr)
	}
	n, err := strconv.Atoi(bits)
	if err != nil || n < 0 || n > 32 {
		return netip.Prefix{}, fmt.Errorf("subnet %q: %q is not a prefix length", s, bits)
	}
	p := netip.PrefixFrom(a, n)
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("subnet %q has host bits set", s)
	}
	return p, nil
}
