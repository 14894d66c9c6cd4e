package daemon

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// bridgeNetfilter is whether traffic that a bridge forwards between two of
// its ports (pod to pod on one node) passes through the netfilter hooks,
// iptables and nftables alike, for one IP family: the br_netfilter module
// loaded and net.bridge.bridge-nf-call-iptables (ip6tables) set to 1.
// Without it kube-proxy's Service NAT is skipped for a reply that crosses
// the bridge: a pod that reaches a Service whose chosen endpoint is a pod on
// the same node gets the answer from the endpoint's own address, not the
// Service's, and drops it; policies enforced with iptables on bridged
// traffic do nothing. twill itself needs none of it, so it warns and goes on.
type bridgeNetfilter struct {
	ok     bool
	reason string // why not, with the fix; "" when ok
}

// procSys is where the kernel's settings are read; tests point it elsewhere.
var procSys = "/proc/sys"

// checkBridgeNetfilter reads the state of one family in twilld's network
// namespace (the settings are per namespace; the module is the kernel's).
func checkBridgeNetfilter(v6 bool) bridgeNetfilter {
	key, cmd := "bridge-nf-call-iptables", "iptables"
	if v6 {
		key, cmd = "bridge-nf-call-ip6tables", "ip6tables"
	}
	b, err := os.ReadFile(filepath.Join(procSys, "net", "bridge", key))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return bridgeNetfilter{reason: fmt.Sprintf("the br_netfilter module is not loaded: traffic between pods on one bridge bypasses %s, "+
			"so a pod reaching a Service whose endpoint is on the same node gets no answer it accepts (kube-proxy); "+
			"fix: modprobe br_netfilter && sysctl -w net.bridge.%s=1 (and list br_netfilter in /etc/modules-load.d/)", cmd, key)}
	case err != nil:
		return bridgeNetfilter{reason: fmt.Sprintf("read net.bridge.%s: %v", key, err)}
	case strings.TrimSpace(string(b)) != "1":
		return bridgeNetfilter{reason: fmt.Sprintf("net.bridge.%s is %s: traffic between pods on one bridge bypasses %s, "+
			"so a pod reaching a Service whose endpoint is on the same node gets no answer it accepts (kube-proxy); "+
			"fix: sysctl -w net.bridge.%s=1 (and set it in /etc/sysctl.d/)", key, strings.TrimSpace(string(b)), cmd, key)}
	}
	return bridgeNetfilter{ok: true}
}

// checkBridges reads the state of each family of the network, sets the
// twill_br_netfilter gauge and logs a change: a warning when a family is
// not covered (the first time, and whenever the reason changes), a note
// when it is again.
func (d *daemon) checkBridges() {
	for _, p := range d.planes {
		st := checkBridgeNetfilter(p.v6)
		v := 0.0
		if st.ok {
			v = 1
		}
		d.met.brNetfilter.WithLabelValues(familyLabel(p.v6)).Set(v)
		last, seen := p.bridge, p.bridgeSeen
		p.bridge, p.bridgeSeen = st, true
		switch {
		case !st.ok && (!seen || last.reason != st.reason):
			d.log.Warn("bridged pod traffic skips netfilter; twill works, Services may not", "family", p.family(), "reason", st.reason)
		case st.ok && seen && !last.ok:
			d.log.Info("bridged pod traffic passes netfilter again", "family", p.family())
		}
	}
}
