// Package kube is twill's lease manager for clusters where the Kubernetes API
// is the datastore (twilld --kube-subnet-mgr): there is no etcd of twill's own
// and no subnet allocation by twill.
//
// A node's lease is its Node's spec.podCIDRs, one per family (spec.podCIDR is
// the first), assigned by kube-controller-manager or by hand: the IPv4 one
// when the network config enables IPv4, the IPv6 one when it enables IPv6.
// twill only checks that each lies inside its family's network; a Node that
// lacks one of an enabled family is waited on. What a node publishes for its
// peers lives in annotations of its Node, under a prefix (twill.io by
// default), with flannel's names and value formats:
//
//	twill.io/backend-type           "vxlan" or "host-gw"                written by twilld
//	twill.io/backend-data           IPv4 backend JSON, {"VtepMAC":...}  written by twilld, with IPv4
//	twill.io/public-ip              the node's IPv4 for tunnels/routes  written by twilld, with IPv4
//	twill.io/backend-v6-data        IPv6 backend JSON                   written by twilld, with IPv6
//	twill.io/public-ipv6            the node's IPv6 for tunnels/routes  written by twilld, with IPv6
//	twill.io/public-ip-overwrite    the IPv4 address peers use instead  set by an operator (NAT)
//	twill.io/public-ipv6-overwrite  the IPv6 address peers use instead  set by an operator (NAT)
//
// A peer's lease has each family for which its Node has a podCIDR and a
// published address, of those the network config enables; a peer may lack
// one (Lease.Family tells), and its PublicIP is 0.0.0.0 without IPv4, as in
// flannel's lease of an IPv6-only node.
//
// twilld writes its annotations with a JSON merge patch on the nodes/status
// subresource, which accepts metadata changes: the only write the ClusterRole
// grants is "nodes/status patch", next to "nodes get, list, watch". The
// same subresource carries the NetworkUnavailable=False condition that
// DatapathReady sets.
//
// Peers come from one Node informer. Its transform (SlimNode) keeps only the
// name, resourceVersion, the values of twill's annotations and the podCIDRs,
// in a struct of their own, so the cache of thousands of Nodes stays small: a
// kubelet's Node is mostly status (images, conditions) and managedFields. The event handlers only put Node
// names on a rate-limited workqueue; one worker reads each Node's current
// state from the cache and updates the lease cache (level-triggered, so a
// burst of updates, a relist after a 410 Gone, or a tombstone for a deletion
// missed while the watch was down all come out the same), and signals Changed
// only when a lease really changed: a node heartbeat that touches nothing of
// twill's costs no reconcile. Nodes without a family complete (a podCIDR
// and twill's annotations of it) are not peers until they have one. Watches that expire are
// re-listed by client-go's reflector.
//
// The client (NewNodeClient) is a REST client for Nodes alone, not
// client-go's Clientset: see NewNodeClient for why.
//
// The own Node is watched as well: its annotations are written again when
// someone removes or changes them, and the own lease follows new podCIDRs or
// overwrite annotations.
package kube
