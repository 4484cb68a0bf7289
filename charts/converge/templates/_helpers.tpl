{{/* The services of the platform, in the order they start and migrate. */}}
{{- define "converge.serviceNames" -}}
identity interactions scoring recommendation
{{- end }}

{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "converge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* release-chart, or the release alone when it already holds the chart name. */}}
{{- define "converge.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* A component's resource name: fullname-component. Call with (list $ "identity"). */}}
{{- define "converge.componentName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "converge.fullname" $root | trunc 50 | trimSuffix "-") (index . 1) }}
{{- end }}

{{- define "converge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every resource carries. Call with (list $ "component"). */}}
{{- define "converge.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "converge.chart" $root }}
{{ include "converge.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: converge
{{- end }}

{{/* The labels selectors match on: never change them after install. */}}
{{- define "converge.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "converge.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Image of a role: the block's own repository/tag, else global registry + converge-<role>. Call with (list $ "identity" $block). */}}
{{- define "converge.image" -}}
{{- $root := index . 0 }}
{{- $role := index . 1 }}
{{- $image := (index . 2).image | default dict }}
{{- $repository := $image.repository | default (printf "%s/converge-%s" $root.Values.global.imageRegistry $role) }}
{{- $tag := $image.tag | default $root.Values.global.imageTag | default $root.Chart.AppVersion }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{/* In-cluster gRPC target of a service: dns:/// so clients resolve every pod
     of its headless Service and balance calls round robin. Call with (list $ "identity"). */}}
{{- define "converge.grpcTarget" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- printf "dns:///%s.%s.svc.cluster.local:%v" (include "converge.componentName" .) $root.Release.Namespace (index $root.Values $name).port }}
{{- end }}

{{/* Plain host:port of a service, for tools that take an address. */}}
{{- define "converge.address" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- printf "%s.%s.svc.cluster.local:%v" (include "converge.componentName" .) $root.Release.Namespace (index $root.Values $name).port }}
{{- end }}

{{- define "converge.mlflowUrl" -}}
{{- printf "http://%s.%s.svc.cluster.local:%v" (include "converge.componentName" (list . "mlflow")) .Release.Namespace .Values.mlflow.port }}
{{- end }}

{{/* The environment variable with the database URL, from the existing Secret. */}}
{{- define "converge.databaseUrlEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.urlKey }}
{{- end }}

{{- define "converge.serviceAccountName" -}}
{{- if .root.Values.serviceAccount.create }}
{{- include "converge.componentName" (list .root .component) }}
{{- else }}
{{- "default" }}
{{- end }}
{{- end }}

{{/* Pod security context, then the pull secrets. */}}
{{- define "converge.podDefaults" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Whether services migrate themselves at start: only without the hook Job. */}}
{{- define "converge.migrateOnStart" -}}
{{- if and .Values.migrations.enabled (not .Values.postgresql.enabled) }}false{{ else }}true{{ end }}
{{- end }}

{{/* The writable scratch space of a read-only root filesystem. */}}
{{- define "converge.tmpVolumeMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}
{{- define "converge.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 256Mi
{{- end }}

{{/* Which components may call a service's gRPC port (NetworkPolicy). */}}
{{- define "converge.callers" -}}
{{- $callers := dict
  "identity" (list "interactions" "scoring" "recommendation" "retraining" "test")
  "interactions" (list "identity" "scoring" "recommendation" "retraining" "test")
  "scoring" (list "identity" "recommendation" "test")
  "recommendation" (list "identity" "test")
  "mlflow" (list "scoring" "retraining" "test")
  "postgresql" (list "identity" "interactions" "scoring" "recommendation" "mlflow" "migrations")
}}
{{- index $callers . | toJson }}
{{- end }}

{{/* Pods of this release whose component may call: a NetworkPolicy peer.
     A disabled service is left out, so a policy names only what the release runs.
     Call with (list $ "identity"). */}}
{{- define "converge.callerPeer" -}}
{{- $root := index . 0 -}}
{{- $services := splitList " " (include "converge.serviceNames" $root) }}
{{- $callers := list }}
{{- range $caller := include "converge.callers" (index . 1) | fromJsonArray }}
{{- if or (not (has $caller $services)) (index $root.Values $caller).enabled }}
{{- $callers = append $callers $caller }}
{{- end }}
{{- end -}}
- podSelector:
    matchLabels:
      app.kubernetes.io/instance: {{ $root.Release.Name }}
      app.kubernetes.io/name: {{ include "converge.name" $root }}
    matchExpressions:
      - key: app.kubernetes.io/component
        operator: In
        values: {{ $callers | toJson }}
{{- end }}
