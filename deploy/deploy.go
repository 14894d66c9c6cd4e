// Package deploy carries the deployment manifests into the programs that use
// them: the lab applies the very DaemonSet manifest users apply, and gives its
// pods the conflist that manifest installs.
package deploy

import (
	"bytes"
	_ "embed"
	"errors"
	"fmt"
	"io"

	"k8s.io/apimachinery/pkg/util/yaml"
)

// KubeManifest is kube-twill.yaml.
//
//go:embed kube-twill.yaml
var KubeManifest []byte

// MonitoringManifest is monitoring.yaml: the scraper's RBAC and the
// PodMonitor of the Prometheus Operator.
//
//go:embed monitoring.yaml
var MonitoringManifest []byte

// GrafanaDashboard is grafana/twill-dashboard.json, a dashboard of twilld's
// metrics.
//
//go:embed grafana/twill-dashboard.json
var GrafanaDashboard []byte

// CNIConfList is 10-twill.conflist, the conflist for nodes that run twilld
// outside Kubernetes (etcd mode, deploy/systemd).
//
//go:embed 10-twill.conflist
var CNIConfList []byte

// KubeCNIConf returns the conflist the DaemonSet installs on every node: the
// cni-conf.json key of its ConfigMap.
func KubeCNIConf() ([]byte, error) {
	dec := yaml.NewYAMLOrJSONDecoder(bytes.NewReader(KubeManifest), 4096)
	for {
		var obj struct {
			Kind string            `json:"kind"`
			Data map[string]string `json:"data"`
		}
		if err := dec.Decode(&obj); errors.Is(err, io.EOF) {
			return nil, errors.New("kube-twill.yaml has no ConfigMap with cni-conf.json")
		} else if err != nil {
			return nil, fmt.Errorf("read kube-twill.yaml: %w", err)
		}
		if conf, ok := obj.Data["cni-conf.json"]; ok && obj.Kind == "ConfigMap" {
			return []byte(conf), nil
		}
	}
}
