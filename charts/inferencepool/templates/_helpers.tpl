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
