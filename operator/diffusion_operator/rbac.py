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
Leader election: get and update of one named Lease in the operator's own namespace (LEASE rules; the
chart creates the Lease, so no create verb). The operator's own CRD: get and patch of that one CRD
by name (CRD_RULES; the leader applies its CRD at start because Helm never upgrades crds/).
"""

from __future__ import annotations

from diffusion_operator.resources import RESOURCES, Grant, Resource


def rules_of(resource: Resource, name: str = "") -> list[dict]:
    """The rules one table row needs: the resource's verbs (none: no rule), then each subresource's. Rows
    with resourceNames get them (`name` fills the templated one, the Lease's)."""
    out = []
    if resource.verbs:
        out.append(
            {"apiGroups": [resource.group], "resources": [resource.plural], "verbs": list(resource.verbs)}
        )
    for sub, verbs in resource.subresources:
        out.append(
            {"apiGroups": [resource.group], "resources": [f"{resource.plural}/{sub}"], "verbs": list(verbs)}
        )
    if resource.names:
        for rule in out:
            rule["resourceNames"] = [n or name for n in resource.names]
    return out


def granted_rules(grant: Grant, name: str = "") -> list[tuple[str, dict]]:
    """(why, rule) for the rows of one grant, in table order."""
    return [(r.why, rule) for r in RESOURCES if r.grant is grant for rule in rules_of(r, name)]


def commented_rules(cluster: bool) -> list[tuple[str, dict]]:
    """(why, rule) for the rows every watched namespace needs (cluster False) or the cluster-wide
    mode's cluster-scoped reads (cluster True), in table order."""
    return granted_rules(Grant.CLUSTER_WIDE if cluster else Grant.WATCHED)


NAMESPACED_RULES: list[dict] = [rule for _, rule in commented_rules(cluster=False)]
CLUSTER_RULES: list[dict] = [rule for _, rule in commented_rules(cluster=True)]


def lease_rules(lease_name: str) -> list[dict]:
    """Leader election: get and update of the one named Lease (in the operator's namespace)."""
    return [rule for _, rule in granted_rules(Grant.LEASE, lease_name)]


CRD_RULES: list[dict] = [rule for _, rule in granted_rules(Grant.OWN_CRD)]


def lease_role(name: str, namespace: str, lease_name: str) -> dict:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace},
        "rules": lease_rules(lease_name),
    }


def role(name: str, namespace: str) -> dict:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace},
        "rules": NAMESPACED_RULES,
    }
