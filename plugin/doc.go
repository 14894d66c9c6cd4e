// Package plugin is the twill CNI plugin: it turns the node's subnet, as twilld
// wrote it to the subnet env file, into a configuration for the reference
// bridge plugin with host-local IPAM, and runs that delegate for every CNI verb.
//
// # Design
//
// The plugin owns no datapath of its own. Everything a pod needs on the node —
// a veth on a Linux bridge, an address from the node's subnet of each family
// (IPv4, IPv6 or both, as the env file says), a route to each cluster network
// through the bridge — is what bridge + host-local already do well, so twill
// only decides *which* configuration they get:
//
//	subnet env file ─┐
//	                 ├─ BuildDelegate ─> delegate config ─> bridge ─> host-local
//	plugin config ───┘                         │
//	                                           └─> state file (dataDir/<network>/<containerID>@<ifname>)
//
// The delegate configuration depends on the env file at the time of ADD. A
// later DEL must undo exactly what ADD did even if twilld has since leased a
// different subnet or is not running at all, so ADD saves the delegate
// configuration it used (atomically, 0600), and DEL, CHECK and GC work from
// that record:
//
//   - ADD starts the delegate and saves the state while it runs (see Add for
//     why the order is safe). If the delegate fails or the state cannot be
//     saved, the plugin rolls back with a delegate DEL and removes the state
//     once that succeeded, so nothing is recorded for an attachment that does
//     not exist. With IPv6, ADD returns only once the bridge's IPv6 gateway
//     has left duplicate address detection, which the reference bridge does
//     not wait for (see gateway.go).
//   - DEL delegates with the saved configuration and removes the state only
//     after the delegate succeeded, so a failed DEL can be retried. When the
//     state is missing or corrupt it rebuilds the configuration from the env
//     file and still delegates, so a lost record does not leak a veth or an
//     address. Missing state with no env file means nothing can be undone: DEL
//     succeeds.
//   - CHECK delegates with the saved configuration and the runtime's
//     prevResult, and also fails when the env file no longer matches the
//     subnets (of either family) or MTU the pod was wired with.
//   - GC removes the state of attachments the runtime no longer lists, then
//     forwards GC to the delegate and to its IPAM plugin (the reference bridge
//     does not forward GC to IPAM), so host-local releases their addresses.
//   - STATUS reports "plugin not available" (50) while the env file is
//     missing or unreadable, else forwards to the delegate.
//
// State files are keyed by network name, container ID and interface name. Both
// IDs come from the runtime and become parts of a path, so they are validated
// to a conservative character set and length before any file is touched.
//
// The plugin writes nothing to stdout but its result; errors are CNI error
// objects with the codes listed in Documentation/cni-plugin.md.
//
// # Cost
//
// A runtime starts the plugin for every verb, and the plugin starts its
// delegate, so the plugin's own cost is one process start plus what it does
// before and after the delegate. Hence: no package with heavy initialisers
// (libcni's invoke imports OpenTelemetry, net/http and crypto/tls; see Exec),
// the delegate started without os/exec's pidfd probe and with its stdio in
// memory files, the state file written without fsync (see writeState) and
// while the delegate runs.
package plugin
