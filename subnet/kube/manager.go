package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
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
	// Mode is where the node publishes its lease and learns its peers':
	// ModeAnnotations ("" too) or ModeNodeNetwork.
	Mode Mode
	// Records reads and writes NodeNetwork records (NewRecordClient;
	// nodenetworks get, list, watch, create, update and delete). The
	// nodenetwork mode needs it. In the annotations mode it is optional:
	// when set, the node also keeps its own record, so that nodes already
	// in the nodenetwork mode find it during a switch of modes.
	Records RecordClient
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
	// Event, when set, is called for every object an informer delivers
	// (listed, added, updated or deleted) with its resource: ResourceNodes
	// or Resource (nodenetworks). It counts what the watches cost.
	Event func(resource string)
}

// Mode is how nodes publish their leases in the Kubernetes mode.
type Mode string

const (
	// ModeNodeNetwork: a NodeNetwork record per node; each twilld writes
	// its own and watches every record and its own Node alone.
	ModeNodeNetwork Mode = "nodenetwork"
	// ModeAnnotations: annotations on the Nodes, flannel's way; each
	// twilld writes its own Node's and watches every Node.
	ModeAnnotations Mode = "annotations"
)

// ResourceNodes is the Nodes' resource name, as Options.Event reports it.
const ResourceNodes = "nodes"

// Manager is the Kubernetes lease manager of one node: the lease is the
// Node's podCIDRs (one per family the network config enables). In the
// nodenetwork mode the lease is published in the node's NodeNetwork record
// and the peers are learnt from a record informer; in the annotations mode
// it is published as annotations of the Node and the peers are learnt from a
// Node informer.
type Manager struct {
	client  NodeClient
	records RecordClient // nil: no records (the annotations mode without them)
	// watchRecords is the nodenetwork mode: peers come from the records.
	watchRecords bool
	node         string
	prefix       string
	keys         AnnotationKeys
	setCond      bool
	log          *slog.Logger
	waiting      func(string)
	event        func(string)
	cfg          *subnet.Config
	attrs        subnet.LeaseAttrs // what this node publishes, for the enabled families only
	want         written           // the annotations that publish attrs

	// retryMin and retryMax bound Acquire's polling of the own Node.
	retryMin, retryMax time.Duration

	mu       sync.Mutex
	own      subnet.Lease
	acquired bool
	released bool
	skipped  map[string]string // node -> why it is not a peer, to log each reason once

	// mirrored is what the annotations mode last wrote in the own record,
	// so that it writes again only when the lease or the Node changes.
	mirrored struct {
		spec NodeNetworkSpec
		uid  types.UID
		ok   bool
	}
	mirrorErr string // the last failure to write it, logged once

	// cache holds the peers by node name, never the own node; changed is
	// the daemon's subscription to it.
	cache   *subnet.Cache
	changed <-chan struct{}

	// store is the informer's Node cache, read by the worker. Run sets it;
	// unit tests seed one. In the nodenetwork mode it holds the own Node
	// alone, and recStore the records.
	store    cache.Store
	recStore cache.Store
}

// NewManager checks the options and returns a manager that will publish
// attrs on the node and lease its podCIDRs: for each family cfg enables, the
// Node's podCIDR of that family, which must lie in the family's network, and
// attrs' public address of that family. The fields of a family cfg does not
// enable are dropped from attrs (PublicIP becomes 0.0.0.0 in an IPv6-only
// network, as flannel's lease of an IPv6-only node has it).
func NewManager(o Options, cfg *subnet.Config, attrs subnet.LeaseAttrs) (*Manager, error) {
	switch {
	case o.Client == nil:
		return nil, errors.New("kube lease manager: no Kubernetes client")
	case o.NodeName == "":
		return nil, errors.New("kube lease manager: no node name (--node-name or NODE_NAME)")
	case cfg == nil:
		return nil, errors.New("kube lease manager: no network config")
	case attrs.BackendType == "":
		return nil, errors.New("kube lease manager: no backend type")
	}
	attrs, err := familyAttrs(cfg, attrs)
	if err != nil {
		return nil, fmt.Errorf("kube lease manager: %w", err)
	}
	switch o.Mode {
	case "":
		o.Mode = ModeAnnotations
	case ModeAnnotations:
	case ModeNodeNetwork:
		if o.Records == nil {
			return nil, errors.New("kube lease manager: the nodenetwork mode needs a NodeNetwork client")
		}
	default:
		return nil, fmt.Errorf("kube lease manager: mode %q: want %s or %s", o.Mode, ModeNodeNetwork, ModeAnnotations)
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
		client: o.Client, records: o.Records, watchRecords: o.Mode == ModeNodeNetwork, node: o.NodeName, prefix: o.AnnotationPrefix, keys: Keys(o.AnnotationPrefix),
		setCond: o.SetNodeCondition, log: o.Log.With("node", o.NodeName), waiting: o.Waiting, event: o.Event,
		cfg: cfg, attrs: attrs, want: writtenFor(attrs),
		retryMin: 200 * time.Millisecond, retryMax: 5 * time.Second,
		skipped: map[string]string{},
		cache:   cache, changed: cache.Subscribe(),
	}, nil
}

// familyAttrs checks attrs for the families cfg enables and drops the
// fields of the others.
func familyAttrs(cfg *subnet.Config, attrs subnet.LeaseAttrs) (subnet.LeaseAttrs, error) {
	switch {
	case !cfg.EnableIPv4 && !cfg.EnableIPv6:
		return attrs, errors.New("the network config enables neither IPv4 nor IPv6")
	case cfg.EnableIPv4 && !cfg.Network.IsValid():
		return attrs, errors.New("the network config enables IPv4 but has no Network")
	case cfg.EnableIPv6 && !cfg.IPv6Network.IsValid():
		return attrs, errors.New("the network config enables IPv6 but has no IPv6Network")
	}
	if cfg.EnableIPv4 {
		if err := checkFamily(attrs.PublicIP, attrs.BackendData, false); err != nil {
			return attrs, err
		}
	} else {
		attrs.PublicIP, attrs.BackendData = netip.IPv4Unspecified(), nil
	}
	if cfg.EnableIPv6 {
		if err := checkFamily(attrs.PublicIPv6, attrs.BackendV6Data, true); err != nil {
			return attrs, err
		}
	} else {
		attrs.PublicIPv6, attrs.BackendV6Data = netip.Addr{}, nil
	}
	return attrs, nil
}

// checkFamily checks the public address and backend data of one family.
func checkFamily(ip netip.Addr, data json.RawMessage, v6 bool) error {
	if err := subnet.CheckPublicIP(ip, v6); err != nil {
		return fmt.Errorf("public %s address: %w", subnet.FamilyName(v6), err)
	}
	if len(data) > 0 && !json.Valid(data) {
		return fmt.Errorf("%s backend data is not valid JSON", subnet.FamilyName(v6))
	}
	return nil
}

// Acquire waits until the own Node has a podCIDR inside the network of each
// family the config enables, publishes the node's annotations on it and
// returns the lease. Every obstacle (no Node yet, no podCIDR yet, none of an
// enabled family, a podCIDR outside its network, a malformed overwrite
// annotation, the API server unreachable, RBAC missing) is logged once and
// waited on with backoff, since an operator or a controller may fix it;
// Acquire returns an error only when ctx ends.
func (m *Manager) Acquire(ctx context.Context) (subnet.Lease, error) {
	bo := retry.Backoff{Min: m.retryMin, Max: m.retryMax}
	last := ""
	for {
		l, reason := m.tryAcquire(ctx)
		if reason == "" {
			m.setOwn(l)
			m.log.Info("lease acquired from the Node", leaseLog(l)...)
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
	if m.watchRecords {
		if err := m.publishRecord(ctx, recordSpec(l), node.UID); err != nil {
			return subnet.Lease{}, err.Error()
		}
		if err := m.keepAnnotations(ctx, own); err != nil {
			return subnet.Lease{}, err.Error()
		}
		return l, ""
	}
	if !m.published(own) {
		if err := m.publish(ctx); err != nil {
			return subnet.Lease{}, err.Error()
		}
	}
	m.mirrorRecord(ctx, l, node.UID)
	return l, ""
}

// ownLease is the lease the own Node gives: for each family the config
// enables, its podCIDR of that family, this node's attributes, and the
// operator's overwrite of the family's public address if any.
func (m *Manager) ownLease(node *cachedNode) (subnet.Lease, error) {
	v4, v6, err := node.podSubnets()
	if err != nil {
		return subnet.Lease{}, err
	}
	if len(node.podCIDRs) == 0 {
		return subnet.Lease{}, fmt.Errorf("Node %s has no podCIDR yet (assigned by kube-controller-manager --allocate-node-cidrs, or set spec.podCIDR)", m.node)
	}
	l := subnet.Lease{Attrs: m.attrs}
	if m.cfg.EnableIPv4 {
		if l.Subnet, err = m.ownSubnet(node, v4, false); err != nil {
			return subnet.Lease{}, err
		}
		if ow := node.annotations().publicIPOverwrite; ow != "" {
			if l.Attrs.PublicIP, err = parseAddr(ow, false); err != nil {
				return subnet.Lease{}, fmt.Errorf("annotation %s on Node %s: %w", m.keys.PublicIPOverwrite, m.node, err)
			}
		}
	}
	if m.cfg.EnableIPv6 {
		if l.IPv6Subnet, err = m.ownSubnet(node, v6, true); err != nil {
			return subnet.Lease{}, err
		}
		if ow := node.annotations().publicIPv6Overwrite; ow != "" {
			if l.Attrs.PublicIPv6, err = parseAddr(ow, true); err != nil {
				return subnet.Lease{}, fmt.Errorf("annotation %s on Node %s: %w", m.keys.PublicIPv6Overwrite, m.node, err)
			}
		}
	}
	return l, nil
}

// ownSubnet checks the own Node's podCIDR p of one family the config
// enables; the errors say what to do.
func (m *Manager) ownSubnet(node *cachedNode, p netip.Prefix, v6 bool) (netip.Prefix, error) {
	network, key, flag := m.cfg.Network, "Network", "EnableIPv4"
	if v6 {
		network, key, flag = m.cfg.IPv6Network, "IPv6Network", "EnableIPv6"
	}
	fam := subnet.FamilyName(v6)
	if !p.IsValid() {
		return p, fmt.Errorf("Node %s has no %s podCIDR (spec.podCIDRs: %s) and the network config enables %s: "+
			"give kube-controller-manager an %s range in --cluster-cidr (one CIDR per family) and register the Node again, or set %s to false",
			m.node, fam, strings.Join(node.podCIDRs, ", "), fam, fam, flag)
	}
	if !inNetwork(network, p) {
		return p, fmt.Errorf("%s podCIDR %s of Node %s is outside the %s %s of the network config: change one of them", fam, p, m.node, key, network)
	}
	return p, nil
}

// published reports whether the Node carries this node's annotations, and
// none of a family the node lacks. The backend type is never empty, so a
// Node without twill's annotations never matches.
func (m *Manager) published(node *cachedNode) bool {
	return node.annotations().written == m.want
}

// publish writes this node's annotations with a JSON merge patch on the
// nodes/status subresource: metadata may be changed through it, and it is the
// only write RBAC must grant (nodes/status patch, not nodes patch).
func (m *Manager) publish(ctx context.Context) error {
	return m.patchAnnotations(ctx, m.keys.patch(m.want))
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

// Own returns the lease the node holds now: it follows the Node's podCIDRs and
// the overwrite annotations. Subnet is zero in an IPv6-only network,
// IPv6Subnet in an IPv4-only one.
func (m *Manager) Own() subnet.Lease {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.own
}

// leaseLog is a lease as log attributes: the subnet and public address of
// each family it has.
func leaseLog(l subnet.Lease) []any {
	var out []any
	if l.Subnet.IsValid() {
		out = append(out, "subnet", l.Subnet, "publicIP", l.Attrs.PublicIP)
	}
	if l.IPv6Subnet.IsValid() {
		out = append(out, "ipv6Subnet", l.IPv6Subnet, "publicIPv6", l.Attrs.PublicIPv6)
	}
	return out
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

// Peers returns the leases of every other Node that has a podCIDR and a
// published address of at least one family the network config enables, in
// no particular order, and whether the informer has listed the Nodes at
// least once. A peer's lease carries only the families it has of those: a
// dual-stack network may have a peer without IPv6 (Lease.Family says so).
func (m *Manager) Peers() ([]subnet.Lease, bool) { return m.cache.Peers("") }

// Changed signals, coalesced, that Own or Peers changed.
func (m *Manager) Changed() <-chan struct{} { return m.changed }

// Release removes what the node publishes, so peers drop it: its
// NodeNetwork record, or in the annotations mode the annotations twilld
// writes (backend type, and backend data and public address of each family)
// from the own Node, and the record it kept beside them; an operator's
// overwrite annotations stay. The podCIDRs
// are the cluster's and stay too. Call it after Run has returned
// (--release-on-exit); a running Run would publish again otherwise, so
// Release also stops that.
func (m *Manager) Release(ctx context.Context) error {
	m.mu.Lock()
	m.released = true
	m.mu.Unlock()
	deleteRecord := func() error {
		if err := m.records.Delete(ctx, m.node, metav1.DeleteOptions{}); err != nil {
			return fmt.Errorf("delete NodeNetwork %s: %w", m.node, err)
		}
		return nil
	}
	release := deleteRecord
	if !m.watchRecords {
		release = func() error { return m.patchAnnotations(ctx, m.keys.patch(written{})) }
		m.mu.Lock()
		mirrored := m.mirrored.ok
		m.mu.Unlock()
		if mirrored {
			if err := deleteRecord(); err != nil && !apierrors.IsNotFound(err) {
				m.log.Warn("release: the node's NodeNetwork record stays", "err", err)
			}
		}
	}
	bo := retry.Backoff{Min: m.retryMin, Max: m.retryMax}
	for {
		err := release()
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
