{{- /* Every object's name starts with the release name, as it is: not renamed, so that names
stay predictable for users and across upgrades. Helm accepts dots in release names, but the
Services' names (<release>-gateway) must be DNS labels, which the API server refuses with a dot. */ -}}
{{- define "slm-fleet.fullname" -}}
{{- if contains "." .Release.Name -}}
{{- fail (printf "release name %q contains a dot: this chart names its objects after the release (Service %s-gateway, ...), and the API server refuses a Service name with a dot (it must be a DNS label). Install the release under a name without dots, e.g. %s." .Release.Name .Release.Name (replace "." "-" .Release.Name)) -}}
{{- end -}}
{{- printf "%s" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "slm-fleet.labels" -}}
app.kubernetes.io/name: slm-fleet-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "slm-fleet.operatorServiceAccount" -}}
{{- default (printf "%s-operator" (include "slm-fleet.fullname" .)) .Values.operator.serviceAccount.name -}}
{{- end -}}

{{- /* The Lease the operator replicas elect their leader on, in the release namespace. */ -}}
{{- define "slm-fleet.operatorLease" -}}
{{- printf "%s-operator" (include "slm-fleet.fullname" .) -}}
{{- end -}}

{{- define "slm-fleet.watchNamespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- join "," .Values.watchNamespaces -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{- /* ---- added for the Deployments, the gateway and monitoring ---- */ -}}

{{- define "slm-fleet.gatewayServiceAccount" -}}
{{- default (printf "%s-gateway" (include "slm-fleet.fullname" .)) .Values.gateway.serviceAccount.name -}}
{{- end -}}

{{- /* Selector labels of one component; call with (dict "root" $ "component" "gateway"). */ -}}
{{- define "slm-fleet.selectorLabels" -}}
app.kubernetes.io/name: slm-fleet-operator
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- /* Image reference; call with (dict "root" $ "image" .Values.operator.image). */ -}}
{{- define "slm-fleet.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{- /* The restricted Pod Security Standard, for every container the chart runs. */ -}}
{{- define "slm-fleet.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "slm-fleet.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- /*
Where the gateway watches AgentTasks: one namespace when exactly one is watched and RBAC is
namespaced, else every namespace ("" here, --all-namespaces on the command line).
*/ -}}
{{- define "slm-fleet.gatewayNamespace" -}}
{{- $ns := splitList "," (include "slm-fleet.watchNamespaces" .) -}}
{{- if and (not .Values.rbac.clusterWide) (eq (len $ns) 1) -}}
{{- first $ns -}}
{{- end -}}
{{- end -}}

{{- /* The trainer pods' ServiceAccount; empty when none is created or named. */ -}}
{{- define "slm-fleet.trainerServiceAccount" -}}
{{- $sa := .Values.trainer.serviceAccount -}}
{{- if $sa.create -}}
{{- default (printf "%s-trainer" (include "slm-fleet.fullname" .)) $sa.name -}}
{{- else -}}
{{- $sa.name -}}
{{- end -}}
{{- end -}}

{{- /*
Where the trainer ServiceAccount and its Role go, comma-separated: trainer.serviceAccount.namespaces,
else the watched namespaces (the release namespace when rbac.clusterWide watches them all).
*/ -}}
{{- define "slm-fleet.trainerNamespaces" -}}
{{- if .Values.trainer.serviceAccount.namespaces -}}
{{- join "," .Values.trainer.serviceAccount.namespaces -}}
{{- else if .Values.rbac.clusterWide -}}
{{- .Release.Namespace -}}
{{- else -}}
{{- include "slm-fleet.watchNamespaces" . -}}
{{- end -}}
{{- end -}}

{{- /*
The ServiceAccounts an AgentTask may not run its trainer as (spec.training.serviceAccountName),
comma-separated: the operator's, and the gateway's when it is deployed.
*/ -}}
{{- define "slm-fleet.reservedServiceAccounts" -}}
{{- $names := list (include "slm-fleet.operatorServiceAccount" .) -}}
{{- if .Values.gateway.enabled -}}
{{- $names = append $names (include "slm-fleet.gatewayServiceAccount" .) -}}
{{- end -}}
{{- join "," ($names | uniq) -}}
{{- end -}}

{{- /*
The trainer ServiceAccount's imagePullSecrets, as JSON [{name: ...}]:
trainer.serviceAccount.imagePullSecrets, else the chart's imagePullSecrets.
*/ -}}
{{- define "slm-fleet.trainerPullSecrets" -}}
{{- toJson (default (default (list) .Values.imagePullSecrets) .Values.trainer.serviceAccount.imagePullSecrets) -}}
{{- end -}}

{{- /*
Names of the pull secrets the operator puts on the trainer and Triton pods it creates,
comma-separated (SLM_FLEET_IMAGE_PULL_SECRETS): the chart's imagePullSecrets and the trainer
ServiceAccount's. Both, because a pod that lists pull secrets gets none from its ServiceAccount.
*/ -}}
{{- define "slm-fleet.podPullSecrets" -}}
{{- $names := list -}}
{{- range concat (default (list) .Values.imagePullSecrets) (include "slm-fleet.trainerPullSecrets" . | fromJsonArray) -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- join "," ($names | uniq) -}}
{{- end -}}

{{- /* A monitor's scrape interval: its own, else operator.prometheusScrapeSeconds. One setting
by default, because the operator reads rates over at least two scrape intervals: a monitor
scraping less often than the operator assumes leaves its windows with one sample or none. */ -}}
{{- define "slm-fleet.scrapeInterval" -}}
{{- $s := include "slm-fleet.prometheusScrapeSeconds" .root | float64 -}}
{{- if .monitor.interval -}}
{{- .monitor.interval -}}
{{- else if eq (float64 (int $s)) $s -}}
{{- printf "%ds" (int $s) -}}
{{- else -}}
{{- printf "%dms" (int (round (mulf $s 1000) 0)) -}}
{{- end -}}
{{- end -}}

{{- /*
A value the schema takes as a number or as a decimal string, rendered as the number it is.
`helm --set x=0.5` passes text ("0.5"); --set-json and values files pass a number: both render
the same (0.5), and text gets here the bounds the schema checks only on numbers. Call with
(dict "value" v "name" "gateway.llmTimeoutSeconds" "above" 0 "max" 3600); the bounds are
optional: "min" (at least), "above" (more than), "max" (at most).
*/ -}}
{{- define "slm-fleet.decimal" -}}
{{- $v := .value -}}
{{- if kindIs "string" $v -}}
{{-   if not (regexMatch "^[0-9]+(\\.[0-9]+)?([eE][-+]?[0-9]+)?$" $v) -}}
{{-     fail (printf "%s=%q is not a number: give a decimal such as 0.5." .name $v) -}}
{{-   end -}}
{{- else if not (or (kindIs "float64" $v) (kindIs "int64" $v) (kindIs "int" $v)) -}}
{{-   fail (printf "%s=%v is not a number: give a decimal such as 0.5." .name $v) -}}
{{- end -}}
{{- $f := float64 $v -}}
{{- $want := list -}}
{{- $ok := true -}}
{{- if hasKey . "min" -}}
{{-   $want = append $want (printf "at least %v" .min) -}}
{{-   $ok = and $ok (ge $f (float64 .min)) -}}
{{- end -}}
{{- if hasKey . "above" -}}
{{-   $want = append $want (printf "more than %v" .above) -}}
{{-   $ok = and $ok (gt $f (float64 .above)) -}}
{{- end -}}
{{- if hasKey . "max" -}}
{{-   $want = append $want (printf "at most %v" .max) -}}
{{-   $ok = and $ok (le $f (float64 .max)) -}}
{{- end -}}
{{- if not $ok -}}
{{-   fail (printf "%s=%v is out of range: it must be %s." .name $v (join " and " $want)) -}}
{{- end -}}
{{- $f -}}
{{- end -}}

{{- /* operator.prometheusScrapeSeconds, checked: the operator's env and the monitors' interval. */ -}}
{{- define "slm-fleet.prometheusScrapeSeconds" -}}
{{- include "slm-fleet.decimal" (dict "value" .Values.operator.prometheusScrapeSeconds "name" "operator.prometheusScrapeSeconds" "min" 0.001 "max" 3600) -}}
{{- end -}}
