package etcd

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"go.uber.org/zap"
)

// The etcd client's warnings and errors reach twilld's log, with their
// fields; its info and debug chatter does not.
func TestZapToSlog(t *testing.T) {
	var buf bytes.Buffer
	z := zapToSlog(slog.New(slog.NewTextHandler(&buf, nil))).With(zap.String("target", "etcd-endpoints://0xc0"))
	z.Info("dialing")
	z.Debug("picked")
	z.Warn("retrying of unary invoker failed", zap.Uint("attempt", 0), zap.Error(errors.New("context deadline exceeded")))
	z.Error("lease keepalive failed")
	out := buf.String()
	for _, want := range []string{
		`level=WARN msg="etcd client: retrying of unary invoker failed" attempt=0 error="context deadline exceeded" target=etcd-endpoints://0xc0`,
		`level=ERROR msg="etcd client: lease keepalive failed" target=etcd-endpoints://0xc0`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %s:\n%s", want, out)
		}
	}
	if strings.Contains(out, "dialing") || strings.Contains(out, "picked") {
		t.Errorf("info or debug records were logged:\n%s", out)
	}
	if zapToSlog(nil).Core().Enabled(zap.ErrorLevel) {
		t.Error("a nil logger should discard everything")
	}
}
