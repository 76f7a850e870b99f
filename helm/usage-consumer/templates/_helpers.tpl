{{/* Names: Kubernetes names stop at 63 characters. */}}
{{- define "usage-consumer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "usage-consumer.fullname" -}}
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

{{- define "usage-consumer.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "usage-consumer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "usage-consumer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "usage-consumer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The consumer pods only: the migration Job's pods share the name and instance labels. */}}
{{- define "usage-consumer.consumerSelectorLabels" -}}
{{ include "usage-consumer.selectorLabels" . }}
app.kubernetes.io/component: consumer
{{- end }}

{{- define "usage-consumer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "usage-consumer.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "usage-consumer.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "usage-consumer.controlTopic" -}}
{{- default (printf "%s.control" .Values.kafka.topic) .Values.kafka.controlTopic }}
{{- end }}

{{/* The Secret the chart creates from plaintext values (trials only). */}}
{{- define "usage-consumer.trialSecretName" -}}
{{- printf "%s-trial" (include "usage-consumer.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
config.yaml: the consumer's configuration file, never a secret. Secrets reach the process
as environment variables (usage-consumer.consumerEnv), which win over this file.
*/}}
{{- define "usage-consumer.config" -}}
{{- $v := .Values }}
{{- $kafka := dict
  "bootstrap_servers" $v.kafka.bootstrapServers
  "topic" $v.kafka.topic
  "dlq_topic" $v.kafka.dlqTopic
  "late_topic" $v.kafka.lateTopic
  "group_id" $v.kafka.groupId
  "control_topic" (include "usage-consumer.controlTopic" .)
  "auto_offset_reset" $v.kafka.autoOffsetReset
  "librdkafka" (deepCopy $v.kafka.librdkafka)
  "consumer_librdkafka" (deepCopy $v.kafka.consumerLibrdkafka)
  "producer_librdkafka" (deepCopy $v.kafka.producerLibrdkafka) }}
{{- with $v.kafka.sasl.username }}{{ $_ := set $kafka "sasl_username" . }}{{ end }}
{{- $schema := dict }}
{{- with $v.schemaRegistry.url }}{{ $_ := set $schema "registry_url" . }}{{ end }}
{{- with $v.schemaRegistry.username }}{{ $_ := set $schema "registry_username" . }}{{ end }}
{{- $clickhouse := dict
  "host" $v.clickhouse.host
  "port" $v.clickhouse.port
  "secure" $v.clickhouse.secure
  "database" $v.clickhouse.database
  "username" $v.clickhouse.username }}
{{- with $v.clickhouse.cluster }}{{ $_ := set $clickhouse "cluster" . }}{{ end }}
{{- $stripe := dict
  "enabled" $v.stripe.enabled
  "api_base" $v.stripe.apiBase
  "meter_events_base" $v.stripe.meterEventsBase
  "requests_per_second" $v.stripe.requestsPerSecond
  "concurrency" $v.stripe.concurrency }}
{{- $pipeline := dict "metrics_host" "0.0.0.0" "metrics_port" $v.metrics.port }}
{{- $config := dict
  "kafka" $kafka
  "schema" $schema
  "clickhouse" $clickhouse
  "stripe" $stripe
  "pipeline" $pipeline
  "log" (dict "format" $v.logFormat)
  "meters" (deepCopy $v.meters) }}
{{- $config = mustMergeOverwrite $config (deepCopy $v.extraConfig) }}
{{- toYaml $config }}
{{- end }}

{{/* The pod's security context, the same for the consumer and the migration Job. */}}
{{- define "usage-consumer.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "usage-consumer.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
A secret's env var: from existingSecret when set, else from the trial Secret when a
plaintext value is set, else nothing. Called with (list $ envName section plainKey
trialKey secretName): secretName overrides the trial Secret (the migration hook has its own).
*/}}
{{- define "usage-consumer.secretEnvVar" -}}
{{- $root := index . 0 }}
{{- $env := index . 1 }}
{{- $s := index . 2 }}
{{- $plain := index . 3 }}
{{- $trialKey := index . 4 }}
{{- $trialSecret := index . 5 }}
{{- if $s.existingSecret }}
- name: {{ $env }}
  valueFrom:
    secretKeyRef:
      name: {{ $s.existingSecret }}
      key: {{ $s.existingSecretKey }}
{{- else if (get $s $plain) }}
- name: {{ $env }}
  valueFrom:
    secretKeyRef:
      name: {{ $trialSecret }}
      key: {{ $trialKey }}
{{- end }}
{{- end }}

{{/*
Environment both the consumer and the migration Job get. Each env helper's output starts
with a newline, so they concatenate into one list.
*/}}
{{- define "usage-consumer.commonEnv" }}
# Pinned: an embedded chDB store would live and die with one pod.
- name: USAGE_CONSUMER_CLICKHOUSE__BACKEND
  value: server
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "usage-consumer.consumerEnv" }}
{{- $trial := include "usage-consumer.trialSecretName" . }}
{{- include "usage-consumer.commonEnv" . }}
{{- include "usage-consumer.secretEnvVar" (list . "USAGE_CONSUMER_CLICKHOUSE__PASSWORD" .Values.clickhouse "password" "clickhouse-password" $trial) }}
{{- if .Values.stripe.enabled }}
{{- include "usage-consumer.secretEnvVar" (list . "USAGE_CONSUMER_STRIPE__API_KEY" .Values.stripe "apiKey" "stripe-api-key" $trial) }}
{{- end }}
{{- include "usage-consumer.secretEnvVar" (list . "USAGE_CONSUMER_KAFKA__SASL_PASSWORD" .Values.kafka.sasl "password" "kafka-sasl-password" $trial) }}
{{- include "usage-consumer.secretEnvVar" (list . "USAGE_CONSUMER_SCHEMA__REGISTRY_PASSWORD" .Values.schemaRegistry "password" "" $trial) }}
{{- if .Values.kafka.staticMembership }}
# Static membership: the pod name, the same across this pod's container restarts.
- name: USAGE_CONSUMER_KAFKA__GROUP_INSTANCE_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end }}
{{- end }}

{{/* The Job needs ClickHouse only; its trial password comes from its own hook Secret. */}}
{{- define "usage-consumer.migrateEnv" }}
{{- $root := index . 0 }}
{{- include "usage-consumer.commonEnv" $root }}
{{- include "usage-consumer.secretEnvVar" (list $root "USAGE_CONSUMER_CLICKHOUSE__PASSWORD" $root.Values.clickhouse "password" "clickhouse-password" (index . 1)) }}
{{- end }}

{{/* The trial Secret's data: only the sections that carry a plaintext value. */}}
{{- define "usage-consumer.trialSecretData" -}}
{{- $v := .Values }}
{{- if and (not $v.stripe.existingSecret) $v.stripe.apiKey }}
stripe-api-key: {{ $v.stripe.apiKey | b64enc | quote }}
{{- end }}
{{- if and (not $v.kafka.sasl.existingSecret) $v.kafka.sasl.password }}
kafka-sasl-password: {{ $v.kafka.sasl.password | b64enc | quote }}
{{- end }}
{{- if and (not $v.clickhouse.existingSecret) $v.clickhouse.password }}
clickhouse-password: {{ $v.clickhouse.password | b64enc | quote }}
{{- end }}
{{- end }}

{{/* Checks the schema cannot express: they compare two values. */}}
{{- define "usage-consumer.validate" -}}
{{- $a := .Values.autoscaling }}
{{- if $a.enabled }}
{{- if gt (int $a.maxReplicaCount) (int .Values.kafka.partitions) }}
{{- fail (printf "autoscaling.maxReplicaCount (%d) exceeds kafka.partitions (%d): consumers beyond the partition count sit idle" (int $a.maxReplicaCount) (int .Values.kafka.partitions)) }}
{{- end }}
{{- if gt (int $a.minReplicaCount) (int $a.maxReplicaCount) }}
{{- fail (printf "autoscaling.minReplicaCount (%d) exceeds autoscaling.maxReplicaCount (%d)" (int $a.minReplicaCount) (int $a.maxReplicaCount)) }}
{{- end }}
{{- end }}
{{- end }}
