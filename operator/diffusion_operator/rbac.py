"""The operator's exact RBAC needs, derived from the one resource table (resources.py). The chart's
`templates/_rbac.tpl` is generated from these rules (`tools/gen_rbac.py`); a cluster test runs the
operator with a ServiceAccount token bound to exactly them.

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

from diffusion_operator.resources import RESOURCES, Resource


def rules_of(resource: Resource) -> list[dict]:
    """The rules one table row needs: the resource's verbs (none: no rule), then each subresource's."""
    out = []
    if resource.verbs:
        out.append(
            {"apiGroups": [resource.group], "resources": [resource.plural], "verbs": list(resource.verbs)}
        )
    for sub, verbs in resource.subresources:
        out.append(
            {"apiGroups": [resource.group], "resources": [f"{resource.plural}/{sub}"], "verbs": list(verbs)}
        )
    return out


def commented_rules(cluster: bool) -> list[tuple[str, dict]]:
    """(why, rule) for the namespaced (cluster False) or the cluster-scoped rows, in table order."""
    return [(r.why, rule) for r in RESOURCES if r.cluster == cluster for rule in rules_of(r)]


NAMESPACED_RULES: list[dict] = [rule for _, rule in commented_rules(cluster=False)]
CLUSTER_RULES: list[dict] = [rule for _, rule in commented_rules(cluster=True)]


def role(name: str, namespace: str) -> dict:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace},
        "rules": NAMESPACED_RULES,
    }
