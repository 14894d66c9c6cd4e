// Command twill is the twill CNI plugin. Container runtimes run it with the
// CNI_* environment and the network configuration on stdin; package plugin
// does the work.
package main

import (
	"runtime"

	"github.com/containernetworking/cni/pkg/skel"

	"github.com/twillnet/twill/plugin"
)

// Namespace switches are per OS thread; keep main on one thread so nothing
// the plugin or its libraries do in a namespace leaks into another goroutine.
func init() { runtime.LockOSThread() }

func main() {
	p := &plugin.Plugin{}
	skel.PluginMainFuncs(skel.CNIFuncs{
		Add:    p.Add,
		Check:  p.Check,
		Del:    p.Del,
		Status: p.Status,
		GC:     p.GC,
	}, plugin.VersionInfo(), plugin.About)
}
