{{/* Chart name, truncated to a label value. */}}
{{- define "pgw.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects. */}}
{{- define "pgw.fullname" -}}
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

{{/* Name of cluster-scoped objects: unique per release namespace and name. */}}
{{- define "pgw.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "pgw.fullname" .) }}
{{- end }}

{{- define "pgw.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of the operator pod; never change on upgrade. */}}
{{- define "pgw.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pgw.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Standard labels of every object the chart renders (add app.kubernetes.io/component). */}}
{{- define "pgw.labels" -}}
helm.sh/chart: {{ include "pgw.chart" . }}
{{ include "pgw.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: prefect-gpu-workers
{{- end }}

{{- define "pgw.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pgw.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create=false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pgw.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Secret names the operator may read (JSON list, deduplicated, never empty strings). */}}
{{- define "pgw.secretNames" -}}
{{- $names := list }}
{{- with .Values.prefect.apiKeySecret.name }}{{ $names = append $names . }}{{ end }}
{{- range .Values.prefect.extraSecretNames }}{{ $names = append $names . }}{{ end }}
{{- $names | uniq | toJson }}
{{- end }}

{{/*
What the operator does inside a served namespace (ClusterRole when it serves
all namespaces, one Role per watched namespace otherwise). Verbs are the ones
its code and kopf use: kopf lists/watches and merge/JSON-patches the pools
(finalizer, annotations), the operator patches their status, server-side
applies (create + patch) the worker Deployments, watches their pods and posts
core v1 Events. The one delete is of its own GpuWorkerLimit records, once the
Prefect limits they name are gone; owner references let the garbage collector
remove Deployments and pods.
*/}}
{{- define "pgw.operatorRules" -}}
- apiGroups: [gpuworkers.dev]
  resources: [gpuworkerpools]
  verbs: [get, list, watch, patch]
- apiGroups: [gpuworkers.dev]
  resources: [gpuworkerpools/status]
  verbs: [get, patch]
- apiGroups: [gpuworkers.dev]
  resources: [gpuworkerlimits]
  # One per worker pod: the operator's record of that pod's Prefect limits,
  # written before it creates them; deleted (its finalizer released) once the
  # limits it names are deleted. Tenants may read these, never write them.
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [gpuworkers.dev]
  resources: [gpuworkerpools/scale]
  # spec.autoscaling: the operator sets a pool's replicas as HPA would, through /scale
  verbs: [patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [pods]
  # patch: the pod-deletion-cost annotation that makes scale-down pick idle workers
  verbs: [get, list, watch, patch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [""]
  resources: [serviceaccounts]
  # Each pool's workers run as an account of their own ({pool}-worker: no rights,
  # no token), server-side applied; get: its owner is read first
  verbs: [get, create, patch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  # spec.disruption: one server-side-applied PDB per pool (never deleted by the
  # operator: unsetting the field applies an inert budget, maxUnavailable 100%);
  # get: its owner is read first, so that no one else's budget is taken over
  verbs: [get, create, patch]
{{- $secrets := include "pgw.secretNames" . | fromJsonArray }}
{{- if $secrets }}
- apiGroups: [""]
  resources: [secrets]
  resourceNames: {{ toJson $secrets }}
  verbs: [get]
{{- end }}
{{- end }}

{{/*
Operator pods: replicaCount, or 2 with leader election and 1 without. More
than one without election would be several writers: refused.
*/}}
{{- define "pgw.replicas" -}}
{{- $set := not (kindIs "invalid" .Values.replicaCount) }}
{{- if .Values.leaderElection.enabled }}
{{- if $set }}{{ int .Values.replicaCount }}{{ else }}2{{ end }}
{{- else if and $set (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "replicaCount %d needs leaderElection.enabled=true: replicas without leader election would all write to the same pools and limits" (int .Values.replicaCount)) }}
{{- else }}1
{{- end }}
{{- end }}

{{/* The leader-election Lease: one per release unless named. */}}
{{- define "pgw.leaseName" -}}
{{- default (printf "%s-leader" (include "pgw.fullname" .)) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
The operator pod's affinity: .Values.affinity, plus anti-affinity between the
replicas (podAntiAffinity) when there are several and affinity has none.
*/}}
{{- define "pgw.affinity" -}}
{{- $affinity := deepCopy (default dict .Values.affinity) }}
{{- $spread := .Values.podAntiAffinity }}
{{- if and (gt (include "pgw.replicas" . | int) 1) (ne $spread.type "none") (not (hasKey $affinity "podAntiAffinity")) }}
{{- $term := dict "labelSelector" (dict "matchLabels" (include "pgw.selectorLabels" . | fromYaml)) "topologyKey" $spread.topologyKey }}
{{- if eq $spread.type "required" }}
{{- $_ := set $affinity "podAntiAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (list $term)) }}
{{- else }}
{{- $_ := set $affinity "podAntiAffinity" (dict "preferredDuringSchedulingIgnoredDuringExecution" (list (dict "weight" 100 "podAffinityTerm" $term))) }}
{{- end }}
{{- end }}
{{- if $affinity }}{{ toYaml $affinity }}{{ end }}
{{- end }}

{{/* Fail early on combinations the schema cannot express. */}}
{{- define "pgw.validate" -}}
{{- with .Values.leaderElection }}
{{- if .enabled }}
{{- if ge (int .renewDeadlineSeconds) (int .leaseDurationSeconds) }}
{{- fail (printf "leaderElection.renewDeadlineSeconds (%d) must be less than leaseDurationSeconds (%d): a leader that cannot renew must stop before a standby may take over" (int .renewDeadlineSeconds) (int .leaseDurationSeconds)) }}
{{- end }}
{{- if ge (int .retryPeriodSeconds) (int .renewDeadlineSeconds) }}
{{- fail (printf "leaderElection.retryPeriodSeconds (%d) must be less than renewDeadlineSeconds (%d): the leader needs more than one try to renew" (int .retryPeriodSeconds) (int .renewDeadlineSeconds)) }}
{{- end }}
{{- end }}
{{- end }}
{{- $replicas := include "pgw.replicas" . | int }}
{{- $minAvailable := .Values.podDisruptionBudget.minAvailable }}
{{- if and .Values.podDisruptionBudget.enabled (gt $replicas 1) (not (kindIs "string" $minAvailable)) (ge (int $minAvailable) $replicas) }}
{{- fail (printf "podDisruptionBudget.minAvailable (%d) must be less than the operator's replicas (%d): no eviction could ever proceed, so node drains would hang" (int $minAvailable) $replicas) }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled=true needs metrics.enabled=true (the ServiceMonitor scrapes the metrics Service)" }}
{{- end }}
{{- if .Values.samplePool.enabled }}
{{- $ns := default .Release.Namespace .Values.samplePool.namespace }}
{{- if and .Values.watchNamespaces (not (has $ns .Values.watchNamespaces)) }}
{{- fail (printf "samplePool.namespace %q is not in watchNamespaces %v: the operator would never serve the sample pool" $ns .Values.watchNamespaces) }}
{{- end }}
{{- end }}
{{- end }}
