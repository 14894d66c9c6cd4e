package subnet

import (
	"net/netip"
	"testing"
)

func TestLastAddrAndNextSubnet(t *testing.T) {
	for _, tt := range []struct{ p, last, next string }{
		{"10.244.7.0/24", "10.244.7.255", "10.244.8.0/24"},
		{"10.244.255.252/30", "10.244.255.255", "10.245.0.0/30"},
		{"255.255.255.0/24", "255.255.255.255", ""},
		{"0.0.0.0/0", "255.255.255.255", ""},
		{"fd00:10:244:7::/64", "fd00:10:244:7:ffff:ffff:ffff:ffff", "fd00:10:244:8::/64"},
		{"fd00:10:244:ffff::/64", "fd00:10:244:ffff:ffff:ffff:ffff:ffff", "fd00:10:245::/64"},
		{"fd00::fffc/126", "fd00::ffff", "fd00::1:0/126"},
		{"fd00::/8", "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "fe00::/8"},
		{"ffff:ffff:ffff:ffff::/64", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", ""},
		{"fd00:0:0:0:ffff:ffff:ffff:fffc/126", "fd00::ffff:ffff:ffff:ffff", "fd00:0:0:1::/126"},
	} {
		p := netip.MustParsePrefix(tt.p)
		if got := LastAddr(p).String(); got != tt.last {
			t.Errorf("LastAddr(%s) = %s, want %s", p, got, tt.last)
		}
		next, ok := NextSubnet(p)
		if got := ""; ok {
			got = next.String()
			if got != tt.next {
				t.Errorf("NextSubnet(%s) = %s, want %s", p, got, tt.next)
			}
		} else if tt.next != "" {
			t.Errorf("NextSubnet(%s) = none, want %s", p, tt.next)
		}
	}
}
