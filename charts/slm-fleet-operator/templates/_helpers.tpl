{{- define "slm-fleet.fullname" -}}
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

{{- define "slm-fleet.watchNamespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- join "," .Values.watchNamespaces -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}
