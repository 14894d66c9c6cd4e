package bench

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/twillnet/twill/backend/dataplane"
	"github.com/twillnet/twill/backend/vxlan"
	"github.com/twillnet/twill/internal/tools/lab"
	"github.com/twillnet/twill/subnet"
	"github.com/twillnet/twill/subnet/etcd"
)

// etcdServer is the real etcd (bin/tools/etcd) serving in the underlay
// namespace, with its Prometheus metrics on a port of their own.
type etcdServer struct {
	proc       *Proc
	netns      string
	url        string
	metricsURL string
	cli        *clientv3.Client
	reg        *etcd.Registry
}

const etcdMetricsPort = 2381

func startEtcd(ctx context.Context, bin, netns, dir string) (*etcdServer, error) {
	host := lab.WorldAddr.String()
	url := "http://" + net.JoinHostPort(host, strconv.Itoa(lab.EtcdPort))
	murl := "http://" + net.JoinHostPort(host, strconv.Itoa(etcdMetricsPort))
	p, err := startInNS(netns, filepath.Join(dir, "etcd.log"), bin,
		"--name", "bench", "--data-dir", filepath.Join(dir, "etcd"),
		"--listen-client-urls", url, "--advertise-client-urls", url,
		"--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
		"--initial-cluster", "bench=http://127.0.0.1:2380",
		"--listen-metrics-urls", murl, "--log-level", "warn")
	if err != nil {
		return nil, err
	}
	e := &etcdServer{proc: p, netns: netns, url: url, metricsURL: murl + "/metrics"}
	e.cli, err = clientv3.New(clientv3.Config{
		Endpoints:   []string{url},
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
		DialOptions: []grpc.DialOption{grpc.WithContextDialer(nsDialer(netns))},
	})
	if err != nil {
		p.Stop()
		return nil, fmt.Errorf("etcd client: %w", err)
	}
	e.reg = etcd.NewRegistry(e.cli, etcd.DefaultPrefix, nil)
	err = lab.Poll(ctx, 30*time.Second, 50*time.Millisecond, "etcd to serve", func() error {
		if p.Exited() {
			return fmt.Errorf("etcd exited (see %s)", p.Log)
		}
		rctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		_, err := e.cli.Get(rctx, "/health-probe")
		return err
	})
	if err != nil {
		e.close()
		return nil, err
	}
	return e, nil
}

func (e *etcdServer) close() {
	if e.cli != nil {
		e.cli.Close()
	}
	e.proc.Stop()
}

// metrics scrapes etcd's own /metrics.
func (e *etcdServer) metrics(ctx context.Context) ([]promSample, error) {
	body, err := nsHTTPGet(ctx, e.netns, e.metricsURL)
	if err != nil {
		return nil, err
	}
	return parseProm(body), nil
}

// benchNetwork is the network of the etcd-mode figures: room for 65,536 /24
// subnets. twilld picks its own from the start of it; fake peers come from
// 10.64.0.0 on, the peers added while measuring change latency from 10.200.0.0 on.
var benchNetwork = netip.MustParsePrefix("10.0.0.0/8")

// benchNetworkV6 is the IPv6 network of the dual-stack figure: room for
// 65,536 /64 subnets, numbered as the IPv4 ones (peer 10.64.1.0/24 has
// fd00:10:0:4001::/64).
var benchNetworkV6 = netip.MustParsePrefix("fd00:10::/48")

// setConfig writes the network config: IPv4 only, or dual-stack; with
// "EnableNFTables" set to *nftables, or without the key when nftables is nil
// (twilld then keeps its --ip-masq rules with iptables when the program is
// installed); with the backend ("" for vxlan).
func (e *etcdServer) setConfig(ctx context.Context, dual bool, nftables *bool, backend string) error {
	if backend == "" {
		backend = subnet.BackendVXLAN
	}
	conf := map[string]any{"Network": benchNetwork.String(), "SubnetLen": 24, "Backend": map[string]string{"Type": backend}}
	if dual {
		conf["EnableIPv6"], conf["IPv6Network"], conf["IPv6SubnetLen"] = true, benchNetworkV6.String(), 64
	}
	if nftables != nil {
		conf["EnableNFTables"] = *nftables
	}
	data, err := json.Marshal(conf)
	if err != nil {
		return err
	}
	_, err = e.reg.SetConfig(ctx, data)
	return err
}

// fakePeer is a peer lease that exists only in etcd: nothing answers at its
// public IPs and no traffic is ever sent there. The IPv6 fields are used
// only in a dual-stack network, WGKey only with the wireguard backend.
type fakePeer struct {
	Subnet   netip.Prefix
	PublicIP netip.Addr
	MAC      dataplane.MAC
	// WGKey is the peer's WireGuard public key, in base64: 32 bytes of a
	// hash of the peer's number, distinct per peer. Any 32 bytes are a
	// Curve25519 public key to WireGuard; no private key exists for them,
	// which does not matter since no handshake is ever attempted.
	WGKey string

	IPv6Subnet netip.Prefix
	PublicIPv6 netip.Addr
	MACv6      dataplane.MAC // of the peer's twill-v6 device
}

// peerAt returns fake peer i (0 <= i < 65536) of a series: series 0 are the
// peers present before twilld starts, series 1 those added while measuring.
// Subnets, public IPs and MACs are all distinct, across families too.
func peerAt(series, i int) fakePeer {
	n := i + 1
	base := byte(64)
	if series == 1 {
		base = 200
	}
	v6 := benchNetworkV6.Addr().As16()
	v6[6], v6[7] = base+byte(i>>8), byte(i)
	return fakePeer{
		Subnet:   netip.PrefixFrom(netip.AddrFrom4([4]byte{10, base + byte(i>>8), byte(i), 0}), 24),
		PublicIP: netip.AddrFrom4([4]byte{198, 19 + byte(series), byte(n >> 8), byte(n)}),
		MAC:      dataplane.MAC{0x02, 0x62, byte(series), 0, byte(n >> 8), byte(n)},
		WGKey:    fakeWGKey(series, i),

		IPv6Subnet: netip.PrefixFrom(netip.AddrFrom16(v6), 64),
		PublicIPv6: netip.AddrFrom16([16]byte{0xfd, 0, 0x01, 0x98, 0, 0x19 + byte(series), 14: byte(n >> 8), 15: byte(n)}),
		MACv6:      dataplane.MAC{0x02, 0x66, byte(series), 0, byte(n >> 8), byte(n)},
	}
}

// key is the peer's lease key: one key for both subnets of a dual-stack
// lease, as twilld (and flannel) write it.
func (p fakePeer) key(reg *etcd.Registry, dual bool) string {
	if !dual {
		return reg.SubnetKey(p.Subnet)
	}
	return reg.SubnetsPrefix() + subnet.LeaseKeyName(p.Subnet, p.IPv6Subnet)
}

// value is the lease value twilld on that peer would have written, with
// the vxlan backend.
func (p fakePeer) value(dual bool) string { return p.valueFor(subnet.BackendVXLAN, dual) }

// valueFor is the peer's lease value with backend: vxlan's
// {"VNI":1,"VtepMAC":"..."}, or wireguard's {"PublicKey":"...","Port":51820}
// (flannel's form, as backend/wireguard writes it; IPv4 only here).
func (p fakePeer) valueFor(backend string, dual bool) string {
	if backend == "" {
		backend = subnet.BackendVXLAN
	}
	data, _ := json.Marshal(vxlan.Data{VNI: 1, VtepMAC: p.MAC})
	if backend == subnet.BackendWireGuard {
		data, _ = json.Marshal(map[string]any{"PublicKey": p.WGKey, "Port": subnet.DefaultWireGuardPort})
	}
	a := subnet.LeaseAttrs{PublicIP: p.PublicIP, BackendType: backend, BackendData: data,
		NodeName: "fake-" + p.Subnet.Addr().String()}
	if dual {
		a.PublicIPv6 = p.PublicIPv6
		a.BackendV6Data, _ = json.Marshal(vxlan.Data{VNI: 1, VtepMAC: p.MACv6})
	}
	v, _ := json.Marshal(a)
	return string(v)
}

// fakeWGKey is fake peer i's WireGuard public key (see fakePeer.WGKey).
func fakeWGKey(series, i int) string {
	sum := sha256.Sum256(fmt.Appendf(nil, "twbench peer %d/%d", series, i))
	return base64.StdEncoding.EncodeToString(sum[:])
}

// putPeers writes peers [from, to) of series 0, IPv4-only or dual-stack,
// with backend's lease data ("" for vxlan), 128 per transaction (etcd's
// default limit of operations in one transaction).
func (e *etcdServer) putPeers(ctx context.Context, from, to int, dual bool, backend string) error {
	for start := from; start < to; start += 128 {
		var ops []clientv3.Op
		for i := start; i < min(start+128, to); i++ {
			p := peerAt(0, i)
			ops = append(ops, clientv3.OpPut(p.key(e.reg, dual), p.valueFor(backend, dual)))
		}
		if _, err := e.cli.Txn(ctx).Then(ops...).Commit(); err != nil {
			return fmt.Errorf("write fake peers %d..%d: %w", start, start+len(ops), err)
		}
	}
	return nil
}

// deletePeers removes peers [from, to) of series 0.
func (e *etcdServer) deletePeers(ctx context.Context, from, to int, dual bool) error {
	for start := from; start < to; start += 128 {
		var ops []clientv3.Op
		for i := start; i < min(start+128, to); i++ {
			ops = append(ops, clientv3.OpDelete(peerAt(0, i).key(e.reg, dual)))
		}
		if _, err := e.cli.Txn(ctx).Then(ops...).Commit(); err != nil {
			return fmt.Errorf("delete fake peers: %w", err)
		}
	}
	return nil
}
