{{- define "decode.name" -}}
{{- .Release.Name | lower | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "decode.labels" -}}
app.kubernetes.io/name: decode-server
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: model-server
app.kubernetes.io/part-of: switchyard
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
{{- end -}}

{{/* Pod selector: the pool labels plus the instance, so two releases never adopt each other's pods. */}}
{{- define "decode.selectorLabels" -}}
{{- range $k, $v := .Values.poolLabels }}
{{ $k }}: {{ $v | quote }}
{{- end }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "decode.claimTemplateName" -}}
{{- .Values.gpu.claimTemplateName | default (printf "%s-gpu" (include "decode.name" .)) -}}
{{- end -}}

{{/* GPUs are claimed for the cuda backend only. */}}
{{- define "decode.usesGpu" -}}
{{- if eq .Values.backend "cuda" -}}true{{- end -}}
{{- end -}}

{{- define "decode.servedModelName" -}}
{{- .Values.model.servedModelName | default (base .Values.model.path) -}}
{{- end -}}

{{- define "decode.validate" -}}
{{- if not (has .Values.backend (list "cuda" "cpu" "sim")) }}
{{- fail (printf ".Values.backend must be cuda, cpu or sim (got %q)" .Values.backend) }}
{{- end }}
{{- if empty .Values.poolLabels }}
{{- fail ".Values.poolLabels must not be empty: the InferencePool selects pods by them" }}
{{- end }}
{{- if lt (int .Values.gpu.count) 1 }}
{{- fail ".Values.gpu.count must be at least 1" }}
{{- end }}
{{- if and (ne .Values.backend "sim") (empty .Values.model.existingClaim) }}
{{- fail (printf ".Values.model.existingClaim is required for backend %s: the PVC that holds the checkpoint" .Values.backend) }}
{{- end }}
{{- if not (has .Values.autoscaling.metric.type (list "Pods" "External")) }}
{{- fail ".Values.autoscaling.metric.type must be Pods or External" }}
{{- end }}
{{- end -}}
