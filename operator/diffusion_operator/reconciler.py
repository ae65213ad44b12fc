"""The controller: one `Reconciler` holds every piece of state (caches, work queue, counters).

`reconcile` is level-triggered: read the CR, parse, build every child, server-side apply the children
that drifted, delete an HPA no longer wanted, write status only if it changed.

Drift: each desired child carries `diffusion.dev/spec-hash` (hash of the whole desired object, as
CloudNativePG does for its poolers). A child is applied when that hash differs (the CR changed,
including a field that was removed: server-side apply under our one field manager then drops the
fields we no longer send) or when a value we set differs in the live object (someone else edited or
removed it; the forced apply puts it back). An idle reconcile makes no write.

Errors: a child the API server refuses for good (422 invalid, 403 forbidden, ...) becomes
`Synced=False` (and `ConfigValid=False` for invalid objects) with the server's message, plus one
Warning event per distinct message; transient errors (conflict, throttling, 5xx, connection) are
retried with backoff, and reported the same way once they failed `REPORT_TRANSIENT_AFTER` times.
When children already exist, changes are first sent as a dry run, so a refused
change leaves the running children exactly as they were.

Events: kopf delivers watch events to `on_cr_event` / `on_child_event`, which only queue the CR's key.
The queue coalesces: the echo of our own write is not queued at all (same resourceVersion as the
apply answer we cached), and a burst of child events within `child_delay` runs one reconcile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from queue import SimpleQueue
from typing import Any

from diffusion_runtime.contract.lines import parse_ready_line

from diffusion_operator import builders, metrics, validation
from diffusion_operator import cache_status as cache_statuses
from diffusion_operator import status as statuses
from diffusion_operator.api import funcs, group
from diffusion_operator.api.types import DiffusionDeployment
from diffusion_operator.builders.common import MANAGED_BY
from diffusion_operator.builders.deployment import RUNTIME_CONTAINER
from diffusion_operator.builders.keda import KEDA_API_VERSION, SCALED_OBJECT, SCALED_OBJECTS
from diffusion_operator.diff import is_subset
from diffusion_operator.hashing import stable_hash
from diffusion_operator.kube import ApiError, KubeClient
from diffusion_operator.workqueue import WorkQueue

log = logging.getLogger("diffusion_operator")

GROUP, VERSION, PLURAL = group.GROUP, group.VERSION, group.PLURAL  # defined once, in api/group.py
CR_API = group.API_VERSION
CR_KIND = group.KIND
CHILD_KINDS = (
    ("v1", "ConfigMap", "configmaps"),
    ("v1", "Service", "services"),
    ("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    ("apps/v1", "Deployment", "deployments"),
    ("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers"),
    ("v1", "PersistentVolumeClaim", "persistentvolumeclaims"),  # spec.model.cache
    ("batch/v1", "Job", "jobs"),  # the model download
)
# while the model cache downloads, status (bytes) is refreshed this often; Job events cover the phases
MODEL_CACHE_POLL_SECONDS = 10.0
DOWNLOAD_LOG_TAIL_LINES = 20
# a serving pod's start line (diffusion_runtime.startup) follows only its start-up logging: read once per
# container from the head of its log, at most this much
START_LOG_BYTES = 1 << 20
# a start line read that failed for a transient reason (5xx, connection) is tried this often, so far apart
START_READ_ATTEMPTS, START_READ_RETRY = 3, 2.0
START_READERS = 2  # threads reading start lines (daemons: a slow log read never holds up the exit)
MANAGED_LABELS = {"app.kubernetes.io/managed-by": MANAGED_BY}
OWNER_LABEL = "diffusion.dev/deployment"
SPEC_HASH_ANNOTATION = "diffusion.dev/spec-hash"
# a transient child error (5xx, 409, 429, connection) still failing at this attempt is also reported
# in status (Synced=False) and by one event, while the retries go on
REPORT_TRANSIENT_AFTER = 3
# a child refused for good is tried again after 5 s, doubling up to max_backoff (no new event or
# status write while the message stays the same)
REFUSED_RETRY = 5.0
# API discovery of keda.sh/v1alpha1 (is KEDA's ScaledObject CRD installed?) is cached this long; a CR
# refused for its absence is looked at again after it
DISCOVERY_TTL = 30.0
# the autoscaler object of each engine (spec.autoscaling.engine): the other one is deleted
AUTOSCALERS = {
    "hpa": ("autoscaling/v2", "HorizontalPodAutoscaler"),
    "keda": (KEDA_API_VERSION, SCALED_OBJECT),
}
KEDA_FLAG = "--keda-prometheus-address"
KEDA_CHART_VALUE = "autoscaling.keda.prometheusAddress"

CrKey = tuple[str, str]  # (namespace, name)
ChildKey = tuple[str, str, str]  # (kind, namespace, name)


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


def with_spec_hash(obj: dict) -> dict:
    """`obj` with the hash of its whole desired content in an annotation (computed without it)."""
    digest = stable_hash(obj)
    meta = obj["metadata"]
    meta["annotations"] = {**meta.get("annotations", {}), SPEC_HASH_ANNOTATION: digest}
    return obj


def needs_apply(desired: dict, observed: dict | None) -> bool:
    """Apply when missing, when the desired object changed (hash), or when a value we set was edited."""
    if observed is None:
        return True
    want = desired["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    have = ((observed.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
    return want != have or not is_subset(desired, observed)


# what a reconcile reads from a Deployment's status (status.valid_status)
DEPLOYMENT_STATUS_INPUTS = (
    "observedGeneration",
    "replicas",
    "readyReplicas",
    "updatedReplicas",
    "availableReplicas",
)


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


def ready_container(pod: Mapping) -> str | None:
    """While a pod is Ready, its runtime container's identity (containerID, else restarts and start time):
    the runtime printed its start line before turning ready, so it is in that container's log."""
    status = pod.get("status") or {}
    if not any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    ):
        return None
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") == RUNTIME_CONTAINER and cs.get("ready"):
            started = ((cs.get("state") or {}).get("running") or {}).get("startedAt")
            return str(cs.get("containerID") or f"{cs.get('restartCount', 0)}@{started}")
    return None


def pod_gate_view(pod: Mapping) -> dict:
    """The part of a pod the operator reads: the QualityGate condition's (status.gate_failure, the
    config-hash annotation) and, while it is Ready, its runtime container (`ready`, whose start line
    goes into status.startup), as a small pod-shaped dict."""
    meta = pod.get("metadata") or {}
    obj = plain({"metadata": {k: meta.get(k) for k in ("name", "namespace", "labels", "annotations")}})
    obj["metadata"]["labels"] = obj["metadata"]["labels"] or {}
    obj["ready"] = ready_container(pod)
    obj["failure"] = statuses.gate_failure(plain(pod))
    if obj["failure"] is not None:
        obj["status"] = {"containerStatuses": [{"lastState": {"terminated": {"message": obj["failure"]}}}]}
    return obj


def owned_by(obj: Mapping, owner: Mapping) -> bool:
    uid = owner["metadata"].get("uid")
    return any(ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def condition_message(status: Mapping | None, type_: str) -> str:
    for cond in (status or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "False":
            return str(cond.get("message", ""))
    return ""


class Reconciler:
    """State and logic of the controller. Thread-safe: one lock per CR, short locks for the caches."""

    def __init__(
        self,
        client: KubeClient | None = None,
        *,
        child_delay: float = 0.25,
        max_backoff: float = 60.0,
        keda_prometheus_address: str = "",
        discovery_ttl: float = DISCOVERY_TTL,
    ) -> None:
        self._client = client  # None: a `Kube` from the kubeconfig or service account, on first use
        # the Prometheus the ScaledObjects' triggers query (engine keda); empty: engine keda is refused
        self.keda_prometheus_address = keda_prometheus_address
        self.discovery_ttl = discovery_ttl
        self._keda_seen: tuple[float, bool] | None = None  # (monotonic time, served)
        self.child_delay = child_delay
        # while a model cache downloads, look again this often (None: only on events, as tests drive it)
        self.cache_poll: float | None = MODEL_CACHE_POLL_SECONDS
        self.max_backoff = max_backoff
        self.queue = WorkQueue()
        self._guard = threading.Lock()
        self._locks: dict[CrKey, threading.Lock] = {}
        self._crs: dict[CrKey, dict] = {}  # newest CR seen (watch events, our status writes)
        self._children: dict[ChildKey, dict] = {}  # newest child seen (watch events, our applies)
        # serving pods by (namespace, name): only what the QualityGate condition reads (pod_gate_view)
        self._pods: dict[tuple[str, str], dict] = {}
        # status.startup: the container of each pod whose start line was read (or is being read), and the
        # newest cold and warm start found per CR; reads run in their own threads, off the workers
        self._start_read: dict[tuple[str, str], str] = {}
        self._starts: dict[CrKey, dict] = {}
        self._start_jobs: SimpleQueue[tuple[str, str, str, str] | None] = SimpleQueue()
        self._start_readers: list[threading.Thread] = []
        self._start_pending = 0
        self._start_idle = threading.Condition(self._guard)
        self._fresh: set[CrKey] = set()  # queued keys whose next run reads everything fresh
        self._failures: dict[CrKey, int] = {}
        self._invalid: set[CrKey] = set()
        self._managed: dict[CrKey, int] = {}
        self._child_keys: dict[CrKey, list[ChildKey]] = {}
        self._seen: dict[CrKey, tuple[int, ...]] = {}  # versions the last reconcile ended with
        self.reconciles = 0
        self.skipped = 0
        self._workers: list[threading.Thread] = []
        self._pool: ThreadPoolExecutor | None = None

    @property
    def client(self) -> KubeClient:
        if self._client is None:
            from diffusion_operator.kube import Kube

            self._client = Kube()
        return self._client

    # ---- caches --------------------------------------------------------------------------------

    def _lock(self, key: CrKey) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _remember(self, cache: dict, key: tuple, obj: dict) -> bool:
        """Keep the newest version; False when the cache already held this version (an echo)."""
        with self._guard:
            old = cache.get(key)
            if old is not None and resource_version(obj) >= 0:
                if resource_version(obj) == resource_version(old):
                    return False
                if resource_version(obj) < resource_version(old):
                    return False  # an older event arriving after our own write's answer
            cache[key] = obj
            return True

    def remember_child(self, obj: dict) -> bool:
        meta = obj.get("metadata") or {}
        return self._remember(
            self._children, (obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", "")), obj
        )

    def forget_child(self, kind: str, namespace: str, name: str) -> None:
        with self._guard:
            self._children.pop((kind, namespace, name), None)

    def remember_cr(self, obj: dict) -> bool:
        meta = obj.get("metadata") or {}
        return self._remember(self._crs, (meta.get("namespace", ""), meta.get("name", "")), obj)

    def forget_cr(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        with self._guard:
            self._crs.pop(key, None)
            self._failures.pop(key, None)
            self._invalid.discard(key)
            self._managed.pop(key, None)
            self._child_keys.pop(key, None)
            self._seen.pop(key, None)
            self._starts.pop(key, None)
        self._update_gauges()

    def cached_child(self, kind: str, namespace: str, name: str) -> dict | None:
        with self._guard:
            return self._children.get((kind, namespace, name))

    def keda_available(self) -> bool:
        """Whether the API server serves keda.sh/v1alpha1 scaledobjects (discovery, cached for
        `discovery_ttl` seconds: KEDA installed after the operator started is seen within it)."""
        now = time.monotonic()
        with self._guard:
            seen = self._keda_seen
        if seen is not None and now - seen[0] < self.discovery_ttl:
            return seen[1]
        resources = self.client.api_resources(KEDA_API_VERSION)
        served = resources is not None and SCALED_OBJECTS in resources
        with self._guard:
            self._keda_seen = (now, served)
        return served

    def engine_errors(self, dd: DiffusionDeployment) -> list[validation.FieldError]:
        """What the cluster or the operator's configuration lacks for the spec's autoscaling engine."""
        if dd.spec.autoscaling is None or dd.spec.autoscaling.engine != "keda":
            return []
        errors = []
        if not self.keda_available():
            errors.append(
                validation.FieldError(
                    "spec.autoscaling.engine",
                    f"keda needs KEDA's ScaledObject CRD ({SCALED_OBJECTS}.{KEDA_API_VERSION}), which this "
                    "cluster does not serve: install KEDA, or use engine hpa",
                )
            )
        if not self.keda_prometheus_address:
            errors.append(
                validation.FieldError(
                    "spec.autoscaling.engine",
                    f"keda needs the Prometheus address its trigger queries: run the operator with {KEDA_FLAG} "
                    f"(chart value {KEDA_CHART_VALUE})",
                )
            )
        return errors

    # ---- events (kopf calls these; they only queue) ---------------------------------------------

    def on_cr_event(self, event_type: str | None, body: Mapping) -> None:
        obj = plain(body)
        meta = obj.get("metadata") or {}
        namespace, name = meta.get("namespace", ""), meta.get("name", "")
        if event_type == "DELETED":
            self.forget_cr(namespace, name)
            return
        obj.setdefault("apiVersion", CR_API)
        obj.setdefault("kind", CR_KIND)
        if self.remember_cr(obj):
            self.enqueue(namespace, name)

    def on_child_event(self, event_type: str | None, body: Mapping) -> None:
        meta = body.get("metadata") or {}
        owner = (meta.get("labels") or {}).get(OWNER_LABEL)
        refs = [r for r in meta.get("ownerReferences") or [] if r.get("kind") == CR_KIND]
        if not owner or not refs:
            return
        namespace = meta.get("namespace", "")
        if event_type == "DELETED":
            self.forget_child(body.get("kind", ""), namespace, meta.get("name", ""))
            self.enqueue(namespace, owner)
            return
        obj = plain(body)
        before = self.cached_child(obj.get("kind", ""), namespace, meta.get("name", ""))
        if not self.remember_child(obj):
            return  # the echo of our own apply (or an older version)
        if before is not None and inputs_of(before) == inputs_of(obj):
            return  # nothing a reconcile reads changed (another controller's annotation, conditions)
        self.enqueue(namespace, owner, delay=self.child_delay)

    def on_pod_event(self, event_type: str | None, body: Mapping) -> None:
        """Serving pods matter for the quality gate and status.startup: a reconcile is queued when a pod's
        gate view (its configuration hash, a gate failure in its termination message) appears, changes or
        goes; a container that turned Ready has its start line read (in the background, once)."""
        meta = body.get("metadata") or {}
        owner = (meta.get("labels") or {}).get(OWNER_LABEL)
        if not owner:
            return
        key = (meta.get("namespace", ""), meta.get("name", ""))
        view = None if event_type == "DELETED" else pod_gate_view(body)
        ready = (view or {}).get("ready")
        with self._guard:
            before = self._pods.pop(key, None)
            if view is not None:
                self._pods[key] = view
            read = ready is not None and self._start_read.get(key) != ready
            if view is None:
                self._start_read.pop(key, None)
            elif read:
                self._start_read[key] = str(ready)
        if read:
            self._read_start_later(key[0], key[1], owner, str(ready))
        if before != view and (view or before or {}).get("failure") is not None:
            # fresh: pods are no input of the skip check (the CR's and children's versions did not move)
            self.enqueue(key[0], owner, delay=self.child_delay, fresh=True)

    def _read_start_later(self, namespace: str, pod: str, owner: str, container: str) -> None:
        with self._guard:
            self._start_pending += 1
            while len(self._start_readers) < START_READERS:
                thread = threading.Thread(
                    target=self._start_reader, name=f"start-read-{len(self._start_readers)}", daemon=True
                )
                thread.start()
                self._start_readers.append(thread)
        self._start_jobs.put((namespace, pod, owner, container))

    def _start_reader(self) -> None:
        while True:
            job = self._start_jobs.get()
            if job is None:
                return
            try:
                self._read_start(*job)
            finally:
                with self._start_idle:
                    self._start_pending -= 1
                    self._start_idle.notify_all()

    def _read_start(self, namespace: str, pod: str, owner: str, container: str) -> None:
        """Read a Ready pod's start line (the head of its runtime container's log) into the CR's newest
        cold / warm start, and queue the CR when that changed. A pod without the line (a node that serves
        no logs, an older runtime) adds nothing; a transient failure is retried, then left to the next
        Ready container of that pod."""
        text = None
        for attempt in range(START_READ_ATTEMPTS):
            try:
                text = self.client.pod_log(namespace, pod, RUNTIME_CONTAINER, limit_bytes=START_LOG_BYTES)
                break
            except ApiError as error:
                if error.permanent or attempt == START_READ_ATTEMPTS - 1:
                    log.info(f"start line of pod {namespace}/{pod} unreadable: {error}")
                    if not error.permanent:
                        with self._guard:  # a later event of this container may try again
                            if self._start_read.get((namespace, pod)) == container:
                                del self._start_read[(namespace, pod)]
                    return
                time.sleep(START_READ_RETRY)
            except Exception as error:  # a bug: never let a log read take a thread down
                log.exception(f"start line of pod {namespace}/{pod}: {error}")
                return
        record = parse_ready_line(text or "")
        if record is None:
            log.info(f"pod {namespace}/{pod}: no start line in its log (a node that serves no logs?)")
            return
        log.info(f"pod {namespace}/{pod}: {record['start']} start, ready after {record['seconds']}s")
        key = (namespace, owner)
        with self._guard:
            before = self._starts.get(key)
            after = statuses.add_start(before, pod, record)
            if after is not None:
                self._starts[key] = after
        if after != before:
            self.enqueue(namespace, owner, fresh=True)

    def wait_start_reads(self, timeout: float = 10.0) -> bool:
        """Wait for the start-line reads queued or in flight (tests, before draining the queue)."""
        with self._start_idle:
            return self._start_idle.wait_for(lambda: self._start_pending == 0, timeout)

    def pods_of(self, namespace: str, name: str) -> list[dict]:
        with self._guard:
            return [
                p
                for (ns, _), p in self._pods.items()
                if ns == namespace and p["metadata"]["labels"].get(OWNER_LABEL) == name
            ]

    def enqueue(self, namespace: str, name: str, delay: float = 0.0, fresh: bool = False) -> None:
        if fresh:
            with self._guard:
                self._fresh.add((namespace, name))
        self.queue.add((namespace, name), delay)
        metrics.QUEUE_DEPTH.set(len(self.queue))

    # ---- workers --------------------------------------------------------------------------------

    def start(self, workers: int) -> None:
        for i in range(workers):
            thread = threading.Thread(target=self._work, name=f"reconcile-{i}", daemon=True)
            thread.start()
            self._workers.append(thread)

    def stop(self) -> None:
        self.queue.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        with self._guard:
            readers = len(self._start_readers)
        for _ in range(readers):
            self._start_jobs.put(None)

    def _work(self) -> None:
        while True:
            key = self.queue.get()
            if key is None:
                return
            self.process(key)  # type: ignore[arg-type]

    def _versions(self, key: CrKey) -> tuple[int, ...]:
        """resourceVersions of the CR and its children as cached (the inputs of a reconcile)."""
        with self._guard:
            children = self._child_keys.get(key, [])
            return (
                resource_version(self._crs.get(key)),
                *(resource_version(self._children.get(c)) for c in children),
            )

    def process(self, key: CrKey) -> None:
        """Run one queued key (by a worker, or a test's `drain`), requeueing on transient errors.

        A key whose CR and children are at the versions the last reconcile ended with is skipped:
        that run was queued by the watch echo of our own writes (the event can arrive before the
        write's answer, so the echo is not always recognised when it arrives)."""
        namespace, name = key
        with self._guard:
            fresh = key in self._fresh
            self._fresh.discard(key)
            seen = self._seen.get(key)
            retrying = key in self._failures  # a retry folded into this run must not be skipped
        try:
            if not fresh and not retrying and seen is not None and seen == self._versions(key):
                with self._guard:
                    self.skipped += 1
                metrics.RECONCILES_SKIPPED.inc()
                return
            result = self.reconcile(namespace, name, fresh=fresh)
            versions = self._versions(key)
            with self._guard:
                self._seen[key] = versions
                attempt = self._failures.pop(key, 0) + 1 if result == "refused" else 0
                if attempt:
                    self._failures[key] = attempt
            if attempt:  # a refused child (RBAC may be fixed, a webhook may change): retried, slowly
                self.enqueue(namespace, name, delay=min(self.max_backoff, REFUSED_RETRY * 2 ** (attempt - 1)))
        except ApiError as error:
            with self._guard:
                self._seen.pop(key, None)
                attempt = self._failures.get(key, 0) + 1
                self._failures[key] = attempt
            delay = min(self.max_backoff, 0.5 * 2 ** (attempt - 1))
            log.warning(
                f"reconcile of {namespace}/{name} failed (attempt {attempt}, retry in {delay:.1f}s): {error}"
            )
            self.enqueue(namespace, name, delay=delay, fresh=True)
        except Exception as error:  # a bug: never let one object take the operator down
            with self._guard:
                self._seen.pop(key, None)
            log.exception(f"reconcile of {namespace}/{name} crashed: {error}")
        finally:
            self.queue.done(key)
            metrics.QUEUE_DEPTH.set(len(self.queue))

    def drain(self, timeout: float = 10.0, horizon: float = 1.0) -> int:
        """Run queued keys in this thread until none is due within `horizon` seconds (tests); returns
        how many reconciles ran (queued keys skipped as echoes of our own writes not counted)."""
        before = self.reconciles
        deadline = time.monotonic() + timeout
        while True:
            self.wait_start_reads(max(0.0, deadline - time.monotonic()))
            wait = self.queue.next_due()
            if wait is None or wait > horizon:
                return self.reconciles - before
            key = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            if key is None:
                raise TimeoutError(f"queue not drained within {timeout}s")
            self.process(key)  # type: ignore[arg-type]

    def resync(self, namespaces: list[str] | None) -> None:
        """Queue every DiffusionDeployment for a fresh, level-triggered pass (writes only on drift)."""
        scopes: list[str | None] = list(namespaces) if namespaces else [None]
        for ns in scopes:
            try:
                items = self.client.list(CR_API, CR_KIND, ns)
            except Exception as error:  # the API server may be briefly away
                log.warning(f"resync list failed: {error}")
                continue
            for item in items:
                meta = item["metadata"]
                self.remember_cr(item)
                self.enqueue(meta["namespace"], meta["name"], fresh=True)

    def start_resync(
        self, namespaces: list[str] | None, interval: float, stop: threading.Event
    ) -> threading.Thread | None:
        """A periodic resync in a plain thread (kopf timers would put a finalizer on every object)."""
        if interval <= 0:
            return None

        def loop() -> None:
            while not stop.wait(interval):
                self.resync(namespaces)

        thread = threading.Thread(target=loop, name="resync", daemon=True)
        thread.start()
        return thread

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

    def _read_cr(self, namespace: str, name: str, fresh: bool) -> dict | None:
        if not fresh:
            with self._guard:
                cached = self._crs.get((namespace, name))
            if cached is not None:
                return cached
        cr = self.client.get(CR_API, CR_KIND, namespace, name)
        if cr is not None:
            self.remember_cr(cr)
        return cr

    def _observed(self, obj: dict, fresh: bool) -> dict | None:
        meta = obj["metadata"]
        if not fresh:
            cached = self.cached_child(obj["kind"], meta["namespace"], meta["name"])
            if cached is not None:
                return cached
        observed = self.client.get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        if observed is None:
            self.forget_child(obj["kind"], meta["namespace"], meta["name"])
        else:
            self.remember_child(observed)
        return observed

    def _write_status(self, cr: dict, status: dict) -> None:
        meta = cr["metadata"]
        written = self.client.patch_status(meta["namespace"], meta["name"], status)
        if written:
            self.remember_cr(written)

    def _reconcile(self, namespace: str, name: str, fresh: bool) -> str:
        key = (namespace, name)
        cr = self._read_cr(namespace, name, fresh)
        if cr is None or cr["metadata"].get("deletionTimestamp"):
            self.forget_cr(namespace, name)
            return "gone"  # children are garbage-collected through their owner references
        generation = cr["metadata"].get("generation", 1)
        old_status = cr.get("status") or {}
        parsed = validation.parse(name, namespace, cr.get("spec"))
        engine_errors = self.engine_errors(parsed.cr) if parsed.ok and parsed.cr is not None else []
        if not parsed.ok or parsed.cr is None or engine_errors:
            if engine_errors:  # the cluster may gain KEDA: look again once discovery is stale
                self.enqueue(namespace, name, delay=max(self.discovery_ttl, REFUSED_RETRY), fresh=True)
            new_status = statuses.invalid_status(old_status, generation, parsed.errors + engine_errors)
            if not statuses.same_status(old_status, new_status):
                self._write_status(cr, new_status)
                self._event_once(cr, old_status, new_status, statuses.CONFIG_VALID, "InvalidSpec")
                log.warning(
                    "invalid spec",
                    extra={
                        "dd": f"{namespace}/{name}",
                        "errors": condition_message(new_status, statuses.CONFIG_VALID),
                    },
                )
            with self._guard:
                self._invalid.add(key)
            self._update_gauges()
            return "invalid"
        with self._guard:
            self._invalid.discard(key)
        dd = parsed.cr
        # a CR never reconciled before (no status yet) has no children: apply without reading first
        first = not old_status.get("observedGeneration")
        cache = self._model_cache(dd, cr, old_status, fresh, first) if dd.spec.model.cache else None
        cache_ready = cache is None or cache["phase"] == cache_statuses.CACHE_READY
        desired = [
            with_spec_hash(obj)
            for obj in builders.build_all(
                dd, cr, model_cache_ready=cache_ready, keda_prometheus_address=self.keda_prometheus_address
            )
        ]
        observed = {obj["kind"]: None if first else self._observed(obj, fresh) for obj in desired}
        stale = [obj for obj in desired if needs_apply(obj, observed[obj["kind"]])]
        serving = observed.get("Deployment")
        if not cache_ready and serving is not None and (serving.get("spec") or {}).get("replicas", 1):
            # a new model (revision, variant) is downloading while pods serve the previous one from the
            # same claim: they keep their configuration until the new folder is complete
            stale = [obj for obj in stale if obj["kind"] not in ("ConfigMap", "Deployment")]
        apply_error: tuple[str, str] | None = None
        retry: ApiError | None = None
        applied: list[str] = []
        try:
            if first:  # nothing exists yet: every child at once (one round trip, not four)
                answers = self._apply_parallel(stale)
                observed.update(answers)
                applied += list(answers)
            else:
                if any(observed[obj["kind"]] is not None for obj in stale):
                    for obj in stale:  # running children stay as they are unless every change passes
                        self._apply(obj, dry_run=True)
                for obj in stale:
                    observed[obj["kind"]] = self._apply(obj)
                    applied.append(obj["kind"])
        except ApiError as error:
            if not error.permanent:
                with self._guard:
                    attempts = self._failures.get(key, 0)
                if attempts < REPORT_TRANSIENT_AFTER - 1:
                    raise  # retried with backoff; reported in status once it keeps failing
                retry = error
            apply_error = (error.code, f"{error.kind_name}: {error.reason}")
            metrics.RECONCILE_ERRORS.labels(error=str(error.status)).inc()
        if apply_error is None:
            self._delete_unwanted_autoscalers(cr, dd, fresh)
        with self._guard:
            self._managed[key] = len(desired)
            self._child_keys[key] = [
                (o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) for o in desired
            ]
        configmap = desired[0]
        new_status = statuses.valid_status(
            old_status,
            generation,
            None if dd.spec.autoscaling else funcs.replicas(dd.spec),
            observed.get("Deployment"),
            builders.selector_string(name),
            builders.endpoint(dd),
            builders.deployment.config_hash(configmap["data"]),
            funcs.cache_tag(funcs.cache_dit_config(dd.spec)),
            apply_error=apply_error,
            gate_pods=self.pods_of(namespace, name) if funcs.quality_gate_on(dd.spec) else None,
        )
        if cache is not None:
            new_status = cache_statuses.gate_ready_condition(
                {**new_status, "modelCache": cache}, cache, generation
            )
        with self._guard:
            starts = self._starts.get(key)
        # a start older than this CR was a pod of an earlier one of the same name (a read that finished
        # after that one was forgotten)
        created = str(cr["metadata"].get("creationTimestamp") or "")
        starts = {k: v for k, v in (starts or {}).items() if str(v.get("at", "")) >= created}
        startup = statuses.merge_startup(old_status.get("startup"), starts)
        if startup is not None:
            new_status["startup"] = startup
        if not statuses.same_status(old_status, new_status):
            self._write_status(cr, new_status)
            self._event_once(cr, old_status, new_status, statuses.SYNCED, "ApplyFailed")
            self._event_once(cr, old_status, new_status, statuses.QUALITY_GATE, "QualityGateFailed")
            if cache is not None:
                for type_, reason, message in cache_statuses.cache_events(
                    old_status.get("modelCache"), cache
                ):
                    self.client.post_event(cr, type_, reason, message)
            log.debug("status written", extra={"dd": f"{namespace}/{name}", "status": new_status})
        if applied:
            log.info("applied children", extra={"dd": f"{namespace}/{name}", "applied": applied})
        if apply_error is not None:
            log.warning("a child was refused", extra={"dd": f"{namespace}/{name}", "error": apply_error[1]})
        self._update_gauges()
        if (
            cache is not None
            and self.cache_poll is not None
            and cache["phase"] in (cache_statuses.PENDING, cache_statuses.DOWNLOADING)
        ):
            # bytes move without any event: look again (fresh, so the echo check does not skip it)
            self.enqueue(namespace, name, delay=self.cache_poll, fresh=True)
        if retry is not None:
            raise retry
        return "ok" if apply_error is None else "refused"

    def _model_cache(
        self, dd: DiffusionDeployment, cr: dict, old_status: dict, fresh: bool, first: bool
    ) -> dict:
        """status.modelCache: the download Job's phase, with bytes from its pods' progress lines."""
        from diffusion_operator.builders import modelcache

        job_obj = builders.build_download_job(dd, cr)
        pvc_obj = builders.build_model_cache_pvc(dd, cr)
        job_name = job_obj["metadata"]["name"]
        job = pvc = None
        if not first:
            job, pvc = self._observed(job_obj, fresh), self._observed(pvc_obj, fresh)
        old = old_status.get("modelCache") or {}
        done = job is not None and cache_statuses.job_finished(job)
        if (
            done
            and old.get("jobName") == job_name
            and old.get("phase")
            in (
                cache_statuses.CACHE_READY,
                cache_statuses.FAILED,
            )
        ):
            pods: list[dict] | None = None  # finished before: the figures in status stay as they were
        else:
            pods = self._download_pods(dd.namespace, job_name) if job is not None else None
        tail = None
        running = [p for p in pods or [] if (p.get("status") or {}).get("phase") == "Running"]
        if running:
            try:
                tail = self.client.pod_log(
                    dd.namespace, running[-1]["metadata"]["name"], modelcache.DOWNLOAD_CONTAINER,
                    DOWNLOAD_LOG_TAIL_LINES,
                )  # fmt: skip
            except ApiError as error:
                log.debug(f"download log of {job_name} unreadable: {error}")
        status = cache_statuses.model_cache_status(
            pvc_obj["metadata"]["name"], job_name, modelcache.model_path_in_pod(dd), job, pvc, pods, tail
        )
        if pods is None and old.get("jobName") == job_name and old.get("phase") == status["phase"]:
            status = {
                **old,
                **{k: v for k, v in status.items() if k in ("phase", "message", "failedAttempts")},
            }
        return status

    def _download_pods(self, namespace: str, job_name: str) -> list[dict] | None:
        """The Job's pods (read-only; None when they cannot be read: the phase does not need them)."""
        try:
            return self.client.pods(namespace, f"job-name={job_name}")
        except ApiError as error:
            log.debug(f"pods of {job_name} unreadable: {error}")
            return None

    def _apply(self, obj: dict, dry_run: bool = False) -> dict:
        try:
            answer = self.client.apply(obj, dry_run=dry_run)
        except ApiError as error:
            error.kind_name = f"{obj['kind']} {obj['metadata']['name']}"
            raise
        if not dry_run:
            self.remember_child(answer)
        return answer

    def _apply_parallel(self, objs: list[dict]) -> dict[str, dict]:
        """Apply independent objects concurrently; on errors, the first failing one in `objs` order
        is raised (after every request finished), so a permanent error wins over nothing."""
        if len(objs) <= 1:
            return {o["kind"]: self._apply(o) for o in objs}
        with self._guard:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="apply")
            pool = self._pool
        futures = [(o["kind"], pool.submit(self._apply, o)) for o in objs]
        answers: dict[str, dict] = {}
        errors: list[ApiError] = []
        for kind, future in futures:
            try:
                answers[kind] = future.result()
            except ApiError as error:
                errors.append(error)
        transient = [e for e in errors if not e.permanent]
        if transient:
            raise transient[0]
        if errors:
            raise errors[0]
        return answers

    def _delete_unwanted_autoscalers(self, cr: dict, dd: DiffusionDeployment, fresh: bool) -> None:
        """Delete the autoscaler no longer wanted: both when spec.autoscaling is removed, the other
        engine's when the engine is switched (an HPA and KEDA's HPA must never drive one Deployment).
        ScaledObjects are looked up only when KEDA is served (discovery), else there are none."""
        namespace, name = cr["metadata"]["namespace"], cr["metadata"]["name"]
        wanted = dd.spec.autoscaling.engine if dd.spec.autoscaling is not None else None
        for engine, (api_version, kind) in AUTOSCALERS.items():
            if engine == wanted or (engine == "keda" and not self.keda_available()):
                continue
            # not fresh: every HPA of ours is in the cache (kopf lists and watches them); ScaledObjects
            # are not watched (their CRD may come and go), the cache holds our own applies and the
            # fresh passes (start, resync) read the API server
            obj = self.client.get(api_version, kind, namespace, name) if fresh else None
            obj = obj or self.cached_child(kind, namespace, name)
            if obj is not None and owned_by(obj, cr):
                self.client.delete(api_version, kind, namespace, name)
                self.forget_child(kind, namespace, name)

    def _event_once(self, cr: dict, old_status: dict, new_status: dict, type_: str, reason: str) -> None:
        """A Warning event when the condition's failure message is new (once per distinct message)."""
        message = condition_message(new_status, type_)
        if message and message != condition_message(old_status, type_):
            self.client.post_event(cr, "Warning", reason, message)

    def _update_gauges(self) -> None:
        with self._guard:
            invalid, managed = len(self._invalid), dict(self._managed)
        metrics.INVALID_SPECS.set(invalid)
        metrics.MANAGED_OBJECTS.labels(kind=CR_KIND).set(len(managed) + invalid)
        metrics.MANAGED_OBJECTS.labels(kind="children").set(sum(managed.values()))
