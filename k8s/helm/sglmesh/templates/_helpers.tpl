{{/* Labels of every object: its name, the mesh, the release. */}}
{{- define "sglmesh.labels" -}}
app.kubernetes.io/name: {{ . }}
app.kubernetes.io/part-of: sglmesh
{{- end }}

{{- define "sglmesh.metaLabels" -}}
{{ include "sglmesh.labels" .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end }}

{{/* An sglmesh image: registry + name + tag (the gpu tag for GPU LLM workers and, on SGLang,
the image encode worker). */}}
{{- define "sglmesh.image" -}}
{{- $images := .root.Values.images -}}
{{- $tag := $images.tag -}}
{{- $gpuRoles := list "worker" "prefill" "decode" -}}
{{- if eq .root.Values.engine "sglang" -}}
{{- $gpuRoles = append $gpuRoles "vision" -}}
{{- end -}}
{{- if and .root.Values.gpu.enabled (has .role $gpuRoles) -}}
{{- $tag = .root.Values.gpu.imageTag -}}
{{- end -}}
{{ printf "%s%s:%s" $images.registry (index $images .image) $tag }}
{{- end }}

{{/* The pod security context of sglmesh pods (SGLang's GPU image runs as root). */}}
{{- define "sglmesh.podSecurity" -}}
securityContext: {runAsNonRoot: true, runAsUser: 10001, runAsGroup: 10001, fsGroup: 10001}
{{- end }}

{{- define "sglmesh.containerSecurity" -}}
securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: ["ALL"]}}
{{- end }}

{{/* The model claim's volume and mount, when the model comes from a claim. */}}
{{- define "sglmesh.modelVolume" -}}
{{- if .Values.model.claimName }}
- name: models
  persistentVolumeClaim: {claimName: {{ .Values.model.claimName }}, readOnly: true}
{{- end }}
{{- end }}

{{- define "sglmesh.modelMount" -}}
{{- if .Values.model.claimName }}
- {name: models, mountPath: {{ .Values.model.path }}, readOnly: true}
{{- end }}
{{- end }}

{{/* Readiness on /health, liveness on /live, on a named port. */}}
{{- define "sglmesh.probes" -}}
readinessProbe:
  httpGet: {path: /health, port: {{ . }}}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  httpGet: {path: /live, port: {{ . }}}
  periodSeconds: 10
  timeoutSeconds: 2
  failureThreshold: 3
{{- end }}
