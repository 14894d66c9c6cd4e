package ctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"text/tabwriter"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/twillnet/twill/subnet"
)

// status summarises the local twilld from its /readyz and /metrics and the
// subnet env file: what an operator on the node wants to know first.
func status(ctx context.Context, args []string, out, errOut io.Writer) error {
	fs := newFlagSet("status", errOut)
	addr := fs.String("addr", "127.0.0.1:9867", "twilld's --http-addr")
	subnetFile := fs.String("subnet-file", subnet.DefaultEnvFile, "twilld's --subnet-file")
	if err := parseNoArgs(fs, args); err != nil {
		return err
	}
	cl := &http.Client{Timeout: 5 * time.Second}
	get := func(path string) (int, string, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+*addr+path, nil)
		if err != nil {
			return 0, "", err
		}
		resp, err := cl.Do(req)
		if err != nil {
			return 0, "", fmt.Errorf("twilld at %s: %w (is it running? is --addr its --http-addr?)", *addr, err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
		return resp.StatusCode, string(b), err
	}
	code, ready, err := get("/readyz")
	if err != nil {
		return err
	}
	_, text, err := get("/metrics")
	if err != nil {
		return err
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		return fmt.Errorf("parse twilld's metrics: %w", err)
	}
	m := metricView(fams)

	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	state := "ready"
	if code != http.StatusOK {
		state = strings.TrimSpace(ready)
	}
	fmt.Fprintf(tw, "twilld\t%s (%s)\n", state, *addr)
	if env, err := subnet.ReadEnv(*subnetFile); err == nil {
		if env.Subnet.IsValid() {
			fmt.Fprintf(tw, "subnet\t%s of %s\n", env.Subnet, env.Network)
		}
		if env.IPv6Subnet.IsValid() {
			fmt.Fprintf(tw, "IPv6 subnet\t%s of %s\n", env.IPv6Subnet, env.IPv6Network)
		}
		fmt.Fprintf(tw, "pods\tMTU %d, masquerade %t\n", env.MTU, env.IPMasq)
	} else {
		fmt.Fprintf(tw, "subnet\t%v\n", err)
	}
	if exp := m.value("twill_lease_expiry_timestamp_seconds", nil); exp > 0 {
		fmt.Fprintf(tw, "lease\texpires in %s unless renewed; %v renewals, %v lost\n",
			time.Until(time.Unix(int64(exp), 0)).Round(time.Second), m.value("twill_lease_renewals_total", nil), m.value("twill_lease_losses_total", nil))
	}
	for _, f := range m.all("twill_peers") {
		fmt.Fprintf(tw, "peers\t%v (backend %s, %s)\n", f.value, f.labels["backend"], f.labels["family"])
	}
	if last := m.value("twill_last_reconcile_timestamp_seconds", nil); last > 0 {
		fmt.Fprintf(tw, "last reconcile\t%s ago, took %s; %v ok (%v of them peer updates), %v failed\n",
			time.Since(time.Unix(0, int64(last*1e9))).Round(time.Millisecond),
			time.Duration(m.value("twill_last_reconcile_duration_seconds", nil)*float64(time.Second)).Round(time.Microsecond),
			m.value("twill_reconcile_total", map[string]string{"result": "ok"}), m.value("twill_reconcile_incremental_total", nil),
			m.value("twill_reconcile_total", map[string]string{"result": "error"}))
	} else {
		fmt.Fprintf(tw, "last reconcile\tnone yet\n")
	}
	var repairs []string
	for _, f := range m.all("twill_repairs_total") {
		repairs = append(repairs, fmt.Sprintf("%s %s %v", f.labels["family"], f.labels["kind"], f.value))
	}
	fmt.Fprintf(tw, "repairs\t%s\n", strings.Join(repairs, ", "))
	for _, f := range m.all("twill_br_netfilter") {
		state := "on"
		if f.value != 1 {
			state = "OFF: Services between pods of this node may fail (twilld's log says why and how to fix it)"
		}
		fmt.Fprintf(tw, "br_netfilter\t%s (%s)\n", state, f.labels["family"])
	}
	if fams["twill_datastore_up"] != nil {
		up := "unreachable"
		if m.value("twill_datastore_up", nil) == 1 {
			up = "connected"
		}
		fmt.Fprintf(tw, "datastore\t%s; %v lease events\n", up, m.value("twill_datastore_events_total", nil))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if code != http.StatusOK {
		return errors.New("twilld is not ready")
	}
	return nil
}

type sample struct {
	labels map[string]string
	value  float64
}

type metricView map[string]*dto.MetricFamily

// all returns every sample of a counter or gauge family.
func (v metricView) all(name string) []sample {
	f := v[name]
	if f == nil {
		return nil
	}
	var out []sample
	for _, m := range f.GetMetric() {
		s := sample{labels: map[string]string{}}
		for _, l := range m.GetLabel() {
			s.labels[l.GetName()] = l.GetValue()
		}
		switch {
		case m.Gauge != nil:
			s.value = m.GetGauge().GetValue()
		case m.Counter != nil:
			s.value = m.GetCounter().GetValue()
		}
		out = append(out, s)
	}
	return out
}

// value returns the sample whose labels include want, or 0.
func (v metricView) value(name string, want map[string]string) float64 {
next:
	for _, s := range v.all(name) {
		for k, val := range want {
			if s.labels[k] != val {
				continue next
			}
		}
		return s.value
	}
	return 0
}
