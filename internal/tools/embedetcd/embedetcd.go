// Package embedetcd runs a single-member etcd inside the current process: the
// datastore of the lab and of the integration tests. It is the real etcd
// server, not a fake.
package embedetcd

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

// Server is a running single-member etcd.
type Server struct {
	etcd *embed.Etcd
	// Endpoint is the client URL, e.g. http://127.0.0.1:40123.
	Endpoint string
}

// Options places the server. Zero values pick free loopback ports.
type Options struct {
	Dir        string // data directory (required)
	ClientHost string // address to listen on for clients; default 127.0.0.1
	ClientPort int    // default: a free port
	PeerPort   int    // default: a free port
	LogLevel   string // default "fatal": etcd logs expected shutdown noise at error level
}

// Start starts the server and waits until it serves clients.
func Start(ctx context.Context, o Options) (*Server, error) {
	if o.ClientHost == "" {
		o.ClientHost = "127.0.0.1"
	}
	var err error
	if o.ClientPort == 0 {
		if o.ClientPort, err = freePort(o.ClientHost); err != nil {
			return nil, err
		}
	}
	if o.PeerPort == 0 {
		if o.PeerPort, err = freePort("127.0.0.1"); err != nil {
			return nil, err
		}
	}
	if o.LogLevel == "" {
		o.LogLevel = "fatal"
	}
	cfg := embed.NewConfig()
	cfg.Name = "twill"
	cfg.Dir = o.Dir
	cfg.LogLevel = o.LogLevel
	client := url.URL{Scheme: "http", Host: net.JoinHostPort(o.ClientHost, fmt.Sprint(o.ClientPort))}
	peer := url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", fmt.Sprint(o.PeerPort))}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{client}, []url.URL{client}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{peer}, []url.URL{peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("start embedded etcd in %s: %w", o.Dir, err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("embedded etcd failed: %w", err)
	case <-ctx.Done():
		e.Close()
		return nil, ctx.Err()
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, fmt.Errorf("embedded etcd in %s not ready after 60s", o.Dir)
	}
	return &Server{etcd: e, Endpoint: client.String()}, nil
}

// Close stops the server.
func (s *Server) Close() { s.etcd.Close() }

// Err reports a fatal server error.
func (s *Server) Err() <-chan error { return s.etcd.Err() }

func freePort(host string) (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, fmt.Errorf("find a free port on %s: %w", host, err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
