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
	// IPv6Subnet is a dual-stack lease's IPv6 subnet (flannel writes both
	// in one key); twill reads it and programs the IPv4 part so far.
	IPv6Subnet netip.Prefix
	Attrs      LeaseAttrs
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
	PublicIPv6  netip.Addr      `json:"PublicIPv6,omitzero"`
	BackendType string          `json:"BackendType"`
	BackendData json.RawMessage `json:"BackendData,omitempty"`
	// BackendV6Data is the backend's data for the IPv6 family (flannel's
	// name: a VXLAN lease's second VTEP).
	BackendV6Data json.RawMessage `json:"BackendV6Data,omitempty"`
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
	if a.PublicIPv6.IsValid() && (!a.PublicIPv6.Is6() || a.PublicIPv6.Is4In6() || a.PublicIPv6.IsUnspecified() ||
		a.PublicIPv6.IsLoopback() || a.PublicIPv6.IsMulticast()) {
		return a, fmt.Errorf("lease PublicIPv6: %s is not a unicast IPv6 address", a.PublicIPv6)
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

// LeaseKeyName is the datastore name of a lease in flannel's form: the IPv4
// subnet's KeyName, and for a dual-stack lease "&" and the IPv6 subnet the
// same way ("10.244.7.0-24&fd00:10:244:7::-64"). A lease without an IPv4
// subnet has "0.0.0.0-0" in its place.
func LeaseKeyName(v4, v6 netip.Prefix) string {
	if !v6.IsValid() {
		return KeyName(v4)
	}
	name := "0.0.0.0-0"
	if v4.IsValid() {
		name = KeyName(v4)
	}
	return name + "&" + v6.Addr().String() + "-" + strconv.Itoa(v6.Bits())
}

// ParseLeaseKey is the inverse of LeaseKeyName.
func ParseLeaseKey(s string) (v4, v6 netip.Prefix, err error) {
	first, second, dual := strings.Cut(s, "&")
	if v4, err = ParseKeyName(first); err != nil {
		return v4, v6, err
	}
	if !dual {
		return v4, v6, nil
	}
	if v4 == netip.PrefixFrom(netip.IPv4Unspecified(), 0) {
		v4 = netip.Prefix{} // an IPv6-only lease
	}
	addr, bits, ok := strings.Cut(second, "-")
	a, aerr := netip.ParseAddr(addr)
	n, nerr := strconv.Atoi(bits)
	if !ok || aerr != nil || !a.Is6() || a.Zone() != "" || nerr != nil || n < 1 || n > 128 {
		return v4, v6, fmt.Errorf("lease key %q: %q is not an IPv6 ADDR-LEN", s, second)
	}
	if v6 = netip.PrefixFrom(a, n); v6.Masked() != v6 {
		return v4, v6, fmt.Errorf("lease key %q: IPv6 subnet %s has host bits set", s, v6)
	}
	return v4, v6, nil
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
