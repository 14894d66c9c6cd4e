package testenv

import "testing"

func TestKubeNodeHostPath(t *testing.T) {
	n := &KubeNode{Dir: "/tmp/node"}
	for in, want := range map[string]string{
		"/etc/cni/net.d":                 "/tmp/node/etc-cni-net.d",
		"/etc/cni/net.d/10-x.conflist":   "/tmp/node/etc-cni-net.d/10-x.conflist",
		"/run/xtables.lock":              "/tmp/node/run-xtables.lock",
		"/var/lib/kubelet/pods":          "/tmp/node/var-lib-kubelet/pods",
		"/usr/libexec/kubernetes/plugin": "/tmp/node/usr-libexec-kubernetes/plugin",
	} {
		if got := n.HostPath(in); got != want {
			t.Errorf("HostPath(%q) = %q, want %q", in, got, want)
		}
	}
	defer func() {
		if recover() == nil {
			t.Error("HostPath of a path not the node's own did not panic")
		}
	}()
	n.HostPath("/etc/cni") // a parent of a mount, not in one
}
