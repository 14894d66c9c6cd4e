// Package retry is twill's one way to wait between attempts: a delay that
// starts at Min and doubles up to Max, and a wait that ends early, with the
// context's error, when the context ends. The lease managers, the etcd watch,
// the wait for the network config, netlink dumps and the CNI plugin's exec of
// a busy delegate all use it. It imports nothing of twill's, so any package
// may.
package retry

import (
	"context"
	"time"
)

// Backoff is a sequence of delays. The zero value is not useful; give Min
// and Max (Max below Min counts as Min).
type Backoff struct {
	Min, Max time.Duration
	next     time.Duration
}

// Next returns the delay to wait now and doubles the following one.
func (b *Backoff) Next() time.Duration {
	if b.next < b.Min {
		b.next = b.Min
	}
	d := b.next
	b.next = min(2*b.next, max(b.Max, b.Min))
	return d
}

// Wait waits for the next delay, or returns ctx's error as soon as ctx ends.
func (b *Backoff) Wait(ctx context.Context) error { return Sleep(ctx, b.Next()) }

// Sleep waits d, or returns ctx's error as soon as ctx ends.
func Sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// Reset makes the next delay Min again, after an attempt that succeeded.
func (b *Backoff) Reset() { b.next = b.Min }
