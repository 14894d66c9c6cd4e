package plugin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/types/create"

	"github.com/twillnet/twill/subnet"
)

// About is printed by skel when the plugin runs without CNI_COMMAND.
const About = "twill CNI plugin: wires pods to the node bridge with the subnet twilld leased (delegates to bridge + host-local)"

// Plugin implements the CNI verbs. The zero value runs the real delegates
// found in CNI_PATH and prints to stdout.
type Plugin struct {
	// Exec finds and runs delegate plugins; nil means running them from
	// CNI_PATH.
	Exec Exec
	// Stdout receives the ADD result; nil means os.Stdout.
	Stdout io.Writer

	// ifInet6 reads /proc/net/if_inet6 (see settleGateway); nil means
	// the real file.
	ifInet6 func() ([]byte, error)
}

func (p *Plugin) stdout() io.Writer {
	if p.Stdout != nil {
		return p.Stdout
	}
	return os.Stdout
}

// attachment parses the configuration and checks the names of an ADD, DEL or
// CHECK before any of them touches a file.
func attachment(args *skel.CmdArgs) (*NetConf, *Store, *types.Error) {
	conf, err := ParseConf(args.StdinData)
	if err != nil {
		return nil, nil, cniError(codeBadConfig, "invalid network config", err)
	}
	if _, err := StateFileName(args.ContainerID, args.IfName); err != nil {
		return nil, nil, cniError(codeBadEnvVars, "CNI_CONTAINERID or CNI_IFNAME cannot name a state file", err)
	}
	store, err := NewStore(conf.DataDir, conf.Name)
	if err != nil {
		return nil, nil, cniError(codeBadConfig, "invalid network config", err)
	}
	return conf, store, nil
}

// delegateFor reads the env file and builds the encoded delegate configuration.
func delegateFor(conf *NetConf) ([]byte, EnvRecord, *types.Error) {
	env, cerr := loadEnv(conf.SubnetFile)
	if cerr != nil {
		return nil, EnvRecord{}, cerr
	}
	raw, cerr := encodeDelegate(conf, env)
	return raw, recordEnv(env), cerr
}

func encodeDelegate(conf *NetConf, env subnet.Env) ([]byte, *types.Error) {
	d, err := BuildDelegate(conf, env)
	if errors.As(err, new(envError)) {
		return nil, cniError(codeBadConfig, fmt.Sprintf("subnet env file %s cannot be used", conf.SubnetFile), err)
	}
	if err != nil {
		return nil, cniError(codeBadConfig, "cannot build the delegate config", err)
	}
	raw, err := marshalDelegate(d)
	if err != nil {
		return nil, cniError(codeInternal, "cannot build the delegate config", err)
	}
	return raw, nil
}

// Add saves the delegate config and runs the delegate's ADD.
//
// The delegate is started first and the state file is written while it
// runs: creating a file costs 0.2-0.4 ms on a busy disk, which then takes no
// time when a CPU is free. The order does not matter to a DEL: the runtime
// sends DEL only after ADD returned (or was killed), and a DEL that finds no
// state rebuilds the config from the env file, which is the config ADD used
// unless twilld rewrote the file within those milliseconds. A failed write
// undoes the delegate's ADD.
func (p *Plugin) Add(args *skel.CmdArgs) error {
	conf, store, cerr := attachment(args)
	if cerr != nil {
		return cerr
	}
	raw, env, cerr := delegateFor(conf)
	if cerr != nil {
		return cerr
	}
	typ, _ := delegateType(raw)
	st := &State{ContainerID: args.ContainerID, IfName: args.IfName, Env: env, Delegate: raw}

	// A state directory that cannot be made fails the ADD before the
	// delegate changes anything.
	if err := store.MakeDir(); err != nil {
		return cniError(codeIO, "cannot save state", err)
	}
	d := startDelegate(conf.DelegateTimeout, "ADD", typ, raw, p.Exec)
	if err := store.Save(st); err != nil {
		cause := cniError(codeIO, "cannot save state", err)
		if !d.started {
			return cause
		}
		_, _ = d.wait() // whatever it did, undo it
		return p.rollback(conf.DelegateTimeout, store, args, typ, raw, cause)
	}
	out, err := d.wait()
	if err != nil {
		return p.rollback(conf.DelegateTimeout, store, args, typ, raw, delegateError(typ, "ADD", err))
	}
	if cerr := p.settleGateway(env); cerr != nil {
		return p.rollback(conf.DelegateTimeout, store, args, typ, raw, cerr)
	}
	if cerr := p.printResult(out, conf.CNIVersion); cerr != nil {
		cerr.Msg = fmt.Sprintf("twill: delegate %s ADD: %s", typ, strings.TrimPrefix(cerr.Msg, "twill: "))
		return p.rollback(conf.DelegateTimeout, store, args, typ, raw, cerr)
	}
	return nil
}

// settleGateway returns once the node's IPv6 gateway can be used, so that
// the pod can use its IPv6 address as soon as ADD returns; see gateway.go.
func (p *Plugin) settleGateway(env EnvRecord) *types.Error {
	if env.IPv6Subnet == "" {
		return nil
	}
	gw, err := netip.ParsePrefix(env.IPv6Subnet)
	if err != nil {
		return cniError(codeInternal, "cannot read the IPv6 gateway", err)
	}
	read := p.ifInet6
	if read == nil {
		read = readIfInet6
	}
	ctx, cancel := context.WithTimeout(context.Background(), gatewaySettleTimeout)
	defer cancel()
	err = settleGateway(ctx, gw.Addr(), read)
	switch {
	case errors.Is(err, errGatewayTentative):
		return cniError(codeTryAgain, "the node's IPv6 gateway is not usable yet", err)
	case err != nil:
		return cniError(codeInternal, "the node's IPv6 gateway is not usable", err)
	}
	return nil
}

// printResult prints the delegate's ADD result in the version the runtime
// asked for. The delegate got the runtime's version, so its result normally
// is in that version already: it goes on as the delegate printed it, once it
// parsed as JSON. The runtime decodes it anyway; decoding it here as well
// cost 0.15 ms in a fresh process (encoding/json building its caches for the
// result types) and re-encoding it 0.08 ms. A result in another version is
// decoded and converted.
func (p *Plugin) printResult(out []byte, want string) *types.Error {
	ver, out, err := resultVersion(want, out)
	if err != nil {
		return cniError(codeInternal, "cannot read the result", err)
	}
	if ver == want {
		if _, err := p.stdout().Write(out); err != nil {
			return cniError(codeInternal, "cannot return the result", err)
		}
		return nil
	}
	result, err := create.Create(ver, out)
	if err != nil {
		return cniError(codeInternal, "cannot read the result", err)
	}
	conv, err := result.GetAsVersion(want)
	if err != nil {
		return cniError(codeInternal, "cannot convert the result", err)
	}
	if err := conv.PrintTo(p.stdout()); err != nil {
		return cniError(codeInternal, "cannot return the result", err)
	}
	return nil
}

// rollback undoes a failed ADD: the delegate's DEL, then the state. When the
// DEL fails too, the state stays so that the runtime's DEL can retry with it.
func (p *Plugin) rollback(timeout time.Duration, store *Store, args *skel.CmdArgs, typ string, raw []byte, cause *types.Error) error {
	if _, err := runDelegate(timeout, "DEL", typ, raw, p.Exec); err != nil {
		cause.Details += fmt.Sprintf(" (rollback: delegate %s DEL failed too, state kept for the runtime's DEL: %v)", typ, err)
		return cause
	}
	if err := store.Remove(args.ContainerID, args.IfName); err != nil {
		cause.Details += fmt.Sprintf(" (rollback: cannot remove state: %v)", err)
	}
	return cause
}

// Del runs the delegate's DEL with the saved config, then removes the state.
func (p *Plugin) Del(args *skel.CmdArgs) error {
	conf, store, cerr := attachment(args)
	if cerr != nil {
		return cerr
	}
	st, err := store.Load(args.ContainerID, args.IfName)
	var raw []byte
	switch {
	case err == nil:
		raw = st.Delegate
	case errors.Is(err, ErrNoState), errors.Is(err, ErrCorruptState):
		// Rebuild from the env file, so a lost or damaged record does not
		// leak the veth and the address.
		var berr *types.Error
		raw, _, berr = delegateFor(conf)
		if berr != nil {
			if errors.Is(err, ErrNoState) {
				return nil // nothing recorded, nothing to rebuild from: nothing to undo
			}
			berr.Msg += " (needed because the saved state is corrupt; the state file is kept for a retry)"
			berr.Details += "; " + err.Error()
			return berr
		}
	default:
		return cniError(codeIO, "cannot read state", err)
	}
	typ, ver, err := delegateHeader(raw)
	if err != nil {
		return cniError(codeInternal, "saved delegate config", err)
	}
	if ver != conf.CNIVersion {
		// The runtime may speak another version now than at ADD.
		if raw, err = withKeys(raw, map[string]any{"cniVersion": conf.CNIVersion}); err != nil {
			return cniError(codeInternal, "cannot prepare the delegate config", err)
		}
	}
	if _, err := runDelegate(conf.DelegateTimeout, "DEL", typ, raw, p.Exec); err != nil {
		return delegateError(typ, "DEL", err)
	}
	if err := store.Remove(args.ContainerID, args.IfName); err != nil {
		return cniError(codeIO, "cannot remove state", err)
	}
	return nil
}

// Check runs the delegate's CHECK with the saved config and prevResult, after
// making sure the node's subnet and MTU are still the ones the pod got.
func (p *Plugin) Check(args *skel.CmdArgs) error {
	conf, store, cerr := attachment(args)
	if cerr != nil {
		return cerr
	}
	st, err := store.Load(args.ContainerID, args.IfName)
	switch {
	case errors.Is(err, ErrNoState):
		return cniError(codeUnknownContainer, fmt.Sprintf("no saved state for container %s interface %s: was it added?", args.ContainerID, args.IfName), err)
	case err != nil:
		return cniError(codeIO, "cannot read state", err)
	}
	env, cerr := loadEnv(conf.SubnetFile)
	if cerr != nil {
		return cerr
	}
	// The delegate's CHECK sees the pod's addresses and routes of both
	// families against prevResult; only twill knows whether they are still
	// the node's. A record without IPv6 (an older plugin's, or an
	// IPv4-only node's) differs from an env file that has IPv6 now: the
	// pod has no IPv6 address.
	if now := recordEnv(env); now.wiring() != st.Env.wiring() {
		return cniError(codeInternal, "the node's subnet or MTU changed since the pod was added; recreate the pod",
			fmt.Errorf("added with %s; the env file now has %s", st.Env.wiring(), now.wiring()))
	}
	keys := map[string]any{"cniVersion": conf.CNIVersion}
	if conf.PrevResult != nil {
		keys["prevResult"] = conf.PrevResult
	}
	raw, err := withKeys(st.Delegate, keys)
	if err != nil {
		return cniError(codeInternal, "cannot prepare the delegate config", err)
	}
	typ, _ := delegateType(raw)
	if _, err := runDelegate(conf.DelegateTimeout, "CHECK", typ, raw, p.Exec); err != nil {
		return delegateError(typ, "CHECK", err)
	}
	return nil
}

// Status is "not available" until the env file can be read, then the
// delegate's answer.
func (p *Plugin) Status(args *skel.CmdArgs) error {
	conf, err := ParseConf(args.StdinData)
	if err != nil {
		return cniError(codeBadConfig, "invalid network config", err)
	}
	env, cerr := loadEnv(conf.SubnetFile)
	if cerr != nil {
		return types.NewError(codeNotAvailable, "twill: not ready: "+strings.TrimPrefix(cerr.Msg, "twill: "), cerr.Details)
	}
	if _, err := nodeFamilies(env); err != nil {
		// An env file no pod can be wired from is twilld's to fix, like
		// an invalid one.
		return types.NewError(codeNotAvailable, fmt.Sprintf("twill: not ready: subnet env file %s cannot be used", conf.SubnetFile), err.Error())
	}
	raw, cerr := encodeDelegate(conf, env)
	if cerr != nil {
		return cerr
	}
	typ, _ := delegateType(raw)
	if _, err := runDelegate(conf.DelegateTimeout, "STATUS", typ, raw, p.Exec); err != nil {
		return delegateError(typ, "STATUS", err)
	}
	return nil
}

// GC removes the state of attachments the runtime no longer lists and asks
// the delegate and its IPAM plugin to do the same for what they hold.
func (p *Plugin) GC(args *skel.CmdArgs) error {
	conf, err := ParseConf(args.StdinData)
	if err != nil {
		return cniError(codeBadConfig, "invalid network config", err)
	}
	if conf.ValidAttachments == nil {
		// An absent list is not an empty one: treating it as "nothing is
		// valid" would delete every pod's state and address.
		return cniError(codeBadConfig, "GC without cni.dev/valid-attachments", nil)
	}
	store, err := NewStore(conf.DataDir, conf.Name)
	if err != nil {
		return cniError(codeBadConfig, "invalid network config", err)
	}
	valid := map[[2]string]bool{}
	for _, a := range *conf.ValidAttachments {
		valid[[2]string{a.ContainerID, a.IfName}] = true
	}
	entries, err := store.Entries()
	if err != nil {
		return cniError(codeIO, "cannot list state", err)
	}
	var errs []error
	for _, e := range entries {
		if !valid[[2]string{e.ContainerID, e.IfName}] {
			if err := store.RemoveEntry(e); err != nil {
				errs = append(errs, err)
			}
		}
	}

	raw, _, cerr := delegateFor(conf)
	if cerr != nil {
		cerr.Msg += " (stale state was removed; addresses are released once the env file is back)"
		return cerr
	}
	raw, err = withKeys(raw, map[string]any{"cni.dev/valid-attachments": *conf.ValidAttachments})
	if err != nil {
		return cniError(codeInternal, "cannot prepare the delegate config", err)
	}
	typ, _ := delegateType(raw)
	if _, err := runDelegate(conf.DelegateTimeout, "GC", typ, raw, p.Exec); err != nil {
		return delegateError(typ, "GC", err)
	}
	// The reference bridge does not pass GC on to its IPAM plugin, so
	// host-local would never release the addresses of vanished pods. GC is
	// idempotent: a delegate that does forward it costs one more no-op.
	if ipamType := IPAMType; ipamType != typ {
		if _, err := runDelegate(conf.DelegateTimeout, "GC", ipamType, raw, p.Exec); err != nil {
			return delegateError(ipamType, "GC", err)
		}
	}
	if len(errs) > 0 {
		return cniError(codeIO, "cannot remove stale state", errors.Join(errs...))
	}
	return nil
}

// withKeys returns a JSON object with keys set (replaced) at the top level.
func withKeys(conf []byte, keys map[string]any) ([]byte, error) {
	var m map[string]json.RawMessage
	if err := json.Unmarshal(conf, &m); err != nil {
		return nil, err
	}
	if m == nil {
		return nil, fmt.Errorf("delegate config is not a JSON object")
	}
	for k, v := range keys {
		b, err := json.Marshal(v)
		if err != nil {
			return nil, err
		}
		m[k] = b
	}
	return json.Marshal(m)
}
