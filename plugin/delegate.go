package plugin

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"

	"github.com/twillnet/twill/subnet"
)

// hostLocal is the ipam object of the delegate configuration.
type hostLocal struct {
	Type    string    `json:"type"`
	DataDir string    `json:"dataDir,omitempty"`
	Ranges  [][]Range `json:"ranges"`
	Routes  []Route   `json:"routes"`
}

// BuildDelegate returns the configuration the delegate plugin gets for this
// node: the plugin's delegate object, with defaults for what it does not set
// (type bridge, bridge cni0, isGateway true, mtu and ipMasq from the env file),
// and the keys twill always decides itself (name, cniVersion, ipam,
// runtimeConfig, args). The ipam object has one range set per family the env
// file has, so a pod gets an address of each. See
// Documentation/cni-plugin.md for the mapping.
func BuildDelegate(c *NetConf, env subnet.Env) (map[string]any, error) {
	fams, err := nodeFamilies(env)
	if err != nil {
		return nil, envError{err}
	}
	d := make(map[string]any, len(c.Delegate)+8)
	for k, v := range c.Delegate {
		d[k] = v
	}
	setDefault(d, "type", DefaultDelegateType)
	setDefault(d, "bridge", DefaultBridge)
	setDefault(d, "isGateway", true)
	// When twilld masquerades traffic leaving the cluster network, the
	// bridge must not masquerade as well: it would hide pod addresses from
	// pods on other nodes.
	setDefault(d, "ipMasq", !env.IPMasq)
	if v, ok := d["mtu"]; ok {
		m, err := delegateMTU(v)
		if err != nil {
			return nil, err
		}
		if m > env.MTU {
			return nil, fmt.Errorf("delegate mtu %d is larger than the network's MTU %d (TWILL_MTU): pods would send packets the overlay drops", m, env.MTU)
		}
		if m < minIPv6MTU && hasV6(fams) {
			return nil, fmt.Errorf("delegate mtu %d is below %d: the kernel turns IPv6 off on a link with a smaller MTU, and this node has an IPv6 subnet", m, minIPv6MTU)
		}
	} else {
		d["mtu"] = env.MTU
	}

	defaultGW, _ := d["isDefaultGateway"].(bool)
	ipam, err := buildIPAM(c.IPAM, fams, defaultGW)
	if err != nil {
		return nil, err
	}
	d["name"] = c.Name
	d["cniVersion"] = c.CNIVersion
	d["ipam"] = ipam
	if len(c.RuntimeConfig) > 0 {
		d["runtimeConfig"] = c.RuntimeConfig
	}
	if len(c.Args) > 0 {
		d["args"] = c.Args
	}
	return d, nil
}

func setDefault(d map[string]any, k string, v any) {
	if _, ok := d[k]; !ok {
		d[k] = v
	}
}

// envError is an env file that parsed but that no delegate config can be
// built from; the verbs report it as the env file's fault, not the plugin
// config's.
type envError struct{ error }

func (e envError) Unwrap() error { return e.error }

// minIPv6MTU is the smallest MTU IPv6 runs on (RFC 8200); the kernel disables
// IPv6 on an interface with a smaller one.
const minIPv6MTU = 1280

// family is one IP family of the node, from the env file.
type family struct {
	fam       int          // famV4 or famV6
	network   netip.Prefix // the cluster network
	node      netip.Prefix // the node subnet, masked
	gw        netip.Addr   // the bridge's address, the pods' next hop
	netKey    string       // the env file's keys, for errors
	subnetKey string
}

func (f family) name() string { return familyName(f.fam) }

// maxBits is the longest node subnet host-local allocates from: it needs the
// gateway and one more address (and, in IPv4, the network and broadcast
// addresses).
func (f family) maxBits() int {
	if f.fam == famV6 {
		return 126
	}
	return 30
}

func hasV6(fams []family) bool {
	return slices.ContainsFunc(fams, func(f family) bool { return f.fam == famV6 })
}

// nodeFamilies returns the families of the env file, IPv4 first, refusing
// subnets host-local cannot allocate from or pods cannot be routed in.
// subnet.ParseEnv checks most of this already; the env of BuildDelegate need
// not come from a file.
func nodeFamilies(env subnet.Env) ([]family, error) {
	var fams []family
	for _, f := range []struct {
		family
		sn netip.Prefix
	}{
		{family{fam: famV4, network: env.Network, netKey: "TWILL_NETWORK", subnetKey: "TWILL_SUBNET"}, env.Subnet},
		{family{fam: famV6, network: env.IPv6Network, netKey: "TWILL_IPV6_NETWORK", subnetKey: "TWILL_IPV6_SUBNET"}, env.IPv6Subnet},
	} {
		if !f.sn.IsValid() && !f.network.IsValid() {
			continue
		}
		f.gw, f.node = f.sn.Addr(), f.sn.Masked()
		if err := f.check(f.sn); err != nil {
			return nil, fmt.Errorf("subnet env file: %w", err)
		}
		fams = append(fams, f.family)
	}
	if len(fams) == 0 {
		return nil, fmt.Errorf("subnet env file: neither TWILL_SUBNET nor TWILL_IPV6_SUBNET is set")
	}
	if hasV6(fams) && env.MTU < minIPv6MTU {
		return nil, fmt.Errorf("subnet env file: TWILL_MTU %d is below %d, the smallest MTU IPv6 runs on: the kernel would turn IPv6 off on the pods' interfaces", env.MTU, minIPv6MTU)
	}
	return fams, nil
}

// check checks a family's node subnet (sn: the gateway with the subnet's
// length) against its network.
func (f family) check(sn netip.Prefix) error {
	switch {
	case !sn.IsValid():
		return fmt.Errorf("%s is missing (%s is %s)", f.subnetKey, f.netKey, f.network)
	case !f.network.IsValid():
		return fmt.Errorf("%s is missing (%s is %s)", f.netKey, f.subnetKey, sn)
	case familyOf(sn.Addr()) != f.fam || familyOf(f.network.Addr()) != f.fam || sn.Addr().Is4In6() || f.network.Addr().Is4In6():
		return fmt.Errorf("%s %s and %s %s must be %s", f.subnetKey, sn, f.netKey, f.network, f.name())
	case f.network.Masked() != f.network:
		return fmt.Errorf("%s %s has host bits set", f.netKey, f.network)
	case f.fam == famV6 && !f.network.Addr().IsGlobalUnicast():
		return fmt.Errorf("%s %s is not a unicast network pods can be routed in (it is link-local, multicast, loopback or unspecified)", f.netKey, f.network)
	case f.node.Bits() > f.maxBits():
		return fmt.Errorf("%s %s leaves no address for pods (host-local needs a /%d or shorter prefix)", f.subnetKey, sn, f.maxBits())
	case !f.network.Contains(f.gw) || f.node.Bits() < f.network.Bits():
		return fmt.Errorf("%s %s lies outside %s %s", f.subnetKey, sn, f.netKey, f.network)
	case f.fam == famV4 && (f.gw == f.node.Addr() || f.gw == subnet.LastAddr(f.node)):
		return fmt.Errorf("%s %s: the gateway is the subnet's network or broadcast address", f.subnetKey, sn)
	case f.gw == f.node.Addr():
		return fmt.Errorf("%s %s: the gateway is the subnet's network address (the subnet-router anycast address)", f.subnetKey, sn)
	}
	return nil
}

// defaultRoute is the default destination of a family.
func (f family) defaultRoute() netip.Prefix {
	if f.fam == famV6 {
		return netip.PrefixFrom(netip.IPv6Unspecified(), 0)
	}
	return netip.PrefixFrom(netip.IPv4Unspecified(), 0)
}

func familyByNumber(fams []family, fam int) (family, bool) {
	for _, f := range fams {
		if f.fam == fam {
			return f, true
		}
	}
	return family{}, false
}

// buildIPAM builds host-local's config: one range set per family of the node
// (the user's set for that family, or the whole node subnet), a route to each
// family's cluster network, then the user's routes.
//
// With isDefaultGateway the bridge adds a default route via the gateway for
// every family the pod got an address of, unless host-local already returned
// a default route with a gateway. So twill adds no default route itself, and
// drops a user's default route that is the same as the bridge's: without a
// gateway the pod would get it twice and the bridge's ADD fail with "file
// exists".
func buildIPAM(a IPAMAdditions, fams []family, defaultGW bool) (hostLocal, error) {
	h := hostLocal{Type: IPAMType, DataDir: a.DataDir}
	setFams, err := rangeSetFamilies(a.Ranges)
	if err != nil {
		return h, err
	}
	userSet := map[int]int{} // family -> index in a.Ranges
	for i, fam := range setFams {
		if fam == famNone {
			if len(fams) != 1 {
				return h, fmt.Errorf("ipam.ranges[%d] names no address, so its family is unknown, and the node has an IPv4 and an IPv6 subnet: give the set a subnet, rangeStart or rangeEnd", i)
			}
			fam = fams[0].fam
		}
		f, ok := familyByNumber(fams, fam)
		if !ok {
			return h, fmt.Errorf("ipam.ranges[%d] is %s, but the node has no %s subnet (%s)", i, familyName(fam), familyName(fam), absentKey(fam))
		}
		userSet[f.fam] = i
	}
	for _, f := range fams {
		i, ok := userSet[f.fam]
		if !ok {
			h.Ranges = append(h.Ranges, []Range{{Subnet: f.node.String(), Gateway: f.gw.String()}})
			continue
		}
		set := make([]Range, 0, len(a.Ranges[i]))
		for j, r := range a.Ranges[i] {
			r, err := r.inside(f, fmt.Sprintf("ipam.ranges[%d][%d]", i, j))
			if err != nil {
				return h, err
			}
			set = append(set, r)
		}
		h.Ranges = append(h.Ranges, set)
	}

	// via is where each destination is routed already; the zero Addr is
	// never a gateway.
	via := map[netip.Prefix]netip.Addr{}
	for _, f := range fams {
		h.Routes = append(h.Routes, Route{Dst: f.network.String()})
		via[f.network] = f.gw
		if defaultGW {
			via[f.defaultRoute()] = f.gw // the bridge adds it
		}
	}
	for i, r := range a.Routes {
		dst, gw, err := r.parse(i)
		if err != nil {
			return h, err
		}
		f, ok := familyByNumber(fams, familyOf(dst.Addr()))
		if !ok {
			fam := familyOf(dst.Addr())
			return h, fmt.Errorf("ipam.routes[%d].dst %s is %s, but the node has no %s subnet (%s)", i, dst, familyName(fam), familyName(fam), absentKey(fam))
		}
		next := gw
		if !next.IsValid() {
			next = f.gw // host-local's route without gw goes via the gateway
		}
		if g, ok := via[dst]; ok {
			switch {
			case g == next:
				continue // the same route twice: harmless, keep one
			case dst == f.defaultRoute():
				return h, fmt.Errorf("ipam.routes[%d]: a default route via %s, but isDefaultGateway makes the bridge route %s via the gateway %s", i, next, dst, g)
			default:
				return h, fmt.Errorf("ipam.routes[%d]: a route to %s is already there (the cluster network is routed via the gateway %s)", i, dst, g)
			}
		}
		via[dst] = next
		out := Route{Dst: dst.String()}
		if gw.IsValid() {
			out.GW = gw.String()
		}
		h.Routes = append(h.Routes, out)
	}
	return h, nil
}

// absentKey names the env file key whose absence means the node has no
// subnet of a family.
func absentKey(fam int) string {
	if fam == famV6 {
		return "the env file has no TWILL_IPV6_SUBNET"
	}
	return "the env file has no TWILL_SUBNET"
}

// inside checks that a range lies in its family's node subnet and fills in
// its subnet and gateway: the gateway is always the node's, because it is the
// bridge's address and the pods' next hop. where names the range in errors.
func (r Range) inside(f family, where string) (Range, error) {
	// rangeSetFamilies has parsed every field already.
	p := f.node
	if r.Subnet != "" {
		p, _ = parsePrefix(r.Subnet)
		if p.Bits() < f.node.Bits() || !f.node.Contains(p.Addr()) {
			return r, fmt.Errorf("%s.subnet %s lies outside the node subnet %s", where, p, f.node)
		}
		if !p.Contains(f.gw) || f.gw == p.Addr() || (f.fam == famV4 && f.gw == subnet.LastAddr(p)) {
			return r, fmt.Errorf("%s.subnet %s does not hold the node's gateway %s as a host address", where, p, f.gw)
		}
		if p.Bits() > f.maxBits() {
			return r, fmt.Errorf("%s.subnet %s is too small for host-local to allocate from (at most /%d)", where, p, f.maxBits())
		}
	}
	if a, _ := parseAddr(r.Gateway); r.Gateway != "" && a != f.gw {
		return r, fmt.Errorf("%s.gateway %s: the gateway is the node's bridge address %s", where, r.Gateway, f.gw)
	}
	var start, end netip.Addr
	if r.RangeStart != "" {
		start, _ = parseAddr(r.RangeStart)
		if !p.Contains(start) {
			return r, fmt.Errorf("%s.rangeStart %s lies outside %s", where, start, p)
		}
	}
	if r.RangeEnd != "" {
		end, _ = parseAddr(r.RangeEnd)
		if !p.Contains(end) {
			return r, fmt.Errorf("%s.rangeEnd %s lies outside %s", where, end, p)
		}
	}
	if start.IsValid() && end.IsValid() && end.Less(start) {
		return r, fmt.Errorf("%s.rangeEnd %s comes before rangeStart %s", where, end, start)
	}
	r.Subnet = p.String()
	r.Gateway = f.gw.String()
	return r, nil
}

// marshalDelegate encodes a delegate configuration.
func marshalDelegate(d map[string]any) ([]byte, error) {
	b, err := json.Marshal(d)
	if err != nil {
		return nil, fmt.Errorf("encode delegate config: %w", err)
	}
	return b, nil
}
