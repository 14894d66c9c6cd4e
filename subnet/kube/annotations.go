package kube

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/twillnet/twill/subnet"
)

// DefaultAnnotationPrefix is the prefix of twill's node annotations.
const DefaultAnnotationPrefix = "twill.io"

// AnnotationKeys are the names of twill's node annotations under one prefix.
type AnnotationKeys struct {
	// BackendType, BackendData and PublicIP are written by twilld on its own
	// node; peers read them.
	BackendType string // <prefix>/backend-type: "vxlan", "host-gw"
	BackendData string // <prefix>/backend-data: JSON, e.g. {"VtepMAC":"…"}; "null" when none
	PublicIP    string // <prefix>/public-ip: the node's IPv4 address for tunnels and routes
	// PublicIPOverwrite is set by an operator, never by twilld: when present
	// it is the address peers use (a node behind NAT) and the node's own
	// lease carries it too.
	PublicIPOverwrite string // <prefix>/public-ip-overwrite
}

// Keys returns the annotation names under prefix ("" means the default).
func Keys(prefix string) AnnotationKeys {
	if prefix == "" {
		prefix = DefaultAnnotationPrefix
	}
	return AnnotationKeys{
		BackendType:       prefix + "/backend-type",
		BackendData:       prefix + "/backend-data",
		PublicIP:          prefix + "/public-ip",
		PublicIPOverwrite: prefix + "/public-ip-overwrite",
	}
}

// checkPrefix reports whether prefix makes valid annotation names: a DNS
// subdomain such as twill.io or net.example.com.
func checkPrefix(prefix string) error {
	if errs := validation.IsDNS1123Subdomain(prefix); len(errs) > 0 {
		return fmt.Errorf("annotation prefix %q: %s", prefix, strings.Join(errs, "; "))
	}
	return nil
}

// owned returns the annotations twilld writes on its own node for attrs.
func (k AnnotationKeys) owned(attrs subnet.LeaseAttrs) map[string]string {
	data := "null"
	if len(attrs.BackendData) > 0 {
		data = string(attrs.BackendData)
	}
	return map[string]string{
		k.BackendType: attrs.BackendType,
		k.BackendData: data,
		k.PublicIP:    attrs.PublicIP.String(),
	}
}

// ParseAnnotations reads the lease attributes a node publishes under prefix
// ("" means the default). ok is false, with no error, while the node has not
// published them yet (no backend type or no public IP); an error means they
// are present but malformed. A public-ip-overwrite replaces the public IP.
func ParseAnnotations(ann map[string]string, prefix string) (attrs subnet.LeaseAttrs, ok bool, err error) {
	k := Keys(prefix)
	return parseAttrs(k, ann[k.BackendType], ann[k.BackendData], ann[k.PublicIP], ann[k.PublicIPOverwrite])
}

// parseAttrs is ParseAnnotations on the values of the annotations named by k
// ("" for an absent one).
func parseAttrs(k AnnotationKeys, bt, data, pip, ow string) (attrs subnet.LeaseAttrs, ok bool, err error) {
	if bt == "" || pip == "" {
		return attrs, false, nil
	}
	attrs.BackendType = bt
	if attrs.PublicIP, err = parseIPv4(pip); err != nil {
		return subnet.LeaseAttrs{}, false, fmt.Errorf("annotation %s: %w", k.PublicIP, err)
	}
	if ow != "" {
		if attrs.PublicIP, err = parseIPv4(ow); err != nil {
			return subnet.LeaseAttrs{}, false, fmt.Errorf("annotation %s: %w", k.PublicIPOverwrite, err)
		}
	}
	if attrs.BackendData, err = parseBackendData(data); err != nil {
		return subnet.LeaseAttrs{}, false, fmt.Errorf("annotation %s: %w", k.BackendData, err)
	}
	return attrs, true, nil
}

func parseIPv4(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return a, fmt.Errorf("%q is not an IP address", s)
	}
	if !a.Is4() {
		return netip.Addr{}, fmt.Errorf("%s is not an IPv4 address", a)
	}
	return a, nil
}

// parseBackendData accepts JSON; empty and "null" mean none.
func parseBackendData(s string) (json.RawMessage, error) {
	t := strings.TrimSpace(s)
	if t == "" || t == "null" {
		return nil, nil
	}
	if len(t) > subnet.MaxLeaseValueSize {
		return nil, fmt.Errorf("%d bytes, more than the %d allowed", len(t), subnet.MaxLeaseValueSize)
	}
	if !json.Valid([]byte(t)) {
		return nil, fmt.Errorf("not valid JSON")
	}
	return json.RawMessage(t), nil
}

// PodSubnet returns the node's IPv4 pod CIDR: the first IPv4 entry of
// spec.podCIDRs, or spec.podCIDR when podCIDRs is empty. ok is false, with no
// error, while the node has none assigned yet.
func PodSubnet(node *corev1.Node) (p netip.Prefix, ok bool, err error) {
	return slim(node, AnnotationKeys{}).podSubnet()
}

func (n *cachedNode) podSubnet() (p netip.Prefix, ok bool, err error) {
	if len(n.podCIDRs) == 0 {
		return p, false, nil
	}
	for _, c := range n.podCIDRs {
		p, err := netip.ParsePrefix(c)
		if err != nil {
			return netip.Prefix{}, false, fmt.Errorf("node %s: podCIDR %q is not a CIDR", n.Name, c)
		}
		if !p.Addr().Is4() {
			continue
		}
		if p.Masked() != p {
			return netip.Prefix{}, false, fmt.Errorf("node %s: podCIDR %s has host bits set", n.Name, p)
		}
		return p, true, nil
	}
	return netip.Prefix{}, false, fmt.Errorf("node %s: no IPv4 podCIDR among %s (twill is IPv4 only)", n.Name, strings.Join(n.podCIDRs, ", "))
}

// NodeToLease converts a Node to the lease its twilld published, reading the
// annotations under prefix ("" means the default). ok is false, with no
// error, while the node lacks a podCIDR or twill's annotations (it is skipped
// until it has them); an error means something is malformed.
func NodeToLease(node *corev1.Node, prefix string) (subnet.Lease, bool, error) {
	k := Keys(prefix)
	return slim(node, k).lease(k)
}

// lease is NodeToLease on the informer's form of a Node, whose annotation
// values were read with the keys k.
func (n *cachedNode) lease(k AnnotationKeys) (subnet.Lease, bool, error) {
	p, ok, err := n.podSubnet()
	if !ok || err != nil {
		return subnet.Lease{}, false, err
	}
	attrs, ok, err := parseAttrs(k, n.backendType, n.backendData, n.publicIP, n.publicIPOverwrite)
	if !ok || err != nil {
		if err != nil {
			err = fmt.Errorf("node %s: %w", n.Name, err)
		}
		return subnet.Lease{}, false, err
	}
	attrs.NodeName = n.Name
	return subnet.Lease{Subnet: p, Attrs: attrs}, true, nil
}

// inNetwork reports whether a pod CIDR lies inside the network. Its size is
// the cluster's (kube-controller-manager --node-cidr-mask-size): SubnetLen,
// SubnetMin and SubnetMax of the config apply to etcd mode only.
func inNetwork(cfg *subnet.Config, p netip.Prefix) bool {
	return p.Bits() >= cfg.Network.Bits() && cfg.Network.Contains(p.Addr())
}
