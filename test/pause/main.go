// Command pause is the sandbox process of the test pods that a container
// runtime starts (test/e2e's containerd test): nothing can be pulled here, so
// the test packs this static program as the runtime's sandbox image. Like
// Kubernetes' pause it holds the pod's namespaces open, reaps the children
// it inherits as PID 1, and exits cleanly when the runtime stops it.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range sigs {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
