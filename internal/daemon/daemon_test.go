package daemon

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/twillnet/twill/subnet"
)

func readyz(t *testing.T, addr string) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// /readyz is 503 during start-up, 200 once started, 503 again while the
// datastore is unreachable, and 200 when it is back; twill_datastore_up
// follows, and the outage is logged once each way.
func TestReadyzFollowsTheDatastore(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	met := newMetrics()
	hl := &health{notReady: "acquiring a lease"}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	addr, stop, err := serveHTTP(ctx, "127.0.0.1:0", hl, met)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	report := datastoreReporter(met, hl, log)

	report(false, "CONNECTING") // start-up, before the first connection
	if code, body := readyz(t, addr.String()); code != 503 || !strings.Contains(body, "acquiring a lease") {
		t.Fatalf("start-up: %d %q", code, body)
	}
	report(true, "READY")
	hl.set("") // the env file is written
	if code, _ := readyz(t, addr.String()); code != 200 {
		t.Fatalf("started: %d", code)
	}
	if v := gauge(t, met.datastoreUp); v != 1 {
		t.Fatalf("twill_datastore_up = %v while connected", v)
	}

	report(false, "TRANSIENT_FAILURE")
	report(false, "CONNECTING")
	code, body := readyz(t, addr.String())
	if code != 503 || !strings.Contains(body, "datastore unreachable since") || !strings.Contains(body, "kept as they are") {
		t.Fatalf("outage: %d %q", code, body)
	}
	if v := gauge(t, met.datastoreUp); v != 0 {
		t.Fatalf("twill_datastore_up = %v during the outage", v)
	}
	report(true, "READY")
	if code, _ := readyz(t, addr.String()); code != 200 {
		t.Fatalf("after the outage: %d", code)
	}
	if n := strings.Count(logs.String(), "datastore unreachable;"); n != 1 {
		t.Errorf("outage logged %d times, want once:\n%s", n, logs.String())
	}
	if n := strings.Count(logs.String(), "datastore reachable again"); n != 1 {
		t.Errorf("recovery logged %d times, want once:\n%s", n, logs.String())
	}
}

// A pass hands the backend only the leases FilterPeers keeps, exports how
// many it skipped, and logs each skipped lease once, not on every pass.
func TestPassSkipsAndLogsOnce(t *testing.T) {
	var logs bytes.Buffer
	mk := func(sn, ip string, claimed int64) subnet.Lease {
		return subnet.Lease{Subnet: netip.MustParsePrefix(sn), Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr(ip), BackendType: "vxlan"}, Claimed: claimed}
	}
	own := mk("10.244.1.0/24", "198.18.0.1", 1)
	peers := []subnet.Lease{mk("10.244.2.0/24", "198.18.0.2", 2), mk("10.244.2.0/25", "198.18.0.99", 9), mk("192.168.0.0/24", "198.18.0.98", 10)}
	mgr := &staticLeases{own: own, peers: peers}
	be := &recordingBackend{}
	d := testDaemon(mgr, be)
	d.envLease = own
	d.log = slog.New(slog.NewTextHandler(&logs, nil))
	ctx := context.Background()
	for range 3 {
		be.calls = nil
		d.pass(ctx, true)
		if !slices.Equal(be.calls, []string{"full 1"}) {
			t.Fatalf("backend calls %q, want one full pass with the one good peer", be.calls)
		}
	}
	if v := gauge(t, d.met.peersSkipped); v != 2 {
		t.Fatalf("twill_peers_skipped = %v, want 2", v)
	}
	if n := strings.Count(logs.String(), "skipping a peer lease"); n != 2 {
		t.Fatalf("%d warnings over three passes, want one per skipped lease:\n%s", n, logs.String())
	}
	mgr.peers = peers[:1]
	d.pass(ctx, true)
	if v := gauge(t, d.met.peersSkipped); v != 0 {
		t.Fatalf("twill_peers_skipped = %v after the bad leases went", v)
	}
	mgr.peers = peers
	d.pass(ctx, true)
	if n := strings.Count(logs.String(), "skipping a peer lease"); n != 4 {
		t.Fatalf("bad leases that came back were not logged again:\n%s", logs.String())
	}
}

func gauge(t *testing.T, g prometheus.Gauge) float64 {
	t.Helper()
	var m dto.Metric
	if err := g.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetGauge().GetValue()
}
