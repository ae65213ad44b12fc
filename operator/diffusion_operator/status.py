"""Status of a DiffusionDeployment: conditions per the Kubernetes API conventions, from the owned Deployment.

Built with the status types (`api.status_types`, the CRD's status schema), so what the controller
writes is what the CRD declares."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from diffusion_runtime.contract.lines import COLD, GATE_FAILED, WARM
from pydantic import BaseModel

from diffusion_operator.api.status_types import (
    Condition,
    DiffusionDeploymentStatus,
    QueueStatus,
    StartRecord,
)
from diffusion_operator.builders.deployment import CONFIG_HASH_ANNOTATION
from diffusion_operator.pod_status import PodSummary, summarize
from diffusion_operator.validation import condition_reason

READY = "Ready"
PROGRESSING = "Progressing"
CONFIG_VALID = "ConfigValid"
SYNCED = "Synced"
QUALITY_GATE = "QualityGate"
# API-server refusals that mean "this object is invalid": the spec rendered into something the server
# refuses (an unknown node affinity operator), so ConfigValid is False as well as Synced
INVALID_CODES = ("Invalid", "BadRequest")


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def dump(model: BaseModel) -> dict[str, Any]:
    """A status type as the JSON the API server stores (camelCase, unset fields left out)."""
    return model.model_dump(by_alias=True, exclude_none=True)


def condition(type_: str, status: bool | str, reason: str, message: str, generation: int | None) -> dict:
    value = status if isinstance(status, str) else ("True" if status else "False")
    return dump(
        Condition.model_validate(
            {
                "type": type_,
                "status": value,
                "reason": reason,
                "message": message,
                "observedGeneration": generation,
            }
        )
    )


def merge_conditions(old: list[dict] | None, new: list[dict], timestamp: str | None = None) -> list[dict]:
    """New conditions; lastTransitionTime kept from the old one unless its status changed."""
    previous = {c.get("type"): c for c in (old or [])}
    merged = []
    for cond in new:
        before = previous.get(cond["type"])
        out = dict(cond)
        if before is not None and before.get("status") == cond["status"] and before.get("lastTransitionTime"):
            out["lastTransitionTime"] = before["lastTransitionTime"]
        else:
            out["lastTransitionTime"] = timestamp or now()
        merged.append(out)
    # conditions of other types (set by someone else) are kept
    known = {c["type"] for c in new}
    merged += [c for t, c in previous.items() if t not in known]
    return merged


def invalid_status(old_status: dict, generation: int, errors: list) -> dict:
    """ConfigValid=False; children are left as they were (nothing half-applied)."""
    message = "; ".join(str(e) for e in errors)
    status = {k: v for k, v in (old_status or {}).items() if k != "conditions"}
    reason = condition_reason(errors)  # Unsupported: valid, but the runtime does not run it (yet)
    conditions = [condition(CONFIG_VALID, False, reason, message, generation)]
    old_types = {c.get("type"): c for c in (old_status or {}).get("conditions", [])}
    if READY not in old_types:
        conditions.append(condition(READY, False, reason, "the spec is invalid: see ConfigValid", generation))
    else:
        keep = dict(old_types[READY])
        keep.pop("lastTransitionTime", None)
        conditions.append(keep)
    status["observedGeneration"] = generation
    status["conditions"] = merge_conditions((old_status or {}).get("conditions"), conditions)
    return status


def valid_status(
    old_status: dict,
    generation: int,
    desired_replicas: int | None,
    deployment: dict | None,
    selector: str,
    endpoint: str,
    config_hash: str,
    cache_tag: str,
    apply_error: tuple[str, str] | None = None,
    gate_pods: list[dict] | None = None,
    pods: list[dict] | None = None,
) -> dict:
    """Status of a parsed spec. `apply_error` (Status reason, message): a child the API server refused:
    Synced=False with the server's message (and ConfigValid=False when the server calls it invalid).
    `gate_pods`: the CR's pods when its quality gate is on (None: off). `pods`: the CR's pod views
    (informers.pod_gate_view; None: not known), so a Ready=False says why (not_ready_condition)."""
    dstatus = (deployment or {}).get("status", {})
    dspec = (deployment or {}).get("spec", {})
    desired = desired_replicas if desired_replicas is not None else int(dspec.get("replicas", 1) or 0)
    replicas = int(dstatus.get("replicas", 0) or 0)
    ready = int(dstatus.get("readyReplicas", 0) or 0)
    updated = int(dstatus.get("updatedReplicas", 0) or 0)
    available = int(dstatus.get("availableReplicas", 0) or 0)
    dep_generation_seen = deployment is not None and dstatus.get("observedGeneration", 0) >= (
        deployment or {}
    ).get("metadata", {}).get("generation", 0)

    rolled_out = dep_generation_seen and updated >= desired and replicas == desired and ready >= desired
    if deployment is None:
        ready_cond = condition(
            READY, False, "DeploymentMissing", "the Deployment does not exist yet", generation
        )
        progressing = condition(PROGRESSING, True, "Creating", "creating the Deployment", generation)
    elif desired == 0:
        ready_cond = condition(READY, replicas == 0, "ScaledToZero", "scaled to zero replicas", generation)
        progressing = condition(
            PROGRESSING,
            replicas != 0,
            "ScalingDown" if replicas else "Complete",
            f"{replicas} pods left",
            generation,
        )
    elif rolled_out and available >= desired:
        ready_cond = condition(
            READY,
            True,
            "AllReplicasReady",
            f"{ready}/{desired} pods ready (model loaded and warmed up)",
            generation,
        )
        progressing = condition(PROGRESSING, False, "Complete", "rollout complete", generation)
    else:
        reason = "RollingOut" if updated < desired or replicas > desired else "WaitingForReady"
        summary = None if pods is None else summarize(pods)
        ready_cond = not_ready_condition(reason, ready, updated, desired, summary, generation)
        progressing = condition(
            PROGRESSING, True, reason, f"{updated}/{desired} pods updated, {ready} ready", generation
        )
    valid = condition(CONFIG_VALID, True, "Valid", "the spec is valid and rendered", generation)
    synced = condition(SYNCED, True, "Applied", "every child is applied", generation)
    if apply_error is not None:
        code, message = apply_error
        synced = condition(SYNCED, False, code or "ApiError", message, generation)
        if code in INVALID_CODES:
            valid = condition(CONFIG_VALID, False, "RejectedByAPIServer", message, generation)
    conditions = merge_conditions(
        (old_status or {}).get("conditions"), [ready_cond, progressing, valid, synced]
    )
    # QualityGate: with `gate_pods` (the gate is on), from them; without, the condition is dropped
    if gate_pods is None:
        conditions = [c for c in conditions if c.get("type") != QUALITY_GATE]
    else:
        gate = quality_gate_condition(gate_pods, config_hash, ready_cond["status"] == "True", generation)
        conditions = merge_conditions(conditions, [gate])
    # every condition stored passed the CRD's schema, so the status type takes them all
    status = DiffusionDeploymentStatus.model_validate(
        {
            "observedGeneration": generation,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": updated,
            "ready": f"{ready}/{desired}",
            "selector": selector,
            "endpoint": endpoint,
            "configHash": config_hash,
            "cacheTag": cache_tag,
            "conditions": [Condition.model_validate(c) for c in conditions],
        }
    )
    return dump(status)


def queue_status(
    status: dict,
    old_status: dict,
    runtime: dict | None,
    front_door: dict | None,
    front_door_replicas: int,
    demand: float | None,
    generation: int | None,
) -> dict:
    """`status` of a DiffusionDeployment with spec.queue: status.queue (the demand, the front door, scaled
    to zero) and Ready, which needs a ready front-door pod (clients reach the queue through it only) and
    is True at zero runtime pods (ScaledToZero: requests wait in the queue and wake the deployment)."""
    fd_ready = int(((front_door or {}).get("status") or {}).get("readyReplicas", 0) or 0)
    rspec, rstatus = (runtime or {}).get("spec") or {}, (runtime or {}).get("status") or {}
    zero = runtime is not None and rspec.get("replicas", 1) == 0 and not rstatus.get("replicas")
    queue: dict[str, Any] = {"frontDoor": f"{fd_ready}/{front_door_replicas}", "scaledToZero": zero}
    if demand is not None:
        queue["demand"] = max(0, round(demand))
    out = {**status, "queue": dump(QueueStatus.model_validate(queue))}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == READY), None)
    new_ready = None
    if fd_ready == 0:
        new_ready = condition(
            READY, False, "FrontDoorNotReady",
            f"0/{front_door_replicas} front-door pods ready: clients cannot reach the queue", generation,
        )  # fmt: skip
    elif zero and ready is not None and ready.get("reason") == "ScaledToZero":
        waiting = "" if demand is None else f" ({max(0, round(demand))} jobs in the queue)"
        new_ready = condition(
            READY, True, "ScaledToZero",
            f"scaled to zero: no runtime pod; requests wait in the queue and the first one wakes the deployment"
            f"{waiting}", generation,
        )  # fmt: skip
    if new_ready is not None:
        merged = merge_conditions((old_status or {}).get("conditions"), [new_ready])[0]
        out["conditions"] = [merged, *(c for c in out.get("conditions") or [] if c.get("type") != READY)]
    return out


def not_ready_condition(
    reason: str, ready: int, updated: int, desired: int, pods: PodSummary | None, generation: int | None
) -> dict:
    """Ready=False while the pods are not all ready: a failing pod's reason and own words (its
    termination message, else its container state's), else what the others do: "loading, compiling or
    warming up" only while a pod runs and is not ready yet, the scheduler's word while pods are pending."""
    counts = f"{ready}/{desired} pods ready, {updated}/{desired} updated"
    if pods is not None and pods.failures:
        name, failure = pods.failures[0]
        more = len(pods.failures) - 1
        also = f"; {more} more pod{'s' if more > 1 else ''} failing" if more else ""
        return condition(
            READY, False, failure.reason, f"{counts}: pod {name}: {failure.message}{also}", generation
        )
    if pods is None or pods.starting:
        doing = "loading, compiling or warming up"
    elif pods.pending:
        doing = pods.pending_note or "pods pending"
    else:
        doing = "waiting for pods"
    return condition(READY, False, reason, f"{counts} ({doing})", generation)


def gate_failure(pod: dict) -> str | None:
    """The runtime's one-line gate failure from a pod's containers (current or last termination)."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        for state in (cs.get("state"), cs.get("lastState")):
            message = ((state or {}).get("terminated") or {}).get("message") or ""
            for line in message.splitlines():
                if GATE_FAILED in line:
                    return line[line.index(GATE_FAILED) :].strip()
    return None


def quality_gate_condition(pods: list[dict], config_hash: str, ready: bool, generation: int | None) -> dict:
    """QualityGate from the pods of the current configuration: False with the runtime's figures when one
    of them failed the gate, True once the configuration is ready, Unknown while pods warm up."""
    current = [
        p
        for p in pods
        if ((p.get("metadata") or {}).get("annotations") or {}).get(CONFIG_HASH_ANNOTATION) == config_hash
    ]
    for pod in sorted(current, key=lambda p: p["metadata"].get("name", "")):
        line = gate_failure(pod)
        if line is not None:
            return condition(
                QUALITY_GATE,
                False,
                "Failed",
                f"{line[len(GATE_FAILED) :]} (pod {pod['metadata'].get('name')}; it never turns Ready, pods "
                "of the previous configuration keep serving)",
                generation,
            )
    if ready:
        return condition(
            QUALITY_GATE, True, "Passed", "the pods of this configuration passed the quality gate", generation
        )
    return condition(
        QUALITY_GATE, "Unknown", "Pending", "pods of this configuration are loading or warming up", generation
    )


# status.startup: the newest start of each kind (diffusion_runtime.contract.lines: cold | warm)
STARTUP_FIELDS = {COLD: "lastCold", WARM: "lastWarm"}


def start_entry(pod: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """A runtime's start record (`parse_ready_line`) as status.startup shows it: the pod, without `start`."""
    known = {f.alias or name for name, f in StartRecord.model_fields.items()}  # a newer runtime may say more
    return dump(StartRecord.model_validate({"pod": pod, **{k: v for k, v in record.items() if k in known}}))


def newer_start(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The later of two entries (by `at`, then pod name, so the choice never depends on order)."""
    if a is None or b is None:
        return a if b is None else b
    return (
        a
        if (str(a.get("at", "")), str(a.get("pod", ""))) >= (str(b.get("at", "")), str(b.get("pod", "")))
        else b
    )


def merge_startup(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """status.startup from two of them: per kind, the newer entry; None when neither has one."""
    out = {}
    for field in STARTUP_FIELDS.values():
        entry = newer_start((old or {}).get(field), (new or {}).get(field))
        if entry is not None:
            out[field] = dict(entry)
    return out or None


def add_start(
    startup: Mapping[str, Any] | None, pod: str, record: Mapping[str, Any]
) -> dict[str, Any] | None:
    """`startup` with one pod's start record folded in."""
    return merge_startup(startup, {STARTUP_FIELDS[record["start"]]: start_entry(pod, record)})


def same_status(a: dict | None, b: dict | None) -> bool:
    return (a or {}) == (b or {})
