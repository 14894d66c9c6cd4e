package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/twillnet/twill/subnet"
)

// cachedRecord is a NodeNetwork as the record informer keeps it: name,
// resourceVersion and creation time, the spec, and the UID of the Node that
// owns it.
type cachedRecord struct {
	metav1.ObjectMeta // Name, ResourceVersion, CreationTimestamp; nothing else

	spec    NodeNetworkSpec
	nodeUID types.UID // of its ownerReference to a Node; "" when none
}

// SlimRecord is the record informer's transform: it keeps of a NodeNetwork
// what twill reads (a cachedRecord), dropping managedFields and the rest of
// the metadata. Tombstones pass through unchanged.
func SlimRecord(obj any) (any, error) {
	r, ok := obj.(*NodeNetwork)
	if !ok {
		return obj, nil
	}
	return &cachedRecord{
		ObjectMeta: metav1.ObjectMeta{Name: r.Name, ResourceVersion: r.ResourceVersion, CreationTimestamp: r.CreationTimestamp},
		spec:       r.Spec,
		nodeUID:    nodeOwner(r.OwnerReferences),
	}, nil
}

// nodeOwner is the UID of the Node among a record's owners.
func nodeOwner(refs []metav1.OwnerReference) types.UID {
	for _, o := range refs {
		if o.Kind == "Node" && o.APIVersion == "v1" {
			return o.UID
		}
	}
	return ""
}

// withNodeOwner returns refs with the own Node (name, uid) as the owner of
// kind Node, in place of any other Node; other owners stay.
func withNodeOwner(refs []metav1.OwnerReference, name string, uid types.UID) []metav1.OwnerReference {
	out := slices.DeleteFunc(slices.Clone(refs), func(o metav1.OwnerReference) bool { return o.Kind == "Node" && o.APIVersion == "v1" })
	return append(out, metav1.OwnerReference{APIVersion: "v1", Kind: "Node", Name: name, UID: uid})
}

// publishRecord makes the node's record carry spec and name the Node of
// uid as its owner: it creates the record, or updates the spec and owner
// of the one there (other metadata, such as an operator's labels, stays).
func (m *Manager) publishRecord(ctx context.Context, spec NodeNetworkSpec, uid types.UID) error {
	cur, err := m.records.Get(ctx, m.node, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		r := &NodeNetwork{
			ObjectMeta: metav1.ObjectMeta{Name: m.node, OwnerReferences: withNodeOwner(nil, m.node, uid)},
			Spec:       spec,
		}
		if _, err := m.records.Create(ctx, r, metav1.CreateOptions{FieldManager: FieldManager}); err != nil {
			return fmt.Errorf("create NodeNetwork %s: %w", m.node, recordErr(err))
		}
		m.log.Info("NodeNetwork record created")
		return nil
	case err != nil:
		return fmt.Errorf("read NodeNetwork %s: %w", m.node, recordErr(err))
	}
	if sameSpec(cur.Spec, spec) && nodeOwner(cur.OwnerReferences) == uid {
		return nil
	}
	cur.Spec, cur.OwnerReferences = spec, withNodeOwner(cur.OwnerReferences, m.node, uid)
	if _, err := m.records.Update(ctx, cur, metav1.UpdateOptions{FieldManager: FieldManager}); err != nil {
		return fmt.Errorf("update NodeNetwork %s: %w", m.node, recordErr(err))
	}
	m.log.Info("NodeNetwork record updated")
	return nil
}

// mirrorRecord is the annotations mode's record: when a NodeNetwork client
// is set, the node keeps its record beside its annotations, so that nodes
// switched to the nodenetwork mode reach it while a DaemonSet rolls the
// switch out. It writes when the lease or the Node's UID differ from what it
// last wrote, and never fails the caller: a cluster without the CRD, or
// without the rights, only gets a warning, once per kind of failure.
func (m *Manager) mirrorRecord(ctx context.Context, l subnet.Lease, uid types.UID) {
	if m.records == nil || uid == "" {
		return
	}
	spec := recordSpec(l)
	m.mu.Lock()
	done := m.mirrored.ok && m.mirrored.uid == uid && sameSpec(m.mirrored.spec, spec)
	m.mu.Unlock()
	if done {
		return
	}
	err := m.publishRecord(ctx, spec, uid)
	m.mu.Lock()
	defer m.mu.Unlock()
	if err != nil {
		if m.mirrorErr != err.Error() {
			m.mirrorErr = err.Error()
			m.log.Warn("annotations mode: could not keep the node's NodeNetwork record beside its annotations (nodes in the nodenetwork mode will not see this node)", "err", err)
		}
		return
	}
	m.mirrored.spec, m.mirrored.uid, m.mirrored.ok, m.mirrorErr = spec, uid, true, ""
}

// keepAnnotations is the nodenetwork mode's care for the annotations a
// node wrote before it was switched from the annotations mode: while they
// are there, nodes still in the annotations mode read them, so they are kept
// current. They are never added, and removing them (once no node is in the
// annotations mode) makes them go for good.
func (m *Manager) keepAnnotations(ctx context.Context, node *cachedNode) error {
	if node.annotations().backendType == "" || m.published(node) {
		return nil
	}
	m.log.Info("updating the annotations this node wrote in the annotations mode, for the nodes still in that mode")
	return m.publish(ctx)
}

// recordErr adds what to do to the errors an operator can fix.
func recordErr(err error) error {
	switch {
	case apierrors.IsNotFound(err) && isResourceMissing(err):
		return fmt.Errorf("%w (the NodeNetwork CustomResourceDefinition is not installed: apply deploy/kube-twill.yaml, or run twilld with --kube-mode=annotations)", err)
	case apierrors.IsForbidden(err) || apierrors.IsInvalid(err):
		return fmt.Errorf("%w (deploy/kube-twill.yaml's ClusterRole and ValidatingAdmissionPolicy let a twilld write only the record named after the node its ServiceAccount token is bound to: is --node-name that node?)", err)
	}
	return err
}

// isResourceMissing tells a 404 for the resource (no CRD) from one for a
// record: the API server's answer for an unknown resource has no details
// naming an object.
func isResourceMissing(err error) bool {
	var st apierrors.APIStatus
	if !errors.As(err, &st) {
		return false
	}
	d := st.Status().Details
	return d == nil || d.Name == ""
}

// recordItem is a key of the nodenetwork mode's queue: the own Node, or a
// record.
type recordItem struct {
	record bool
	name   string
}

// runRecords is Run in the nodenetwork mode: an informer of the records
// fills the peer cache and keeps the own record; an informer of the own Node
// alone (a field selector on its name) lets the lease follow its podCIDRs
// and overwrite annotations, and gives the UID the record's ownerReference
// names.
func (m *Manager) runRecords(ctx context.Context) error {
	nodeInf := m.ownNodeInformer()
	recInf := m.recordInformer()
	queue := workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[recordItem]())
	nodeKey := recordItem{name: m.node}
	onNode := func() { m.counted(ResourceNodes); queue.Add(nodeKey) }
	if _, err := nodeInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { onNode() },
		UpdateFunc: func(any, any) { onNode() },
		DeleteFunc: func(any) { onNode() },
	}); err != nil {
		return fmt.Errorf("kube lease manager: own Node informer: %w", err)
	}
	enqueue := func(obj any) {
		m.counted(Resource)
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			queue.Add(recordItem{record: true, name: key})
		}
	}
	if _, err := recInf.AddEventHandler(cache.ResourceEventHandlerDetailedFuncs{
		AddFunc: func(obj any, isInInitialList bool) {
			if isInInitialList {
				m.counted(Resource)
			} else {
				enqueue(obj)
			}
		},
		UpdateFunc: func(_, obj any) { enqueue(obj) },
		DeleteFunc: func(obj any) {
			if ts, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				m.log.Debug("record deletion learnt from a relist", "peer", ts.Key)
			}
			enqueue(obj)
		},
	}); err != nil {
		return fmt.Errorf("kube lease manager: NodeNetwork informer: %w", err)
	}
	m.store, m.recStore = nodeInf.GetStore(), recInf.GetStore()

	var wg sync.WaitGroup
	defer wg.Wait()
	defer queue.ShutDown()
	wg.Go(func() { nodeInf.RunWithContext(ctx) })
	wg.Go(func() { recInf.RunWithContext(ctx) })
	if !cache.WaitFor(ctx, "", recInf.HasSyncedChecker(), nodeInf.HasSyncedChecker()) {
		return ctx.Err()
	}
	keys := m.recStore.ListKeys()
	for _, key := range keys {
		if key != m.node {
			m.syncRecordPeer(key)
		}
	}
	m.cache.MarkSynced()
	m.log.Info("NodeNetwork records listed", "records", len(keys), "peers", m.cache.Len())
	queue.Add(nodeKey) // the own Node and record, checked once now

	wg.Go(func() {
		for m.processRecord(ctx, queue) {
		}
	})
	<-ctx.Done()
	return ctx.Err()
}

func (m *Manager) processRecord(ctx context.Context, queue workqueue.TypedRateLimitingInterface[recordItem]) bool {
	item, quit := queue.Get()
	if quit {
		return false
	}
	defer queue.Done(item)
	var err error
	switch {
	case !item.record || item.name == m.node:
		err = m.syncOwnRecord(ctx)
	default:
		m.syncRecordPeer(item.name)
	}
	if err != nil {
		if ctx.Err() == nil {
			m.log.Warn("sync own NodeNetwork record; will retry", "err", err)
			queue.AddRateLimited(item)
		}
		return true
	}
	queue.Forget(item)
	return true
}

// syncRecordPeer brings the peer cache in line with one record as the
// informer has it now.
func (m *Manager) syncRecordPeer(name string) {
	obj, exists, _ := m.recStore.GetByKey(name)
	r, _ := obj.(*cachedRecord)
	if !exists || r == nil {
		m.dropPeer(name, "", true)
		return
	}
	fams := families{v4: m.cfg.EnableIPv4, v6: m.cfg.EnableIPv6}
	l, ok, err := recordLease(name, &r.spec, fams)
	switch {
	case err != nil:
		m.dropPeer(name, "malformed: "+err.Error(), false)
	case !ok:
		m.dropPeer(name, fmt.Sprintf("its NodeNetwork record has no family the network config enables (%s)", fams), false)
	case l.Subnet.IsValid() && !inNetwork(m.cfg.Network, l.Subnet):
		m.dropPeer(name, fmt.Sprintf("subnet %s is outside the Network %s", l.Subnet, m.cfg.Network), false)
	case l.IPv6Subnet.IsValid() && !inNetwork(m.cfg.IPv6Network, l.IPv6Subnet):
		m.dropPeer(name, fmt.Sprintf("IPv6 subnet %s is outside the IPv6Network %s", l.IPv6Subnet, m.cfg.IPv6Network), false)
	default:
		// Between records that claim the same addresses the older wins
		// (subnet.FilterPeers): a node cannot take over the subnet of one
		// that published before it.
		l.Claimed = r.CreationTimestamp.Unix()
		m.setPeer(name, l)
	}
}

// syncOwnRecord lets the own lease follow the own Node and writes the
// node's record again when it is missing or differs from the lease (deleted
// or changed by someone else). While the own Node is gone nothing is
// written: a record owned by a deleted Node would be collected again.
func (m *Manager) syncOwnRecord(ctx context.Context) error {
	m.mu.Lock()
	released := m.released
	m.mu.Unlock()
	if released {
		return nil
	}
	obj, exists, _ := m.store.GetByKey(m.node)
	node, _ := obj.(*cachedNode)
	if !exists || node == nil {
		m.ownProblem("the own Node was deleted; keeping the lease until it is back")
		return nil
	}
	moved := false
	if l, err := m.ownLease(node); err != nil {
		m.ownProblem(err.Error() + "; keeping the current lease")
	} else {
		m.ownProblem("")
		if old := m.Own(); !subnet.SameLease(old, l) {
			m.log.Warn("own lease changed with the Node", slog.Group("old", leaseLog(old)...), slog.Group("new", leaseLog(l)...))
			m.setOwn(l)
			moved = true
		}
	}
	if err := m.keepAnnotations(ctx, node); err != nil {
		return err
	}
	want := recordSpec(m.Own())
	obj, ok, _ := m.recStore.GetByKey(m.node)
	switch r, _ := obj.(*cachedRecord); {
	case ok && r != nil && sameSpec(r.spec, want) && r.nodeUID == node.UID:
		return nil
	case !ok:
		m.log.Warn("the node's NodeNetwork record is missing; writing it again")
	case !moved:
		m.log.Warn("the node's NodeNetwork record was changed; writing it again")
	}
	return m.publishRecord(ctx, want, node.UID)
}

// ownNodeInformer is an informer of the own Node alone (a field selector on
// metadata.name), slimmed like the Node informer's objects, with the UID
// the record's ownerReference names.
func (m *Manager) ownNodeInformer() cache.SharedIndexInformer {
	return m.nodeInformerOf(fields.OneTermEqualSelector("metadata.name", m.node).String())
}

// recordInformer is an informer of every NodeNetwork, slimmed by SlimRecord.
func (m *Manager) recordInformer() cache.SharedIndexInformer {
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, opts metav1.ListOptions) (runtime.Object, error) {
			return m.records.List(ctx, opts)
		},
		WatchFuncWithContext: func(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
			return m.records.Watch(ctx, opts)
		},
	}
	return newInformer(lw, m.records, &NodeNetwork{}, SlimRecord)
}
