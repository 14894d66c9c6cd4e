package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"path/filepath"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/twillnet/twill/deploy"
	"github.com/twillnet/twill/subnet"
)

// ConfList is the CNI chain the lab gives host i's pods: the conflist the
// DaemonSet installs (deploy/kube-twill.yaml), with the node's paths moved
// into the host's directory by NodeConfList.
func (l *Lab) ConfList(i int) ([]byte, error) {
	dir := l.hostDir(i)
	return NodeConfList(l.EnvFile(i), filepath.Join(dir, "cni-state"), filepath.Join(dir, "ipam"))
}

// NodeConfList is the DaemonSet's conflist for one of several nodes sharing
// this machine's file system: twill's subnetFile and dataDir and
// host-local's dataDir, which every node of a real cluster keeps at the same
// path, are set to the node's own. Everything else is as shipped.
func NodeConfList(subnetFile, stateDir, ipamDir string) ([]byte, error) {
	raw, err := deploy.KubeCNIConf()
	if err != nil {
		return nil, err
	}
	var conf map[string]any
	if err := json.Unmarshal(raw, &conf); err != nil {
		return nil, fmt.Errorf("the shipped cni-conf.json: %w", err)
	}
	plugins, _ := conf["plugins"].([]any)
	if len(plugins) == 0 {
		return nil, fmt.Errorf("the shipped cni-conf.json has no plugins")
	}
	tw, _ := plugins[0].(map[string]any)
	if tw == nil || tw["type"] != "twill" {
		return nil, fmt.Errorf("the shipped cni-conf.json does not start with twill")
	}
	tw["subnetFile"], tw["dataDir"] = subnetFile, stateDir
	ipam, _ := tw["ipam"].(map[string]any)
	if ipam == nil {
		ipam = map[string]any{}
	}
	ipam["dataDir"] = ipamDir
	tw["ipam"] = ipam
	return json.MarshalIndent(conf, "", "  ")
}

func (l *Lab) cni(i int) (*libcni.CNIConfig, *libcni.NetworkConfigList, error) {
	data, err := l.ConfList(i)
	if err != nil {
		return nil, nil, err
	}
	list, err := libcni.ConfListFromBytes(data)
	if err != nil {
		return nil, nil, err
	}
	c := libcni.NewCNIConfigWithCacheDir([]string{l.BinDir, l.CNIBinDir}, filepath.Join(l.hostDir(i), "cni-cache"), nil)
	return c, list, nil
}

// addPod creates pod j on host i.
func (l *Lab) addPod(ctx context.Context, i, j int) (Pod, error) {
	return l.addPodNamed(ctx, i, fmt.Sprintf("h%d-p%d", i, j))
}

// AddPod creates a pod named name (its container ID) on host i, adds it to
// l.Pods and saves the lab's state. Its namespace is the lab's prefix and the
// name, so `lab down` removes it.
func (l *Lab) AddPod(ctx context.Context, i int, name string) (Pod, error) {
	p, err := l.addPodNamed(ctx, i, name)
	if err != nil {
		return p, err
	}
	l.Pods = append(l.Pods, p)
	return p, l.save()
}

// addPodNamed creates a pod the way a container runtime does: a fresh
// namespace, then ADD through the CNI chain, run from inside the host's
// namespace so that the bridge and veth ends are made there.
func (l *Lab) addPodNamed(ctx context.Context, i int, name string) (Pod, error) {
	p := Pod{Name: name, Host: i, NS: l.Prefix + name}
	if _, err := IP(ctx, "netns", "add", p.NS); err != nil {
		return p, err
	}
	if _, err := IP(ctx, "-n", p.NS, "link", "set", "lo", "up"); err != nil {
		return p, err
	}
	c, list, err := l.cni(i)
	if err != nil {
		return p, err
	}
	rt := &libcni.RuntimeConf{ContainerID: p.Name, NetNS: "/run/netns/" + p.NS, IfName: "eth0"}
	var res *current.Result
	err = ns.WithNetNSPath("/run/netns/"+l.Topology().HostNS(i), func(ns.NetNS) error {
		r, err := c.AddNetworkList(ctx, list, rt)
		if err != nil {
			return err
		}
		res, err = current.NewResultFromResult(r)
		return err
	})
	if err != nil {
		return p, fmt.Errorf("CNI ADD of pod %s on h%d: %w", p.Name, i, err)
	}
	for _, ip := range res.IPs {
		a, ok := netip.AddrFromSlice(ip.Address.IP)
		switch a = a.Unmap(); {
		case !ok:
		case a.Is4():
			p.Addr = a
		default:
			p.AddrV6 = a
		}
	}
	for _, v6 := range l.Families() {
		if !p.AddrOf(v6).IsValid() {
			return p, fmt.Errorf("CNI ADD of pod %s gave no %s address (result: %v)", p.Name, subnet.FamilyName(v6), res.IPs)
		}
	}
	return p, nil
}

// delPod removes a pod through the CNI chain, then its namespace.
func (l *Lab) delPod(ctx context.Context, p Pod) error {
	c, list, err := l.cni(p.Host)
	if err != nil {
		return err
	}
	rt := &libcni.RuntimeConf{ContainerID: p.Name, NetNS: "/run/netns/" + p.NS, IfName: "eth0"}
	err = ns.WithNetNSPath("/run/netns/"+l.Topology().HostNS(p.Host), func(ns.NetNS) error {
		return c.DelNetworkList(ctx, list, rt)
	})
	if err != nil {
		return fmt.Errorf("CNI DEL of pod %s: %w", p.Name, err)
	}
	_, err = IP(ctx, "netns", "del", p.NS)
	return err
}

// GC runs the CNI chain's GC on host i with valid as the attachments that
// still exist, the way a runtime does after it lost track of some pods (a
// reboot). The runtime's cache is not consulted: whatever is not valid is
// left to the plugins' own GC.
func (l *Lab) GC(ctx context.Context, i int, valid []Pod) error {
	_, list, err := l.cni(i)
	if err != nil {
		return err
	}
	c := libcni.NewCNIConfigWithCacheDir([]string{l.BinDir, l.CNIBinDir}, filepath.Join(l.hostDir(i), "cni-cache-gc"), nil)
	args := &libcni.GCArgs{}
	for _, p := range valid {
		args.ValidAttachments = append(args.ValidAttachments, types.GCAttachment{ContainerID: p.Name, IfName: "eth0"})
	}
	return ns.WithNetNSPath("/run/netns/"+l.Topology().HostNS(i), func(ns.NetNS) error {
		return c.GCNetworkList(ctx, list, args)
	})
}
