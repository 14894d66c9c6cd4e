package helm

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/twillnet/twill/deploy"
	"github.com/twillnet/twill/internal/tools/kubeapi"
	"github.com/twillnet/twill/subnet"
)

func find(r rendering, kind, name string) *unstructured.Unstructured {
	for _, o := range r.objs {
		if o.GetKind() == kind && o.GetName() == name {
			return o
		}
	}
	return nil
}

func daemonSet(t *testing.T, r rendering) *appsv1.DaemonSet {
	t.Helper()
	o := find(r, "DaemonSet", "twill")
	if o == nil {
		t.Fatal("no DaemonSet twill")
	}
	var ds appsv1.DaemonSet
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &ds); err != nil {
		t.Fatal(err)
	}
	return &ds
}

// configMap returns twill-cfg's data.
func configMap(t *testing.T, r rendering) map[string]string {
	t.Helper()
	o := find(r, "ConfigMap", "twill-cfg")
	if o == nil {
		t.Fatal("no ConfigMap twill-cfg")
	}
	var cm corev1.ConfigMap
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &cm); err != nil {
		t.Fatal(err)
	}
	return cm.Data
}

// netConf returns the ConfigMap's net-conf.json, parsed, after checking that
// twilld accepts it (subnet.ParseConfig, what twilld reads it with).
func netConf(t *testing.T, r rendering) map[string]any {
	t.Helper()
	raw, ok := configMap(t, r)["net-conf.json"]
	if !ok {
		t.Fatal("the ConfigMap has no net-conf.json")
	}
	if _, err := subnet.ParseConfig([]byte(raw)); err != nil {
		t.Errorf("twilld would refuse the rendered net-conf.json: %v\n%s", err, raw)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(raw), &m); err != nil {
		t.Fatalf("net-conf.json: %v\n%s", err, raw)
	}
	return m
}

func twilld(t *testing.T, ds *appsv1.DaemonSet) corev1.Container {
	t.Helper()
	for _, c := range ds.Spec.Template.Spec.Containers {
		if c.Name == "twilld" {
			return c
		}
	}
	t.Fatal("no container twilld")
	return corev1.Container{}
}

func wantEqual(t *testing.T, what string, want, got any) {
	t.Helper()
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("%s (-want +got):\n%s", what, d)
	}
}

func volume(ds *appsv1.DaemonSet, name string) *corev1.Volume {
	for i, v := range ds.Spec.Template.Spec.Volumes {
		if v.Name == name {
			return &ds.Spec.Template.Spec.Volumes[i]
		}
	}
	return nil
}

func mount(c corev1.Container, name string) *corev1.VolumeMount {
	for i, m := range c.VolumeMounts {
		if m.Name == name {
			return &c.VolumeMounts[i]
		}
	}
	return nil
}

// Non-default values have the effects values.yaml documents, in the
// DaemonSet's args, volumes and scheduling and in the ConfigMap.
func TestValues(t *testing.T) {
	for _, tc := range []struct {
		name, values string
		check        func(t *testing.T, r rendering)
	}{{
		name: "etcd datastore with TLS and a node selector",
		// The network values are set too: in etcd mode the config lives in
		// etcd, so they must not show up anywhere.
		values: `
datastore:
  type: etcd
  etcd:
    endpoints: [https://10.0.0.10:2379, https://10.0.0.11:2379]
    prefix: /prod/network
    tlsSecret: twill-etcd-client
nodeSelector:
  twill.io/network: "on"
podCidrv6: fd00:10:244::/56
enableNFTables: true
`,
		check: func(t *testing.T, r rendering) {
			ds := daemonSet(t, r)
			c := twilld(t, ds)
			wantEqual(t, "twilld's args", []string{
				"--etcd-endpoints=https://10.0.0.10:2379,https://10.0.0.11:2379",
				"--etcd-prefix=/prod/network",
				"--etcd-cafile=/etc/twill-etcd/ca.crt",
				"--etcd-certfile=/etc/twill-etcd/tls.crt",
				"--etcd-keyfile=/etc/twill-etcd/tls.key",
				"--ip-masq",
				"--http-addr=127.0.0.1:9867",
				// no --secure-metrics-addr: twilld checks tokens with the
				// API server only with the Kubernetes datastore.
			}, c.Args)
			if len(c.Ports) != 0 {
				t.Errorf("ports %v without --secure-metrics-addr", c.Ports)
			}
			v := volume(ds, "etcd-tls")
			if v == nil || v.Secret == nil || v.Secret.SecretName != "twill-etcd-client" {
				t.Fatalf("volume etcd-tls %+v, want the Secret twill-etcd-client", v)
			}
			m := mount(c, "etcd-tls")
			if m == nil || m.MountPath != "/etc/twill-etcd" || !m.ReadOnly {
				t.Errorf("twilld mounts etcd-tls as %+v, want read-only at /etc/twill-etcd", m)
			}
			wantEqual(t, "nodeSelector", map[string]string{"twill.io/network": "on"}, ds.Spec.Template.Spec.NodeSelector)
			data := configMap(t, r)
			if conf, ok := data["net-conf.json"]; ok {
				t.Errorf("etcd mode: the ConfigMap has a net-conf.json, which twilld would not read:\n%s", conf)
			}
			if _, ok := data["cni-conf.json"]; !ok {
				t.Error("etcd mode: the ConfigMap lost cni-conf.json, which the init container installs")
			}
			if find(r, "PodMonitor", "twill") != nil {
				t.Error("a PodMonitor without podMonitor.enabled")
			}
		},
	}, {
		name: "dual-stack, nftables, wireguard, PodMonitor, annotations mode",
		values: `
podCidrv6: fd00:10:244::/56
enableNFTables: true
backend: {type: wireguard, persistentKeepaliveInterval: 25, listenPort: 51830}
datastore: {kubeMode: annotations}
metrics: {podMonitor: {enabled: true}}
image: {repository: registry.example/twill, tag: v0.2.0, pullPolicy: Always}
imagePullSecrets: [{name: registry-example}]
tolerations: [{key: node-role.kubernetes.io/control-plane, operator: Exists, effect: NoSchedule}]
priorityClassName: ""
resources: {requests: {cpu: 100m}}  # merged with the defaults
ipMasq: false
mountDevNetTun: true
extraArgs: [--iface-can-reach=10.0.0.1]
cniBinDir: /var/lib/rancher/k3s/data/cni
`,
		check: func(t *testing.T, r rendering) {
			wantEqual(t, "net-conf.json", map[string]any{
				"Network":        "10.244.0.0/16",
				"EnableIPv6":     true,
				"IPv6Network":    "fd00:10:244::/56",
				"EnableNFTables": true,
				"Backend":        map[string]any{"Type": "wireguard", "PersistentKeepaliveInterval": 25.0, "ListenPort": 51830.0},
			}, netConf(t, r))
			ds := daemonSet(t, r)
			c := twilld(t, ds)
			wantEqual(t, "twilld's args", []string{
				"--kube-subnet-mgr",
				"--kube-mode=annotations",
				"--net-config=/etc/twill/net-conf.json",
				"--http-addr=127.0.0.1:9867",
				"--secure-metrics-addr=:9868",
				"--iface-can-reach=10.0.0.1",
			}, c.Args)
			wantEqual(t, "ports", []corev1.ContainerPort{{Name: "metrics", ContainerPort: 9868}}, c.Ports)
			spec := ds.Spec.Template.Spec
			for _, c := range append(slices.Clone(spec.InitContainers), spec.Containers...) {
				if c.Image != "registry.example/twill:v0.2.0" || c.ImagePullPolicy != corev1.PullAlways {
					t.Errorf("container %s: image %s, pull policy %q", c.Name, c.Image, c.ImagePullPolicy)
				}
			}
			wantEqual(t, "imagePullSecrets", []corev1.LocalObjectReference{{Name: "registry-example"}}, spec.ImagePullSecrets)
			wantEqual(t, "tolerations", []corev1.Toleration{{Key: "node-role.kubernetes.io/control-plane", Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoSchedule}}, spec.Tolerations)
			if spec.PriorityClassName != "" {
				t.Errorf("priorityClassName %q, want none", spec.PriorityClassName)
			}
			// Helm merges maps: the other defaults stay.
			if c.Resources.Requests.Cpu().String() != "100m" || c.Resources.Requests.Memory().String() != "50Mi" || c.Resources.Limits.Memory().String() != "200Mi" {
				t.Errorf("resources %v, want requests of 100m CPU and 50Mi, a limit of 200Mi", c.Resources)
			}
			if m := mount(c, "dev-net-tun"); m == nil || m.MountPath != "/dev/net/tun" {
				t.Errorf("mountDevNetTun: mount %+v", m)
			}
			if v := volume(ds, "dev-net-tun"); v == nil || v.HostPath == nil || v.HostPath.Path != "/dev/net/tun" {
				t.Errorf("mountDevNetTun: volume %+v", v)
			}
			if v := volume(ds, "cni-plugin"); v == nil || v.HostPath == nil || v.HostPath.Path != "/var/lib/rancher/k3s/data/cni" {
				t.Errorf("cniBinDir: volume %+v", v)
			}
			// The monitoring objects are deploy/monitoring.yaml's.
			want, err := kubeapi.Decode(deploy.MonitoringManifest)
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range want {
				g := find(r, w.GetKind(), w.GetName())
				if g == nil || g.GetNamespace() != w.GetNamespace() {
					t.Errorf("no %s as deploy/monitoring.yaml's", key(w))
					continue
				}
				wantEqual(t, key(w)+" against deploy/monitoring.yaml's", w.Object, g.Object)
			}
		},
	}, {
		name: "IPv6-only with iptables",
		values: `
podCidr: ""
podCidrv6: fd00:10:244::/56
enableNFTables: false
`,
		check: func(t *testing.T, r rendering) {
			wantEqual(t, "net-conf.json", map[string]any{
				"EnableIPv4":     false,
				"EnableIPv6":     true,
				"IPv6Network":    "fd00:10:244::/56",
				"EnableNFTables": false,
				"Backend":        map[string]any{"Type": "vxlan"},
			}, netConf(t, r))
			args := twilld(t, daemonSet(t, r)).Args
			if !slices.Contains(args, "--ip-masq") || !slices.Contains(args, "--secure-metrics-addr=:9868") {
				t.Errorf("args %v lost the defaults --ip-masq and --secure-metrics-addr", args)
			}
		},
	}, {
		name: "netConf as JSON text",
		values: `
netConf: '{"Network": "10.10.0.0/16", "SubnetLen": 26, "Backend": {"Type": "host-gw"}}'
podCidr: 10.99.0.0/16
`,
		check: func(t *testing.T, r rendering) {
			wantEqual(t, "net-conf.json", map[string]any{
				"Network": "10.10.0.0/16", "SubnetLen": 26.0, "Backend": map[string]any{"Type": "host-gw"},
			}, netConf(t, r))
		},
	}, {
		name: "netConf as a map",
		values: `
netConf: {Network: 10.20.0.0/16, Backend: {Type: vxlan, VNI: 4096, Port: 4789}}
`,
		check: func(t *testing.T, r rendering) {
			wantEqual(t, "net-conf.json", map[string]any{
				"Network": "10.20.0.0/16", "Backend": map[string]any{"Type": "vxlan", "VNI": 4096.0, "Port": 4789.0},
			}, netConf(t, r))
		},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			r := render(t, tc.values)
			tc.check(t, r)
			// Whatever the values, the admission policy names the
			// ServiceAccount twilld runs as.
			vap := find(r, "ValidatingAdmissionPolicy", "twill-own-node")
			conds, _, _ := unstructured.NestedSlice(vap.Object, "spec", "matchConditions")
			ds := daemonSet(t, r)
			user := "'system:serviceaccount:" + ds.Namespace + ":" + ds.Spec.Template.Spec.ServiceAccountName + "'"
			if len(conds) != 1 || !strings.Contains(conds[0].(map[string]any)["expression"].(string), user) {
				t.Errorf("the policy's matchConditions %v do not name %s", conds, user)
			}
		})
	}
}

// The admission policy follows the release namespace and the ServiceAccount.
func TestPolicyFollowsTheServiceAccount(t *testing.T) {
	ch := render(t, "serviceAccount: {name: twilld}")
	sa := find(ch, "ServiceAccount", "twilld")
	crb := find(ch, "ClusterRoleBinding", "twill")
	if sa == nil || crb == nil || sa.GetNamespace() != releaseNS {
		t.Fatalf("ServiceAccount %v, ClusterRoleBinding %v", sa, crb)
	}
	subjects, _, _ := unstructured.NestedSlice(crb.Object, "subjects")
	wantEqual(t, "the binding's subjects", []any{map[string]any{"kind": "ServiceAccount", "name": "twilld", "namespace": releaseNS}}, subjects)
	if got := daemonSet(t, ch).Spec.Template.Spec.ServiceAccountName; got != "twilld" {
		t.Errorf("the DaemonSet runs as %s", got)
	}
	vap := find(ch, "ValidatingAdmissionPolicy", "twill-own-node")
	expr, _, _ := unstructured.NestedSlice(vap.Object, "spec", "matchConditions")
	wantEqual(t, "matchConditions", []any{map[string]any{
		"name":       "twill-service-account",
		"expression": "request.userInfo.username == 'system:serviceaccount:kube-twill:twilld'",
	}}, expr)
}

// Values twilld could not run with stop the rendering, with the value named.
func TestBadValues(t *testing.T) {
	for _, tc := range []struct{ values, want string }{
		{"datastore: {type: consul}", "datastore.type"},
		{"datastore: {kubeMode: nodes}", "datastore.kubeMode"},
		{"datastore: {type: etcd}", "datastore.etcd.endpoints"},
		{"datastore: {type: etcd, etcd: {endpoints: [http://e:2379]}}\nmetrics: {podMonitor: {enabled: true}}", "metrics.podMonitor.enabled"},
		{"metrics: {secure: {enabled: false}, podMonitor: {enabled: true}}", "metrics.podMonitor.enabled"},
		{"backend: {type: vxlan, gbp: true}", "backend.gbp"},
		{"backend: {type: null}", "backend.type"},
		{"enableNFTables: \"yes\"", "enableNFTables"},
		{"podCidr: \"\"", "podCidr"},
		{"netConf: '{\"Network\": '", "netConf"},
		{"cniConf: 'not json'", "cniConf"},
	} {
		_, err := tryRender(tc.values)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("values %q: error %v, want one naming %s", tc.values, err, tc.want)
		}
	}
}
