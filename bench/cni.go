package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containernetworking/cni/libcni"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/twillnet/twill/plugin"
	"github.com/twillnet/twill/subnet"
)

// cniMode is one side of figure 4: a host namespace, a plugin configuration
// and libcni's cache.
type cniMode struct {
	name   string
	hostNS string
	conf   *libcni.PluginConfig
	cni    *libcni.CNIConfig
}

const (
	phaseAddSerial = "ADD one by one"
	phaseDelSerial = "DEL one by one"
	phaseAddPar    = "ADD, 10 in parallel"
	phaseDelPar    = "DEL, 10 in parallel"
)

// runCNI is figure 4. The reference configuration is the very delegate
// configuration twill builds from the env file (plugin.BuildDelegate): same
// bridge name, subnet, gateway, routes, MTU and ipMasq; only host-local's
// store folder differs. Each side has a host namespace of its own and
// the sides alternate between rounds, so drift on the machine hits both.
func (h *Harness) runCNI(ctx context.Context, sec *Section) error {
	dir := filepath.Join(h.work, "cni")
	env := subnet.Env{Network: netip.MustParsePrefix("10.244.0.0/16"), Subnet: netip.MustParsePrefix("10.244.7.1/24"), MTU: 1450, IPMasq: true}
	envFile := filepath.Join(dir, "subnet.env")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := subnet.WriteEnv(envFile, env); err != nil {
		return err
	}
	twillConf, err := json.Marshal(map[string]any{
		"cniVersion": "1.1.0", "name": "twbench", "type": "twill",
		"subnetFile": envFile, "dataDir": filepath.Join(dir, "twill-state"),
		"delegate": map[string]any{"bridge": "cni0"},
		"ipam":     map[string]any{"dataDir": filepath.Join(dir, "ipam-twill")},
	})
	if err != nil {
		return err
	}
	refConf, err := referenceConf(twillConf, env, filepath.Join(dir, "ipam-ref"))
	if err != nil {
		return err
	}
	path := []string{h.cfg.BinDir, h.cfg.CNIDir}
	var modes []*cniMode
	for _, m := range []struct {
		name, ns string
		conf     []byte
	}{{"twill", "cni-t", twillConf}, {"bridge+host-local", "cni-r", refConf}} {
		c, err := libcni.NetworkPluginConfFromBytes(m.conf)
		if err != nil {
			return fmt.Errorf("%s config: %w", m.name, err)
		}
		mode := &cniMode{name: m.name, hostNS: h.cfg.Prefix + m.ns, conf: c,
			cni: libcni.NewCNIConfigWithCacheDir(path, filepath.Join(dir, "cache-"+m.ns), nil)}
		if _, err := ipCmd(ctx, "netns", "add", mode.hostNS); err != nil {
			return err
		}
		defer ipCmd(context.Background(), "netns", "del", mode.hostNS)
		if _, err := ipCmd(ctx, "-n", mode.hostNS, "link", "set", "lo", "up"); err != nil {
			return err
		}
		modes = append(modes, mode)
	}
	pods := make([]string, h.cfg.CNIPods)
	for i := range pods {
		pods[i] = fmt.Sprintf("%sp%03d", h.cfg.Prefix, i+1)
		if _, err := ipCmd(ctx, "netns", "add", pods[i]); err != nil {
			return err
		}
		defer ipCmd(context.Background(), "netns", "del", pods[i])
	}
	samples := map[string]map[string][]time.Duration{}
	walls := map[string]map[string][]time.Duration{}
	for _, m := range modes {
		samples[m.name], walls[m.name] = map[string][]time.Duration{}, map[string][]time.Duration{}
	}
	for round := range h.cfg.CNIRounds {
		order := modes
		if round%2 == 1 {
			order = []*cniMode{modes[1], modes[0]}
		}
		for _, m := range order {
			for _, ph := range []struct {
				name     string
				add      bool
				parallel int
			}{{phaseAddSerial, true, 1}, {phaseDelSerial, false, 1}, {phaseAddPar, true, h.cfg.CNIParallel}, {phaseDelPar, false, h.cfg.CNIParallel}} {
				ds, wall, err := m.many(ctx, pods, ph.add, ph.parallel)
				if err != nil {
					m.delAll(pods)
					return fmt.Errorf("%s, %s: %w", m.name, ph.name, err)
				}
				samples[m.name][ph.name] = append(samples[m.name][ph.name], ds...)
				walls[m.name][ph.name] = append(walls[m.name][ph.name], wall)
			}
			h.say("  round %d, %s: ADD median %.1f ms, DEL median %.1f ms (one by one)", round+1, m.name,
				Summarize(millis(samples[m.name][phaseAddSerial])).Median, Summarize(millis(samples[m.name][phaseDelSerial])).Median)
		}
	}
	tw, ref := modes[0].name, modes[1].name
	for _, ph := range []string{phaseAddSerial, phaseDelSerial, phaseAddPar, phaseDelPar} {
		h.add(sec, &Figure{Name: fmt.Sprintf("%d pods: %s, per operation", h.cfg.CNIPods, ph), Unit: "ms",
			Stats: Summarize(millis(samples[tw][ph])), Limit: &Limit{Name: "bridge+host-local", Stats: Summarize(millis(samples[ref][ph]))},
			Targets: []Target{{"ratio", "<=", 1.10}}})
	}
	for _, ph := range []string{phaseAddPar, phaseDelPar} {
		h.add(sec, &Figure{Name: fmt.Sprintf("%d pods: %s, wall time for all", h.cfg.CNIPods, ph), Unit: "s",
			Stats: Summarize(seconds(walls[tw][ph])), Limit: &Limit{Name: "bridge+host-local", Stats: Summarize(seconds(walls[ref][ph]))}})
	}
	h.note(sec, "each operation is one libcni AddNetwork/DelNetwork (single plugin config, CNI 1.1.0) run from inside the host namespace; %d rounds, the sides alternating first", h.cfg.CNIRounds)
	h.note(sec, "reference config = the delegate config twill builds from the same env file (plugin.BuildDelegate), host-local store folder aside")
	return nil
}

// referenceConf is the configuration twill hands to bridge for env, with
// host-local's store moved to ipamDir.
func referenceConf(twillConf []byte, env subnet.Env, ipamDir string) ([]byte, error) {
	nc, err := plugin.ParseConf(twillConf)
	if err != nil {
		return nil, err
	}
	d, err := plugin.BuildDelegate(nc, env)
	if err != nil {
		return nil, err
	}
	raw, err := json.Marshal(d)
	if err != nil {
		return nil, err
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, err
	}
	ipam, ok := m["ipam"].(map[string]any)
	if !ok {
		return nil, errors.New("delegate config has no ipam object")
	}
	ipam["dataDir"] = ipamDir
	return json.Marshal(m)
}

// many runs ADD or DEL for every pod, `parallel` at a time, and returns each
// operation's time and the wall time of all.
func (m *cniMode) many(ctx context.Context, pods []string, add bool, parallel int) ([]time.Duration, time.Duration, error) {
	ds := make([]time.Duration, len(pods))
	errs := make([]error, len(pods))
	next := make(chan int)
	var wg sync.WaitGroup
	start := time.Now()
	for range max(parallel, 1) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				ds[i], errs[i] = m.op(ctx, pods[i], add)
			}
		}()
	}
	for i := range pods {
		if ctx.Err() != nil {
			break
		}
		next <- i
	}
	close(next)
	wg.Wait()
	wall := time.Since(start)
	if err := errors.Join(errs...); err != nil {
		return nil, 0, err
	}
	return ds, wall, ctx.Err()
}

// op is one ADD or DEL, timed from inside the host namespace.
func (m *cniMode) op(ctx context.Context, pod string, add bool) (time.Duration, error) {
	rt := &libcni.RuntimeConf{ContainerID: pod, NetNS: nsPath(pod), IfName: "eth0"}
	var d time.Duration
	err := ns.WithNetNSPath(nsPath(m.hostNS), func(ns.NetNS) error {
		octx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		start := time.Now()
		if !add {
			err := m.cni.DelNetwork(octx, m.conf, rt)
			d = time.Since(start)
			return err
		}
		r, err := m.cni.AddNetwork(octx, m.conf, rt)
		d = time.Since(start)
		if err != nil {
			return err
		}
		res, err := current.NewResultFromResult(r)
		if err != nil {
			return err
		}
		if len(res.IPs) == 0 || res.IPs[0].Address.IP.To4() == nil {
			return fmt.Errorf("ADD of %s gave no IPv4 address", pod)
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("%s %s: %w", map[bool]string{true: "ADD", false: "DEL"}[add], pod, err)
	}
	return d, nil
}

// delAll removes every pod's attachment after a failure, ignoring errors.
func (m *cniMode) delAll(pods []string) {
	for _, p := range pods {
		m.op(context.Background(), p, false)
	}
}
