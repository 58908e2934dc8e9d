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

{{- /*
A resource quantity (500m, 0.5, 512Mi, 1e9, or a number from --set-json or a values file) as the
float it stands for, printed so that `float64` reads it back exactly. The schema admits only
quantities; Kubernetes' suffixes are converted here (Sprig has no quantity parser). Call with
(dict "value" v "name" "operator.resources.limits.memory").
*/ -}}
{{- define "slm-fleet.quantity" -}}
{{- $v := .value -}}
{{- if not (kindIs "string" $v) -}}
{{-   float64 $v -}}
{{- else -}}
{{-   $number := regexFind "^\\+?([0-9]+(\\.[0-9]*)?|\\.[0-9]+)" $v -}}
{{-   $suffix := trimPrefix $number $v -}}
{{-   $units := dict "" "1" "n" "1e-9" "u" "1e-6" "m" "1e-3" "k" "1e3" "M" "1e6" "G" "1e9" "T" "1e12" "P" "1e15" "E" "1e18" "Ki" "1024" "Mi" "1048576" "Gi" "1073741824" "Ti" "1099511627776" "Pi" "1125899906842624" "Ei" "1152921504606846976" -}}
{{-   if not $number -}}
{{-     fail (printf "%s=%q is not a quantity: give one such as 500m, 2 or 512Mi." .name $v) -}}
{{-   else if regexMatch "^[eE][-+]?[0-9]+$" $suffix -}}
{{-     float64 (trimPrefix "+" $v) -}}
{{-   else if hasKey $units $suffix -}}
{{-     mulf (float64 (trimPrefix "+" $number)) (float64 (index $units $suffix)) -}}
{{-   else -}}
{{-     fail (printf "%s=%q is not a quantity: give one such as 500m, 2 or 512Mi." .name $v) -}}
{{-   end -}}
{{- end -}}
{{- end -}}

{{- /*
Refuses a container's request above its limit (cpu, memory, ephemeral-storage: any resource
given both), which the schema cannot compare and the API server refuses only at apply, halfway
through an install or upgrade (the release failed, half-applied). Compared as quantities (500m is
0.5, 512Mi is 0.5Gi), with a margin for float rounding. Call with
(dict "resources" .Values.operator.resources "name" "operator.resources").
*/ -}}
{{- define "slm-fleet.checkResources" -}}
{{- $r := default (dict) .resources -}}
{{- $limits := default (dict) (index $r "limits") -}}
{{- $name := .name -}}
{{- range $key, $request := default (dict) (index $r "requests") -}}
{{-   if hasKey $limits $key -}}
{{-     $limit := index $limits $key -}}
{{-     $reqKey := printf "%s.requests.%s" $name $key -}}
{{-     $limKey := printf "%s.limits.%s" $name $key -}}
{{-     $a := include "slm-fleet.quantity" (dict "value" $request "name" $reqKey) | float64 -}}
{{-     $b := include "slm-fleet.quantity" (dict "value" $limit "name" $limKey) | float64 -}}
{{-     if gt $a (mulf $b 1.000000000001) -}}
{{-       fail (printf "%s (%v) is above %s (%v): the API server refuses a container whose request is above its limit (halfway through the install or upgrade, once other objects are applied). Lower the request, or raise the limit too." $reqKey $request $limKey $limit) -}}
{{-     end -}}
{{-   end -}}
{{- end -}}
{{- end -}}

{{- /*
The capture claim the chart creates (gateway.capture.persistence.create), as JSON: name,
accessModes, storageClassName, size, and live (whether it exists already). Read back from the
cluster at install and upgrade, a reinstall included (it adopts the claim kept on uninstall):
a claim's access modes and storage class cannot change, and its size can only grow, once bound
and on a class that allows expansion. The API server refused such a change only after it had
updated the gateway Deployment (2 replicas rolling on a ReadWriteOnce claim), leaving the release
failed and half-applied, so it is refused here. The live access modes (and a class the values
leave empty) are the ones rendered, so the strategy and the replica check follow the claim as it
is. `lookup` finds nothing under `helm template` and a client-side dry run: the values then.
*/ -}}
{{- define "slm-fleet.captureClaim" -}}
{{- $p := .Values.gateway.capture.persistence -}}
{{- $name := printf "%s-gateway-capture" (include "slm-fleet.fullname" .) -}}
{{- $live := lookup "v1" "PersistentVolumeClaim" .Release.Namespace $name -}}
{{- $claim := dict "name" $name "accessModes" $p.accessModes "storageClassName" (default "" $p.storageClassName) "size" $p.size "live" false -}}
{{- if $live -}}
{{-   $_ := set $claim "live" true -}}
{{-   $spec := $live.spec -}}
{{-   $modes := default (list) $spec.accessModes -}}
{{-   $copy := printf "create a new claim, copy the captures from %s into it, and set gateway.capture.existingClaim to its name (the chart keeps %s: delete it once copied)" $name $name -}}
{{-   if ne (toJson (sortAlpha $modes)) (toJson (sortAlpha $p.accessModes)) -}}
{{-     fail (printf "gateway.capture.persistence.accessModes={%s}: the capture claim %s this chart created is %s, and the API server refuses to change a claim's access modes (the install or upgrade would fail half-applied, the gateway already updated). To move the captures, create a ReadWriteMany claim (or one with the modes you want), copy the captures from %s into it, and set gateway.capture.existingClaim to its name (the chart keeps %s: delete it once copied). Or set gateway.capture.persistence.accessModes={%s} again." (join "," $p.accessModes) $name (join ", " $modes) $name $name (join "," $modes)) -}}
{{-   end -}}
{{-   $_ := set $claim "accessModes" $modes -}}
{{-   $class := default "" $spec.storageClassName -}}
{{-   if not $p.storageClassName -}}
{{-     $_ := set $claim "storageClassName" $class -}}
{{-   else if and (hasKey $spec "storageClassName") (ne $class $p.storageClassName) -}}
{{-     fail (printf "gateway.capture.persistence.storageClassName=%s: the capture claim %s this chart created has storageClassName %s, and the API server refuses to change a claim's class (the install or upgrade would fail half-applied, the gateway already updated). To move the captures, %s. Or set gateway.capture.persistence.storageClassName=%s again (or leave it empty: the claim's class is kept)." $p.storageClassName $name (default "\"\"" $class) $copy $class) -}}
{{-   end -}}
{{-   $have := dig "resources" "requests" "storage" "" $spec -}}
{{-   if $have -}}
{{-     $h := include "slm-fleet.quantity" (dict "value" $have "name" (printf "the claim %s's size" $name)) | float64 -}}
{{-     $w := include "slm-fleet.quantity" (dict "value" $p.size "name" "gateway.capture.persistence.size") | float64 -}}
{{-     if lt (mulf $w 1.000000000001) $h -}}
{{-       fail (printf "gateway.capture.persistence.size=%s is smaller than the %s the capture claim %s this chart created requests, and a claim cannot shrink (the API server would refuse it, the release left half-applied). Set gateway.capture.persistence.size=%s again, or %s." $p.size $have $name $have $copy) -}}
{{-     else if gt $w (mulf $h 1.000000000001) -}}
{{-       if ne (dig "status" "phase" "" $live) "Bound" -}}
{{-         fail (printf "gateway.capture.persistence.size=%s: the capture claim %s this chart created (%s) is not bound yet, and the API server resizes bound claims only (it would refuse it, the release left half-applied). Keep gateway.capture.persistence.size=%s until it is bound (with a WaitForFirstConsumer class, once a gateway pod mounts it)." $p.size $name $have $have) -}}
{{-       end -}}
{{-       $sc := dict -}}
{{-       if $class -}}
{{-         $sc = lookup "storage.k8s.io/v1" "StorageClass" "" $class -}}
{{-       end -}}
{{-       if not (dig "allowVolumeExpansion" false $sc) -}}
{{-         $why := ternary (printf "its StorageClass %s does not allow volume expansion" $class) "it has no StorageClass" (ne $class "") -}}
{{-         fail (printf "gateway.capture.persistence.size=%s: the capture claim %s this chart created (%s) can grow only on a StorageClass with allowVolumeExpansion: true, and %s (the API server would refuse it, the release left half-applied). Set gateway.capture.persistence.size=%s again, or %s." $p.size $name $have $why $have $copy) -}}
{{-       end -}}
{{-     end -}}
{{-   end -}}
{{- end -}}
{{- toJson $claim -}}
{{- end -}}
