package kube

import (
	"bytes"
	"encoding/json"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// FuzzNodeToLease feeds arbitrary podCIDRs and annotation values to the
// conversion. It must never panic; a lease it returns must be usable by a
// backend (an IPv4 network address, an IPv4 public IP, a backend type, valid
// JSON or no backend data); the transform must not change the result; and
// the annotations twilld would publish for that lease must read back as the
// same lease.
func FuzzNodeToLease(f *testing.F) {
	f.Add("10.244.1.0/24", "", "vxlan", `{"VNI":1,"VtepMAC":"ae:12:34:56:78:9a"}`, "192.0.2.1", "")
	f.Add("10.244.1.0/24", "fd00::/64", "host-gw", "null", "192.0.2.1", "203.0.113.9")
	f.Add("10.244.1.1/24", "", "vxlan", "{", "192.0.2.1", "")
	f.Add("fd00::/64", "10.244.2.0/24", "vxlan", "", "::ffff:192.0.2.1", "")
	f.Fuzz(func(t *testing.T, podCIDR, podCIDR2, bt, data, pip, ow string) {
		n := &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: "n", Annotations: map[string]string{
				"twill.io/backend-type": bt, "twill.io/backend-data": data,
				"twill.io/public-ip": pip, "twill.io/public-ip-overwrite": ow,
			}},
			Spec: corev1.NodeSpec{PodCIDR: podCIDR},
		}
		if podCIDR2 != "" {
			n.Spec.PodCIDRs = []string{podCIDR, podCIDR2}
		}
		l, ok, err := NodeToLease(n, "")
		if ok && err != nil {
			t.Fatalf("ok with error %v", err)
		}
		cached, _ := SlimNode("")(n)
		l2, ok2, err2 := cached.(*cachedNode).lease(Keys(""))
		if ok2 != ok || (err == nil) != (err2 == nil) || !leaseEqual(l, l2) {
			t.Fatalf("transform changed the result: %+v %v %v / %+v %v %v", l, ok, err, l2, ok2, err2)
		}
		if !ok {
			return
		}
		if !l.Subnet.Addr().Is4() || l.Subnet.Masked() != l.Subnet || !l.Attrs.PublicIP.Is4() ||
			l.Attrs.BackendType == "" || l.Attrs.NodeName != "n" {
			t.Fatalf("unusable lease %+v", l)
		}
		if l.Attrs.BackendData != nil && !json.Valid(l.Attrs.BackendData) {
			t.Fatalf("backend data %q is not JSON", l.Attrs.BackendData)
		}
		back, ok, err := ParseAnnotations(Keys("").owned(l.Attrs), "")
		if !ok || err != nil || back.PublicIP != l.Attrs.PublicIP || back.BackendType != l.Attrs.BackendType ||
			!bytes.Equal(back.BackendData, l.Attrs.BackendData) {
			t.Fatalf("published %+v reads back as %+v %v %v", l.Attrs, back, ok, err)
		}
	})
}
