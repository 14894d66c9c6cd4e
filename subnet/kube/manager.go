package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"

	"github.com/twillnet/twill/internal/retry"
	"github.com/twillnet/twill/subnet"
)

// FieldManager is the field manager twill's patches are recorded under.
const FieldManager = "twilld"

// Node condition twill sets once the datapath is up.
const (
	ConditionReason  = "TwillIsUp"
	conditionMessage = "twill has set up the pod network on this node"
)

// Options configures a Manager.
type Options struct {
	// Client talks to the API server (NewNodeClient). It needs nodes get,
	// list and watch, and nodes/status patch; nothing else.
	Client NodeClient
	// NodeName is the Node this twilld runs on (--node-name, NODE_NAME).
	NodeName string
	// AnnotationPrefix prefixes twill's annotations; default "twill.io".
	AnnotationPrefix string
	// SetNodeCondition makes DatapathReady set NetworkUnavailable=False.
	SetNodeCondition bool
	// Log receives the manager's messages and client-go's (reflector) ones.
	Log *slog.Logger
	// Waiting, when set, is called with the reason each time Acquire finds
	// the lease not ready yet (for a readiness endpoint).
	Waiting func(reason string)
}

// Manager is the Kubernetes lease manager of one node: the lease is the
// Node's podCIDR, the attributes are published as Node annotations and the
// peers are learnt from a Node informer.
type Manager struct {
	client  NodeClient
	node    string
	prefix  string
	keys    AnnotationKeys
	setCond bool
	log     *slog.Logger
	waiting func(string)
	cfg     *subnet.Config
	attrs   subnet.LeaseAttrs // what this node publishes

	// retryMin and retryMax bound Acquire's polling of the own Node.
	retryMin, retryMax time.Duration

	mu       sync.Mutex
	own      subnet.Lease
	acquired bool
	released bool
	skipped  map[string]string // node -> why it is not a peer, to log each reason once

	// cache holds the peers by node name, never the own node; changed is
	// the daemon's subscription to it.
	cache   *subnet.Cache
	changed <-chan struct{}

	// store is the informer's Node cache, read by the worker. Run sets it;
	// unit tests seed one.
	store cache.Store
}

// NewManager checks the options and returns a manager that will publish
// attrs on the node and lease its podCIDR, which must lie in cfg.Network.
func NewManager(o Options, cfg *subnet.Config, attrs subnet.LeaseAttrs) (*Manager, error) {
	switch {
	case o.Client == nil:
		return nil, errors.New("kube lease manager: no Kubernetes client")
	case o.NodeName == "":
		return nil, errors.New("kube lease manager: no node name (--node-name or NODE_NAME)")
	case cfg == nil:
		return nil, errors.New("kube lease manager: no network config")
	case !attrs.PublicIP.Is4():
		return nil, fmt.Errorf("kube lease manager: public IP %v is not IPv4", attrs.PublicIP)
	case attrs.BackendType == "":
		return nil, errors.New("kube lease manager: no backend type")
	case len(attrs.BackendData) > 0 && !json.Valid(attrs.BackendData):
		return nil, errors.New("kube lease manager: backend data is not valid JSON")
	}
	if o.AnnotationPrefix == "" {
		o.AnnotationPrefix = DefaultAnnotationPrefix
	}
	if err := checkPrefix(o.AnnotationPrefix); err != nil {
		return nil, fmt.Errorf("kube lease manager: %w", err)
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	attrs.NodeName = o.NodeName
	cache := subnet.NewCache()
	return &Manager{
		client: o.Client, node: o.NodeName, prefix: o.AnnotationPrefix, keys: Keys(o.AnnotationPrefix),
		setCond: o.SetNodeCondition, log: o.Log.With("node", o.NodeName), waiting: o.Waiting,
		cfg: cfg, attrs: attrs,
		retryMin: 200 * time.Millisecond, retryMax: 5 * time.Second,
		skipped: map[string]string{},
		cache:   cache, changed: cache.Subscribe(),
	}, nil
}

// Acquire waits until the own Node has a podCIDR inside the network, publishes
// the node's annotations on it and returns the lease. Every obstacle (no Node
// yet, no podCIDR yet, a podCIDR outside the network, a malformed
// public-ip-overwrite, the API server unreachable, RBAC missing) is logged once
// and waited on with backoff, since an operator or a controller may fix it;
// Acquire returns an error only when ctx ends.
func (m *Manager) Acquire(ctx context.Context) (subnet.Lease, error) {
	bo := retry.Backoff{Min: m.retryMin, Max: m.retryMax}
	last := ""
	for {
		l, reason := m.tryAcquire(ctx)
		if reason == "" {
			m.setOwn(l)
			m.log.Info("lease acquired from the Node", "subnet", l.Subnet, "publicIP", l.Attrs.PublicIP)
			return l, nil
		}
		if ctx.Err() == nil {
			if m.waiting != nil {
				m.waiting(reason)
			}
			if reason != last {
				m.log.Warn("lease not available yet; waiting", "reason", reason)
				last = reason
			}
		}
		if err := bo.Wait(ctx); err != nil {
			return subnet.Lease{}, fmt.Errorf("acquire lease of node %s (%s): %w", m.node, reason, err)
		}
	}
}

// tryAcquire returns the lease, or why there is none yet.
func (m *Manager) tryAcquire(ctx context.Context) (subnet.Lease, string) {
	node, err := m.client.Get(ctx, m.node, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return subnet.Lease{}, fmt.Sprintf("Node %s does not exist yet (the kubelet registers it)", m.node)
	}
	if err != nil {
		return subnet.Lease{}, fmt.Sprintf("read Node %s: %v", m.node, err)
	}
	own := slim(node, m.keys)
	l, err := m.ownLease(own)
	if err != nil {
		return subnet.Lease{}, err.Error()
	}
	if !m.published(own) {
		if err := m.publish(ctx); err != nil {
			return subnet.Lease{}, err.Error()
		}
	}
	return l, ""
}

// ownLease is the lease the own Node gives: its podCIDR, this node's
// attributes, and the operator's public-ip-overwrite if any.
func (m *Manager) ownLease(node *cachedNode) (subnet.Lease, error) {
	p, ok, err := node.podSubnet()
	if err != nil {
		return subnet.Lease{}, err
	}
	if !ok {
		return subnet.Lease{}, fmt.Errorf("Node %s has no podCIDR yet (assigned by kube-controller-manager --allocate-node-cidrs, or set spec.podCIDR)", m.node)
	}
	if !inNetwork(m.cfg, p) {
		return subnet.Lease{}, fmt.Errorf("podCIDR %s of Node %s is outside the Network %s of the network config: change one of them", p, m.node, m.cfg.Network)
	}
	attrs := m.attrs
	if ow := node.publicIPOverwrite; ow != "" {
		if attrs.PublicIP, err = parseIPv4(ow); err != nil {
			return subnet.Lease{}, fmt.Errorf("annotation %s on Node %s: %w", m.keys.PublicIPOverwrite, m.node, err)
		}
	}
	return subnet.Lease{Subnet: p, Attrs: attrs}, nil
}

// published reports whether the Node carries this node's annotations. None
// of them is ever empty, so an absent one ("") never matches.
func (m *Manager) published(node *cachedNode) bool {
	want := m.keys.owned(m.attrs)
	return node.backendType == want[m.keys.BackendType] && node.backendData == want[m.keys.BackendData] &&
		node.publicIP == want[m.keys.PublicIP]
}

// publish writes this node's annotations with a JSON merge patch on the
// nodes/status subresource: metadata may be changed through it, and it is the
// only write RBAC must grant (nodes/status patch, not nodes patch).
func (m *Manager) publish(ctx context.Context) error {
	return m.patchAnnotations(ctx, m.keys.owned(m.attrs))
}

// patchAnnotations merges ann (values are strings, or nil to remove) into
// the own Node's annotations.
func (m *Manager) patchAnnotations(ctx context.Context, ann any) error {
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": ann}})
	if err != nil {
		return err
	}
	_, err = m.client.Patch(ctx, m.node, types.MergePatchType, patch,
		metav1.PatchOptions{FieldManager: FieldManager}, "status")
	if err != nil {
		return fmt.Errorf("patch annotations of Node %s (nodes/status): %w", m.node, err)
	}
	return nil
}

// Own returns the lease the node holds now: it follows the Node's podCIDR and
// public-ip-overwrite.
func (m *Manager) Own() subnet.Lease {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.own
}

func (m *Manager) setOwn(l subnet.Lease) {
	m.mu.Lock()
	same := m.acquired && subnet.SameLease(m.own, l)
	m.own, m.acquired = l, true
	m.mu.Unlock()
	if !same {
		m.cache.Notify()
	}
}

// Peers returns the leases of every other Node with a podCIDR and twill's
// annotations, in no particular order, and whether the informer has listed
// the Nodes at least once.
func (m *Manager) Peers() ([]subnet.Lease, bool) { return m.cache.Peers("") }

// Changed signals, coalesced, that Own or Peers changed.
func (m *Manager) Changed() <-chan struct{} { return m.changed }

// Release removes the annotations twilld wrote (backend type, backend data,
// public IP) from the own Node, so peers drop this node; an operator's
// public-ip-overwrite stays. The podCIDR is the cluster's and stays too. Call it
// after Run has returned (--release-on-exit); a running Run would restore the
// annotations otherwise, so Release also stops that.
func (m *Manager) Release(ctx context.Context) error {
	m.mu.Lock()
	m.released = true
	m.mu.Unlock()
	remove := map[string]*string{m.keys.BackendType: nil, m.keys.BackendData: nil, m.keys.PublicIP: nil}
	bo := retry.Backoff{Min: m.retryMin, Max: m.retryMax}
	for {
		err := m.patchAnnotations(ctx, remove)
		if err == nil || apierrors.IsNotFound(err) {
			return nil
		}
		if bo.Wait(ctx) != nil {
			return fmt.Errorf("release lease: %w", err)
		}
	}
}

// DatapathReady sets the Node condition NetworkUnavailable=False (reason
// TwillIsUp) when Options.SetNodeCondition is on; it does nothing otherwise,
// and nothing when the condition is already so, which keeps its
// lastTransitionTime across restarts. The patch is a strategic merge patch
// of status.conditions (merged by type) on nodes/status.
func (m *Manager) DatapathReady(ctx context.Context) error {
	if !m.setCond {
		return nil
	}
	node, err := m.client.Get(ctx, m.node, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("set NetworkUnavailable condition: read Node %s: %w", m.node, err)
	}
	for _, c := range node.Status.Conditions {
		if c.Type == corev1.NodeNetworkUnavailable && c.Status == corev1.ConditionFalse && c.Reason == ConditionReason {
			return nil
		}
	}
	now := metav1.Now()
	cond := corev1.NodeCondition{
		Type: corev1.NodeNetworkUnavailable, Status: corev1.ConditionFalse,
		Reason: ConditionReason, Message: conditionMessage,
		LastTransitionTime: now, LastHeartbeatTime: now,
	}
	patch, err := json.Marshal(map[string]any{"status": map[string]any{"conditions": []corev1.NodeCondition{cond}}})
	if err != nil {
		return err
	}
	if _, err := m.client.Patch(ctx, m.node, types.StrategicMergePatchType, patch,
		metav1.PatchOptions{FieldManager: FieldManager}, "status"); err != nil {
		return fmt.Errorf("set NetworkUnavailable condition of Node %s (nodes/status): %w", m.node, err)
	}
	m.log.Info("node condition NetworkUnavailable set to False")
	return nil
}
