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
	// The values of twill's annotations; "" when absent.
	backendType, backendData, publicIP, publicIPOverwrite string
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
	if ann := n.Annotations; len(ann) > 0 {
		c.backendType, c.backendData = ann[k.BackendType], ann[k.BackendData]
		c.publicIP, c.publicIPOverwrite = ann[k.PublicIP], ann[k.PublicIPOverwrite]
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
