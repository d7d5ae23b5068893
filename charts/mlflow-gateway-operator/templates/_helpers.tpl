{{/* The chart's name. */}}
{{- define "mgo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the prefix of every object. */}}
{{- define "mgo.fullname" -}}
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

{{- define "mgo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mgo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mgo.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "mgo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "mgo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mgo.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name: name the existing ServiceAccount to run as (serviceAccount.create is false)" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference from {repository, tag, digest}; the tag defaults to the appVersion. */}}
{{- define "mgo.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) }}
{{- end }}
{{- end }}

{{- define "mgo.image" -}}
{{- include "mgo.imageRef" (dict "image" .Values.image "appVersion" .Chart.AppVersion) }}
{{- end }}

{{/* The gateway pods' image: gateway.image when its repository is set, else the operator's. */}}
{{- define "mgo.gatewayImage" -}}
{{- if .Values.gateway.image.repository }}
{{- include "mgo.imageRef" (dict "image" .Values.gateway.image "appVersion" .Chart.AppVersion) }}
{{- else }}
{{- include "mgo.image" . }}
{{- end }}
{{- end }}

{{/* The Lease name. */}}
{{- define "mgo.leaseName" -}}
{{- include "mgo.fullname" . }}
{{- end }}

{{/*
Rules values.schema.json cannot state with a clear message: each fails the render with one.
*/}}
{{- define "mgo.validate" -}}
{{- $ca := .Values.mlflow.caBundle }}
{{- if and $ca.configMap $ca.secret }}
{{- fail "mlflow.caBundle: set configMap or secret, not both" }}
{{- end }}
{{- if and (or $ca.configMap $ca.secret) .Values.mlflow.insecureTls }}
{{- fail "mlflow.insecureTls is true and mlflow.caBundle is set: either verify the server with the CA bundle or skip verification, not both" }}
{{- end }}
{{- $le := .Values.leaderElection }}
{{- if and (gt (int .Values.replicaCount) 1) (not $le.enabled) }}
{{- fail (printf "replicaCount is %d with leaderElection.enabled false: the replicas would all reconcile. Turn leader election on or run one replica" (int .Values.replicaCount)) }}
{{- end }}
{{- if $le.enabled }}
{{- if le (int $le.leaseDurationSeconds) (int $le.renewDeadlineSeconds) }}
{{- fail "leaderElection.leaseDurationSeconds must be greater than renewDeadlineSeconds, or a follower could take over before the leader stops" }}
{{- end }}
{{- if le (int $le.renewDeadlineSeconds) (int $le.retryPeriodSeconds) }}
{{- fail "leaderElection.renewDeadlineSeconds must be greater than retryPeriodSeconds" }}
{{- end }}
{{- end }}
{{- end }}
