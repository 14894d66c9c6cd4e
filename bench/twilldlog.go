package bench

import (
	"bufio"
	"os"
	"regexp"
	"strconv"
	"time"
)

// twilld logs with slog's text handler, time to the millisecond. The first
// time each of these messages appears marks a phase of its start-up.
var phaseMessages = []struct{ msg, phase string }{
	{"starting twilld", "main() running"},
	{"network config", "network config read"},
	{"created device", "VXLAN device created"},
	{"lease acquired", "lease acquired"},
	{"wrote subnet env file", "env file written"},
	{"reconciling", "first reconcile: diff computed"},
	{"reconciled", "first reconcile: done"},
}

var logLine = regexp.MustCompile(`^time=(\S+) level=\S+ msg=("(?:[^"\\]|\\.)*"|\S+)`)

// logPhases reads twilld's log and returns, for each phase, the time from
// start to the first line that marks it.
func logPhases(path string, start time.Time) map[string]time.Duration {
	out := map[string]time.Duration{}
	f, err := os.Open(path)
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for lines := 0; sc.Scan() && lines < 10000; lines++ {
		m := logLine.FindStringSubmatch(sc.Text())
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
			if _, seen := out[p.phase]; !seen && msg == p.msg {
				out[p.phase] = at.Sub(start)
			}
		}
	}
	return out
}
