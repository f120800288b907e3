{{/*
Naming and labels. Names follow the reference chart (<release>-epp, selector label
`inferencepool: <release>-epp`) so that dashboards, NetworkPolicies and scripts written for the
reference keep matching.
*/}}

{{/* EPP name: release name (max 40 chars) + "-epp". */}}
{{- define "inferencepool.eppName" -}}
{{- $base := .Release.Name | default "default-pool" | lower | trim | trunc 40 -}}
{{ $base }}-epp
{{- end -}}

{{/* Cluster-scoped names must be unique across namespaces. */}}
{{- define "inferencepool.clusterName" -}}
{{- $base := .Release.Name | default "default-pool" | lower | trim | trunc 40 -}}
{{- $ns := .Release.Namespace | default "default" | lower | trim | trunc 40 -}}
{{- printf "%s-%s-epp" $base $ns | trunc 84 | trimSuffix "-" -}}
{{- end -}}

{{- define "inferencepool.labels" -}}
app.kubernetes.io/name: {{ include "inferencepool.eppName" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: switchyard
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
{{- end -}}

{{- define "inferencepool.selectorLabels" -}}
inferencepool: {{ include "inferencepool.eppName" . }}
{{- end -}}

{{- define "inferencepool.gatewayName" -}}
{{- if .Values.experimentalHttpRoute.inferenceGatewayName -}}
{{- .Values.experimentalHttpRoute.inferenceGatewayName | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-inference-gateway" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* First target port: the one health checks probe. Accepts the legacy targetPortNumber. */}}
{{- define "inferencepool.firstTargetPort" -}}
{{- if .Values.inferencePool.targetPorts -}}
{{- (index .Values.inferencePool.targetPorts 0).number -}}
{{- else -}}
{{- .Values.inferencePool.targetPortNumber | default 8000 -}}
{{- end -}}
{{- end -}}

{{/* Managed Prometheus collector namespace (Autopilot runs it elsewhere). */}}
{{- define "inferencepool.gmpNamespace" -}}
{{- if and .Values.provider.gke .Values.provider.gke.autopilot -}}
gke-gmp-system
{{- else -}}
gmp-system
{{- end -}}
{{- end -}}

{{- define "inferencepool.metricsAuth" -}}
{{- if .Values.inferenceExtension.monitoring.prometheus.auth.enabled -}}true{{- else -}}false{{- end -}}
{{- end -}}

{{/*
NetworkPolicy peers of the gateway's proxies (ext_proc clients): networkPolicy.gatewayPeers, else
by provider. GKE's managed proxies connect from the region's proxy-only subnet (required value)
and its health checks from Google's checker ranges; Istio labels the gateway's pods with
gateway.networking.k8s.io/gateway-name; Envoy Gateway (provider none, class eg) with
gateway.envoyproxy.io/owning-gateway-name.
*/}}
{{- define "inferencepool.gatewayPeers" -}}
{{- $np := .Values.networkPolicy -}}
{{- $provider := lower .Values.provider.name -}}
{{- if $np.gatewayPeers -}}
{{- toYaml $np.gatewayPeers -}}
{{- else if eq $provider "gke" -}}
{{- if not $np.gkeProxyOnlySubnetCIDRs -}}
{{- fail "networkPolicy.gkeProxyOnlySubnetCIDRs is required with provider gke: the region's proxy-only subnet (gcloud compute networks subnets list --filter=purpose=REGIONAL_MANAGED_PROXY), from which the gateway's proxies connect; or set networkPolicy.gatewayPeers, or networkPolicy.enabled=false" -}}
{{- end -}}
{{- range concat $np.gkeProxyOnlySubnetCIDRs $np.gkeHealthCheckCIDRs }}
- ipBlock:
    cidr: {{ . }}
{{- end }}
{{- else -}}
- namespaceSelector: {}
  podSelector:
    matchLabels:
      {{- if eq $provider "istio" }}
      gateway.networking.k8s.io/gateway-name: {{ $np.gatewayName }}
      {{- else }}
      gateway.envoyproxy.io/owning-gateway-name: {{ $np.gatewayName }}
      {{- end }}
{{- end -}}
{{- end -}}

{{/* Peers allowed to scrape the EPP's /metrics: networkPolicy.metricsPeers, else the Managed
Prometheus collectors on GKE and Prometheus Operator's pods elsewhere. */}}
{{- define "inferencepool.metricsPeers" -}}
{{- $np := .Values.networkPolicy -}}
{{- if $np.metricsPeers -}}
{{- toYaml $np.metricsPeers -}}
{{- else if eq (lower .Values.provider.name) "gke" -}}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {{ include "inferencepool.gmpNamespace" . }}
{{- else -}}
- namespaceSelector: {}
  podSelector:
    matchLabels:
      app.kubernetes.io/name: prometheus
{{- end -}}
{{- end -}}
