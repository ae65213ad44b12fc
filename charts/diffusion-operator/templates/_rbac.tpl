{{/*
The operator's permissions, in one place. Keep in step with the operator's own declaration
(operator/diffusion_operator/rbac.py); tests/chart checks that the rendered rules cover it and
that a token bound to them reconciles a sample and can do nothing more.
*/}}

{{/* Rules needed in every watched namespace (Role) or cluster-wide (ClusterRole). */}}
{{- define "diffusion-operator.namespacedRules" -}}
# the custom resource: watch it, record finalizers/annotations, and write its status
- apiGroups: ["diffusion.dev"]
  resources: ["diffusiondeployments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["diffusion.dev"]
  resources: ["diffusiondeployments/status"]
  verbs: ["get", "patch"]
# the children it owns: server-side apply is a PATCH (plus create for a new object)
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# events about real problems (invalid spec, failed apply) on the DiffusionDeployment
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

{{/* Cluster-scoped, read-only rules kopf needs in both modes (it observes CRDs and namespaces). */}}
{{- define "diffusion-operator.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get", "list", "watch"]
{{- end -}}
