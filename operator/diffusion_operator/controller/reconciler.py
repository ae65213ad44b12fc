"""Orchestration: the one `Reconciler` (kopf's memo) wires the concerns together, and `_reconcile`
runs one level-triggered pass as a list of stages: read the CR, parse, model cache, build, decide the
rollback (rollback.py: the last good revision instead of a failing one), apply the children that
drifted, delete the autoscaler no longer wanted, report status, keep a revision that serves as the last
good one.

Events: kopf delivers watch events to `on_cr_event` / `on_child_event` / `on_pod_event`, which only
update the caches (informers.py) and queue the CR's key (loop.py); the workers run `reconcile`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

from diffusion_runtime.contract.queue import QUEUE_DEMAND_METRIC

from diffusion_operator import builders, pod_status, validation
from diffusion_operator.api import funcs
from diffusion_operator.api.types import DiffusionDeployment
from diffusion_operator.controller import model_cache, rollback
from diffusion_operator.controller.apply import Applier, Slot, needs_apply, slot, with_spec_hash
from diffusion_operator.controller.autoscalers import DISCOVERY_TTL, Autoscalers
from diffusion_operator.controller.informers import (
    ChildKey,
    CrKey,
    Informers,
    Queue,
    owned_by,
    resource_version,
)
from diffusion_operator.controller.loop import REFUSED_RETRY, WorkLoop
from diffusion_operator.controller.report import Reporter, serving_status
from diffusion_operator.controller.startup import StartLines
from diffusion_operator.controller.workqueue import WorkQueue
from diffusion_operator.kube import ApiError, KubeClient
from diffusion_operator.metrics import OperatorMetrics
from diffusion_operator.resources import CR, MANAGED_LABELS, NETWORK_POLICY, Watch, watched
from diffusion_operator.status import now as statuses_now

log = logging.getLogger("diffusion_operator")

# a transient child error (5xx, 409, 429, connection) still failing at this attempt is also reported
# in status (Synced=False) and by one event, while the retries go on
REPORT_TRANSIENT_AFTER = 3
MANAGED_SELECTOR = ",".join(f"{k}={v}" for k, v in MANAGED_LABELS.items())  # the resync's child lists
QUEUE_POLL_SECONDS = 15.0


class Reconciler:
    """State and logic of the controller. Thread-safe: one lock per CR, short locks in each part."""

    def __init__(
        self,
        client: KubeClient | None = None,
        *,
        child_delay: float = 0.25,
        max_backoff: float = 60.0,
        keda_prometheus_address: str = "",
        discovery_ttl: float = DISCOVERY_TTL,
        metrics: OperatorMetrics | None = None,
        network: builders.NetworkSettings = builders.DEFAULT_NETWORK,
    ) -> None:
        # the registry the runner serves; None: this reconciler's own (tests)
        self.metrics = metrics if metrics is not None else OperatorMetrics()
        self._client = client  # None: a `Kube` from the kubeconfig or service account, on first use
        # while a model cache downloads, look again this often (None: only on events, as tests drive it)
        self.cache_poll: float | None = model_cache.MODEL_CACHE_POLL_SECONDS
        # with spec.queue, status.queue.demand is refreshed this often (None: only on events, as tests drive it)
        self.queue_poll: float | None = QUEUE_POLL_SECONDS
        self.informers = Informers(child_delay)
        self.start_lines = StartLines(
            lambda: self.client, lambda ns, name: self.enqueue(ns, name, force=True)
        )
        self.autoscalers = Autoscalers(
            lambda: self.client, self.informers, keda_prometheus_address, discovery_ttl
        )
        self.applier = Applier(lambda: self.client, self.informers.remember_child)
        self.reporter = Reporter(lambda: self.client, self.informers.remember_cr)
        self.rollbacks = rollback.Rollbacks(lambda: self.client, self.informers.child, self.applier.apply)
        self.loop = WorkLoop(
            self.reconcile,
            self._versions,
            self.start_lines.wait,
            max_backoff,
            self.metrics,
            seen=self._seen_versions,
        )
        self._guard = threading.Lock()
        self._locks: dict[CrKey, threading.Lock] = {}
        self._invalid: set[CrKey] = set()
        self._managed: dict[CrKey, list[ChildKey]] = {}  # the children of each CR's last reconcile
        self._used: dict[CrKey, dict[ChildKey, int]] = {}  # the child versions the running reconcile used
        self._first_pass: tuple[float, set[CrKey]] | None = None  # (started, CRs not reconciled yet)
        self.reconciles = 0
        # the NetworkPolicies' settings: the monitoring namespace, the cluster's own ranges
        self.network = network

    @property
    def client(self) -> KubeClient:
        if self._client is None:
            from diffusion_operator.kube import Kube

            self._client = Kube(metrics=self.metrics)
        return self._client

    # the parts' settings and counters, where tests and the runner look for them
    @property
    def queue(self) -> WorkQueue:
        return self.loop.queue

    @property
    def skipped(self) -> int:
        return self.loop.skipped

    @property
    def discovery_ttl(self) -> float:
        return self.autoscalers.discovery_ttl

    @discovery_ttl.setter
    def discovery_ttl(self, value: float) -> None:
        self.autoscalers.discovery_ttl = value

    def cached_child(self, kind: str, namespace: str, name: str) -> dict | None:
        return self.informers.child(kind, namespace, name)

    # ---- events (kopf calls these; they only cache and queue) -------------------------------------

    def on_cr_event(self, event_type: str | None, body: Mapping) -> None:
        key, queue = self.informers.cr_event(event_type, body)
        if event_type == "DELETED":
            self.forget_cr(*key)
        self._queue(queue)

    def on_child_event(self, event_type: str | None, body: Mapping) -> None:
        self._queue(self.informers.child_event(event_type, body))

    def on_pod_event(self, event_type: str | None, body: Mapping) -> None:
        """Serving pods matter for the quality gate and status.startup: a reconcile is queued when a pod's
        gate view (its configuration hash, a gate failure in its termination message) appears, changes or
        goes; a container that turned Ready has its start line read (in the background, once)."""
        change = self.informers.pod_event(event_type, body)
        if change is None:
            return
        namespace, pod = change.pod
        self.start_lines.saw(namespace, pod, change.owner, change.ready, change.gone)
        if change.gate_changed:
            # forced: pods are no input of the skip check (the CR's and children's versions did not move);
            # not fresh: the CR and its children are read from the caches the watches keep (a pod's state
            # changes a few times while it starts: re-reading five objects each time made a restart with
            # many new pods slow)
            self.enqueue(namespace, change.owner, delay=self.informers.child_delay, force=True)

    def _queue(self, queue: Queue | None) -> None:
        if queue is not None:
            self.enqueue(*queue.key, delay=queue.delay, fresh=queue.fresh)

    def forget_cr(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        self.informers.forget_cr(key)
        self.loop.forget(key)
        self.start_lines.forget(namespace, name)
        self.reporter.forget(namespace, name)
        with self._guard:
            self._invalid.discard(key)
            self._managed.pop(key, None)
            self._used.pop(key, None)
        self._update_gauges()

    # ---- the work loop --------------------------------------------------------------------------

    def enqueue(
        self, namespace: str, name: str, delay: float = 0.0, fresh: bool = False, force: bool = False
    ) -> None:
        self.loop.enqueue(namespace, name, delay, fresh, force)

    def start(self, workers: int) -> None:
        self.loop.start(workers)

    def stop(self) -> None:
        self.loop.stop()
        self.applier.stop()
        self.start_lines.stop()

    def process(self, key: CrKey) -> None:
        self.loop.process(key)

    def drain(self, timeout: float = 10.0, horizon: float = 1.0) -> int:
        """Run queued keys in this thread until none is due within `horizon` seconds (tests); returns
        how many reconciles ran (queued keys skipped as echoes of our own writes not counted)."""
        before = self.reconciles
        self.loop.drain(timeout, horizon)
        return self.reconciles - before

    def wait_start_reads(self, timeout: float = 10.0) -> bool:
        return self.start_lines.wait(timeout)

    def resync(self, namespaces: list[str] | None) -> list[CrKey]:
        """A level-triggered pass over every DiffusionDeployment (writes only on drift): per namespace,
        one list of the CRs and one of each watched child kind (ours, by label) refresh the caches, then
        every CR is queued to run once from them (not skipped as an echo): a pass over N CRs costs a few
        lists, not N x (CR + children) reads. Where a child list fails, that namespace's CRs run fresh
        (each reads the API server). Returns the keys queued."""
        scopes: list[str | None] = list(namespaces) if namespaces else [None]
        queued: list[CrKey] = []
        for ns in scopes:
            try:
                items = self.client.list(CR.api_version, CR.kind, ns)
            except Exception as error:  # the API server may be briefly away
                log.warning(f"resync list failed: {error}")
                continue
            refreshed = True
            try:
                for resource in watched(Watch.CHILD):
                    listed = self.client.list(resource.api_version, resource.kind, ns, MANAGED_SELECTOR)
                    self.informers.refresh_children(resource.kind, ns, listed)
                self.autoscalers.refresh(items)
            except Exception as error:
                log.warning(f"resync: children not listed ({error}): each DiffusionDeployment reads its own")
                refreshed = False
            for item in items:
                meta = item["metadata"]
                self.informers.remember_cr(item)
                key = (meta["namespace"], meta["name"])
                queued.append(key)
                self.enqueue(*key, fresh=not refreshed, force=refreshed)
        return queued

    def start_first_pass(self, namespaces: list[str] | None) -> int:
        """At start (after acquiring the lease): the resync's lists fill the caches and queue every CR
        at once, before kopf's watches deliver them one by one; the `first_pass` start-up phase is set
        (and logged) when each has been reconciled once. Returns how many were queued."""
        started = time.monotonic()
        # the serving pods first: a CR's Ready condition names a failing pod's cause, so a pass that ran
        # before the pods were known would write "warming up" over it (and post the cause's event again)
        for ns in list(namespaces) if namespaces else [None]:
            for resource in watched(Watch.POD):
                try:
                    pods = self.client.list(resource.api_version, resource.kind, ns, MANAGED_SELECTOR)
                except Exception as error:
                    log.warning(
                        f"first pass: serving pods not listed ({error}): their watch events will tell"
                    )
                    continue
                for pod in pods:
                    self.on_pod_event("ADDED", pod)
        queued = set(self.resync(namespaces))
        with self._guard:
            self._first_pass = (started, queued)
        if not queued:
            self._first_pass_done()
        return len(queued)

    def _passed(self, key: CrKey) -> None:
        with self._guard:
            if self._first_pass is None:
                return
            self._first_pass[1].discard(key)
            done = not self._first_pass[1]
        if done:
            self._first_pass_done()

    def _first_pass_done(self) -> None:
        with self._guard:
            first, self._first_pass = self._first_pass, None
        if first is None:
            return
        self.metrics.startup_phase.labels(phase="first_pass").set(time.time())
        log.info(f"first pass: every DiffusionDeployment reconciled once, {time.monotonic() - first[0]:.2f}s")

    def start_resync(
        self, namespaces: list[str] | None, interval: float, stop: threading.Event
    ) -> threading.Thread | None:
        """The periodic resync; a tick while the first pass still runs is skipped (that pass is one)."""

        def tick() -> None:
            with self._guard:
                first_pass_running = self._first_pass is not None
            if not first_pass_running:
                self.resync(namespaces)

        return self.loop.start_resync(tick, interval, stop)

    def _versions(self, key: CrKey) -> tuple[int, ...]:
        with self._guard:
            children = self._managed.get(key, [])
        return self.informers.versions(key, children)

    def _seen_versions(self, key: CrKey) -> tuple[int, ...]:
        """The versions a reconcile that just ended worked from: the CR as cached now (its own status
        write's answer included), each child as the run read or wrote it. A child another controller
        changed while the run went on (a Deployment's status: a pod turned Ready) is newer in the cache
        than in the run: its event's queued run is then not skipped as an echo, so the status follows."""
        with self._guard:
            children = self._managed.get(key, [])
            used = self._used.pop(key, {})
        cached = self.informers.versions(key, children)
        return (cached[0], *(used.get(child, v) for child, v in zip(children, cached[1:], strict=True)))

    # ---- one reconcile ----------------------------------------------------------------------------

    def reconcile(self, namespace: str, name: str, fresh: bool = True) -> str:
        """One reconcile of one DiffusionDeployment; returns ok | invalid | refused | gone. Raises on transient
        API errors (the caller retries); permanent child errors are reported in status."""
        with self._lock((namespace, name)):
            started = time.perf_counter()
            with self._guard:
                self.reconciles += 1
            try:
                result = self._reconcile(namespace, name, fresh)
                self.metrics.reconciles.labels(result=result).inc()
                self._passed((namespace, name))
                return result
            except ApiError as error:
                self.metrics.reconciles.labels(result="error").inc()
                self.metrics.reconcile_errors.labels(error=str(error.status)).inc()
                raise
            except Exception as error:
                self.metrics.reconciles.labels(result="error").inc()
                self.metrics.reconcile_errors.labels(error=type(error).__name__).inc()
                raise
            finally:
                self.metrics.reconcile_duration.observe(time.perf_counter() - started)

    def _reconcile(self, namespace: str, name: str, fresh: bool) -> str:
        key = (namespace, name)
        cr = self._read_cr(key, fresh)
        if cr is None or cr["metadata"].get("deletionTimestamp"):
            self.forget_cr(namespace, name)
            return "gone"  # children are garbage-collected through their owner references
        old_status = cr.get("status") or {}
        dd, errors = self._parse(cr)
        if dd is None or errors:
            return self._report_invalid(key, cr, old_status, dd, errors)
        with self._guard:
            self._invalid.discard(key)
        # a CR never reconciled before (no status yet) has no children: apply without reading first
        first = not old_status.get("observedGeneration")
        cache = self._model_cache(dd, cr, old_status, fresh, first)
        built = self._build(dd, cr, cache)
        pods = self.informers.pods_of(*key)
        decision, desired = self._rollback(cr, old_status, built, pods, first)
        observed = {slot(obj): None if first else self._observed(obj, fresh) for obj in desired}
        apply_error, retry = self._apply(key, desired, observed, first, model_cache.is_ready(cache))
        used = {
            (kind, namespace, name_): resource_version(obj)
            for (kind, name_), obj in observed.items()
            if obj is not None and resource_version(obj) >= 0
        }
        with self._guard:
            self._used[key] = used
        if apply_error is None:
            self.autoscalers.delete_unwanted(cr, dd, fresh)
            self.autoscalers.delete_unwanted_front_door(cr, dd, fresh)
            self._delete_unwanted_policy(cr, dd, fresh)
        new_status = self._report(key, dd, cr, old_status, desired, observed, apply_error, cache, decision)
        if apply_error is None:
            self._keep_last_good(cr, built, decision, new_status, pods)
        if self.cache_poll is not None and model_cache.downloading(cache):
            # bytes move without any event: look again (fresh, so the echo check does not skip it)
            self.enqueue(namespace, name, delay=self.cache_poll, fresh=True)
        elif self.queue_poll is not None and dd.spec.queue is not None:
            # the queue's demand moves without any event: status.queue.demand is read again
            self.enqueue(namespace, name, delay=self.queue_poll, fresh=True)
        if retry is not None:
            raise retry
        return "ok" if apply_error is None else "refused"

    # ---- the stages -----------------------------------------------------------------------------

    def _lock(self, key: CrKey) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _read_cr(self, key: CrKey, fresh: bool) -> dict | None:
        if not fresh:
            cached = self.informers.cr(key)
            if cached is not None:
                return cached
        cr = self.client.get(CR.api_version, CR.kind, *key)
        if cr is not None:
            self.informers.remember_cr(cr)
        return cr

    def _observed(self, obj: dict, fresh: bool) -> dict | None:
        meta = obj["metadata"]
        if not fresh:
            cached = self.informers.child(obj["kind"], meta["namespace"], meta["name"])
            if cached is not None:
                return cached
        observed = self.client.get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        if observed is None:
            self.informers.forget_child(obj["kind"], meta["namespace"], meta["name"])
        else:
            self.informers.remember_child(observed)
        return observed

    def _delete_unwanted_policy(self, cr: dict, dd: DiffusionDeployment, fresh: bool) -> None:
        """spec.networkPolicy.enabled false: delete the NetworkPolicy of ours, if any (watched: the cache
        holds it; fresh passes read the API server)."""
        if dd.spec.network_policy.enabled:
            return
        namespace, name = cr["metadata"]["namespace"], cr["metadata"]["name"]
        api_version, kind = NETWORK_POLICY.api_version, NETWORK_POLICY.kind
        obj = self.client.get(api_version, kind, namespace, name) if fresh else None
        obj = obj or self.informers.child(kind, namespace, name)
        if obj is not None and owned_by(obj, cr):
            self.client.delete(api_version, kind, namespace, name)
            self.informers.forget_child(kind, namespace, name)

    def _parse(self, cr: dict) -> tuple[DiffusionDeployment | None, list[validation.FieldError]]:
        """The typed CR (None when invalid) and what is wrong with it: the schema's and the runtime's
        checks (validation.py), then what the cluster lacks for it (the autoscaling engine)."""
        meta = cr["metadata"]
        parsed = validation.parse(meta["name"], meta["namespace"], cr.get("spec"))
        if not parsed.ok or parsed.cr is None:
            return None, parsed.errors
        return parsed.cr, self.autoscalers.engine_errors(parsed.cr)

    def _report_invalid(
        self,
        key: CrKey,
        cr: dict,
        old_status: dict,
        dd: DiffusionDeployment | None,
        errors: list[validation.FieldError],
    ) -> str:
        """Report an invalid spec; nothing is applied."""
        if dd is not None:  # valid, but the cluster lacks KEDA: look again once discovery is stale
            self.enqueue(*key, delay=max(self.discovery_ttl, REFUSED_RETRY), fresh=True)
        with self._guard:
            self._invalid.add(key)
        self.reporter.invalid(cr, old_status, errors)
        self._update_gauges()
        return "invalid"

    def _model_cache(
        self, dd: DiffusionDeployment, cr: dict, old_status: dict, fresh: bool, first: bool
    ) -> dict | None:
        if not dd.spec.model.cache:
            return None
        return model_cache.model_cache_status(self.client, self._observed, dd, cr, old_status, fresh, first)

    def _build(self, dd: DiffusionDeployment, cr: dict, cache: dict | None) -> list[dict]:
        """Every desired child, from the pure builders, with its spec hash."""
        children = builders.build_all(
            dd,
            cr,
            model_cache_ready=model_cache.is_ready(cache),
            keda_prometheus_address=self.autoscalers.keda_prometheus_address,
            network=self.network,
        )
        return [with_spec_hash(obj) for obj in children]

    def _rollback(
        self, cr: dict, old_status: dict, built: list[dict], pods: list[dict], first: bool
    ) -> tuple[rollback.Decision, list[dict]]:
        """The rollback decision and the children to apply (the last good ConfigMap and Deployment while
        rolling back or holding). The last good revision is read only when a decision needs it: a pod
        fails, or a rollback is held."""
        if first:
            return rollback.Decision(rollback.APPLY), built
        record = old_status.get("rollback")
        needed = bool(record and record.get("active")) or any(
            v.get("state") == pod_status.FAILING for v in pods
        )
        good = self.rollbacks.last_good(cr) if needed else None
        decision = rollback.decide(
            rollback.spec_hash(cr),
            int(cr["metadata"].get("generation", 1)),
            self._revision(built),
            good,
            record,
            pods,
            statuses_now(),
        )
        if decision.action == rollback.ROLLBACK and decision.record is not None:
            meta = cr["metadata"]
            log.warning(
                "rolling back to the last good revision",
                extra={"dd": f"{meta['namespace']}/{meta['name']}", "reason": decision.record["message"]},
            )
            # recorded before the restore is applied: an operator killed in between holds after its restart
            self.reporter.record_rollback(cr, decision.record)
        if decision.good is not None and decision.action in (rollback.ROLLBACK, rollback.HOLD):
            return decision, rollback.restored(built, decision.good)
        return decision, built

    @staticmethod
    def _revision(built: list[dict]) -> str:
        by_kind = rollback.revision_children(built)
        return rollback.revision_of(by_kind["ConfigMap"], by_kind["Deployment"])

    def _keep_last_good(
        self,
        cr: dict,
        built: list[dict],
        decision: rollback.Decision,
        new_status: dict,
        pods: list[dict],
    ) -> None:
        """A revision applied as desired that serves becomes the last good one (when it is not already)."""
        deployment = rollback.revision_children(built)["Deployment"]
        revision = self._revision(built)
        if not rollback.should_save(decision, new_status, revision, deployment):
            return
        good = decision.good or self.rollbacks.last_good(cr)
        if good is not None and good.revision == revision:
            return
        self.rollbacks.save(cr, built, revision, new_status, pods)

    def _apply(
        self,
        key: CrKey,
        desired: list[dict],
        observed: dict[Slot, dict | None],
        first: bool,
        cache_ready: bool,
    ) -> tuple[tuple[str, str] | None, ApiError | None]:
        """Apply the drifted children. Returns (the error to report, the transient error to raise after
        reporting it); raises a transient error at once while it has not failed REPORT_TRANSIENT_AFTER times."""
        stale = [obj for obj in desired if needs_apply(obj, observed[slot(obj)])]
        serving = observed.get(("Deployment", key[1]))
        if not cache_ready and serving is not None and (serving.get("spec") or {}).get("replicas", 1):
            # a new model (revision, variant) is downloading while pods serve the previous one from the
            # same claim: they keep their configuration until the new folder is complete
            stale = [obj for obj in stale if obj["kind"] not in ("ConfigMap", "Deployment")]
        applied: list[str] = []
        try:
            self.applier.apply_changes(stale, observed, applied, first)
        except ApiError as error:
            retry = None
            if not error.permanent:
                if self.loop.failures(key) < REPORT_TRANSIENT_AFTER - 1:
                    raise  # retried with backoff; reported in status once it keeps failing
                retry = error
            self.metrics.reconcile_errors.labels(error=str(error.status)).inc()
            log.warning(
                "a child was refused",
                extra={"dd": "/".join(key), "error": f"{error.kind_name}: {error.reason}"},
            )
            return (error.code, f"{error.kind_name}: {error.reason}"), retry
        finally:
            if applied:
                log.info("applied children", extra={"dd": "/".join(key), "applied": applied})
        return None, None

    def _report(
        self,
        key: CrKey,
        dd: DiffusionDeployment,
        cr: dict,
        old_status: dict,
        desired: list[dict],
        observed: dict[Slot, dict | None],
        apply_error: tuple[str, str] | None,
        cache: dict | None,
        decision: rollback.Decision,
    ) -> dict:
        """Write the status (if it changed) and the gauges; returns the status."""
        with self._guard:
            self._managed[key] = [
                (o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) for o in desired
            ]
        pods = self.informers.pods_of(*key)
        gate_pods = pods if funcs.quality_gate_on(dd.spec) else None
        startup = self.start_lines.status(cr, old_status)
        demand = None
        if dd.spec.queue is not None:  # as the HPA reads it (None without a metrics adapter)
            demand = self.client.object_metric(key[0], "Deployment", key[1], QUEUE_DEMAND_METRIC)
        new_status = serving_status(
            dd, cr, old_status, desired, observed, apply_error, gate_pods, cache, startup, pods, demand
        )
        new_status = rollback.with_rollback(
            new_status, old_status, decision, int(cr["metadata"].get("generation", 1)), decision.good
        )
        self.reporter.serving(cr, old_status, new_status, cache, pods)
        self._update_gauges()
        return new_status

    def _update_gauges(self) -> None:
        with self._guard:
            invalid, managed = len(self._invalid), dict(self._managed)
        self.metrics.invalid_specs.set(invalid)
        self.metrics.managed_objects.labels(kind=CR.kind).set(len(managed) + invalid)
        self.metrics.managed_objects.labels(kind="children").set(sum(len(c) for c in managed.values()))
