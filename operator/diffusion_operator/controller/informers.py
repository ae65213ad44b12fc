"""Informer caches: the newest DiffusionDeployment, child and serving pod seen (watch events and the
answers of our own writes), and what a watch event queues.

kopf delivers the events (handlers.py); this file decides whether one matters. The echo of our own
write is not queued (same resourceVersion as the apply answer we cached); a child event that changes
nothing a reconcile reads queues nothing; a pod matters when its view changes (the gate failure, its
state: pending, starting, ready or failing and why: pod_status.py) or a runtime container turned Ready
(its start line is then read: startup.py).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diffusion_operator import pod_status
from diffusion_operator import status as statuses
from diffusion_operator.builders.frontdoor import FRONT_DOOR_APP
from diffusion_operator.controller.apply import SPEC_HASH_ANNOTATION
from diffusion_operator.controller.startup import ready_container
from diffusion_operator.resources import CR

CrKey = tuple[str, str]  # (namespace, name)
ChildKey = tuple[str, str, str]  # (kind, namespace, name)
PodKey = tuple[str, str]  # (namespace, name)
OWNER_LABEL = "diffusion.dev/deployment"

# what a reconcile reads from a Deployment's status (status.valid_status)
DEPLOYMENT_STATUS_INPUTS = (
    "observedGeneration",
    "replicas",
    "readyReplicas",
    "updatedReplicas",
    "availableReplicas",
)


def plain(value: Any) -> Any:
    """kopf hands bodies as Mapping views: plain dicts and lists for comparisons and the caches."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def resource_version(obj: Mapping | None) -> int:
    value = ((obj or {}).get("metadata") or {}).get("resourceVersion", "")
    return int(value) if str(value).isdigit() else -1


def inputs_of(child: Mapping) -> tuple:
    """The parts of a child a reconcile depends on: when an event changes none of them (another
    controller's annotation, timestamps in status conditions), it queues nothing."""
    meta = child.get("metadata") or {}
    status = child.get("status") or {}
    return (
        meta.get("generation"),
        meta.get("labels"),
        (meta.get("annotations") or {}).get(SPEC_HASH_ANNOTATION),
        meta.get("ownerReferences"),
        meta.get("deletionTimestamp"),
        child.get("spec"),
        child.get("data"),
        child.get("binaryData"),
        [status.get(k) for k in DEPLOYMENT_STATUS_INPUTS] if child.get("kind") == "Deployment" else None,
        # the download Job's counts and conditions decide the cache phase; a claim's phase too
        {k: v for k, v in status.items() if k in ("active", "succeeded", "failed", "conditions")}
        if child.get("kind") == "Job"
        else None,
        status.get("phase") if child.get("kind") == "PersistentVolumeClaim" else None,
    )


def pod_gate_view(pod: Mapping) -> dict:
    """The part of a pod the operator reads: the QualityGate condition's (status.gate_failure, the
    config-hash annotation), the Ready condition's (`state`, `problem`: pod_status.py; `pendingNote`)
    and, while it is Ready, its runtime container (`ready`, whose start line goes into status.startup),
    as a small pod-shaped dict."""
    meta = pod.get("metadata") or {}
    obj = plain({"metadata": {k: meta.get(k) for k in ("name", "namespace", "labels", "annotations")}})
    obj["metadata"]["labels"] = obj["metadata"]["labels"] or {}
    obj["ready"] = ready_container(pod)
    body = plain(pod)
    failure = pod_status.pod_failure(body)
    obj["state"] = pod_status.pod_state(body)
    obj["problem"] = None if failure is None else failure.as_dict()
    obj["pendingNote"] = pod_status.pending_message(body) if obj["state"] == pod_status.PENDING else None
    obj["failure"] = statuses.gate_failure(plain(pod))
    if obj["failure"] is not None:
        obj["status"] = {"containerStatuses": [{"lastState": {"terminated": {"message": obj["failure"]}}}]}
    return obj


def owned_by(obj: Mapping, owner: Mapping) -> bool:
    uid = owner["metadata"].get("uid")
    return any(ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


@dataclass(frozen=True)
class Queue:
    """What a watch event asks for: a reconcile of `key`, after `delay`, reading everything fresh or not."""

    key: CrKey
    delay: float = 0.0
    fresh: bool = False


@dataclass(frozen=True)
class PodChange:
    """A serving pod's event: its owner, its Ready runtime container (None: not Ready, or gone) and
    whether its view changed in a way the QualityGate or the Ready condition reads."""

    pod: PodKey
    owner: str
    ready: str | None
    gone: bool
    gate_changed: bool


class Informers:
    """The caches (thread-safe: one short lock). Newest resourceVersion wins."""

    def __init__(self, child_delay: float) -> None:
        self.child_delay = child_delay  # a burst of child events within it runs one reconcile
        self._lock = threading.Lock()
        self._crs: dict[CrKey, dict] = {}  # newest CR seen (watch events, our status writes)
        self._children: dict[ChildKey, dict] = {}  # newest child seen (watch events, our applies)
        # serving pods: only what the QualityGate condition and the start lines read (pod_gate_view)
        self._pods: dict[PodKey, dict] = {}

    def _remember(self, cache: dict, key: tuple, obj: dict) -> bool:
        """Keep the newest version; False when the cache already held this version (an echo)."""
        with self._lock:
            old = cache.get(key)
            if old is not None and resource_version(obj) >= 0:
                if resource_version(obj) == resource_version(old):
                    return False
                if resource_version(obj) < resource_version(old):
                    return False  # an older event arriving after our own write's answer
            cache[key] = obj
            return True

    # ---- the custom resources ------------------------------------------------------------------

    def remember_cr(self, obj: dict) -> bool:
        meta = obj.get("metadata") or {}
        return self._remember(self._crs, (meta.get("namespace", ""), meta.get("name", "")), obj)

    def forget_cr(self, key: CrKey) -> None:
        with self._lock:
            self._crs.pop(key, None)

    def cr(self, key: CrKey) -> dict | None:
        with self._lock:
            return self._crs.get(key)

    # ---- children ------------------------------------------------------------------------------

    def remember_child(self, obj: dict) -> bool:
        meta = obj.get("metadata") or {}
        return self._remember(
            self._children, (obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", "")), obj
        )

    def refresh_children(self, kind: str, namespace: str | None, listed: list[dict]) -> None:
        """A list of one child kind (in `namespace`; None: every namespace) refreshes the cache: the
        newest version of each listed child is kept, and a cached one the list lacks is dropped (a
        reconcile that needs it reads the API server: it may have been created since the list)."""
        for obj in listed:
            self.remember_child(obj)
        names = {(o["metadata"].get("namespace", ""), o["metadata"].get("name", "")) for o in listed}
        with self._lock:
            for key in [
                k
                for k in self._children
                if k[0] == kind and (namespace is None or k[1] == namespace) and (k[1], k[2]) not in names
            ]:
                del self._children[key]

    def forget_child(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            self._children.pop((kind, namespace, name), None)

    def child(self, kind: str, namespace: str, name: str) -> dict | None:
        with self._lock:
            return self._children.get((kind, namespace, name))

    def versions(self, key: CrKey, children: list[ChildKey]) -> tuple[int, ...]:
        """resourceVersions of the CR and of `children` as cached (the inputs of a reconcile)."""
        with self._lock:
            return (
                resource_version(self._crs.get(key)),
                *(resource_version(self._children.get(c)) for c in children),
            )

    # ---- serving pods --------------------------------------------------------------------------

    def pods_of(self, namespace: str, name: str) -> list[dict]:
        with self._lock:
            return [
                p
                for (ns, _), p in self._pods.items()
                if ns == namespace and p["metadata"]["labels"].get(OWNER_LABEL) == name
            ]

    # ---- watch events: what they queue -------------------------------------------------------------

    def cr_event(self, event_type: str | None, body: Mapping) -> tuple[CrKey, Queue | None]:
        """The CR's key, and a reconcile unless the event is DELETED or the echo of our own write."""
        obj = plain(body)
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if event_type == "DELETED":
            self.forget_cr(key)
            return key, None
        obj.setdefault("apiVersion", CR.api_version)
        obj.setdefault("kind", CR.kind)
        return key, Queue(key) if self.remember_cr(obj) else None

    def child_event(self, event_type: str | None, body: Mapping) -> Queue | None:
        meta = body.get("metadata") or {}
        owner = (meta.get("labels") or {}).get(OWNER_LABEL)
        refs = [r for r in meta.get("ownerReferences") or [] if r.get("kind") == CR.kind]
        if not owner or not refs:
            return None
        namespace = meta.get("namespace", "")
        if event_type == "DELETED":
            self.forget_child(body.get("kind", ""), namespace, meta.get("name", ""))
            return Queue((namespace, owner))
        obj = plain(body)
        before = self.child(obj.get("kind", ""), namespace, meta.get("name", ""))
        if not self.remember_child(obj):
            return None  # the echo of our own apply (or an older version)
        if before is not None and inputs_of(before) == inputs_of(obj):
            return None  # nothing a reconcile reads changed (another controller's annotation, conditions)
        return Queue((namespace, owner), delay=self.child_delay)

    def pod_event(self, event_type: str | None, body: Mapping) -> PodChange | None:
        meta = body.get("metadata") or {}
        labels = meta.get("labels") or {}
        owner = labels.get(OWNER_LABEL)
        if not owner or labels.get("app.kubernetes.io/name") == FRONT_DOOR_APP:
            return (
                None  # front-door pods: no model, no gate, no start line (their Deployment's status counts)
            )
        key = (meta.get("namespace", ""), meta.get("name", ""))
        view = None if event_type == "DELETED" else pod_gate_view(body)
        with self._lock:
            before = self._pods.pop(key, None)
            if view is not None:
                self._pods[key] = view
        return PodChange(key, owner, (view or {}).get("ready"), view is None, view_changed(before, view))


def view_changed(before: dict | None, view: dict | None) -> bool:
    """Whether a pod's new view changes a condition: a gate failure or a pod failure appears, changes
    or goes, or a pod seen before changes state (pending -> starting: the Deployment's counts do not
    move). A new pod with no failure queues nothing (its Deployment's status changes anyway)."""
    if before == view:
        return False
    old, new = before or {}, view or {}
    if old.get("failure") is not None or new.get("failure") is not None:
        return True
    if old.get("problem") != new.get("problem"):
        return True
    return before is not None and view is not None and old.get("state") != new.get("state")
