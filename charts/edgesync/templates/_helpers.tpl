{{/* Name of the chart, overridable. */}}
{{- define "edgesync.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name of the operator's objects. */}}
{{- define "edgesync.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "edgesync.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "edgesync.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "edgesync.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edgesync.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "edgesync.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "edgesync.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "edgesync.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "edgesync.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "edgesync.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* "repository:tag" of one node image. */}}
{{- define "edgesync.nodeImage" -}}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
