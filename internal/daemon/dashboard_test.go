package daemon

import (
	"context"
	"encoding/json"
	"net/netip"
	"regexp"
	"strings"
	"testing"

	"github.com/twillnet/twill/deploy"
	"github.com/twillnet/twill/subnet"
	"github.com/twillnet/twill/subnet/etcd"
	"github.com/twillnet/twill/subnet/kube"
)

// Every metric the Grafana dashboard (deploy/grafana) queries is one twilld
// exports: the series of a daemon that ran a pass, with the etcd mode's
// lease metrics and the Kubernetes mode's watch counters, as Run registers
// them. A renamed metric fails here rather than as an empty panel.
func TestDashboardQueriesExportedMetrics(t *testing.T) {
	var dash struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	if err := json.Unmarshal(deploy.GrafanaDashboard, &dash); err != nil {
		t.Fatal(err)
	}
	own := subnet.Lease{Subnet: netip.MustParsePrefix("10.244.1.0/24"), Attrs: subnet.LeaseAttrs{PublicIP: netip.MustParseAddr("198.18.0.1"), BackendType: "vxlan"}}
	d := testDaemon(&staticLeases{own: own}, &recordingBackend{})
	d.envLease = own
	d.met.registerLeaseStats(func() etcd.Stats { return etcd.Stats{} })
	d.met.registerPlanes(d.planes)
	for _, r := range []string{kube.ResourceNodes, kube.Resource} {
		d.met.kubeEvents.WithLabelValues(r)
	}
	datastoreReporter(d.met, d.hl, d.log)(true, "answering")
	d.pass(context.Background(), true)
	fams, err := d.met.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	exported := map[string]bool{}
	for _, f := range fams {
		exported[f.GetName()] = true
	}
	name := regexp.MustCompile(`twill_[a-z0-9_]+`)
	queried := 0
	for _, p := range dash.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			for _, m := range name.FindAllString(tg.Expr, -1) {
				queried++
				base := m
				for _, suffix := range []string{"_bucket", "_sum", "_count"} {
					if b, ok := strings.CutSuffix(m, suffix); ok && exported[b] {
						base = b
					}
				}
				if !exported[base] {
					t.Errorf("panel %q queries %s, which twilld does not export", p.Title, m)
				}
			}
		}
	}
	if queried < 10 {
		t.Errorf("only %d metric references in the dashboard", queried)
	}
}
