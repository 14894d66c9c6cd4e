// Package etcd keeps twill's leases in etcd (v3 API).
//
// Layout under a prefix (default /twill.io/network):
//
//	<prefix>/config                   the network config (net-conf.json)
//	<prefix>/subnets/10.244.7.0-24    one lease: JSON LeaseAttrs, attached to an etcd lease with a TTL
//
// A subnet is acquired with one transaction that creates the key only if it is
// absent, so two nodes can never hold one subnet. The key lives as long as the
// etcd lease it is attached to, which its node keeps alive; a dead node's
// subnet frees itself when the TTL runs out. Peers are followed with one prefix
// watch resumed from the last revision seen; values are decoded from the watch
// events themselves, with no further request per event.
package etcd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	grpcbackoff "google.golang.org/grpc/backoff"
)

// DefaultPrefix is where twill keeps a network's keys.
const DefaultPrefix = "/twill.io/network"

// ClientOptions says how to reach etcd.
type ClientOptions struct {
	Endpoints []string
	CAFile    string
	CertFile  string
	KeyFile   string
	Username  string
	Password  string
	// DialTimeout bounds the first connection; default 5s.
	DialTimeout time.Duration
	// Log receives the client's own warnings and errors (its retries, a
	// lost connection); nil discards them.
	Log *slog.Logger
}

// NewClient connects to etcd. The connection itself is lazy: an unreachable
// etcd shows up as errors of the first requests, which callers retry.
func NewClient(o ClientOptions) (*clientv3.Client, error) {
	if len(o.Endpoints) == 0 {
		return nil, errors.New("no etcd endpoints given")
	}
	for _, ep := range o.Endpoints {
		if !strings.Contains(ep, "://") {
			return nil, fmt.Errorf("etcd endpoint %q: want a URL such as http://127.0.0.1:2379", ep)
		}
	}
	if o.DialTimeout == 0 {
		o.DialTimeout = 5 * time.Second
	}
	var tlsCfg *tls.Config
	if o.CAFile != "" || o.CertFile != "" || o.KeyFile != "" {
		if (o.CertFile == "") != (o.KeyFile == "") {
			return nil, errors.New("etcd TLS: give both a certificate file and a key file, or neither")
		}
		info := transport.TLSInfo{TrustedCAFile: o.CAFile, CertFile: o.CertFile, KeyFile: o.KeyFile}
		var err error
		if tlsCfg, err = info.ClientConfig(); err != nil {
			return nil, fmt.Errorf("etcd TLS: %w", err)
		}
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   o.Endpoints,
		DialTimeout: o.DialTimeout,
		TLS:         tlsCfg,
		Username:    o.Username,
		Password:    o.Password,
		Logger:      zapToSlog(o.Log),
		// Keepalive pings notice a dead connection well before the lease TTL.
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: 5 * time.Second,
		// gRPC's reconnect backoff grows to 2 minutes by default, so a node
		// could go on ignoring its peers that long after etcd came back.
		// Capped at 5s (with gRPC's jitter, which spreads a cluster's nodes),
		// twilld reconnects within seconds of etcd's return.
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           grpcbackoff.Config{BaseDelay: time.Second, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 5 * time.Second},
			MinConnectTimeout: 5 * time.Second,
		})},
	})
	if err != nil {
		return nil, fmt.Errorf("connect to etcd at %s: %w", strings.Join(o.Endpoints, ","), err)
	}
	return cli, nil
}

// zapToSlog is a zap logger (what the etcd client logs through) that hands
// warnings and errors to log, each message prefixed "etcd client: ".
func zapToSlog(log *slog.Logger) *zap.Logger {
	if log == nil {
		return zap.NewNop()
	}
	return zap.New(slogCore{log: log})
}

// slogCore is a zapcore.Core writing to a slog.Logger at warn and above.
type slogCore struct {
	log    *slog.Logger
	fields []zapcore.Field
}

func (c slogCore) Enabled(l zapcore.Level) bool { return l >= zapcore.WarnLevel }

func (c slogCore) With(fields []zapcore.Field) zapcore.Core {
	return slogCore{log: c.log, fields: append(slices.Clip(c.fields), fields...)}
}

func (c slogCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c slogCore) Write(e zapcore.Entry, fields []zapcore.Field) error {
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range c.fields {
		f.AddTo(enc)
	}
	for _, f := range fields {
		f.AddTo(enc)
	}
	keys := make([]string, 0, len(enc.Fields))
	for k := range enc.Fields {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	attrs := make([]any, 0, 2*len(keys))
	for _, k := range keys {
		attrs = append(attrs, k, enc.Fields[k])
	}
	level := slog.LevelWarn
	if e.Level >= zapcore.ErrorLevel {
		level = slog.LevelError
	}
	c.log.Log(context.Background(), level, "etcd client: "+e.Message, attrs...)
	return nil
}

func (c slogCore) Sync() error { return nil }
