"""The operator's exact RBAC needs (the chart renders these rules; a cluster test runs the operator
with a ServiceAccount token bound to exactly them).

Namespaced mode (`--namespace NS`, repeatable): a Role with NAMESPACED_RULES in each watched namespace,
nothing cluster-scoped (kopf's namespace/CRD scanning is switched off in this mode, so the CRD must
exist when the operator starts). Cluster-wide mode (`--all-namespaces`): a ClusterRole with
NAMESPACED_RULES + CLUSTER_RULES (kopf lists/watches namespaces and CRDs there).
No access to Secrets: the HF token reaches the pods only by secretKeyRef, which the kubelet resolves.
Pods: read-only (get, list, watch) and their logs (get), for three purposes: the model download's
progress lines (the download Job's pod log tail while it runs, its termination message after), a
failed quality gate (a serving pod's termination message, the QualityGate condition), and the serving
pods' start lines (the head of a Ready pod's log, once per container: status.startup). No writes to
pods, no exec. Serving status comes from the owned Deployments.
"""

from __future__ import annotations

from diffusion_operator.api.group import GROUP, PLURAL

NAMESPACED_RULES: list[dict] = [
    {
        # the custom resource: watch it, write its status
        "apiGroups": [GROUP],
        "resources": [PLURAL],
        "verbs": ["get", "list", "watch"],
    },
    {"apiGroups": [GROUP], "resources": [f"{PLURAL}/status"], "verbs": ["get", "patch"]},
    {
        # children: read, watch (drift), server-side apply (patch; create happens through apply)
        "apiGroups": [""],
        "resources": ["configmaps", "services"],
        "verbs": ["get", "list", "watch", "create", "patch"],
    },
    {
        "apiGroups": ["apps"],
        "resources": ["deployments"],
        "verbs": ["get", "list", "watch", "create", "patch"],
    },
    {
        "apiGroups": ["policy"],
        "resources": ["poddisruptionbudgets"],
        "verbs": ["get", "list", "watch", "create", "patch"],
    },
    {
        # the HPA is deleted when spec.autoscaling is removed or its engine is keda
        "apiGroups": ["autoscaling"],
        "resources": ["horizontalpodautoscalers"],
        "verbs": ["get", "list", "watch", "create", "patch", "delete"],
    },
    {
        # spec.autoscaling.engine keda: the KEDA ScaledObject (applied, read on fresh passes, deleted when
        # the engine or autoscaling changes; not watched, as KEDA's CRD may be absent: no list/watch)
        "apiGroups": ["keda.sh"],
        "resources": ["scaledobjects"],
        "verbs": ["get", "create", "patch", "delete"],
    },
    {
        # spec.model.cache: the claim and the download Job (a new Job per change, never edited or deleted:
        # both go with the DiffusionDeployment through their owner references)
        "apiGroups": [""],
        "resources": ["persistentvolumeclaims"],
        "verbs": ["get", "list", "watch", "create", "patch"],
    },
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch"]},
    # pods, read-only: the download's progress (its pod's log tail and termination message), the serving
    # pods' termination messages (a failed quality gate: the QualityGate condition) and start lines
    # (the head of a Ready pod's log: status.startup)
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
]

CLUSTER_RULES: list[dict] = [
    # kopf, cluster-wide: discover the CRD and follow namespaces
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["get", "list", "watch"],
    },
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
]


def role(name: str, namespace: str) -> dict:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace},
        "rules": NAMESPACED_RULES,
    }


def cluster_role(name: str) -> dict:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": NAMESPACED_RULES + CLUSTER_RULES,
    }
