package subnet

import (
	"bytes"
	"sync"
)

// Cache is the one picture twilld has of the datastore's leases: every lease
// the datastore holds, the node's own included where the datastore lists it,
// each under the datastore's name for it (etcd: the subnet's key name;
// Kubernetes: the Node's name). Both lease managers write into it (the etcd
// watch, the Node informer's worker); the daemon and the managers' own
// checks read snapshots of it.
//
// A change is signalled to every subscriber on a channel of its own that
// holds at most one value, so a burst of changes is one wake-up and no
// reader can steal another's signal.
type Cache struct {
	mu     sync.Mutex
	leases map[string]Lease
	synced bool
	subs   []chan struct{}
}

// NewCache returns an empty cache, not synced.
func NewCache() *Cache { return &Cache{leases: map[string]Lease{}} }

// Subscribe returns a channel that receives a value after one or more
// changes (and after Notify).
func (c *Cache) Subscribe() <-chan struct{} {
	ch := make(chan struct{}, 1)
	c.mu.Lock()
	c.subs = append(c.subs, ch)
	c.mu.Unlock()
	return ch
}

// Notify wakes every subscriber without a change of the cache: the own
// lease, which the managers hold outside it, changed.
func (c *Cache) Notify() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.notifyLocked()
}

func (c *Cache) notifyLocked() {
	for _, ch := range c.subs {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

// Change is one update: the lease under Key written, or (Lease nil) gone.
type Change struct {
	Key   string
	Lease *Lease
}

// Apply applies changes in their order and reports whether any changed what
// a node programs (SameLease); subscribers are woken once if so.
func (c *Cache) Apply(changes ...Change) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	changed := false
	for _, ch := range changes {
		old, had := c.leases[ch.Key]
		switch {
		case ch.Lease == nil:
			if had {
				delete(c.leases, ch.Key)
				changed = true
			}
		default:
			c.leases[ch.Key] = *ch.Lease
			if !had || !SameLease(old, *ch.Lease) {
				changed = true
			}
		}
	}
	if changed {
		c.notifyLocked()
	}
	return changed
}

// Replace sets the whole picture from a complete listing and marks the
// cache synced.
func (c *Cache) Replace(leases map[string]Lease) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.leases = leases
	c.synced = true
	c.notifyLocked()
}

// MarkSynced says the cache now holds a complete listing, built up by Apply.
func (c *Cache) MarkSynced() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.synced = true
	c.notifyLocked()
}

// Synced reports whether the cache has held a complete listing.
func (c *Cache) Synced() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.synced
}

// Get returns the lease under key.
func (c *Cache) Get(key string) (Lease, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	l, ok := c.leases[key]
	return l, ok
}

// Len is the number of leases held.
func (c *Cache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.leases)
}

// Peers returns every lease but the one under own (the node's, "" for none)
// in no particular order (FilterPeers orders them), and whether the cache is
// synced.
func (c *Cache) Peers(own string) ([]Lease, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]Lease, 0, len(c.leases))
	for k, l := range c.leases {
		if k != own {
			out = append(out, l)
		}
	}
	return out, c.synced
}

// SameLease reports whether two leases program the same datapath: same
// subnets, claim, public addresses and backend. Expiry and node name do not
// count.
func SameLease(a, b Lease) bool {
	return a.Subnet == b.Subnet && a.IPv6Subnet == b.IPv6Subnet && a.Claimed == b.Claimed &&
		a.Attrs.PublicIP == b.Attrs.PublicIP && a.Attrs.PublicIPv6 == b.Attrs.PublicIPv6 &&
		a.Attrs.BackendType == b.Attrs.BackendType && bytes.Equal(a.Attrs.BackendData, b.Attrs.BackendData) &&
		bytes.Equal(a.Attrs.BackendV6Data, b.Attrs.BackendV6Data)
}
