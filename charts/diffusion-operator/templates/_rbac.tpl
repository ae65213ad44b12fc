{{/*
The operator's permissions. The source of truth is operator/diffusion_operator/rbac.py
(NAMESPACED_RULES, CLUSTER_RULES); tests/chart checks that these rules grant exactly the same
(group, resource, verb) set, and a cluster test runs the operator with a token bound to them.
No Secrets (the HF token reaches pods by secretKeyRef only), no RBAC objects; pods read-only (the
model download's progress: log tail and termination message).
*/}}

{{/* Rules needed in every watched namespace (a Role each), or cluster-wide (in the ClusterRole). */}}
{{- define "diffusion-operator.namespacedRules" -}}
# the custom resource: watch it, write its status
- apiGroups: ["diffusion.dev"]
  resources: ["diffusiondeployments"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["diffusion.dev"]
  resources: ["diffusiondeployments/status"]
  verbs: ["get", "patch"]
# children: read, watch (drift), server-side apply (patch; a new object also needs create)
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# the HPA is deleted when spec.autoscaling is removed or its engine is keda
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# spec.autoscaling.engine keda: the KEDA ScaledObject (not watched: KEDA's CRD may be absent)
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["get", "create", "patch", "delete"]
# spec.model.cache: the claim and the download Job
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
# pods, read-only: the download's progress (log tail, termination message) and the serving pods'
# termination messages (a failed quality gate: the QualityGate condition)
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
# events about real problems (invalid spec, failed apply) on the DiffusionDeployment
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

{{/* Cluster-scoped, read-only rules kopf needs when it watches all namespaces. */}}
{{- define "diffusion-operator.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get", "list", "watch"]
{{- end -}}
