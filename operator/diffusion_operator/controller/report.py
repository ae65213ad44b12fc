"""Status reporting glue: the status of a valid or an invalid spec (built by status.py and
cache_status.py), written only when it changed, with one Warning event per distinct failure message
and one per distinct cause of a failing pod (pod_status.py: not one per reconcile or restart).

Errors: a child the API server refuses for good (422 invalid, 403 forbidden, ...) becomes
`Synced=False` (and `ConfigValid=False` for invalid objects) with the server's message; transient
errors are reported the same way once they failed REPORT_TRANSIENT_AFTER times (loop.py retries them).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from diffusion_operator import builders, pod_status
from diffusion_operator import cache_status as cache_statuses
from diffusion_operator import status as statuses
from diffusion_operator.api import funcs
from diffusion_operator.api.types import DiffusionDeployment
from diffusion_operator.controller.rollback import ROLLED_BACK
from diffusion_operator.kube import KubeClient
from diffusion_operator.validation import FieldError

log = logging.getLogger("diffusion_operator")
# causes remembered per CR (per configuration): a pod looping through ever new messages stays bounded
MAX_CAUSES = 32


def condition_of(status: Mapping | None, type_: str) -> dict:
    return next((dict(c) for c in (status or {}).get("conditions") or [] if c.get("type") == type_), {})


def condition_message(status: Mapping | None, type_: str) -> str:
    for cond in (status or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "False":
            return str(cond.get("message", ""))
    return ""


def serving_status(
    dd: DiffusionDeployment,
    cr: dict,
    old_status: dict,
    desired: list[dict],
    observed: Mapping[tuple[str, str], dict | None],
    apply_error: tuple[str, str] | None,
    gate_pods: list[dict] | None,
    cache: dict | None,
    startup: dict | None,
    pods: list[dict] | None = None,
    demand: float | None = None,
) -> dict:
    """The status of a valid spec: the Deployment's progress, the children's apply, the quality gate,
    the model cache, the start times and, with spec.queue, the queue (`demand`: its jobs waiting +
    running as the custom metrics API serves them, None when unknown) and the front door."""
    generation = cr["metadata"].get("generation", 1)
    configmap = next(o for o in desired if o["kind"] == "ConfigMap")
    new_status = statuses.valid_status(
        old_status,
        generation,
        None if dd.spec.autoscaling else funcs.replicas(dd.spec),
        observed.get(("Deployment", dd.name)),
        builders.selector_string(dd.name),
        builders.endpoint(dd),
        builders.deployment.config_hash(configmap["data"]),
        funcs.cache_tag(funcs.cache_dit_config(dd.spec)),
        apply_error=apply_error,
        gate_pods=gate_pods,
        pods=pods,
    )
    if cache is not None:
        new_status = cache_statuses.gate_ready_condition(
            {**new_status, "modelCache": cache}, cache, generation
        )
    if startup is not None:
        new_status["startup"] = startup
    if dd.spec.queue is not None:
        new_status = statuses.queue_status(
            new_status,
            old_status,
            observed.get(("Deployment", dd.name)),
            observed.get(("Deployment", builders.frontdoor.front_door_name(dd))),
            dd.spec.queue.front_door.replicas,
            demand,
            generation,
        )
    elif "queue" in (old_status or {}):
        new_status["queue"] = None  # spec.queue removed: the merge patch drops status.queue
    return new_status


class Reporter:
    """Writes a CR's status when it changed (the answer goes to the informer cache) and posts events."""

    def __init__(self, client: Callable[[], KubeClient], remember_cr: Callable[[dict], bool]) -> None:
        self._client = client
        self._remember_cr = remember_cr
        # (namespace, name) -> (config hash, the pod failure causes an event was posted for)
        self._posted: dict[tuple[str, str], tuple[str, set[str]]] = {}
        self._lock = threading.Lock()

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._posted.pop((namespace, name), None)

    def invalid(self, cr: dict, old_status: dict, errors: list[FieldError]) -> None:
        """ConfigValid=False naming the fields, one InvalidSpec event per distinct message."""
        meta = cr["metadata"]
        new_status = statuses.invalid_status(old_status, meta.get("generation", 1), errors)
        if statuses.same_status(old_status, new_status):
            return
        self._write(cr, new_status)
        self._event_once(cr, old_status, new_status, statuses.CONFIG_VALID, "InvalidSpec")
        log.warning(
            "invalid spec",
            extra={
                "dd": f"{meta['namespace']}/{meta['name']}",
                "errors": condition_message(new_status, statuses.CONFIG_VALID),
            },
        )

    def serving(
        self, cr: dict, old_status: dict, new_status: dict, cache: dict | None, pods: list[dict] | None = None
    ) -> None:
        """Write the status of a valid spec if it changed, with its events (apply, gate, model cache,
        failing pods)."""
        self._pod_events(cr, old_status, new_status, pods or [])
        if statuses.same_status(old_status, new_status):
            return
        self._write(cr, new_status)
        self._event_once(cr, old_status, new_status, statuses.SYNCED, "ApplyFailed")
        self._event_once(cr, old_status, new_status, statuses.QUALITY_GATE, "QualityGateFailed")
        self._rolled_back_event(cr, old_status, new_status)
        if cache is not None:
            for type_, reason, message in cache_statuses.cache_events(old_status.get("modelCache"), cache):
                self._client().post_event(cr, type_, reason, message)
        meta = cr["metadata"]
        log.debug("status written", extra={"dd": f"{meta['namespace']}/{meta['name']}", "status": new_status})

    def record_rollback(self, cr: dict, record: dict) -> None:
        """status.rollback alone, before the restore is applied (controller/rollback.py)."""
        self._write(cr, {"rollback": record})

    def _rolled_back_event(self, cr: dict, old_status: dict, new_status: dict) -> None:
        """One Warning event `RolledBack` per rollback (not again while it is held, nor after a restart)."""
        new = condition_of(new_status, ROLLED_BACK)
        old = condition_of(old_status, ROLLED_BACK)
        if new.get("status") == "True" and (
            old.get("status") != "True" or old.get("message") != new.get("message")
        ):
            self._client().post_event(cr, "Warning", ROLLED_BACK, str(new.get("message", "")))

    def _write(self, cr: dict, status: dict) -> None:
        meta = cr["metadata"]
        written = self._client().patch_status(meta["namespace"], meta["name"], status)
        if written:
            self._remember_cr(written)

    def _pod_events(self, cr: dict, old_status: dict, new_status: dict, pods: list[dict]) -> None:
        """One Warning event per distinct cause of the failing pods (reason: the Ready condition's, e.g.
        CrashLoopBackOff, OOMKilled), while Ready is False. A cause is posted once per configuration: not
        again on the next reconcile, restart or back-off, nor after an operator restart when the stored
        Ready condition already names it. A failed quality gate has its own event (QualityGateFailed)."""
        ready = condition_of(new_status, statuses.READY)
        if ready.get("status") != "False":
            return
        summary = pod_status.summarize(pods)
        if not summary.failures:
            return
        old_ready = condition_of(old_status, statuses.READY)
        meta = cr["metadata"]
        key = (meta["namespace"], meta["name"])
        config = str(new_status.get("configHash", ""))
        names = {f.cause: n for n, f in reversed(summary.failures)}
        post = []
        with self._lock:
            seen_config, posted = self._posted.get(key, (config, set()))
            if seen_config != config:
                posted = set()
            for failure in summary.causes():
                if failure.cause in posted or failure.reason == "QualityGateFailed":
                    continue
                if len(posted) >= MAX_CAUSES:
                    break
                posted.add(failure.cause)
                stored = old_ready.get("reason") == failure.reason and failure.message in str(
                    old_ready.get("message", "")
                )
                if not stored:  # an operator restarted after posting it: the status says so already
                    post.append(failure)
            self._posted[key] = (config, posted)
        for failure in post:
            self._client().post_event(
                cr, "Warning", failure.reason, f"pod {names[failure.cause]}: {failure.message}"
            )

    def _event_once(self, cr: dict, old_status: dict, new_status: dict, type_: str, reason: str) -> None:
        """A Warning event when the condition's failure message is new (once per distinct message)."""
        message = condition_message(new_status, type_)
        if message and message != condition_message(old_status, type_):
            self._client().post_event(cr, "Warning", reason, message)
