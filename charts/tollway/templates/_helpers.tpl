{{/* Full name of the release's objects: the release name, with "-tollway" unless it says tollway already. */}}
{{- define "tollway.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tollway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tollway.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels that select the operator's pods; never change them (Deployment selectors are immutable). */}}
{{- define "tollway.selectorLabels" -}}
app.kubernetes.io/name: tollway-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tollway.labels" -}}
{{ include "tollway.selectorLabels" . }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: tollway
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "tollway.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Peering is on when asked for, and always with more than one replica. */}}
{{- define "tollway.peering" -}}
{{- if or .Values.peering.enabled (gt (int .Values.replicas) 1) -}}true{{- end -}}
{{- end -}}

{{/* The in-chart Redis (redis.enabled): its objects' name and the labels that select its pod. */}}
{{- define "tollway.redisName" -}}
{{- printf "%s-redis" (include "tollway.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tollway.redisSelectorLabels" -}}
app.kubernetes.io/name: tollway-redis
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tollway.redisLabels" -}}
{{ include "tollway.redisSelectorLabels" . }}
app.kubernetes.io/component: state-store
app.kubernetes.io/part-of: tollway
{{- end -}}
