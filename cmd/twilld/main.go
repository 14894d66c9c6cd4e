// twilld is twill's node daemon: it leases the node's pod subnet, programs the
// datapath to every peer and writes the subnet env file for the CNI plugin.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/twillnet/twill/backend/wireguard"
	"github.com/twillnet/twill/internal/daemon"
	"github.com/twillnet/twill/internal/version"
	"github.com/twillnet/twill/subnet"
	"github.com/twillnet/twill/subnet/etcd"
	"github.com/twillnet/twill/subnet/kube"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "twilld:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("twilld", flag.ContinueOnError)
	var (
		c          daemon.Config
		endpoints  = fs.String("etcd-endpoints", "http://127.0.0.1:2379", "comma-separated etcd client URLs")
		publicIP   = fs.String("public-ip", "", "IPv4 address peers use to reach this node (default: the interface's)")
		publicIPv6 = fs.String("public-ipv6", "", "IPv6 address peers use to reach this node when the network has IPv6 (default: the interface's)")
		peerCIDRs  = fs.String("public-ip-cidr", "", "comma-separated CIDRs (IPv4, and IPv6 for a network with IPv6); when set, peer leases whose public IP is outside them are skipped")
		logLevel   = fs.String("log-level", "info", "debug, info, warn or error")
		showVer    = fs.Bool("version", false, "print the version and exit")
		cleanup    = fs.Bool("cleanup", false, "remove twill's devices, routes, iptables chains and nftables table from this node, then exit")
	)
	fs.StringVar(&c.EtcdPrefix, "etcd-prefix", etcd.DefaultPrefix, "etcd key prefix of the network")
	fs.StringVar(&c.Etcd.CAFile, "etcd-cafile", "", "CA bundle to verify etcd's server certificate")
	fs.StringVar(&c.Etcd.CertFile, "etcd-certfile", "", "client certificate for etcd")
	fs.StringVar(&c.Etcd.KeyFile, "etcd-keyfile", "", "client key for etcd")
	fs.StringVar(&c.Etcd.Username, "etcd-username", "", "etcd user name")
	fs.StringVar(&c.Etcd.Password, "etcd-password", "", "etcd password (or ETCD_PASSWORD in the environment)")
	fs.Func("iface", "interface for peer traffic: a name, or an IPv4 or IPv6 address of it; repeat it to try each in order, the first that exists with an address of every family of the network wins (default: the default route's)", func(s string) error {
		c.Iface.Names = append(c.Iface.Names, s)
		return nil
	})
	fs.Func("iface-regex", "regular expression matched against every interface's addresses, then names; repeatable, tried in order after every --iface", func(s string) error {
		re, err := regexp.Compile(s)
		if err != nil {
			return fmt.Errorf("not a regular expression: %w", err)
		}
		c.Iface.Regexes = append(c.Iface.Regexes, re)
		return nil
	})
	fs.Func("iface-can-reach", "an address: the interface the kernel routes it through is used (ip route get), tried after --iface and --iface-regex", func(s string) error {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return fmt.Errorf("not an IP address: %q", s)
		}
		c.Iface.CanReach = a.Unmap()
		return nil
	})
	fs.StringVar(&c.SubnetFile, "subnet-file", subnet.DefaultEnvFile, "where to write the subnet env file")
	fs.StringVar(&c.FlannelSubnetFile, "flannel-subnet-file", "", "also write the subnet env file in flannel's format (FLANNEL_ keys) here, e.g. /run/flannel/subnet.env while flannel's CNI plugin is still installed")
	fs.BoolVar(&c.IPMasq, "ip-masq", false, "masquerade pod traffic leaving the cluster network")
	fs.StringVar(&c.WireGuardKeyFile, "wireguard-key-file", wireguard.DefaultKeyFile, "wireguard backend: the node's private key, made (mode 0600) when missing; under /run it lasts until a reboot")
	fs.DurationVar(&c.LeaseTTL, "lease-ttl", 24*time.Hour, "TTL of the subnet lease; renewed while twilld runs")
	fs.DurationVar(&c.ResyncInterval, "resync-interval", 10*time.Second, "how often the datapath is checked against the desired state")
	fs.StringVar(&c.HTTPAddr, "http-addr", "127.0.0.1:9867", "address serving /healthz, /readyz and /metrics")
	fs.StringVar(&c.SecureMetricsAddr, "secure-metrics-addr", "", "also serve /metrics here (e.g. :9868), over TLS, to bearer tokens the Kubernetes API server accepts and allows to get /metrics (TokenReview, SubjectAccessReview): for a Prometheus in the cluster. Off when empty")
	fs.StringVar(&c.SecureMetricsCertFile, "secure-metrics-cert-file", "", "TLS certificate of --secure-metrics-addr (default: a self-signed one made at start)")
	fs.StringVar(&c.SecureMetricsKeyFile, "secure-metrics-key-file", "", "its private key")
	fs.BoolVar(&c.ReleaseOnExit, "release-on-exit", false, "release the lease on shutdown (for nodes being decommissioned)")
	fs.BoolVar(&c.KubeSubnetMgr, "kube-subnet-mgr", false, "take the subnet from the Kubernetes Node's podCIDR instead of etcd")
	fs.StringVar(&c.Kubeconfig, "kubeconfig", "", "kubeconfig file (default: the in-cluster config)")
	fs.StringVar(&c.NetConfig, "net-config", "/etc/twill/net-conf.json", "network config file, in Kubernetes mode")
	fs.Func("kube-mode", "in Kubernetes mode, where nodes publish their leases: nodenetwork (the default: a NodeNetwork record per node; each twilld watches the records and its own Node) or annotations (Node annotations, as flannel; each twilld watches every Node, and keeps its record too where it may)", func(s string) error {
		c.KubeMode = kube.Mode(s)
		return nil
	})
	fs.StringVar(&c.KubeAnnotationPrefix, "kube-annotation-prefix", "twill.io", "prefix of twill's Node annotations (--kube-mode=annotations; the overwrite and node-public-ip annotations in both modes)")
	fs.BoolVar(&c.SetNodeCondition, "set-node-condition", true, "in Kubernetes mode, set the Node's NetworkUnavailable condition to False once the datapath is up")
	fs.StringVar(&c.NodeName, "node-name", os.Getenv("NODE_NAME"), "node name stored with the lease, for operators (default: $NODE_NAME or the host name)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	if *showVer {
		fmt.Println("twilld", version.Version)
		return nil
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
	c.Etcd.Endpoints = strings.Split(*endpoints, ",")
	if c.Etcd.Password == "" {
		c.Etcd.Password = os.Getenv("ETCD_PASSWORD")
	}
	for _, f := range []struct {
		name, val string
		v6        bool
		to        *netip.Addr
	}{{"--public-ip", *publicIP, false, &c.PublicIP}, {"--public-ipv6", *publicIPv6, true, &c.PublicIPv6}} {
		if f.val == "" {
			continue
		}
		ip, err := netip.ParseAddr(f.val)
		if err == nil {
			err = subnet.CheckPublicIP(ip, f.v6)
		}
		if err != nil {
			return fmt.Errorf("%s: %q: %v", f.name, f.val, err)
		}
		*f.to = ip
	}
	for _, f := range strings.Split(*peerCIDRs, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil || p.Addr().Is4In6() || p.Masked() != p {
			return fmt.Errorf("--public-ip-cidr: %q is not a network such as 192.168.0.0/16 or fd00:198:18::/64", f)
		}
		c.PeerPublicIPs = append(c.PeerPublicIPs, p)
	}
	if c.NodeName == "" {
		c.NodeName, _ = os.Hostname()
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	if *cleanup {
		return daemon.Cleanup(ctx, log)
	}
	log.Info("starting twilld", "version", version.Version)
	return daemon.Run(ctx, c, log)
}
