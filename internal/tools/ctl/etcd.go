package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/twillnet/twill/subnet"
	"github.com/twillnet/twill/subnet/etcd"
)

// etcdFlags are the datastore flags, the same as twilld's.
type etcdFlags struct {
	endpoints string
	prefix    string
	timeout   time.Duration
	opts      etcd.ClientOptions
}

func addEtcdFlags(fs *flag.FlagSet) *etcdFlags {
	f := &etcdFlags{}
	def := os.Getenv("TWILL_ETCD_ENDPOINTS")
	if def == "" {
		def = "http://127.0.0.1:2379"
	}
	fs.StringVar(&f.endpoints, "etcd-endpoints", def, "comma-separated etcd client URLs ($TWILL_ETCD_ENDPOINTS)")
	fs.DurationVar(&f.timeout, "timeout", 5*time.Second, "how long to wait for etcd")
	fs.StringVar(&f.prefix, "etcd-prefix", etcd.DefaultPrefix, "etcd key prefix of the network")
	fs.StringVar(&f.opts.CAFile, "etcd-cafile", "", "CA bundle to verify etcd's server certificate")
	fs.StringVar(&f.opts.CertFile, "etcd-certfile", "", "client certificate for etcd")
	fs.StringVar(&f.opts.KeyFile, "etcd-keyfile", "", "client key for etcd")
	fs.StringVar(&f.opts.Username, "etcd-username", "", "etcd user name")
	fs.StringVar(&f.opts.Password, "etcd-password", "", "etcd password (or ETCD_PASSWORD in the environment)")
	return f
}

// connect opens a client; requests are bounded so an unreachable etcd gives
// an error rather than a hang.
func (f *etcdFlags) connect(ctx context.Context, errOut io.Writer) (*etcd.Registry, func(), context.Context, error) {
	f.opts.Endpoints = strings.Split(f.endpoints, ",")
	if f.opts.Password == "" {
		f.opts.Password = os.Getenv("ETCD_PASSWORD")
	}
	cli, err := etcd.NewClient(f.opts)
	if err != nil {
		return nil, nil, nil, err
	}
	rctx, cancel := context.WithTimeout(ctx, f.timeout)
	closeAll := func() { cancel(); cli.Close() }
	return etcd.NewRegistry(cli, f.prefix, logger(errOut)), closeAll, rctx, nil
}

// explain turns a timeout into the likely cause.
func (f *etcdFlags) explain(err error) error {
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("no answer from etcd at %s within %s; is it running and reachable? (%w)", f.endpoints, f.timeout, err)
	}
	return err
}

func configGet(ctx context.Context, args []string, out, errOut io.Writer) error {
	fs := newFlagSet("config get", errOut)
	ef := addEtcdFlags(fs)
	if err := parseNoArgs(fs, args); err != nil {
		return err
	}
	reg, done, rctx, err := ef.connect(ctx, errOut)
	if err != nil {
		return err
	}
	defer done()
	raw, err := reg.RawConfig(rctx)
	if err != nil {
		return ef.explain(err)
	}
	out.Write(raw)
	if len(raw) > 0 && raw[len(raw)-1] != '\n' {
		fmt.Fprintln(out)
	}
	if _, err := subnet.ParseConfig(raw); err != nil {
		return fmt.Errorf("the stored config is invalid: %w", err)
	}
	return nil
}

func configSet(ctx context.Context, args []string, out, errOut io.Writer) error {
	fs := newFlagSet("config set", errOut)
	ef := addEtcdFlags(fs)
	file := fs.String("file", "", "net-conf.json to store (- for stdin)")
	if err := parseNoArgs(fs, args); err != nil {
		return err
	}
	if *file == "" {
		return errors.New("config set: --file is required")
	}
	var data []byte
	var err error
	if *file == "-" {
		data, err = io.ReadAll(io.LimitReader(os.Stdin, 1<<20))
	} else {
		data, err = os.ReadFile(*file)
	}
	if err != nil {
		return fmt.Errorf("config set: %w", err)
	}
	// Validate before connecting, so a bad file never needs etcd to be refused.
	if _, err := subnet.ParseConfig(data); err != nil {
		return fmt.Errorf("config set: %s: %w (nothing was written)", *file, err)
	}
	reg, done, rctx, err := ef.connect(ctx, errOut)
	if err != nil {
		return err
	}
	defer done()
	cfg, err := reg.SetConfig(rctx, data)
	if err != nil {
		return ef.explain(err)
	}
	rules := "iptables where installed, else nftables"
	if cfg.EnableNFTables != nil {
		rules = map[bool]string{false: "iptables", true: "nftables"}[*cfg.EnableNFTables]
	}
	fmt.Fprintf(out, "stored network config at %s: network %s, /%d subnets, backend %s, rules %s\n", reg.ConfigKey(), cfg.Network, cfg.SubnetLen, cfg.Backend.Type, rules)
	return nil
}

// leaseView is the JSON form of a lease in twillctl's output.
type leaseView struct {
	Subnet        string          `json:"subnet"`
	IPv6Subnet    string          `json:"ipv6Subnet,omitempty"`
	PublicIP      string          `json:"publicIP"`
	PublicIPv6    string          `json:"publicIPv6,omitempty"`
	BackendType   string          `json:"backendType"`
	BackendData   json.RawMessage `json:"backendData,omitempty"`
	BackendV6Data json.RawMessage `json:"backendV6Data,omitempty"`
	NodeName      string          `json:"nodeName,omitempty"`
	Key           string          `json:"key"`
	ExpiresIn     string          `json:"expiresIn,omitempty"`
	TTLSeconds    int64           `json:"ttlSeconds,omitempty"`
}

func view(ctx context.Context, cli *clientv3.Client, l etcd.StoredLease) leaseView {
	v := leaseView{Subnet: l.Subnet.String(), PublicIP: l.Attrs.PublicIP.String(), BackendType: l.Attrs.BackendType,
		BackendData: l.Attrs.BackendData, BackendV6Data: l.Attrs.BackendV6Data, NodeName: l.Attrs.NodeName, Key: l.Key}
	if l.IPv6Subnet.IsValid() {
		v.IPv6Subnet = l.IPv6Subnet.String()
	}
	if l.Attrs.PublicIPv6.IsValid() {
		v.PublicIPv6 = l.Attrs.PublicIPv6.String()
	}
	if l.EtcdLease != clientv3.NoLease && cli != nil {
		if ttl, err := cli.TimeToLive(ctx, l.EtcdLease); err == nil && ttl.TTL > 0 {
			v.TTLSeconds = ttl.TTL
			v.ExpiresIn = (time.Duration(ttl.TTL) * time.Second).String()
		}
	}
	return v
}

func leasesList(ctx context.Context, args []string, out, errOut io.Writer) error {
	fs := newFlagSet("leases list", errOut)
	ef := addEtcdFlags(fs)
	format := fs.String("o", "table", "output format: table or json")
	if err := parseNoArgs(fs, args); err != nil {
		return err
	}
	if *format != "table" && *format != "json" {
		return fmt.Errorf("leases list: -o %q: want table or json", *format)
	}
	reg, done, rctx, err := ef.connect(ctx, errOut)
	if err != nil {
		return err
	}
	defer done()
	leases, _, err := reg.Leases(rctx)
	if err != nil {
		return ef.explain(err)
	}
	sort.Slice(leases, func(i, j int) bool { return leases[i].Subnet.Addr().Less(leases[j].Subnet.Addr()) })
	views := make([]leaseView, len(leases))
	for i, l := range leases {
		views[i] = view(rctx, reg.Client(), l)
	}
	if *format == "json" {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(views)
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SUBNET\tPUBLIC-IP\tBACKEND\tBACKEND-DATA\tNODE\tEXPIRES-IN")
	for _, v := range views {
		sn, ip := v.Subnet, v.PublicIP
		if v.IPv6Subnet != "" { // a dual-stack lease (flannel's): both families
			sn += "," + v.IPv6Subnet
		}
		if v.PublicIPv6 != "" {
			ip += "," + v.PublicIPv6
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", sn, ip, v.BackendType, summary(v.BackendData), dash(v.NodeName), dash(v.ExpiresIn))
	}
	return tw.Flush()
}

func leasesShow(ctx context.Context, args []string, out, errOut io.Writer) error {
	return withLease(ctx, "leases show", args, errOut, func(rctx context.Context, reg *etcd.Registry, p netip.Prefix) error {
		l, err := reg.Lease(rctx, p)
		if err != nil {
			return err
		}
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(view(rctx, reg.Client(), *l))
	})
}

func leasesDelete(ctx context.Context, args []string, out, errOut io.Writer) error {
	return withLease(ctx, "leases delete", args, errOut, func(rctx context.Context, reg *etcd.Registry, p netip.Prefix) error {
		if err := reg.DeleteLease(rctx, p); err != nil {
			return err
		}
		fmt.Fprintf(out, "deleted lease %s\n", p)
		return nil
	})
}

// withLease parses the etcd flags and a SUBNET argument, connects, and runs f.
func withLease(ctx context.Context, name string, args []string, errOut io.Writer, f func(context.Context, *etcd.Registry, netip.Prefix) error) error {
	fs := newFlagSet(name, errOut)
	ef := addEtcdFlags(fs)
	p, err := parseSubnetArg(fs, args)
	if err != nil {
		return err
	}
	reg, done, rctx, err := ef.connect(ctx, errOut)
	if err != nil {
		return err
	}
	defer done()
	return ef.explain(f(rctx, reg, p))
}

func parseNoArgs(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%s: unexpected arguments: %s", fs.Name(), strings.Join(fs.Args(), " "))
	}
	return nil
}

// parseSubnetArg accepts the subnet before or after the flags.
func parseSubnetArg(fs *flag.FlagSet, args []string) (p netip.Prefix, err error) {
	var pos []string
	for len(args) > 0 {
		if err := fs.Parse(args); err != nil {
			return p, err
		}
		if fs.NArg() == 0 {
			break
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
	if len(pos) != 1 {
		return p, fmt.Errorf("%s: want one SUBNET (e.g. 10.244.7.0/24)", fs.Name())
	}
	return subnet.ParseKeyName(pos[0])
}

// summary shortens backend data for the table: {"VtepMAC":"..."} -> VtepMAC=...
func summary(data json.RawMessage) string {
	var m map[string]any
	if len(data) == 0 || json.Unmarshal(data, &m) != nil || len(m) == 0 {
		return "-"
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%v", k, m[k])
	}
	return strings.Join(parts, ",")
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
