package subnet

import (
	"bytes"
	"strings"
	"testing"
)

// FuzzParseEnv checks that ParseEnv never panics and that whatever it accepts
// is usable by the CNI plugin: IPv4, the subnet inside the network, an MTU in
// range, and a body that Render writes back to the same Env.
func FuzzParseEnv(f *testing.F) {
	good := "TWILL_NETWORK=10.244.0.0/16\nTWILL_SUBNET=10.244.7.1/24\nTWILL_MTU=1450\nTWILL_IPMASQ=true\n"
	for _, seed := range []string{
		good,
		"# written by twilld\n\n" + good,
		strings.ReplaceAll(good, "\n", "\r\n"),
		strings.TrimSuffix(good, "\n"),
		"TWILL_IPMASQ=false\nTWILL_MTU=576\nTWILL_SUBNET=10.0.0.1/8\nTWILL_NETWORK=10.0.0.0/8\n",
		"OTHER=1\n" + good,
		// malformed
		"",
		"\x00\xff\xfe",
		"TWILL_NETWORK\n",
		"=\n",
		good + "TWILL_MTU=1450\n",
		good + "TWILL_VNI=1\n",
		strings.Replace(good, "TWILL_MTU=1450\n", "", 1),
		strings.Replace(good, "10.244.7.1/24", "10.99.7.1/24", 1),
		strings.Replace(good, "10.244.7.1/24", "10.244.7.1/8", 1),
		strings.Replace(good, "10.244.0.0/16", "10.244.1.0/16", 1),
		strings.Replace(good, "10.244.0.0/16", "fd00::/16", 1),
		strings.Replace(good, "10.244.7.1/24", "::ffff:10.244.7.1/120", 1),
		strings.Replace(good, "1450", "575", 1),
		strings.Replace(good, "1450", "65536", 1),
		strings.Replace(good, "1450", "+1450", 1),
		strings.Replace(good, "1450", " 1450", 1),
		strings.Replace(good, "true", "yes", 1),
		strings.Replace(good, "TWILL_MTU=", "TWILL_MTU =", 1),
		strings.Repeat("#", MaxEnvFileSize+1),
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		e, err := ParseEnv(data)
		if err != nil {
			return
		}
		if !e.Network.Addr().Is4() || !e.Subnet.Addr().Is4() {
			t.Fatalf("accepted non-IPv4 %v / %v", e.Network, e.Subnet)
		}
		if e.Network.Masked() != e.Network {
			t.Fatalf("accepted network %v with host bits", e.Network)
		}
		if !e.Network.Contains(e.Subnet.Addr()) || e.Subnet.Bits() < e.Network.Bits() {
			t.Fatalf("accepted subnet %v outside network %v", e.Subnet, e.Network)
		}
		if e.MTU < 576 || e.MTU > 65535 {
			t.Fatalf("accepted MTU %d", e.MTU)
		}
		body := e.Render()
		again, err := ParseEnv(body)
		if err != nil {
			t.Fatalf("Render output %q does not parse: %v", body, err)
		}
		if again != e {
			t.Fatalf("round trip: %+v became %+v", e, again)
		}
		if !bytes.Equal(again.Render(), body) {
			t.Fatalf("Render is not stable: %q vs %q", body, again.Render())
		}
	})
}
