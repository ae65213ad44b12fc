"""The operator applies its own CRD at start (as the leader, before it reconciles anything).

Why: Helm installs a chart's `crds/` folder on the first `helm install` only and never upgrades it
(https://helm.sh/docs/chart_best_practices/custom_resource_definitions/), so a chart upgrade that adds
a CR field would leave the old schema in the cluster and the API server would prune the new field from
every CR written. The operator carries the CRD it was built with (`api/diffusion.dev_diffusiondeployments.yaml`,
a byte copy of `crds/`, kept identical by tools/sync_chart_crds.sh and checked by a test) and applies it
with server-side apply under its own field manager. See docs/operator.md ("Upgrades") for the choice.

Rules:
- the CRD must exist (the chart's crds/ or `kubectl apply -f crds/` creates it): the operator may only
  get and patch that one CRD by name, never create CRDs;
- never downgrade: the applied CRD carries `diffusion.dev/operator-version`; a cluster CRD stamped by a
  newer operator is left alone (an old replica that leads for a moment during a rollout, or a
  `helm rollback`, must not drop the newer fields from the schema: the API server would prune them);
- the same CRD already in the cluster: a server-side apply of unchanged content changes nothing.
"""

from __future__ import annotations

import logging
import re
from functools import cache
from importlib import resources

import yaml

from diffusion_operator import __version__
from diffusion_operator.kube import ApiError
from diffusion_operator.resources import CRD_NAME, RESOURCES, Grant

log = logging.getLogger("diffusion_operator")

CRD_FILE = "diffusion.dev_diffusiondeployments.yaml"
VERSION_ANNOTATION = "diffusion.dev/operator-version"
CRD_FIELD_MANAGER = "diffusion-operator-crd"
_ROW = next(r for r in RESOURCES if r.grant is Grant.OWN_CRD)


@cache
def bundled_crd() -> dict:
    """The CRD this operator was built with (its package copy of crds/)."""
    text = resources.files("diffusion_operator.api").joinpath(CRD_FILE).read_text()
    return yaml.safe_load(text)


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version)[:3])


def desired(version: str = __version__) -> dict:
    crd = bundled_crd()
    meta = dict(crd["metadata"])
    meta["annotations"] = {**(meta.get("annotations") or {}), VERSION_ANNOTATION: version}
    return {"apiVersion": crd["apiVersion"], "kind": crd["kind"], "metadata": meta, "spec": crd["spec"]}


def apply_crd(client, version: str = __version__) -> str:
    """Apply the bundled CRD; returns what happened: applied | unchanged | newer | absent | refused."""
    path = f"{_ROW.collection(None)}/{CRD_NAME}"
    try:
        live = client.request("GET", path)
    except ApiError as error:  # e.g. RBAC without the CRD rule (rbac.create false): reconcile anyway
        log.error(f"CRD {CRD_NAME} not read, not applied: {error}")
        return "refused"
    if live is None:
        log.warning(f"CRD {CRD_NAME} not found: install it (the chart's crds/ or kubectl apply -f crds/)")
        return "absent"
    have = ((live.get("metadata") or {}).get("annotations") or {}).get(VERSION_ANNOTATION, "")
    if have and version_key(have) > version_key(version):
        log.warning(
            f"CRD {CRD_NAME} was applied by operator {have}, newer than this {version}: left as it is"
        )
        return "newer"
    before = (live.get("metadata") or {}).get("resourceVersion")
    try:
        out = client.request(
            "PATCH",
            path,
            body=desired(version),
            query={"fieldManager": CRD_FIELD_MANAGER, "force": "true"},
            content_type="application/apply-patch+yaml",
        )
    except ApiError as error:  # e.g. RBAC without the CRD rule (rbac.create false): reconcile anyway
        log.error(f"CRD {CRD_NAME} not applied: {error}")
        return "refused"
    changed = (out or {}).get("metadata", {}).get("resourceVersion") != before
    log.info(f"CRD {CRD_NAME} {'applied (schema updated)' if changed else 'unchanged'} by operator {version}")
    return "applied" if changed else "unchanged"
