package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"github.com/twillnet/twill/subnet"
)

// Run follows the Nodes (or, in the nodenetwork mode, the records and the
// own Node) until ctx ends: it fills the peer cache, keeps the own lease in
// step with the own Node and publishes the node's annotations (or record)
// again if someone removes or changes them. Acquire must have succeeded
// first.
func (m *Manager) Run(ctx context.Context) error {
	m.mu.Lock()
	acquired := m.acquired
	m.mu.Unlock()
	if !acquired {
		return errors.New("kube lease manager: Run before Acquire")
	}
	// client-go's reflector logs through the context's logger: ours.
	ctx = klog.NewContext(ctx, logr.FromSlogHandler(m.log.Handler()))
	if m.watchRecords {
		return m.runRecords(ctx)
	}

	inf := m.nodeInformer()
	queue := workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]())
	// The handlers only say which Node to look at; the worker reads the
	// Node's current state from the cache (level-triggered).
	enqueue := func(obj any) {
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			queue.Add(key)
		}
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerDetailedFuncs{
		AddFunc: func(obj any, isInInitialList bool) {
			m.counted(ResourceNodes)
			// syncAll reads the whole first listing from the cache.
			if !isInInitialList {
				enqueue(obj)
			}
		},
		UpdateFunc: func(_, obj any) { m.counted(ResourceNodes); enqueue(obj) },
		DeleteFunc: func(obj any) {
			m.counted(ResourceNodes)
			// A deletion missed while the watch was down comes from the
			// relist as a tombstone; its key is the Node's name all the same.
			if ts, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				m.log.Debug("node deletion learnt from a relist", "peer", ts.Key)
			}
			enqueue(obj)
		},
	}); err != nil {
		return fmt.Errorf("kube lease manager: node informer: %w", err)
	}
	m.store = inf.GetStore()

	var wg sync.WaitGroup
	defer wg.Wait() // the informer stops with ctx, the worker with the queue
	defer queue.ShutDown()
	wg.Go(func() { inf.RunWithContext(ctx) })
	// cache.WaitFor is told when the store is filled; WaitForCacheSync polls
	// every 100 ms, which was up to 100 ms of every start.
	if !cache.WaitFor(ctx, "", inf.HasSyncedChecker()) {
		return ctx.Err()
	}
	for _, key := range m.syncAll(ctx) {
		queue.AddRateLimited(key)
	}

	wg.Go(func() {
		for m.processNext(ctx, queue) {
		}
	})
	<-ctx.Done()
	return ctx.Err()
}

// nodeInformer is an informer of every Node, slimmed by SlimNode before it
// is cached (the own Node keeps its UID). It is built from the NodeClient rather than with client-go's
// informer factory, which would link a typed client of every API group, and
// it has no index: the factory's namespace index is of no use for Nodes.
func (m *Manager) nodeInformer() cache.SharedIndexInformer {
	return m.nodeInformerOf("")
}

// nodeInformerOf is an informer of the Nodes a field selector picks (""
// for all), slimmed by slimNode.
func (m *Manager) nodeInformerOf(fieldSelector string) cache.SharedIndexInformer {
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
			opts.FieldSelector = fieldSelector
			return m.client.List(ctx, opts)
		},
		WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
			opts.FieldSelector = fieldSelector
			return m.client.Watch(ctx, opts)
		},
	}
	return newInformer(lw, m.client, &corev1.Node{}, m.slimNode)
}

// slimNode is the Node informers' transform: SlimNode's, keeping the own
// Node's UID, which the own record's ownerReference names.
func (m *Manager) slimNode(obj any) (any, error) {
	n, ok := obj.(*corev1.Node)
	if !ok {
		return obj, nil
	}
	c := slim(n, m.keys)
	if n.Name == m.node {
		c.UID = n.UID
	}
	return c, nil
}

// newInformer is an informer of lw's objects with a transform and no index.
// The reflector lists with a watch that streams the objects one by one
// (WatchList) unless client says it cannot, as fakes do.
func newInformer(lw *cache.ListWatch, client any, obj runtime.Object, transform cache.TransformFunc) cache.SharedIndexInformer {
	inf := cache.NewSharedIndexInformerWithOptions(cache.ToListWatcherWithWatchListSemantics(lw, client),
		obj, cache.SharedIndexInformerOptions{})
	if err := inf.SetTransform(transform); err != nil {
		panic(err) // only if the informer had started
	}
	return inf
}

// syncAll builds the peer cache from the first complete listing before Peers
// reports synced, so a consumer never sees a partial peer list as complete.
// It returns the Nodes to retry. The Nodes of that listing are not queued
// by the handlers, so 5,000 of them are parsed once, not twice.
func (m *Manager) syncAll(ctx context.Context) (retry []string) {
	keys := m.store.ListKeys()
	for _, key := range keys {
		if err := m.syncNode(ctx, key); err != nil {
			m.log.Warn("sync node; will retry", "peer", key, "err", err)
			retry = append(retry, key)
		}
	}
	m.cache.MarkSynced()
	m.log.Info("nodes listed", "nodes", len(keys), "peers", m.cache.Len())
	return retry
}

func (m *Manager) processNext(ctx context.Context, queue workqueue.TypedRateLimitingInterface[string]) bool {
	key, quit := queue.Get()
	if quit {
		return false
	}
	defer queue.Done(key)
	if err := m.syncNode(ctx, key); err != nil {
		if ctx.Err() == nil {
			m.log.Warn("sync node; will retry", "peer", key, "err", err)
			queue.AddRateLimited(key)
		}
		return true
	}
	queue.Forget(key)
	return true
}

// syncNode brings the cache in line with one Node as the informer has it now.
// It returns an error only for what a retry may fix.
func (m *Manager) syncNode(ctx context.Context, name string) error {
	obj, exists, err := m.store.GetByKey(name)
	if err != nil {
		return err
	}
	var node *cachedNode
	if exists {
		if node, _ = obj.(*cachedNode); node == nil {
			return fmt.Errorf("node cache holds a %T", obj)
		}
	}
	if name == m.node {
		if node == nil {
			m.ownProblem("the own Node was deleted; keeping the lease until it is back")
			return nil
		}
		return m.syncOwn(ctx, node)
	}
	if node == nil {
		m.dropPeer(name, "", true)
		return nil
	}
	fams := families{v4: m.cfg.EnableIPv4, v6: m.cfg.EnableIPv6}
	l, ok, err := node.lease(m.keys, fams)
	switch {
	case err != nil:
		m.dropPeer(name, "malformed: "+err.Error(), false)
	case !ok && len(node.podCIDRs) > 0 && node.annotations().backendType != "":
		// A twill node, but of other families: its twilld runs with
		// another network config, or its Node has other podCIDRs.
		m.dropPeer(name, fmt.Sprintf("no family the network config enables (%s) has both a podCIDR and a published address", fams), false)
	case !ok:
		// No podCIDR or no annotations yet: not a twill node (yet).
		m.dropPeer(name, "", false)
	case l.Subnet.IsValid() && !inNetwork(m.cfg.Network, l.Subnet):
		m.dropPeer(name, fmt.Sprintf("podCIDR %s is outside the Network %s", l.Subnet, m.cfg.Network), false)
	case l.IPv6Subnet.IsValid() && !inNetwork(m.cfg.IPv6Network, l.IPv6Subnet):
		m.dropPeer(name, fmt.Sprintf("IPv6 podCIDR %s is outside the IPv6Network %s", l.IPv6Subnet, m.cfg.IPv6Network), false)
	default:
		m.setPeer(name, l)
	}
	return nil
}

func (m *Manager) setPeer(name string, l subnet.Lease) {
	m.mu.Lock()
	delete(m.skipped, name)
	m.mu.Unlock()
	if m.cache.Apply(subnet.Change{Key: name, Lease: &l}) {
		m.log.Debug("peer", append([]any{"peer", name}, leaseLog(l)...)...)
	}
}

// dropPeer removes a Node from the peers; reason, when not empty, is logged
// once per change of reason.
func (m *Manager) dropPeer(name, reason string, deleted bool) {
	m.mu.Lock()
	logIt := reason != "" && m.skipped[name] != reason
	if reason == "" || deleted {
		delete(m.skipped, name)
	} else {
		m.skipped[name] = reason
	}
	m.mu.Unlock()
	if logIt {
		m.log.Warn("skipping node", "peer", name, "reason", reason)
	}
	if m.cache.Apply(subnet.Change{Key: name}) {
		m.log.Debug("peer gone", "peer", name, "deleted", deleted)
	}
}

// syncOwn restores the node's annotations if they were removed or changed,
// and lets the own lease follow the Node's podCIDRs and overwrite annotations.
func (m *Manager) syncOwn(ctx context.Context, node *cachedNode) error {
	m.mu.Lock()
	released := m.released
	m.mu.Unlock()
	if released {
		return nil
	}
	if !m.published(node) {
		m.log.Warn("the own Node lacks twill's annotations or they were changed; publishing them again")
		if err := m.publish(ctx); err != nil {
			return err
		}
	}
	l, err := m.ownLease(node)
	if err != nil {
		m.ownProblem(err.Error() + "; keeping the current lease")
		return nil
	}
	m.ownProblem("")
	if old := m.Own(); !subnet.SameLease(old, l) {
		m.log.Warn("own lease changed with the Node", slog.Group("old", leaseLog(old)...), slog.Group("new", leaseLog(l)...))
		m.setOwn(l)
	}
	m.mirrorRecord(ctx, m.Own(), node.UID)
	return nil
}

// ownProblem logs a problem with the own Node once, until it changes.
func (m *Manager) ownProblem(reason string) {
	m.mu.Lock()
	last := m.skipped[m.node]
	if reason == "" {
		delete(m.skipped, m.node)
	} else {
		m.skipped[m.node] = reason
	}
	m.mu.Unlock()
	if reason != "" && reason != last {
		m.log.Warn("own Node", "problem", reason)
	}
}

// counted reports an object an informer delivered (Options.Event).
func (m *Manager) counted(resource string) {
	if m.event != nil {
		m.event(resource)
	}
}
