{{/*
Render-time validation: wrong values fail `helm install` with a message naming the key instead of
producing objects the API server or the EPP rejects later.
*/}}
{{- define "inferencepool.validate" -}}
{{- if or (empty .Values.inferencePool.modelServers) (not .Values.inferencePool.modelServers.matchLabels) }}
{{- fail ".Values.inferencePool.modelServers.matchLabels is required" }}
{{- end }}
{{- if not (has (lower .Values.provider.name) (list "none" "gke" "istio")) }}
{{- fail (printf ".Values.provider.name must be one of none, gke, istio (got %q)" .Values.provider.name) }}
{{- end }}
{{- if not (has .Values.inferencePool.modelServerType (list "vllm" "sglang" "triton-tensorrt-llm" "trtllm-serve")) }}
{{- fail (printf ".Values.inferencePool.modelServerType must be one of vllm, sglang, triton-tensorrt-llm, trtllm-serve (got %q)" .Values.inferencePool.modelServerType) }}
{{- end }}
{{- /* The reference's grpc mode speaks vLLM's gRPC engine API; the Switchyard EPP parses OpenAI HTTP bodies only. */}}
{{- if ne .Values.inferencePool.modelServerProtocol "http" }}
{{- fail (printf ".Values.inferencePool.modelServerProtocol must be http: the Switchyard EPP does not speak the vLLM gRPC API (got %q)" .Values.inferencePool.modelServerProtocol) }}
{{- end }}
{{- if not (has (.Values.inferencePool.parser | default "") (list "" "openai-parser")) }}
{{- fail (printf ".Values.inferencePool.parser must be empty or openai-parser (got %q)" .Values.inferencePool.parser) }}
{{- end }}
{{- if not (has .Values.inferenceExtension.failureMode (list "FailOpen" "FailClose")) }}
{{- fail (printf ".Values.inferenceExtension.failureMode must be FailOpen or FailClose (got %q)" .Values.inferenceExtension.failureMode) }}
{{- end }}
{{- $n := len .Values.inferencePool.targetPorts }}
{{- if or (lt $n 1) (gt $n 8) }}
{{- fail (printf ".Values.inferencePool.targetPorts must have 1 to 8 entries (got %d)" $n) }}
{{- end }}
{{- if lt (int .Values.inferenceExtension.replicas) 1 }}
{{- fail ".Values.inferenceExtension.replicas must be at least 1" }}
{{- end }}
{{- if .Values.inferenceExtension.sidecar.enabled }}
{{- fail ".Values.inferenceExtension.sidecar is not supported by the Switchyard EPP" }}
{{- end }}
{{- if .Values.inferenceExtension.latencyPredictor.enabled }}
{{- fail ".Values.inferenceExtension.latencyPredictor is not supported by the Switchyard EPP" }}
{{- end }}
{{- with .Values.inferenceExtension.metricsDataSource }}
{{- if ne (.scheme | default "http") "http" }}
{{- fail (printf ".Values.inferenceExtension.metricsDataSource.scheme must be http: the Switchyard EPP scrapes over plain HTTP (got %q)" .scheme) }}
{{- end }}
{{- if not (hasPrefix "/" (.path | default "/metrics")) }}
{{- fail (printf ".Values.inferenceExtension.metricsDataSource.path must start with / (got %q)" .path) }}
{{- end }}
{{- end }}
{{- if and (ne .Values.inferenceExtension.pluginsConfigFile "default-plugins.yaml") (not (hasKey (.Values.inferenceExtension.pluginsCustomConfig | default dict) .Values.inferenceExtension.pluginsConfigFile)) }}
{{- fail (printf ".Values.inferenceExtension.pluginsConfigFile %q is neither default-plugins.yaml nor a key of pluginsCustomConfig" .Values.inferenceExtension.pluginsConfigFile) }}
{{- end }}
{{- end -}}
