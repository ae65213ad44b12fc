"""Automatic rollback: a new revision whose pods fail is undone by restoring the last revision that served.

A revision is the rendered configuration of the serving pods: the ConfigMap (runtime.yaml, cache-dit.yaml)
and the Deployment, as the builders produce them. When a revision is fully rolled out and Ready (every
desired pod ready: it passed the quality gate, if on), it is kept as the **last good** revision in a
ConfigMap `<name>-last-good` owned by the CR: the two objects as applied, the spec hash, the config hash
and the `pod-template-hash` of its ready pods.

Why a ConfigMap of our own, not the Deployment's ReplicaSet history: a ReplicaSet holds the pod template
only; runtime.yaml lives in one ConfigMap that each revision rewrites in place, so the old revision's
configuration is nowhere else. Storing the builders' own objects means the restore goes through the same
server-side apply and drift detection as any reconcile, and the Deployment controller, given back the old
template, scales the old ReplicaSet up again (the same `pod-template-hash`). It lives in the cluster, so a
restarted operator (or another replica) decides the same.

The decision (`decide`, pure), each reconcile, from the spec, the last good revision, `status.rollback`
and the CR's pods:
- `hold`: status.rollback is active and the spec is the one that failed (same spec hash): the last good
  revision stays applied; the failing revision is not retried until the spec changes.
- `rollback`: the desired revision is not the last good one, and a pod of another ReplicaSet than the last
  good one's (nor one of an earlier failed revision's) fails for a reason of the revision's own
  (ROLLBACK_REASONS: the quality gate, a refused config or any crash, the startup budget, out of memory,
  an image that cannot be pulled, a container that cannot be created). One failure is enough: these are
  deterministic (the same settings fail the same way), and with `maxSurge: 0` every retry is an outage.
  status.rollback is written first (so an operator killed mid-way holds after its restart), then the
  last good revision is applied and `RolledBack=True` reported with the pod's own words, once as a
  Warning event.
- `apply`: anything else (no last good revision: a new CR that never served has nothing to go back to).

The CR's spec is never written: it stays as the user wrote it; status.configHash names the configuration
actually applied (the restored one while holding).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from diffusion_operator import pod_status
from diffusion_operator import status as statuses
from diffusion_operator.api.status_types import RollbackStatus
from diffusion_operator.builders.common import FRONT_DOOR_APP, labels, owner_reference
from diffusion_operator.controller.apply import SPEC_HASH_ANNOTATION, with_spec_hash
from diffusion_operator.hashing import stable_hash
from diffusion_operator.kube import KubeClient

log = logging.getLogger("diffusion_operator")

ROLLED_BACK = "RolledBack"  # the condition type and the Warning event's reason
LAST_GOOD_SUFFIX = "-last-good"
POD_TEMPLATE_HASH = "pod-template-hash"  # the ReplicaSet of a pod (set by the Deployment controller)
APPLY, ROLLBACK, HOLD = "apply", "rollback", "hold"
# failures that are the revision's own; not: Evicted, PodFailed (the node), pending pods (capacity)
ROLLBACK_REASONS = frozenset(
    {
        "QualityGateFailed",
        "CrashLoopBackOff",
        "ContainerExited",
        "StartupBudgetExceeded",
        "OOMKilled",
        "ImagePullBackOff",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
# the store's keys
_KEYS = (
    "revision",
    "specHash",
    "generation",
    "configHash",
    "cacheTag",
    "podHashes",
    "configmap",
    "deployment",
)


def spec_hash(cr: Mapping) -> str:
    """The hash of the CR's spec as the user wrote it (a failed revision is retried when it changes)."""
    return stable_hash(cr.get("spec") or {})


def revision_of(configmap: Mapping, deployment: Mapping) -> str:
    """The rendered revision: the desired ConfigMap's and Deployment's spec hashes (apply.with_spec_hash)."""
    return stable_hash(
        [
            (obj.get("metadata") or {}).get("annotations", {}).get(SPEC_HASH_ANNOTATION)
            for obj in (configmap, deployment)
        ]
    )


def store_name(name: str) -> str:
    return f"{name}{LAST_GOOD_SUFFIX}"


@dataclass(frozen=True)
class LastGood:
    """The last revision that served: its desired ConfigMap and Deployment, and the ReplicaSets of its pods."""

    revision: str
    spec_hash: str
    generation: int
    config_hash: str
    cache_tag: str
    pod_hashes: frozenset[str]
    configmap: dict = field(compare=False)
    deployment: dict = field(compare=False)


def build_store(cr: Mapping, good: LastGood) -> dict:
    """The ConfigMap `<name>-last-good` (owned by the CR, so deleted with it)."""
    meta = cr["metadata"]
    data = {
        "revision": good.revision,
        "specHash": good.spec_hash,
        "generation": str(good.generation),
        "configHash": good.config_hash,
        "cacheTag": good.cache_tag,
        "podHashes": ",".join(sorted(good.pod_hashes)),
        "configmap": json.dumps(good.configmap, sort_keys=True),
        "deployment": json.dumps(good.deployment, sort_keys=True),
    }
    obj = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": store_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": labels(meta["name"]),
            "ownerReferences": [owner_reference(dict(cr))],
        },
        "data": data,
    }
    return with_spec_hash(obj)


def parse_store(obj: Mapping | None, cr: Mapping) -> LastGood | None:
    """The last good revision from its ConfigMap; None when absent, not this CR's (a deleted CR of the
    same name whose children the garbage collector has not removed yet) or unreadable."""
    if obj is None:
        return None
    uid = cr["metadata"].get("uid")
    if not any(r.get("uid") == uid for r in (obj.get("metadata") or {}).get("ownerReferences") or []):
        return None
    data = obj.get("data") or {}
    if any(k not in data for k in _KEYS):
        return None
    try:
        return LastGood(
            revision=data["revision"],
            spec_hash=data["specHash"],
            generation=int(data["generation"]),
            config_hash=data["configHash"],
            cache_tag=data["cacheTag"],
            pod_hashes=frozenset(h for h in data["podHashes"].split(",") if h),
            configmap=json.loads(data["configmap"]),
            deployment=json.loads(data["deployment"]),
        )
    except (ValueError, TypeError) as error:
        log.warning(f"{obj['metadata'].get('name')}: unreadable last good revision ({error}); ignored")
        return None


def revision_children(objs: Sequence[dict]) -> dict[str, dict]:
    """The children a revision is made of, by kind (the objects themselves): the ConfigMap and the serving
    pods' Deployment. The front door's Deployment (spec.queue) is not part of it: it runs no model and is
    never rolled back."""
    out: dict[str, dict] = {}
    for o in objs:
        labels = o["metadata"].get("labels") or {}
        if o["kind"] == "Deployment" and labels.get("app.kubernetes.io/name") == FRONT_DOOR_APP:
            continue
        if o["kind"] in ("ConfigMap", "Deployment"):
            out.setdefault(o["kind"], o)
    return out


def restored(desired: list[dict], good: LastGood) -> list[dict]:
    """The desired children with the ConfigMap and the serving Deployment of the last good revision."""
    swap = {id(o): kind for kind, o in revision_children(desired).items()}
    good_of = {"ConfigMap": good.configmap, "Deployment": good.deployment}
    return [json.loads(json.dumps(good_of[swap[id(o)]])) if id(o) in swap else o for o in desired]


def failing_new_pods(
    pods: Sequence[Mapping], good_hashes: frozenset[str], excluded: frozenset[str] = frozenset()
) -> list[tuple[str, pod_status.Failure]]:
    """Pods of another ReplicaSet than the last good revision's (nor of `excluded`) that fail for a reason
    of their revision's own, by pod name."""
    out = []
    for view in sorted(pods, key=lambda v: str((v.get("metadata") or {}).get("name", ""))):
        meta = view.get("metadata") or {}
        rs = (meta.get("labels") or {}).get(POD_TEMPLATE_HASH)
        problem = view.get("problem")
        if (
            not rs
            or rs in good_hashes
            or rs in excluded
            or view.get("state") != pod_status.FAILING
            or not problem
        ):
            continue
        if problem.get("reason") in ROLLBACK_REASONS:
            out.append(
                (
                    str(meta.get("name", "")),
                    pod_status.Failure(problem["reason"], problem["message"], problem["cause"]),
                )
            )
    return out


@dataclass(frozen=True)
class Decision:
    """What to apply: `apply` the desired revision, `rollback` to the last good one (a new status.rollback
    in `record`), or `hold` it (`record`: the active one)."""

    action: str
    record: dict | None = None
    good: LastGood | None = None


def decide(
    cr_spec_hash: str,
    generation: int,
    desired_revision: str,
    good: LastGood | None,
    record: Mapping | None,
    pods: Sequence[Mapping],
    now: str,
) -> Decision:
    """Pure: the decision of one reconcile (see the module's docstring)."""
    if good is None:
        return Decision(APPLY)
    if record and record.get("active") and record.get("failedSpecHash") == cr_spec_hash:
        return Decision(HOLD, dict(record), good)
    if desired_revision == good.revision:
        return Decision(APPLY, good=good)
    excluded = frozenset((record or {}).get("failedPodHashes") or []) if record else frozenset()
    failing = failing_new_pods(pods, good.pod_hashes, excluded)
    if not failing:
        return Decision(APPLY, good=good)
    name, failure = failing[0]
    new_record = statuses.dump(
        RollbackStatus.model_validate(
            {
                "active": True,
                "failedSpecHash": cr_spec_hash,
                "failedGeneration": generation,
                "failedRevision": desired_revision,
                "failedPodHashes": sorted(
                    {
                        str(((v.get("metadata") or {}).get("labels") or {}).get(POD_TEMPLATE_HASH))
                        for v in pods
                        if str((v.get("metadata") or {}).get("name", "")) in {n for n, _ in failing}
                    }
                ),
                "restoredRevision": good.revision,
                "restoredGeneration": good.generation,
                "reason": failure.reason,
                "message": f"pod {name}: {failure.message}",
                "at": now,
            }
        )
    )
    return Decision(ROLLBACK, new_record, good)


def rolled_back_message(record: Mapping) -> str:
    return (
        f"generation {record['failedGeneration']} failed ({record['reason']}: {record['message']}); restored the "
        f"configuration of generation {record['restoredGeneration']}, which served. The spec is kept as written "
        "and not retried until it changes"
    )


def with_rollback(
    new_status: dict, old_status: Mapping, decision: Decision, generation: int, good: LastGood | None
) -> dict:
    """status.rollback and the RolledBack condition (and, while holding the restored configuration, the
    QualityGate condition of the spec that failed it and the restored revision's cache tag)."""
    out = dict(new_status)
    record = decision.record if decision.action in (ROLLBACK, HOLD) else None
    old_record = old_status.get("rollback")
    conditions: list[dict] = []
    if record is not None:
        out["rollback"] = record
        conditions.append(
            statuses.condition(ROLLED_BACK, True, record["reason"], rolled_back_message(record), generation)
        )
        if record["reason"] == "QualityGateFailed" and any(
            c.get("type") == statuses.QUALITY_GATE for c in out.get("conditions") or []
        ):
            conditions.append(
                statuses.condition(
                    statuses.QUALITY_GATE,
                    False,
                    "Failed",
                    f"generation {record['failedGeneration']}: {record['message']} (rolled back)",
                    generation,
                )
            )
        if good is not None and good.cache_tag:
            out["cacheTag"] = good.cache_tag
        # `kubectl get dd -o wide` shows Ready's message: say the pods run the restored configuration
        ready = next((c for c in out.get("conditions") or [] if c.get("type") == statuses.READY), None)
        if ready is not None and ready.get("status") == "True":
            note = (
                f"; rolled back to generation {record['restoredGeneration']}'s configuration (see RolledBack)"
            )
            conditions.append({**ready, "message": f"{ready.get('message', '')}{note}"})
    elif old_record:
        out["rollback"] = {**old_record, "active": False}
        if old_record.get("active"):
            conditions.append(
                statuses.condition(
                    ROLLED_BACK,
                    False,
                    "SpecChanged",
                    f"the spec changed after generation {old_record.get('failedGeneration')} was rolled back: "
                    f"rolling out generation {generation}",
                    generation,
                )
            )
    if conditions:
        out["conditions"] = statuses.merge_conditions(out.get("conditions"), conditions)
    return out


def should_save(decision: Decision, new_status: Mapping, desired_revision: str, deployment: Mapping) -> bool:
    """Keep the desired revision as the last good one: it is applied as desired (not held back), serves
    (Ready=True with at least one replica) and is not the one kept already."""
    if decision.action != APPLY:
        return False
    if (deployment.get("spec") or {}).get("replicas", 1) == 0:
        return False
    ready: Mapping = next(
        (c for c in new_status.get("conditions") or [] if c.get("type") == statuses.READY), {}
    )
    if ready.get("status") != "True" or ready.get("reason") != "AllReplicasReady":
        return False
    return decision.good is None or decision.good.revision != desired_revision


def ready_pod_hashes(pods: Sequence[Mapping]) -> frozenset[str]:
    return frozenset(
        str(((v.get("metadata") or {}).get("labels") or {})[POD_TEMPLATE_HASH])
        for v in pods
        if v.get("state") == pod_status.READY
        and ((v.get("metadata") or {}).get("labels") or {}).get(POD_TEMPLATE_HASH)
    )


class Rollbacks:
    """Reads and writes the last good revision (the child cache first; the API server when not cached)."""

    def __init__(
        self,
        client: Callable[[], KubeClient],
        cached: Callable[[str, str, str], dict | None],
        apply: Callable[[dict], dict],
    ) -> None:
        self._client = client
        self._cached = cached
        self._apply = apply

    def last_good(self, cr: Mapping) -> LastGood | None:
        meta = cr["metadata"]
        name = store_name(meta["name"])
        obj = self._cached("ConfigMap", meta["namespace"], name)
        if obj is None:
            obj = self._client().get("v1", "ConfigMap", meta["namespace"], name)
        return parse_store(obj, cr)

    def save(
        self,
        cr: Mapping,
        desired: list[dict],
        desired_revision: str,
        new_status: Mapping,
        pods: Sequence[Mapping],
    ) -> LastGood | None:
        """Keep the desired revision as the last good one; None (nothing written) while no ready pod shows
        its ReplicaSet yet (its pod events come next)."""
        hashes = ready_pod_hashes(pods)
        if not hashes:
            return None
        by_kind = revision_children(desired)
        good = LastGood(
            revision=desired_revision,
            spec_hash=spec_hash(cr),
            generation=int(cr["metadata"].get("generation", 1)),
            config_hash=str(new_status.get("configHash", "")),
            cache_tag=str(new_status.get("cacheTag", "")),
            pod_hashes=hashes,
            configmap=by_kind["ConfigMap"],
            deployment=by_kind["Deployment"],
        )
        self._apply(build_store(cr, good))
        meta = cr["metadata"]
        log.info(
            "kept the last good revision",
            extra={"dd": f"{meta['namespace']}/{meta['name']}", "revision": desired_revision},
        )
        return good
