"""Thin kopf handlers: every event of a DiffusionDeployment or of one of its children runs `reconcile`.

`reconcile` is level-triggered: parse the spec, build every child, server-side apply only the children
whose desired fields differ from the observed object, then write status only if it changed. An idle
resync (kopf re-listing, a child's unrelated status update) therefore makes no API writes. A spec the
schema could not refuse sets ConfigValid=False with a Warning event, once per distinct message, and
leaves the children as they were.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Mapping

import kopf

from diffusion_operator import builders, metrics
from diffusion_operator import spec as specs
from diffusion_operator import status as statuses
from diffusion_operator.builders.common import MANAGED_BY
from diffusion_operator.diff import is_subset
from diffusion_operator.kube import ApiError, Kube

log = logging.getLogger("diffusion_operator")

GROUP, VERSION, PLURAL = "diffusion.dev", "v1alpha1", "diffusiondeployments"
CR_API = f"{GROUP}/{VERSION}"
CHILD_KINDS = (
    ("v1", "ConfigMap", "configmaps"),
    ("v1", "Service", "services"),
    ("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    ("apps/v1", "Deployment", "deployments"),
    ("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers"),
)
MANAGED_LABELS = {"app.kubernetes.io/managed-by": MANAGED_BY}

_kube: Kube | None = None
_locks: dict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
_locks_guard = threading.Lock()
_invalid: set[tuple[str, str]] = set()
# children as last seen by their watch streams or returned by our applies (informer-style), so a
# reconcile triggered by an event does not re-read every child; the resync thread reads fresh
_children: dict[tuple[str, str, str], dict] = {}
_children_guard = threading.Lock()
_managed: dict[tuple[str, str], int] = {}


def kube() -> Kube:
    global _kube
    if _kube is None:
        _kube = Kube()
    return _kube


def _lock(key: tuple[str, str]) -> threading.Lock:
    with _locks_guard:
        return _locks[key]


def _child_name(obj: dict) -> str:
    return obj["metadata"]["name"]


def _rv(obj: dict) -> int:
    value = obj.get("metadata", {}).get("resourceVersion", "")
    return int(value) if str(value).isdigit() else -1


def remember(obj: dict) -> None:
    """Keep the newest version of a child (watch events may arrive after our own apply's response)."""
    meta = obj.get("metadata", {})
    key = (obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", ""))
    with _children_guard:
        old = _children.get(key)
        if old is None or _rv(obj) < 0 or _rv(obj) >= _rv(old):
            _children[key] = obj


def _plain(value):
    """kopf hands bodies as Mapping views: plain dicts and lists for comparisons and the cache."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def forget(kind: str, namespace: str, name: str) -> None:
    with _children_guard:
        _children.pop((kind, namespace, name), None)


def _observed(client: Kube, obj: dict, namespace: str, fresh: bool) -> dict | None:
    key = (obj["kind"], namespace, _child_name(obj))
    if not fresh:
        with _children_guard:
            cached = _children.get(key)
        if cached is not None:
            return cached
    observed = client.get(obj["apiVersion"], obj["kind"], namespace, _child_name(obj))
    if observed is None:
        forget(*key)
    else:
        remember(observed)
    return observed


def reconcile(
    namespace: str, name: str, body: dict | None = None, client: Kube | None = None, fresh: bool = True
) -> str:
    """One reconcile of one DiffusionDeployment; returns ok | invalid | gone. Raises on API errors."""
    client = client or kube()
    with _lock((namespace, name)):
        started = time.perf_counter()
        try:
            result = _reconcile(client, namespace, name, fresh)
            metrics.RECONCILE_TOTAL.labels(result=result).inc()
            return result
        except ApiError as error:
            metrics.RECONCILE_TOTAL.labels(result="error").inc()
            metrics.RECONCILE_ERRORS.labels(error=str(error.status)).inc()
            raise
        except Exception as error:
            metrics.RECONCILE_TOTAL.labels(result="error").inc()
            metrics.RECONCILE_ERRORS.labels(error=type(error).__name__).inc()
            raise
        finally:
            metrics.RECONCILE_DURATION.observe(time.perf_counter() - started)


def _reconcile(client: Kube, namespace: str, name: str, fresh: bool = True) -> str:
    # always read the CR fresh: an event body may be older than our last status write
    cr = client.get(CR_API, "DiffusionDeployment", namespace, name)
    key = (namespace, name)
    if cr is None or cr["metadata"].get("deletionTimestamp"):
        _invalid.discard(key)
        _managed.pop(key, None)
        _update_gauges()
        return "gone"  # children are garbage-collected through their owner references
    generation = cr["metadata"].get("generation", 1)
    old_status = cr.get("status") or {}
    parsed = specs.parse(name, namespace, cr.get("spec"))
    if not parsed.ok:
        new_status = statuses.invalid_status(old_status, generation, parsed.errors)
        if not statuses.same_status(old_status, new_status):
            old_msg = _condition_message(old_status, statuses.CONFIG_VALID)
            client.patch_status(namespace, name, new_status)
            new_msg = _condition_message(new_status, statuses.CONFIG_VALID)
            if new_msg != old_msg:
                client.post_event(cr, "Warning", "InvalidSpec", new_msg)
            log.warning("invalid spec", extra={"dd": f"{namespace}/{name}", "errors": new_msg})
        _invalid.add(key)
        _update_gauges()
        return "invalid"
    _invalid.discard(key)
    spec = parsed.spec
    desired = builders.build_all(spec, cr)
    deployment = None
    applied: list[str] = []
    # a CR never reconciled before (no status yet) has no children: apply without reading first
    first = not old_status.get("observedGeneration")
    for obj in desired:
        observed = None if first else _observed(client, obj, namespace, fresh)
        if observed is None or not is_subset(obj, observed):
            observed = client.apply(obj)
            remember(observed)
            applied.append(obj["kind"])
        if obj["kind"] == "Deployment":
            deployment = observed
    if spec.autoscaling is None:
        if fresh:
            hpa = client.get("autoscaling/v2", "HorizontalPodAutoscaler", namespace, name)
        else:  # every HPA of ours is in the cache: kopf lists and watches them
            with _children_guard:
                hpa = _children.get(("HorizontalPodAutoscaler", namespace, name))
        if hpa is not None and _owned_by(hpa, cr):
            client.delete("autoscaling/v2", "HorizontalPodAutoscaler", namespace, name)
            forget("HorizontalPodAutoscaler", namespace, name)
    _managed[key] = len(desired)
    configmap = desired[0]
    new_status = statuses.valid_status(
        old_status,
        generation,
        None if spec.autoscaling else spec.replicas,
        deployment,
        builders.selector_string(name),
        builders.endpoint(spec),
        builders.deployment.config_hash(configmap["data"]),
        specs.cache_tag(spec.cache_dit),
    )
    if not statuses.same_status(old_status, new_status):
        client.patch_status(namespace, name, new_status)
        log.debug("status written", extra={"dd": f"{namespace}/{name}", "status": new_status})
    if applied:
        log.info("applied children", extra={"dd": f"{namespace}/{name}", "applied": applied})
    _update_gauges()
    return "ok"


def _owned_by(obj: dict, owner: dict) -> bool:
    uid = owner["metadata"].get("uid")
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences", []))


def _condition_message(status: dict, type_: str) -> str:
    for cond in (status or {}).get("conditions", []):
        if cond.get("type") == type_ and cond.get("status") == "False":
            return cond.get("message", "")
    return ""


def _update_gauges() -> None:
    metrics.INVALID_SPECS.set(len(_invalid))
    metrics.MANAGED_OBJECTS.labels(kind="DiffusionDeployment").set(len(_managed) + len(_invalid))
    metrics.MANAGED_OBJECTS.labels(kind="children").set(sum(_managed.values()))


def _run(namespace: str, name: str, logger, fresh: bool = False) -> None:
    """Reconcile with a short bounded retry for transient API errors (conflicts, throttling, 5xx)."""
    for attempt in range(4):
        try:
            reconcile(namespace, name, fresh=fresh or attempt > 0)
            return
        except ApiError as error:
            if error.permanent or attempt == 3:
                logger.error(f"reconcile of {namespace}/{name} failed: {error}")
                return
            time.sleep(0.5 * 2**attempt)
        except Exception as error:  # never let one object take the operator down
            logger.exception(f"reconcile of {namespace}/{name} crashed: {error}")
            return


# ---- kopf wiring -------------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, PLURAL)
def on_diffusiondeployment(event, namespace, name, logger, **_):
    if event.get("type") == "DELETED":
        _invalid.discard((namespace, name))
        _managed.pop((namespace, name), None)
        _update_gauges()
        return
    _run(namespace, name, logger)


def _on_child(event, body, namespace, logger, **_):
    owner = body.get("metadata", {}).get("labels", {}).get("diffusion.dev/deployment")
    refs = [
        r
        for r in body.get("metadata", {}).get("ownerReferences", [])
        if r.get("kind") == "DiffusionDeployment"
    ]
    if not owner or not refs:
        return
    meta = body.get("metadata", {})
    if event.get("type") == "DELETED":
        forget(body.get("kind", ""), namespace, meta.get("name", ""))
    else:
        remember(_plain(body))
    _run(namespace, owner, logger)


for _api, _kind, _plural in CHILD_KINDS:
    _group, _, _version = _api.rpartition("/")
    kopf.on.event(
        group=_group, version=_version, plural=_plural, labels=MANAGED_LABELS, id=f"child-{_plural}"
    )(_on_child)


def start_resync(
    namespaces: list[str] | None, interval: float, stop: threading.Event
) -> threading.Thread | None:
    """A periodic level-triggered pass over every DiffusionDeployment (writes only on drift).

    A plain thread, not a kopf timer: kopf timers put a finalizer on every object, which is a write
    per object and would block deleting a CR while the operator is down.
    """
    if interval <= 0:
        return None

    def loop() -> None:
        while not stop.wait(interval):
            for ns in namespaces or [None]:
                path = (
                    f"/apis/{GROUP}/{VERSION}/{PLURAL}"
                    if ns is None
                    else Kube.collection(CR_API, "DiffusionDeployment", ns)
                )
                try:
                    items = kube().request("GET", path)["items"]
                except Exception as error:  # the API server may be briefly away
                    log.warning(f"resync list failed: {error}")
                    continue
                for item in items:
                    meta = item["metadata"]
                    _run(meta["namespace"], meta["name"], log, fresh=True)

    thread = threading.Thread(target=loop, name="resync", daemon=True)
    thread.start()
    return thread
