{{/* Chart name, truncated to the 63 characters of a label value. */}}
{{- define "llmengine-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the prefix of every object this chart creates. */}}
{{- define "llmengine-operator.fullname" -}}
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

{{- define "llmengine-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llmengine-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmengine-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "llmengine-operator.labels" -}}
helm.sh/chart: {{ include "llmengine-operator.chart" . }}
{{ include "llmengine-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: llmengine
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "llmengine-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llmengine-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "llmengine-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Kopf peering name shared by all replicas (only used when replicaCount > 1). */}}
{{- define "llmengine-operator.peeringName" -}}
llmengine-operator
{{- end }}

{{- define "llmengine-operator.peering" -}}
{{- if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}

{{/* Secret name build and serving pods of default-store engines read. */}}
{{- define "llmengine-operator.engineSecret" -}}
{{- if eq .Values.store.access "isolated" }}
{{- .Values.store.credentialsSecret }}
{{- else }}
{{- default .Values.store.credentialsSecret .Values.store.engineSecret }}
{{- end }}
{{- end }}

{{/* The validating webhook: its Service and its serving-certificate Secret. */}}
{{- define "llmengine-operator.webhookService" -}}
{{- printf "%s-webhook" (include "llmengine-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llmengine-operator.webhookSecret" -}}
{{- if eq .Values.webhook.certificate.source "secret" }}
{{- required "webhook.certificate.secretName is required when webhook.certificate.source is secret" .Values.webhook.certificate.secretName }}
{{- else if eq .Values.webhook.certificate.source "operator" }}
{{- /* Not "-webhook-tls": that one is the kubernetes.io/tls Secret of source helm, and a Secret's type never changes. */}}
{{- printf "%s-webhook-cert" (include "llmengine-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-webhook-tls" (include "llmengine-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Host of webhook.url without its port, for the certificate's subject alternative names. */}}
{{- define "llmengine-operator.webhookUrlHost" -}}
{{- with .Values.webhook.url }}{{ (urlParse .).host | splitList ":" | first }}{{ end }}
{{- end }}

{{/* The Prometheus job of the operator's metrics, as the chart's ServiceMonitor scrapes them (the Service name). */}}
{{- define "llmengine-operator.operatorSelector" -}}
job="{{ include "llmengine-operator.fullname" . }}-metrics",namespace="{{ .Release.Namespace }}"
{{- end }}

{{/* The Prometheus job of the serving pods, as the chart's PodMonitor scrapes them ("<namespace>/<name>"). */}}
{{- define "llmengine-operator.servingSelector" -}}
job="{{ .Release.Namespace }}/{{ include "llmengine-operator.fullname" . }}-serving"
{{- end }}

{{/*
The operator's per-engine series (llmengine_engine_condition, llmengine_engine_phase). Their namespace label is the
engine's, which the ServiceMonitor keeps (honorLabels), so they are selected by job alone, and by the watched
namespaces where the operator watches only some.
*/}}
{{- define "llmengine-operator.engineSelector" -}}
job="{{ include "llmengine-operator.fullname" . }}-metrics"
{{- if .Values.watchNamespaces }},namespace=~"{{ join "|" .Values.watchNamespaces }}"{{ end }}
{{- end }}

{{/* enginePods as the operator reads it (LLMENGINE_ENGINE_PODS, JSON): settings left empty are left out. */}}
{{- define "llmengine-operator.enginePods" -}}
{{- $out := dict }}
{{- range $k, $v := .Values.enginePods }}
{{- if eq $k "proxy" }}
{{- $proxy := dict }}
{{- range $pk, $pv := $v }}{{ if $pv }}{{ $_ := set $proxy $pk $pv }}{{ end }}{{ end }}
{{- if $proxy }}{{ $_ := set $out $k $proxy }}{{ end }}
{{- else if $v }}
{{- $_ := set $out $k $v }}
{{- end }}
{{- end }}
{{- if $out }}{{ toJson $out }}{{ end }}
{{- end }}

{{/* The CA bundle the operator's own store client trusts: enginePods.caBundle's object, from the release namespace. */}}
{{- define "llmengine-operator.caBundleVolume" -}}
{{- with .Values.enginePods.caBundle }}
{{- with .configMapKeyRef }}
configMap:
  name: {{ .name }}
  items:
    - key: {{ .key | quote }}
      path: ca.crt
{{- end }}
{{- with .secretKeyRef }}
secret:
  secretName: {{ .name }}
  items:
    - key: {{ .key | quote }}
      path: ca.crt
{{- end }}
{{- end }}
{{- end }}

{{/*
metadata.annotations of the objects the operator and its webhook need: `extra` (a dict) and the Argo CD sync wave
(argocd.syncWave), or nothing at all. Called with (dict "ctx" $ "extra" (dict ...)).
*/}}
{{- define "llmengine-operator.annotations" -}}
{{- $a := deepCopy (.extra | default dict) }}
{{- $wave := toString (.ctx.Values.argocd.syncWave | default "") }}
{{- if $wave }}
{{- $_ := set $a "argocd.argoproj.io/sync-wave" $wave }}
{{- end }}
{{- with $a -}}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
The CRDs' annotations. With crds.keep they are kept on `helm uninstall` (helm.sh/resource-policy) and never pruned
or deleted by Argo CD, which ignores Helm's policy when it prunes (sync-options Prune=false: Argo CD prunes what a
render no longer holds, crds.install=false included; Delete=false: deleting the Application). Deleting a CRD
deletes every object of its kind.
*/}}
{{- define "llmengine-operator.crdAnnotations" -}}
{{- $a := dict }}
{{- if .Values.crds.keep }}
{{- $_ := set $a "helm.sh/resource-policy" "keep" }}
{{- $_ := set $a "argocd.argoproj.io/sync-options" "Prune=false,Delete=false" }}
{{- end }}
{{- include "llmengine-operator.annotations" (dict "ctx" . "extra" $a) }}
{{- end }}
