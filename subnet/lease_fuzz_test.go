package subnet

import (
	"bytes"
	"encoding/json"
	"testing"
)

// FuzzParseLeaseAttrs feeds arbitrary etcd values to the lease decoder. For
// whatever it accepts, the lease must be one a peer can be programmed from
// (a usable IPv4 public IP, a backend type, size within bounds), and encoding
// it again must give a value that decodes to the same lease. Seeds:
// testdata/fuzz/FuzzParseLeaseAttrs.
func FuzzParseLeaseAttrs(f *testing.F) {
	f.Add([]byte(`{"PublicIP":"198.18.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"},"NodeName":"h1"}`))
	f.Add([]byte(`{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::1","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		a, err := ParseLeaseAttrs(data)
		if err != nil {
			return
		}
		if len(data) > MaxLeaseValueSize {
			t.Fatalf("accepted a %d-byte value", len(data))
		}
		if a.PublicIPv6.IsValid() {
			if err := CheckPublicIP(a.PublicIPv6, true); err != nil {
				t.Fatalf("accepted public IPv6: %v", err)
			}
		} else if err := CheckPublicIP(a.PublicIP, false); err != nil {
			t.Fatalf("accepted public IP: %v", err)
		}
		if a.BackendType == "" {
			t.Fatal("accepted a lease without a backend type")
		}
		if len(a.BackendData) > 0 && !json.Valid(a.BackendData) {
			t.Fatalf("accepted backend data that is not JSON: %q", a.BackendData)
		}
		enc, err := json.Marshal(a)
		if err != nil {
			t.Fatalf("accepted lease does not encode: %v", err)
		}
		b, err := ParseLeaseAttrs(enc)
		if err != nil {
			t.Fatalf("re-encoded lease %s is refused: %v", enc, err)
		}
		var c1, c2 bytes.Buffer
		json.Compact(&c1, a.BackendData)
		json.Compact(&c2, b.BackendData)
		if a.PublicIP != b.PublicIP || a.BackendType != b.BackendType || a.NodeName != b.NodeName || c1.String() != c2.String() {
			t.Fatalf("round trip changed the lease: %+v -> %+v", a, b)
		}
	})
}
