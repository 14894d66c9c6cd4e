// Package deploy carries the deployment manifests into the programs that use
// them: the lab applies the very DaemonSet manifest users apply.
package deploy

import _ "embed"

// KubeManifest is kube-twill.yaml.
//
//go:embed kube-twill.yaml
var KubeManifest []byte

// CNIConfList is 10-twill.conflist.
//
//go:embed 10-twill.conflist
var CNIConfList []byte
