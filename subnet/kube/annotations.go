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

// AnnotationKeys are the names of twill's node annotations under one prefix:
// flannel's names (pkg/subnet/kube/annotations.go) with their value formats.
type AnnotationKeys struct {
	// BackendType and, for each family the node has, its backend data and
	// public address are written by twilld on its own node; peers read them.
	BackendType   string // <prefix>/backend-type: "vxlan", "host-gw"
	BackendData   string // <prefix>/backend-data: IPv4 backend JSON, e.g. {"VtepMAC":"…"}; "null" when none
	PublicIP      string // <prefix>/public-ip: the node's IPv4 address for tunnels and routes
	BackendV6Data string // <prefix>/backend-v6-data: the same for IPv6 (a second VTEP)
	PublicIPv6    string // <prefix>/public-ipv6: the node's IPv6 address, e.g. 2001:db8::1
	// SubnetManager is "true" on every node twilld (or flanneld in
	// Kubernetes mode) runs on: flannel programs only the Nodes that carry
	// it, so twill writes it for mixed clusters.
	SubnetManager string // <prefix>/kube-subnet-manager
	// PublicIPOverwrite and PublicIPv6Overwrite are set by an operator,
	// never by twilld: when present they are the addresses peers use (a node
	// behind NAT) and the node's own lease carries them too.
	PublicIPOverwrite   string // <prefix>/public-ip-overwrite
	PublicIPv6Overwrite string // <prefix>/public-ipv6-overwrite
	// NodePublicIP and NodePublicIPv6 are set by an operator (or a
	// distribution) on a Node before twilld starts there: the node's public
	// addresses, in place of --public-ip and --public-ipv6, as flanneld
	// reads them.
	NodePublicIP   string // <prefix>/node-public-ip
	NodePublicIPv6 string // <prefix>/node-public-ipv6
}

// Keys returns the annotation names under prefix ("" means the default).
func Keys(prefix string) AnnotationKeys {
	if prefix == "" {
		prefix = DefaultAnnotationPrefix
	}
	return AnnotationKeys{
		BackendType:         prefix + "/backend-type",
		BackendData:         prefix + "/backend-data",
		PublicIP:            prefix + "/public-ip",
		BackendV6Data:       prefix + "/backend-v6-data",
		PublicIPv6:          prefix + "/public-ipv6",
		SubnetManager:       prefix + "/kube-subnet-manager",
		PublicIPOverwrite:   prefix + "/public-ip-overwrite",
		PublicIPv6Overwrite: prefix + "/public-ipv6-overwrite",
		NodePublicIP:        prefix + "/node-public-ip",
		NodePublicIPv6:      prefix + "/node-public-ipv6",
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

// written are the values of the annotations twilld writes on its own Node,
// "" for one it does not write (the families the node lacks). Two of them
// are equal exactly when the Node carries what twilld would write.
type written struct {
	subnetManager             string // "true"
	backendType               string
	backendData, publicIP     string // the IPv4 family
	backendV6Data, publicIPv6 string // the IPv6 family
}

// nodeAnnotations are the values of twill's annotations on one Node, "" for
// an absent one.
type nodeAnnotations struct {
	written                                       // twilld's
	publicIPOverwrite, publicIPv6Overwrite string // the operator's
}

// read picks twill's annotations out of a Node's.
func (k AnnotationKeys) read(ann map[string]string) nodeAnnotations {
	if len(ann) == 0 {
		return nodeAnnotations{}
	}
	return nodeAnnotations{
		written: written{
			subnetManager: ann[k.SubnetManager], backendType: ann[k.BackendType],
			backendData: ann[k.BackendData], publicIP: ann[k.PublicIP],
			backendV6Data: ann[k.BackendV6Data], publicIPv6: ann[k.PublicIPv6],
		},
		publicIPOverwrite: ann[k.PublicIPOverwrite], publicIPv6Overwrite: ann[k.PublicIPv6Overwrite],
	}
}

// writtenFor is what twilld writes for attrs: the backend type, and the
// backend data and public address of each family attrs has. An IPv4 address
// of 0.0.0.0 is no IPv4 family (an IPv6-only node's lease carries it, as
// flannel's does), and flannel's VXLAN backend writes neither public-ip nor
// backend-data then.
func writtenFor(attrs subnet.LeaseAttrs) written {
	w := written{subnetManager: "true", backendType: attrs.BackendType}
	if hasIPv4(attrs.PublicIP) {
		w.publicIP, w.backendData = attrs.PublicIP.String(), backendData(attrs.BackendData)
	}
	if attrs.PublicIPv6.IsValid() {
		w.publicIPv6, w.backendV6Data = attrs.PublicIPv6.String(), backendData(attrs.BackendV6Data)
	}
	return w
}

// backendData is flannel's form of backend data: the JSON, "null" for none.
func backendData(d json.RawMessage) string {
	if len(d) == 0 {
		return "null"
	}
	return string(d)
}

// hasIPv4 reports whether a public IPv4 address stands for an IPv4 family.
func hasIPv4(ip netip.Addr) bool { return ip.IsValid() && ip != netip.IPv4Unspecified() }

// pairs lists the annotations twilld writes with their values in w.
func (k AnnotationKeys) pairs(w written) [6][2]string {
	return [...][2]string{
		{k.SubnetManager, w.subnetManager}, {k.BackendType, w.backendType},
		{k.BackendData, w.backendData}, {k.PublicIP, w.publicIP},
		{k.BackendV6Data, w.backendV6Data}, {k.PublicIPv6, w.publicIPv6},
	}
}

// owned returns the annotations twilld writes on its own node for attrs.
func (k AnnotationKeys) owned(attrs subnet.LeaseAttrs) map[string]string {
	out := map[string]string{}
	for _, p := range k.pairs(writtenFor(attrs)) {
		if p[1] != "" {
			out[p[0]] = p[1]
		}
	}
	return out
}

// patch is the merge patch of the annotations that makes a Node carry w:
// the values to write, and null for those of a family the node lacks, so a
// family the node had before (its config changed) is not left behind for its
// peers to program.
func (k AnnotationKeys) patch(w written) map[string]any {
	out := map[string]any{}
	for _, p := range k.pairs(w) {
		if p[1] == "" {
			out[p[0]] = nil
		} else {
			out[p[0]] = p[1]
		}
	}
	return out
}

// NodePublicIPs reads a Node's node-public-ip and node-public-ipv6
// annotations under prefix: zero addresses when absent; an error names a
// malformed one.
func NodePublicIPs(ann map[string]string, prefix string) (v4, v6 netip.Addr, err error) {
	k := Keys(prefix)
	for _, a := range []struct {
		key string
		v6  bool
		to  *netip.Addr
	}{{k.NodePublicIP, false, &v4}, {k.NodePublicIPv6, true, &v6}} {
		s := ann[a.key]
		if s == "" {
			continue
		}
		ip, perr := netip.ParseAddr(strings.TrimSpace(s))
		if perr == nil {
			perr = subnet.CheckPublicIP(ip, a.v6)
		}
		if perr != nil {
			return v4, v6, fmt.Errorf("annotation %s=%q: %v", a.key, s, perr)
		}
		*a.to = ip
	}
	return v4, v6, nil
}

// ParseAnnotations reads the lease attributes a node publishes under prefix
// ("" means the default): the backend type and, for each family it publishes
// an address of, that address and the family's backend data. ok is false,
// with no error, while the node has not published them yet (no backend type,
// or a public address of neither family); an error means they are present
// but malformed. A public-ip-overwrite or public-ipv6-overwrite replaces the
// address of its family. Without an IPv4 family PublicIP is 0.0.0.0, as in a
// lease flannel writes for an IPv6-only node.
func ParseAnnotations(ann map[string]string, prefix string) (attrs subnet.LeaseAttrs, ok bool, err error) {
	k := Keys(prefix)
	return parseAttrs(k, k.read(ann), bothFamilies)
}

// families says which address families to read.
type families struct{ v4, v6 bool }

var bothFamilies = families{v4: true, v6: true}

// String names the families: "IPv4", "IPv6" or "IPv4 and IPv6".
func (f families) String() string {
	switch {
	case f.v4 && f.v6:
		return "IPv4 and IPv6"
	case f.v6:
		return "IPv6"
	}
	return "IPv4"
}

// parseAttrs is ParseAnnotations on the values of the annotations named by
// k, for the families f: the annotations of the others are not read, so a
// stale or foreign value there does not make a peer malformed.
func parseAttrs(k AnnotationKeys, a nodeAnnotations, f families) (attrs subnet.LeaseAttrs, ok bool, err error) {
	if a.backendType == "" {
		return attrs, false, nil
	}
	attrs.BackendType = a.backendType
	// public-ip "0.0.0.0" is no IPv4 family: flannel's host-gw writes it on an IPv6-only node.
	if f.v4 && a.publicIP != "" && a.publicIP != netip.IPv4Unspecified().String() {
		if attrs.PublicIP, err = parsePublicIP(k.PublicIP, a.publicIP, k.PublicIPOverwrite, a.publicIPOverwrite, false); err != nil {
			return subnet.LeaseAttrs{}, false, err
		}
		if attrs.BackendData, err = parseBackendData(a.backendData); err != nil {
			return subnet.LeaseAttrs{}, false, fmt.Errorf("annotation %s: %w", k.BackendData, err)
		}
	}
	if f.v6 && a.publicIPv6 != "" {
		if attrs.PublicIPv6, err = parsePublicIP(k.PublicIPv6, a.publicIPv6, k.PublicIPv6Overwrite, a.publicIPv6Overwrite, true); err != nil {
			return subnet.LeaseAttrs{}, false, err
		}
		if attrs.BackendV6Data, err = parseBackendData(a.backendV6Data); err != nil {
			return subnet.LeaseAttrs{}, false, fmt.Errorf("annotation %s: %w", k.BackendV6Data, err)
		}
	}
	if !attrs.PublicIP.IsValid() {
		if !attrs.PublicIPv6.IsValid() {
			return subnet.LeaseAttrs{}, false, nil
		}
		attrs.PublicIP = netip.IPv4Unspecified()
	}
	return attrs, true, nil
}

// parsePublicIP reads a published address of one family (annotation key,
// value val) and the operator's overwrite of it (owKey, ow), which wins.
func parsePublicIP(key, val, owKey, ow string, v6 bool) (netip.Addr, error) {
	ip, err := parseAddr(val, v6)
	if err != nil {
		return ip, fmt.Errorf("annotation %s: %w", key, err)
	}
	if ow == "" {
		return ip, nil
	}
	if ip, err = parseAddr(ow, v6); err != nil {
		return ip, fmt.Errorf("annotation %s: %w", owKey, err)
	}
	return ip, nil
}

// parseAddr reads an address peers can send a family's traffic to.
func parseAddr(s string, v6 bool) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if err != nil {
		return a, fmt.Errorf("%q is not an IP address", s)
	}
	if err := subnet.CheckPublicIP(a, v6); err != nil {
		return netip.Addr{}, err
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

// PodSubnets returns the node's pod CIDRs, one per family: the first IPv4
// and the first IPv6 entry of spec.podCIDRs, or spec.podCIDR when podCIDRs
// is empty. A family the node has none of is a zero prefix; an entry that is
// not a network address is an error naming the node.
func PodSubnets(node *corev1.Node) (v4, v6 netip.Prefix, err error) {
	return slim(node, AnnotationKeys{}).podSubnets()
}

func (n *cachedNode) podSubnets() (v4, v6 netip.Prefix, err error) {
	for _, c := range n.podCIDRs {
		p, err := netip.ParsePrefix(c)
		switch {
		case err != nil:
			return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("node %s: podCIDR %q is not a CIDR", n.Name, c)
		case p.Masked() != p:
			return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("node %s: podCIDR %s has host bits set", n.Name, p)
		case p.Addr().Is4In6():
			return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("node %s: podCIDR %s is an IPv4-mapped IPv6 prefix", n.Name, p)
		case p.Addr().Is4():
			if !v4.IsValid() {
				v4 = p
			}
		case !v6.IsValid():
			v6 = p
		}
	}
	return v4, v6, nil
}

// NodeToLease converts a Node to the lease its twilld published, reading the
// annotations under prefix ("" means the default). The lease has each family
// for which the Node has both a podCIDR and a published address: Subnet with
// PublicIP and BackendData, IPv6Subnet with PublicIPv6 and BackendV6Data; the
// fields of a family it lacks are empty (PublicIP 0.0.0.0). ok is false, with
// no error, while the node has no family complete (no podCIDR or no
// annotations yet: it is skipped until it has them); an error means
// something is malformed. Whether a family is one the network has is the
// caller's question.
func NodeToLease(node *corev1.Node, prefix string) (subnet.Lease, bool, error) {
	k := Keys(prefix)
	return slim(node, k).lease(k, bothFamilies)
}

// lease is NodeToLease on the informer's form of a Node, whose annotation
// values were read with the keys k, for the families f only.
func (n *cachedNode) lease(k AnnotationKeys, f families) (subnet.Lease, bool, error) {
	v4, v6, err := n.podSubnets()
	if err != nil || (!v4.IsValid() && !v6.IsValid()) {
		return subnet.Lease{}, false, err
	}
	attrs, ok, err := parseAttrs(k, n.annotations(), f)
	if !ok || err != nil {
		if err != nil {
			err = fmt.Errorf("node %s: %w", n.Name, err)
		}
		return subnet.Lease{}, false, err
	}
	attrs.NodeName = n.Name
	l := subnet.Lease{Attrs: attrs}
	if hasIPv4(attrs.PublicIP) && v4.IsValid() {
		l.Subnet = v4
	} else {
		l = withoutFamily(l, false)
	}
	if attrs.PublicIPv6.IsValid() && v6.IsValid() {
		l.IPv6Subnet = v6
	} else {
		l = withoutFamily(l, true)
	}
	if !l.Subnet.IsValid() && !l.IPv6Subnet.IsValid() {
		return subnet.Lease{}, false, nil
	}
	return l, true, nil
}

// withoutFamily returns l without its IPv6 family (v6) or its IPv4 one.
func withoutFamily(l subnet.Lease, v6 bool) subnet.Lease {
	if v6 {
		l.IPv6Subnet, l.Attrs.PublicIPv6, l.Attrs.BackendV6Data = netip.Prefix{}, netip.Addr{}, nil
	} else {
		l.Subnet, l.Attrs.PublicIP, l.Attrs.BackendData = netip.Prefix{}, netip.IPv4Unspecified(), nil
	}
	return l
}

// inNetwork reports whether a pod CIDR lies inside a family's network. Its
// size is the cluster's (kube-controller-manager --node-cidr-mask-size-ipv4,
// -ipv6): SubnetLen, SubnetMin and SubnetMax of the config, which
// subnet.Range.Contains checks, apply to etcd mode only.
func inNetwork(network, p netip.Prefix) bool {
	return network.IsValid() && p.Bits() >= network.Bits() && network.Contains(p.Addr())
}
