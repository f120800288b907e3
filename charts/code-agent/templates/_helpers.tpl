{{- define "agent.name" -}}
{{- .Release.Name | lower | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "agent.labels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: switchyard
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
{{- end -}}

{{/* Labels of sandbox pods (set in the SandboxTemplate's pod template; the NetworkPolicy selects them). */}}
{{- define "agent.sandboxSelector" -}}
app.kubernetes.io/component: sandbox
switchyard.dev/sandbox-template: {{ .Values.sandbox.templateName }}
{{- end -}}

{{/* The controller's default sandbox policy admits pods labelled app=sandbox-router; keep it. */}}
{{- define "agent.routerSelector" -}}
app: sandbox-router
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "agent.agentSelector" -}}
app.kubernetes.io/name: code-agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "agent.gatewayClass" -}}
{{- if .Values.gateway.className -}}
{{- .Values.gateway.className -}}
{{- else if eq (lower .Values.provider.name) "gke" -}}
gke-l7-rilb
{{- else if eq (lower .Values.provider.name) "istio" -}}
istio
{{- else -}}
eg
{{- end -}}
{{- end -}}

{{/* Hardened container security context shared by every container of the chart. */}}
{{- define "agent.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "agent.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .runAsUser }}
runAsGroup: {{ .runAsUser }}
fsGroup: {{ .runAsUser }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "agent.validate" -}}
{{- if not (has (lower .Values.provider.name) (list "none" "gke" "istio")) }}
{{- fail (printf ".Values.provider.name must be one of none, gke, istio (got %q)" .Values.provider.name) }}
{{- end }}
{{- if not .Values.gvisor.runtimeClassName }}
{{- fail ".Values.gvisor.runtimeClassName is required: generated code only runs under gVisor" }}
{{- end }}
{{- end -}}

{{/* Egress rules of sandbox pods: DNS, then (optionally) the internet minus blocked ranges. */}}
{{- define "agent.sandboxEgress" -}}
- to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: kube-system
      podSelector:
        matchLabels:
          k8s-app: kube-dns
    {{- range .Values.networkPolicy.dnsExtraCIDRs }}
    - ipBlock:
        cidr: {{ . }}
    {{- end }}
  ports:
    - protocol: UDP
      port: 53
    - protocol: TCP
      port: 53
{{- if .Values.networkPolicy.allowInternetEgress }}
- to:
    - ipBlock:
        cidr: 0.0.0.0/0
        except:
          {{- range concat .Values.networkPolicy.blockedCIDRs .Values.networkPolicy.clusterCIDRs }}
          - {{ . }}
          {{- end }}
{{- end }}
{{- end -}}

{{/* Ingress of sandbox pods: only the router, only on the runtime port. */}}
{{- define "agent.sandboxIngress" -}}
- from:
    - podSelector:
        matchLabels:
          app: sandbox-router
  ports:
    - protocol: TCP
      port: {{ int .Values.sandbox.port }}
{{- end -}}
