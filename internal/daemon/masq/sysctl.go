package masq

import (
	"fmt"
	"os"
	"strings"
)

// Sysctls that let the kernel route between interfaces, per family.
const (
	IPForwardPath   = "/proc/sys/net/ipv4/ip_forward"
	IPv6ForwardPath = "/proc/sys/net/ipv6/conf/all/forwarding"
)

// EnableIPForward turns on net.ipv4.ip_forward in the calling thread's
// network namespace, writing only if it is off. twilld needs it: pod traffic
// to other nodes and out of the cluster is forwarded.
func EnableIPForward() error { return enableSysctl(IPForwardPath) }

// EnableIPv6Forward turns on net.ipv6.conf.all.forwarding in the calling
// thread's network namespace, writing only if it is off; twilld needs it for
// an IPv6 pod network as it needs EnableIPForward for IPv4. It fails when the
// kernel has no IPv6 (booted with ipv6.disable=1: the file does not exist).
//
// Unlike IPv4's switch, this one changes how the node itself is configured.
// Writing "all" sets forwarding on every interface (and the default for new
// ones), which makes the node an IPv6 router in the kernel's eyes, and the
// kernel ignores router advertisements on every interface whose accept_ra is
// 1, the usual default: a node that got its IPv6 address or default route
// from SLAAC stops renewing them and loses them when their lifetimes run out
// (minutes to hours later, not at once). Setting
// net.ipv6.conf.<uplink>.accept_ra=2 keeps RAs accepted with forwarding on.
// Nothing changes on interfaces with accept_ra 0 or 2, or when forwarding was
// already on (a caller can read IPv6ForwardPath first to know which it is,
// and should log this when it turns forwarding on).
func EnableIPv6Forward() error { return enableSysctl(IPv6ForwardPath) }

func enableSysctl(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	if strings.TrimSpace(string(b)) == "1" {
		return nil
	}
	if err := os.WriteFile(path, []byte("1\n"), 0o644); err != nil {
		return fmt.Errorf("enable %s: %w", path, err)
	}
	return nil
}
