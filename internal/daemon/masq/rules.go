package masq

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os/exec"
)

// Keeper keeps twill's masquerade and forward rules for every family of a
// network, in one mode: *IPTablesRules or *NFTables.
type Keeper interface {
	// Ensure makes the kernel hold the rules for cfgs (one Config per
	// family of the network) and writes nothing when it already does.
	Ensure(ctx context.Context, cfgs []Config) error
	// Writes counts what Ensure wrote for the rules of a family (IPv6 when
	// v6) since the Keeper was made.
	Writes(v6 bool) uint64
}

// Mode is how twill writes its rules.
type Mode string

const (
	ModeIPTables Mode = "iptables" // the iptables and ip6tables programs
	ModeNFTables Mode = "nftables" // nf_tables through netlink
)

// ChooseMode returns the mode for the network config's EnableNFTables and
// the network's families (false for IPv4, true for IPv6), and why, for the
// log: nftables when EnableNFTables is true, iptables when it is false, and
// when it is not set, iptables if the programs of every family are found
// by lookPath (exec.LookPath) and nftables if not.
func ChooseMode(enableNFTables *bool, families []bool, lookPath func(string) (string, error)) (Mode, string) {
	if enableNFTables != nil {
		if *enableNFTables {
			return ModeNFTables, "EnableNFTables is true in the network config"
		}
		return ModeIPTables, "EnableNFTables is false in the network config"
	}
	for _, v6 := range families {
		if _, err := lookPath(iptablesProgram(v6)); err != nil {
			return ModeNFTables, "EnableNFTables is not set and " + iptablesProgram(v6) + " is not installed"
		}
	}
	return ModeIPTables, "EnableNFTables is not set and iptables is installed"
}

func iptablesProgram(v6 bool) string {
	if v6 {
		return "ip6tables"
	}
	return "iptables"
}

// NewKeeper returns the Keeper of a mode for a network of the given
// families.
func NewKeeper(mode Mode, families []bool, log *slog.Logger) (Keeper, error) {
	switch mode {
	case ModeNFTables:
		return NewNFTables(log)
	case ModeIPTables:
		var ipt [2]IPTables
		for _, v6 := range families {
			h, err := NewIPTables(v6)
			if err != nil {
				if _, lerr := exec.LookPath(iptablesProgram(v6)); lerr != nil {
					err = fmt.Errorf("%w (set EnableNFTables to true in the network config to use nftables)", err)
				}
				return nil, err
			}
			ipt[familyIndex(v6)] = h
		}
		return NewIPTablesRules(ipt[0], ipt[1], log), nil
	}
	return nil, fmt.Errorf("masq: unknown mode %q", mode)
}

// IPTablesRules keeps one Manager per family: iptables' chains for IPv4,
// ip6tables' for IPv6.
type IPTablesRules struct {
	log *slog.Logger
	ipt [2]IPTables
	m   [2]*Manager
	// retired are the writes of Managers replaced after a subnet change,
	// so that Writes never goes backwards.
	retired [2]uint64
}

// NewIPTablesRules returns IPTablesRules on the given handles, nil for a
// family the network has not.
func NewIPTablesRules(ipv4, ipv6 IPTables, log *slog.Logger) *IPTablesRules {
	return &IPTablesRules{log: log, ipt: [2]IPTables{ipv4, ipv6}}
}

// Ensure runs each family's Manager, making a new one when the family's
// Config changed.
func (r *IPTablesRules) Ensure(ctx context.Context, cfgs []Config) error {
	if err := checkConfigs(cfgs); err != nil {
		return err
	}
	var errs []error
	for _, cfg := range cfgs {
		i := familyIndex(cfg.Network.Addr().Is6())
		if r.ipt[i] == nil {
			return fmt.Errorf("masq: no %s handle for network %s", iptablesProgram(i == 1), cfg.Network)
		}
		if m := r.m[i]; m == nil || m.cfg != cfg {
			n, err := New(r.ipt[i], cfg, r.log)
			if err != nil {
				return err
			}
			if m != nil {
				r.retired[i] += m.Writes()
			}
			r.m[i] = n
		}
		if err := r.m[i].Ensure(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Writes counts the chain rewrites and jump insertions of the family.
func (r *IPTablesRules) Writes(v6 bool) uint64 {
	i := familyIndex(v6)
	if r.m[i] == nil {
		return r.retired[i]
	}
	return r.retired[i] + r.m[i].Writes()
}
