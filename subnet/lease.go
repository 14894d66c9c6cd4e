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
	// IPv6Subnet is the lease's IPv6 subnet: a dual-stack or IPv6-only
	// lease has one (flannel writes both subnets in one key). Subnet is zero
	// in an IPv6-only lease.
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

// Family returns the lease as the datapath of one family sees it: the
// family's subnet in Subnet, its public address in PublicIP and its backend
// data in BackendData, the other family's fields empty. ok is false when the
// lease has no subnet of that family.
func (l Lease) Family(v6 bool) (f Lease, ok bool) {
	f = Lease{Subnet: l.Subnet, Expires: l.Expires, Claimed: l.Claimed,
		Attrs: LeaseAttrs{PublicIP: l.Attrs.PublicIP, BackendType: l.Attrs.BackendType, BackendData: l.Attrs.BackendData, NodeName: l.Attrs.NodeName}}
	if v6 {
		f.Subnet, f.Attrs.PublicIP, f.Attrs.BackendData = l.IPv6Subnet, l.Attrs.PublicIPv6, l.Attrs.BackendV6Data
	}
	return f, f.Subnet.IsValid()
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
	if a.PublicIPv6.IsValid() {
		if err := CheckPublicIP(a.PublicIPv6, true); err != nil {
			return a, fmt.Errorf("lease PublicIPv6: %w", err)
		}
	}
	switch {
	case a.PublicIPv6.IsValid() && (!a.PublicIP.IsValid() || a.PublicIP == netip.IPv4Unspecified()):
		// An IPv6-only node: flannel writes "0.0.0.0" here.
	case !a.PublicIP.IsValid():
		return a, fmt.Errorf("lease value has no PublicIP")
	default:
		if err := CheckPublicIP(a.PublicIP, false); err != nil {
			return a, fmt.Errorf("lease PublicIP: %w", err)
		}
	}
	if a.BackendType == "" {
		return a, fmt.Errorf("lease value has no BackendType")
	}
	return a, nil
}

// CheckPublicIP says whether ip can be where peers send a node's traffic of
// one family: a unicast address of that family (IPv6 when v6), not
// unspecified, loopback, multicast, link-local or the IPv4 broadcast.
func CheckPublicIP(ip netip.Addr, v6 bool) error {
	switch {
	case !ip.IsValid():
		return fmt.Errorf("no %s address", FamilyName(v6))
	case ip.Is6() != v6 || ip.Is4In6() || ip.Zone() != "":
		return fmt.Errorf("%v is not an %s address", ip, FamilyName(v6))
	case ip.IsUnspecified(), ip.IsLoopback(), ip.IsMulticast(), ip.IsLinkLocalUnicast(), ip == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
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
