package plugin

import (
	"encoding/json"
	"fmt"
	"net/netip"

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
// runtimeConfig, args). See Documentation/cni-plugin.md for the mapping.
func BuildDelegate(c *NetConf, env subnet.Env) (map[string]any, error) {
	gw, node, err := nodeSubnet(env)
	if err != nil {
		return nil, err
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
	} else {
		d["mtu"] = env.MTU
	}

	ipam, err := buildIPAM(c.IPAM, env, gw, node)
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

// nodeSubnet returns the gateway (the bridge's address) and the node subnet,
// refusing subnets host-local cannot allocate from.
func nodeSubnet(env subnet.Env) (netip.Addr, netip.Prefix, error) {
	gw := env.Subnet.Addr()
	node := env.Subnet.Masked()
	if !gw.Is4() || !env.Network.Addr().Is4() {
		return gw, node, fmt.Errorf("subnet env file: TWILL_SUBNET %s and TWILL_NETWORK %s must be IPv4", env.Subnet, env.Network)
	}
	if node.Bits() > 30 {
		return gw, node, fmt.Errorf("subnet env file: TWILL_SUBNET %s leaves no address for pods", env.Subnet)
	}
	if !env.Network.Contains(gw) || node.Bits() < env.Network.Bits() {
		return gw, node, fmt.Errorf("subnet env file: TWILL_SUBNET %s lies outside TWILL_NETWORK %s", env.Subnet, env.Network)
	}
	if gw == node.Addr() || gw == lastAddr(node) {
		return gw, node, fmt.Errorf("subnet env file: TWILL_SUBNET %s: the gateway is the subnet's network or broadcast address", env.Subnet)
	}
	return gw, node, nil
}

func buildIPAM(a IPAMAdditions, env subnet.Env, gw netip.Addr, node netip.Prefix) (hostLocal, error) {
	h := hostLocal{Type: IPAMType, DataDir: a.DataDir}
	if a.Ranges == nil {
		h.Ranges = [][]Range{{{Subnet: node.String(), Gateway: gw.String()}}}
	} else if len(a.Ranges) != 1 || len(a.Ranges[0]) == 0 {
		return h, fmt.Errorf("ipam ranges must be one non-empty range set")
	} else {
		set := make([]Range, 0, len(a.Ranges[0]))
		for i, r := range a.Ranges[0] {
			r, err := r.inside(node, gw)
			if err != nil {
				return h, fmt.Errorf("ipam range %d: %w", i, err)
			}
			set = append(set, r)
		}
		h.Ranges = [][]Range{set}
	}
	h.Routes = []Route{{Dst: env.Network.String()}}
	gwOf := map[string]string{env.Network.String(): ""}
	for i, r := range a.Routes {
		dst, err := parseV4Prefix(r.Dst)
		if err != nil {
			return h, fmt.Errorf("ipam route %d dst: %w", i, err)
		}
		r.Dst = dst.String()
		if r.GW != "" {
			g, err := parseV4Addr(r.GW)
			if err != nil {
				return h, fmt.Errorf("ipam route %d gw: %w", i, err)
			}
			r.GW = g.String()
		}
		if g, ok := gwOf[r.Dst]; ok {
			if g == r.GW {
				continue // the same route twice: harmless, keep one
			}
			return h, fmt.Errorf("ipam route %d: a route to %s is already there (the cluster network is routed via the gateway)", i, r.Dst)
		}
		gwOf[r.Dst] = r.GW
		h.Routes = append(h.Routes, r)
	}
	return h, nil
}

// inside checks that a range lies in the node subnet and fills in its subnet
// and gateway: the gateway is always the node's, because it is the bridge's
// address and the pods' next hop.
func (r Range) inside(node netip.Prefix, gw netip.Addr) (Range, error) {
	if err := r.parse(); err != nil {
		return r, err
	}
	p := node
	if r.Subnet != "" {
		p, _ = parseV4Prefix(r.Subnet)
		if p.Bits() < node.Bits() || !node.Contains(p.Addr()) {
			return r, fmt.Errorf("subnet %s lies outside the node subnet %s", p, node)
		}
		if !p.Contains(gw) || gw == p.Addr() || gw == lastAddr(p) {
			return r, fmt.Errorf("subnet %s does not hold the node's gateway %s as a host address", p, gw)
		}
	}
	if a, _ := parseV4Addr(r.Gateway); r.Gateway != "" && a != gw {
		return r, fmt.Errorf("gateway %s: the gateway is the node's bridge address %s", r.Gateway, gw)
	}
	var start, end netip.Addr
	if r.RangeStart != "" {
		start, _ = parseV4Addr(r.RangeStart)
		if !p.Contains(start) {
			return r, fmt.Errorf("rangeStart %s lies outside %s", start, p)
		}
	}
	if r.RangeEnd != "" {
		end, _ = parseV4Addr(r.RangeEnd)
		if !p.Contains(end) {
			return r, fmt.Errorf("rangeEnd %s lies outside %s", end, p)
		}
	}
	if start.IsValid() && end.IsValid() && end.Less(start) {
		return r, fmt.Errorf("rangeEnd %s comes before rangeStart %s", end, start)
	}
	r.Subnet = p.String()
	r.Gateway = gw.String()
	return r, nil
}

// lastAddr is the broadcast address of an IPv4 prefix.
func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v |= host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// marshalDelegate encodes a delegate configuration.
func marshalDelegate(d map[string]any) ([]byte, error) {
	b, err := json.Marshal(d)
	if err != nil {
		return nil, fmt.Errorf("encode delegate config: %w", err)
	}
	return b, nil
}
