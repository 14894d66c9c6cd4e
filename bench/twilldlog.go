package bench

import (
	"bufio"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// twilld logs with slog's text handler, time to the millisecond. The first
// time each of these messages appears marks a phase of its start-up. A
// message that each family's plane logs (the device, the first pass) is told
// apart by an attribute of the line (attr); the IPv6 plane's phases exist in
// a dual-stack network only, and there the IPv4 plane's are named so.
var phaseMessages = []struct {
	msg, attr, phase string
	family           int // 4 or 6 for a phase of one family's plane, else 0
}{
	{"starting twilld", "", "main() running", 0},
	{"network config", "", "network config read", 0},
	{"created device", " device=twill.1 ", "VXLAN device created", 4},
	{"created device", " device=twill-v6.1 ", "VXLAN device created", 6},
	// The wireguard backend (IPv4): its key, its device (in the kernel or
	// by wireguard-go), and its "reconciling" line, which comes once the
	// peers are written and the routes diffed.
	{"made a new WireGuard key", "", "WireGuard key made", 0},
	{"created device", " device=" + wgDevice + " ", "WireGuard device created", 4},
	{"lease acquired", "", "lease acquired", 0},
	{"wrote subnet env file", "", "env file written", 0},
	{"reconciling", " device=twill.1 ", "first reconcile: diff computed", 4},
	{"reconciling", " device=" + wgDevice + " ", "first reconcile: peers written, routes diffed", 4},
	{"reconciled", " family=IPv4 ", "first reconcile: done", 4},
	{"reconciling", " device=twill-v6.1 ", "first reconcile: diff computed", 6},
	{"reconciled", " family=IPv6 ", "first reconcile: done", 6},
}

// phaseNames lists the phases of a start in the order of phaseMessages,
// with the family of a plane's phase in a dual-stack network.
func phaseNames(dual bool) []string {
	var out []string
	for _, p := range phaseMessages {
		if name, ok := phaseName(p.phase, p.family, dual); ok {
			out = append(out, name)
		}
	}
	return out
}

func phaseName(phase string, family int, dual bool) (string, bool) {
	switch {
	case family == 0:
		return phase, true
	case dual:
		return fmt.Sprintf("IPv%d %s", family, phase), true
	default:
		return phase, family == 4
	}
}

var logLine = regexp.MustCompile(`^time=(\S+) level=\S+ msg=("(?:[^"\\]|\\.)*"|\S+)`)

// logPhases reads twilld's log and returns, for each phase (phaseNames), the
// time from start to the first line that marks it.
func logPhases(path string, start time.Time, dual bool) map[string]time.Duration {
	out := map[string]time.Duration{}
	f, err := os.Open(path)
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for lines := 0; sc.Scan() && lines < 10000; lines++ {
		line := sc.Text()
		m := logLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		at, err := time.Parse(time.RFC3339Nano, m[1])
		if err != nil {
			continue
		}
		msg := m[2]
		if u, err := strconv.Unquote(msg); err == nil {
			msg = u
		}
		for _, p := range phaseMessages {
			name, ok := phaseName(p.phase, p.family, dual)
			if _, seen := out[name]; !ok || seen || msg != p.msg || !strings.Contains(line+" ", p.attr) {
				continue
			}
			out[name] = at.Sub(start)
		}
	}
	return out
}
