package kube

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
)

// cachedNode is a Node as the informer keeps it: the name the informer keys
// it by, its resourceVersion, and twill's inputs (the podCIDRs and the values
// of twill's annotations under the manager's prefix). The informer needs only
// the metadata accessors, which the embedded ObjectMeta provides.
//
// It is a type of its own rather than a *corev1.Node with only these fields
// set because the Node struct alone is 784 bytes and an annotation map some
// 300 more: with 5,000 Nodes the cache took 7 MiB that way, about 2.5 MiB
// like this.
type cachedNode struct {
	metav1.ObjectMeta // Name and ResourceVersion; nothing else

	podCIDRs []string // spec.podCIDRs, or spec.podCIDR alone when podCIDRs is empty
	// The values of twill's annotations, "" when absent: those of an IPv4
	// node in place, the others behind a pointer that is nil when they are
	// all absent, as on every Node of an IPv4 cluster without overwrites.
	// In place they would take the struct from 320 bytes to 368, which Go
	// allocates as 384: 64 bytes more for every Node.
	backendType, backendData, publicIP string
	more                               *moreAnnotations
	subnetManager                      bool // kube-subnet-manager is "true"; fits in the padding
}

// moreAnnotations are the values of twill's IPv6 annotations and of the
// operator's overwrites.
type moreAnnotations struct {
	backendV6Data, publicIPv6, publicIPOverwrite, publicIPv6Overwrite string
}

// annotations returns the values of twill's annotations on n.
func (n *cachedNode) annotations() nodeAnnotations {
	a := nodeAnnotations{written: written{backendType: n.backendType, backendData: n.backendData, publicIP: n.publicIP}}
	if n.subnetManager {
		a.subnetManager = "true"
	}
	if m := n.more; m != nil {
		a.backendV6Data, a.publicIPv6 = m.backendV6Data, m.publicIPv6
		a.publicIPOverwrite, a.publicIPv6Overwrite = m.publicIPOverwrite, m.publicIPv6Overwrite
	}
	return a
}

// slim returns what twill reads of n, with the annotations named by k. The
// strings are those of n, which the decoder allocated one by one, so nothing
// else of n stays reachable.
func slim(n *corev1.Node, k AnnotationKeys) *cachedNode {
	c := &cachedNode{
		ObjectMeta: metav1.ObjectMeta{Name: n.Name, ResourceVersion: n.ResourceVersion},
		podCIDRs:   n.Spec.PodCIDRs,
	}
	if len(c.podCIDRs) == 0 && n.Spec.PodCIDR != "" {
		c.podCIDRs = []string{n.Spec.PodCIDR}
	}
	a := k.read(n.Annotations)
	c.backendType, c.backendData, c.publicIP = a.backendType, a.backendData, a.publicIP
	c.subnetManager = a.subnetManager == "true"
	if m := (moreAnnotations{a.backendV6Data, a.publicIPv6, a.publicIPOverwrite, a.publicIPv6Overwrite}); m != (moreAnnotations{}) {
		c.more = &m
	}
	return c
}

// SlimNode returns the informer transform that keeps of a Node only what
// twill reads (a cachedNode): name, resourceVersion, the podCIDRs and the
// values of twill's annotations under prefix. Everything else (managedFields,
// labels, other annotations, taints, the whole status with its images,
// conditions, addresses and node info) is dropped before the object enters
// the informer's cache, which is what keeps thousands of Nodes small: a
// kubelet-written Node is mostly status and managedFields.
//
// It is idempotent, and tombstones (cache.DeletedFinalStateUnknown) pass
// through unchanged.
func SlimNode(prefix string) cache.TransformFunc {
	k := Keys(prefix)
	return func(obj any) (any, error) {
		if n, ok := obj.(*corev1.Node); ok {
			return slim(n, k), nil
		}
		return obj, nil
	}
}
