{{/* Names and labels only; everything else lives in the templates that use it. */}}

{{- define "moe-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "moe-operator.fullname" -}}
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

{{- define "moe-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moe-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "moe-operator.labels" -}}
{{ include "moe-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "moe-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "moe-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "moe-operator.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "moe-operator.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "moe-operator.fullname" .)) .Values.webhook.tls.secretName -}}
{{- end -}}

{{/* http or https: the scheme of the operator's port. */}}
{{- define "moe-operator.scheme" -}}
{{- ternary "https" "http" (and .Values.webhook.tls.enabled true) -}}
{{- end -}}

{{- define "moe-operator.alertsSecretName" -}}
{{- default (printf "%s-alerts" (include "moe-operator.fullname" .)) .Values.alertsWebhook.existingSecret -}}
{{- end -}}

{{/* The namespaces a Namespaced install watches (default: the release namespace). */}}
{{- define "moe-operator.watchNamespaces" -}}
{{- if .Values.scope.watchNamespaces -}}
{{- toJson .Values.scope.watchNamespaces -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}
