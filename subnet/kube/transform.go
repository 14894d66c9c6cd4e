package kube

import (
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/cache"
)

// SlimNode returns the informer transform that keeps of a Node only what
// twill reads: name, UID, resourceVersion, the annotations under prefix and
// spec.podCIDR(s). Everything else (managedFields, labels, other annotations,
// taints, the whole status with its images, conditions, addresses and node
// info) is dropped before the object enters the informer's cache, which is
// what keeps thousands of Nodes small: a kubelet-written Node is mostly
// status and managedFields.
//
// It returns a new object rather than trimming the decoded one, so nothing of
// the decoded object stays reachable. It is idempotent, and tombstones
// (cache.DeletedFinalStateUnknown) pass through unchanged.
func SlimNode(prefix string) cache.TransformFunc {
	if prefix == "" {
		prefix = DefaultAnnotationPrefix
	}
	pfx := prefix + "/"
	return func(obj any) (any, error) {
		n, ok := obj.(*corev1.Node)
		if !ok {
			return obj, nil
		}
		var ann map[string]string
		for k, v := range n.Annotations {
			if strings.HasPrefix(k, pfx) {
				if ann == nil {
					ann = make(map[string]string, 4)
				}
				ann[k] = v
			}
		}
		slim := &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{
				Name:            n.Name,
				UID:             n.UID,
				ResourceVersion: n.ResourceVersion,
				Annotations:     ann,
			},
			Spec: corev1.NodeSpec{PodCIDR: n.Spec.PodCIDR},
		}
		if len(n.Spec.PodCIDRs) > 0 {
			slim.Spec.PodCIDRs = append([]string(nil), n.Spec.PodCIDRs...)
		}
		return slim, nil
	}
}
