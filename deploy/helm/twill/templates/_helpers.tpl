{{/*
twill.validate stops the rendering on values twilld could not run with.
*/}}
{{- define "twill.validate" -}}
{{- $ds := .Values.datastore -}}
{{- if not (has $ds.type (list "kubernetes" "etcd")) -}}
{{- fail (printf "datastore.type: %q; want kubernetes or etcd" $ds.type) -}}
{{- end -}}
{{- if and (eq $ds.type "kubernetes") (not (has $ds.kubeMode (list "nodenetwork" "annotations"))) -}}
{{- fail (printf "datastore.kubeMode: %q; want nodenetwork or annotations" $ds.kubeMode) -}}
{{- end -}}
{{- if and (eq $ds.type "etcd") (not $ds.etcd.endpoints) -}}
{{- fail "datastore.etcd.endpoints: the etcd client URLs are required with datastore.type=etcd" -}}
{{- end -}}
{{- if and .Values.metrics.podMonitor.enabled (not (include "twill.secureMetrics" .)) -}}
{{- fail "metrics.podMonitor.enabled needs metrics.secure.enabled and datastore.type=kubernetes: the PodMonitor scrapes --secure-metrics-addr, which checks tokens with the API server" -}}
{{- end -}}
{{- $cni := fromJson .Values.cniConf -}}
{{- if or (hasKey $cni "Error") (not $cni) -}}
{{- fail (printf "cniConf: not a JSON object: %s" (get $cni "Error")) -}}
{{- end -}}
{{- end -}}

{{/*
twill.secureMetrics is "true" when twilld serves --secure-metrics-addr: it
checks tokens with the API server, which it talks to only with the Kubernetes
datastore.
*/}}
{{- define "twill.secureMetrics" -}}
{{- if and .Values.metrics.secure.enabled (eq .Values.datastore.type "kubernetes") -}}true{{- end -}}
{{- end -}}

{{/*
twill.image is the image of every container.
*/}}
{{- define "twill.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/*
twill.netConf is net-conf.json (Documentation/configuration.md): netConf
verbatim when set, else built from podCidr, podCidrv6, enableNFTables and
backend.
*/}}
{{- define "twill.netConf" -}}
{{- $v := .Values -}}
{{- if $v.netConf -}}
{{- if kindIs "string" $v.netConf -}}
{{- $parsed := fromJson $v.netConf -}}
{{- if or (hasKey $parsed "Error") (not $parsed) -}}
{{- fail (printf "netConf: not a JSON object: %s" (get $parsed "Error")) -}}
{{- end -}}
{{- $v.netConf | trim -}}
{{- else -}}
{{- toPrettyJson $v.netConf -}}
{{- end -}}
{{- else -}}
{{- $c := dict -}}
{{- if $v.podCidr -}}
{{- $_ := set $c "Network" $v.podCidr -}}
{{- else if $v.podCidrv6 -}}
{{- $_ := set $c "EnableIPv4" false -}}
{{- else -}}
{{- fail "podCidr, podCidrv6: at least one pod network is required (or netConf)" -}}
{{- end -}}
{{- if $v.podCidrv6 -}}
{{- $_ := set $c "EnableIPv6" true -}}
{{- $_ := set $c "IPv6Network" $v.podCidrv6 -}}
{{- end -}}
{{- if kindIs "bool" $v.enableNFTables -}}
{{- $_ := set $c "EnableNFTables" $v.enableNFTables -}}
{{- else if not (kindIs "invalid" $v.enableNFTables) -}}
{{- fail (printf "enableNFTables: %v; want true, false or null (unset)" $v.enableNFTables) -}}
{{- end -}}
{{- $names := dict "vni" "VNI" "port" "Port" "directRouting" "DirectRouting" "mtu" "MTU" "listenPort" "ListenPort" "listenPortV6" "ListenPortV6" "psk" "PSK" "persistentKeepaliveInterval" "PersistentKeepaliveInterval" "mode" "Mode" -}}
{{- $b := dict "Type" (required "backend.type: vxlan, host-gw, wireguard or alloc" $v.backend.type) -}}
{{- range $k, $opt := $v.backend -}}
{{- if ne $k "type" -}}
{{- if not (hasKey $names $k) -}}
{{- fail (printf "backend.%s: not a backend option; the options are %s (or use netConf)" $k (keys $names | sortAlpha | join ", ")) -}}
{{- end -}}
{{- $_ := set $b (get $names $k) $opt -}}
{{- end -}}
{{- end -}}
{{- $_ := set $c "Backend" $b -}}
{{- toPrettyJson $c -}}
{{- end -}}
{{- end -}}
