// Package hotpath holds testing.B benchmarks of the pure code twilld runs on
// every reconcile pass and every lease it reads, at 5,000 peers: computing
// the desired state, diffing it against the kernel's, and decoding lease
// values. They need no kernel and no etcd, so they isolate the user-space
// share of a pass from the netlink share that the backend benchmarks measure.
package hotpath
