package kube

import (
	"bytes"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// FuzzNodeToLease feeds arbitrary podCIDRs and annotation values of both
// families to the conversion. It must never panic; a lease it returns must be
// usable by a backend (checkLease: each family it has a network address of
// that family with a public address of it, JSON or no backend data, the
// fields of a family it lacks empty); the transform must not change the
// result; and the annotations twilld would publish for that lease must read
// back as the same attributes.
func FuzzNodeToLease(f *testing.F) {
	f.Add("10.244.1.0/24", "", "vxlan", `{"VNI":1,"VtepMAC":"ae:12:34:56:78:9a"}`, "192.0.2.1", "", "", "", "")
	f.Add("10.244.1.0/24", "fd00::/64", "host-gw", "null", "192.0.2.1", "203.0.113.9", "null", "2001:db8::1", "")
	f.Add("10.244.1.1/24", "", "vxlan", "{", "192.0.2.1", "", "", "", "")
	f.Add("fd00::/64", "10.244.2.0/24", "vxlan", "", "::ffff:192.0.2.1", "", "", "", "")
	f.Add("10.244.1.0/24", "fd00:10:244:1::/64", "vxlan", `{"VNI":1,"VtepMAC":"ae:12:34:56:78:9a"}`, "192.0.2.1", "",
		`{"VNI":1,"VtepMAC":"ae:12:34:56:78:9b"}`, "2001:db8::1", "2001:db8:ffff::1")
	f.Add("fd00:10:244:1::/64", "", "vxlan", "", "", "", `{"VNI":1,"VtepMAC":"ae:12:34:56:78:9b"}`, "2001:db8::1", "")
	f.Add("fd00:10:244:1::/64", "", "host-gw", "null", "0.0.0.0", "", "null", "2001:db8::1", "")
	f.Add("10.244.1.0/24", "fd00:10:244:1::/64", "vxlan", "", "192.0.2.1", "", "{", "fe80::1%eth0", "192.0.2.9")
	f.Fuzz(func(t *testing.T, podCIDR, podCIDR2, bt, data, pip, ow, data6, pip6, ow6 string) {
		n := &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: "n", Annotations: map[string]string{
				"twill.io/backend-type": bt, "twill.io/backend-data": data,
				"twill.io/public-ip": pip, "twill.io/public-ip-overwrite": ow,
				"twill.io/backend-v6-data": data6, "twill.io/public-ipv6": pip6, "twill.io/public-ipv6-overwrite": ow6,
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
		l2, ok2, err2 := cached.(*cachedNode).lease(Keys(""), bothFamilies)
		if ok2 != ok || (err == nil) != (err2 == nil) || !leaseEqual(l, l2) {
			t.Fatalf("transform changed the result: %+v %v %v / %+v %v %v", l, ok, err, l2, ok2, err2)
		}
		if !ok {
			return
		}
		if err := checkLease(l); err != nil {
			t.Fatalf("unusable lease %+v: %v", l, err)
		}
		back, ok, err := ParseAnnotations(Keys("").owned(l.Attrs), "")
		if !ok || err != nil || back.PublicIP != l.Attrs.PublicIP || back.PublicIPv6 != l.Attrs.PublicIPv6 ||
			back.BackendType != l.Attrs.BackendType || !bytes.Equal(back.BackendData, l.Attrs.BackendData) ||
			!bytes.Equal(back.BackendV6Data, l.Attrs.BackendV6Data) {
			t.Fatalf("published %+v reads back as %+v %v %v", l.Attrs, back, ok, err)
		}
	})
}

// FuzzRecordToLease feeds arbitrary record fields of both families to the
// conversion. It must never panic; a lease it returns must be usable by a
// backend (checkLease); and the record twilld would write for that lease
// must read back as the same lease.
func FuzzRecordToLease(f *testing.F) {
	f.Add("vxlan", "10.244.1.0/24", "192.0.2.1", `{"VNI":1,"VtepMAC":"ae:12:34:56:78:9a"}`, "", "", "")
	f.Add("vxlan", "10.244.1.0/24", "192.0.2.1", `{"VNI":1}`, "fd00:10:244:1::/64", "2001:db8::1", `{"VNI":1}`)
	f.Add("host-gw", "", "", "", "fd00:10:244:1::/64", "2001:db8::1", "")
	f.Add("vxlan", "10.244.1.1/24", "192.0.2.1", "{", "fd00::/64", "fe80::1%eth0", "")
	f.Add("", "10.244.1.0/24", "192.0.2.1", "", "", "", "")
	f.Add("vxlan", "fd00::/64", "::ffff:192.0.2.1", "null", "10.244.2.0/24", "192.0.2.1", "")
	f.Fuzz(func(t *testing.T, bt, sn, pip, data, sn6, pip6, data6 string) {
		r := &NodeNetwork{ObjectMeta: metav1.ObjectMeta{Name: "n"}, Spec: NodeNetworkSpec{
			BackendType: bt, Subnet: sn, PublicIP: pip, BackendData: []byte(data),
			IPv6Subnet: sn6, PublicIPv6: pip6, BackendV6Data: []byte(data6),
		}}
		l, ok, err := RecordToLease(r)
		if ok && err != nil {
			t.Fatalf("ok with error %v", err)
		}
		if !ok {
			return
		}
		if err := checkLease(l); err != nil {
			t.Fatalf("unusable lease %+v: %v", l, err)
		}
		back, ok, err := RecordToLease(&NodeNetwork{ObjectMeta: r.ObjectMeta, Spec: recordSpec(l)})
		if !ok || err != nil || !leaseEqual(back, l) {
			t.Fatalf("lease %+v written as %+v reads back as %+v %v %v", l, recordSpec(l), back, ok, err)
		}
	})
}
