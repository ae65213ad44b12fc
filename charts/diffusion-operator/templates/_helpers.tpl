{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "diffusion-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: release-chart unless the release name already contains the chart name. */}}
{{- define "diffusion-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "diffusion-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "diffusion-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "diffusion-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "diffusion-operator.labels" -}}
helm.sh/chart: {{ include "diffusion-operator.chart" . }}
{{ include "diffusion-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: diffusion-operator
{{- end -}}

{{- define "diffusion-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "diffusion-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "diffusion-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The namespaces watched when watch.allNamespaces is false, as a list (JSON-encoded). */}}
{{- define "diffusion-operator.watchedNamespaces" -}}
{{- $list := .Values.watch.namespaces -}}
{{- if not $list -}}{{- $list = list .Release.Namespace -}}{{- end -}}
{{- $list | uniq | toJson -}}
{{- end -}}

{{/* Namespaces whose runtime pods the PodMonitor scrapes (JSON list; empty = any). */}}
{{- define "diffusion-operator.monitoredNamespaces" -}}
{{- if .Values.monitoring.podMonitor.namespaces -}}
{{- .Values.monitoring.podMonitor.namespaces | uniq | toJson -}}
{{- else if .Values.watch.allNamespaces -}}
{{- list | toJson -}}
{{- else -}}
{{- include "diffusion-operator.watchedNamespaces" . -}}
{{- end -}}
{{- end -}}

{{/* The leader-election Lease's name (the Lease, its Role's resourceNames and the operator's argument). */}}
{{- define "diffusion-operator.leaseName" -}}
{{- include "diffusion-operator.fullname" . -}}
{{- end -}}
