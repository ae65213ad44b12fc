"""The work loop: the keyed work queue (workqueue.py), its worker threads, backoff, the echo skip
check and the periodic resync (a plain thread: kopf timers would put a finalizer on every object).

Errors: transient API errors (conflict, throttling, 5xx, connection) are retried with exponential
backoff (0.5 s doubling up to max_backoff); a child refused for good is tried again after
REFUSED_RETRY seconds, doubling up to max_backoff. A queued key whose CR and children are at the
versions the last reconcile ended with is skipped: the watch echo of our own writes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from diffusion_operator.controller.informers import CrKey
from diffusion_operator.controller.workqueue import WorkQueue
from diffusion_operator.kube import ApiError
from diffusion_operator.metrics import OperatorMetrics

log = logging.getLogger("diffusion_operator")

# a child refused for good is tried again after 5 s, doubling up to max_backoff (no new event or
# status write while the message stays the same)
REFUSED_RETRY = 5.0

Run = Callable[[str, str, bool], str]  # (namespace, name, fresh) -> ok | invalid | refused | gone


class WorkLoop:
    def __init__(
        self,
        run: Run,
        versions: Callable[[CrKey], tuple[int, ...]],
        settle: Callable[[float], bool],
        max_backoff: float,
        metrics: OperatorMetrics,
        seen: Callable[[CrKey], tuple[int, ...]] | None = None,
    ) -> None:
        self._run = run
        self._versions = versions  # resourceVersions of a CR and its children, as cached
        # the versions a run worked from (default: as cached when it ends); a child that moved during
        # the run by someone else's write must not count as seen, or its event's run is skipped
        self._seen_by_run = seen or versions
        self._settle = settle  # waits for background work that may queue keys (drain, in tests)
        self.max_backoff = max_backoff
        self.metrics = metrics
        self.queue = WorkQueue()
        self._lock = threading.Lock()
        self._fresh: set[CrKey] = set()  # queued keys whose next run reads everything fresh
        self._forced: set[CrKey] = set()  # queued keys whose next run is not skipped as an echo
        self._failures: dict[CrKey, int] = {}
        self._seen: dict[CrKey, tuple[int, ...]] = {}  # versions the last reconcile ended with
        self.runs = 0
        self.skipped = 0
        self._workers: list[threading.Thread] = []

    def enqueue(
        self, namespace: str, name: str, delay: float = 0.0, fresh: bool = False, force: bool = False
    ) -> None:
        """`fresh`: the run reads the CR and its children from the API server; `force`: it runs even
        when the cached versions are those the last run ended with (a resync whose lists refreshed
        the caches just before)."""
        if fresh or force:
            with self._lock:
                (self._fresh if fresh else self._forced).add((namespace, name))
        self.queue.add((namespace, name), delay)
        self.metrics.queue_depth.set(len(self.queue))

    def failures(self, key: CrKey) -> int:
        """Failed attempts of `key` so far (0 after a success)."""
        with self._lock:
            return self._failures.get(key, 0)

    def forget(self, key: CrKey) -> None:
        with self._lock:
            self._failures.pop(key, None)
            self._seen.pop(key, None)

    # ---- workers --------------------------------------------------------------------------------

    def start(self, workers: int) -> None:
        for i in range(workers):
            thread = threading.Thread(target=self._work, name=f"reconcile-{i}", daemon=True)
            thread.start()
            self._workers.append(thread)

    def stop(self) -> None:
        self.queue.close()

    def _work(self) -> None:
        while True:
            key = self.queue.get()
            if key is None:
                return
            self.process(key)  # type: ignore[arg-type]

    def process(self, key: CrKey) -> None:
        """Run one queued key (by a worker, or a test's `drain`), requeueing on transient errors.

        A key whose CR and children are at the versions the last reconcile ended with is skipped:
        that run was queued by the watch echo of our own writes (the event can arrive before the
        write's answer, so the echo is not always recognised when it arrives)."""
        namespace, name = key
        with self._lock:
            fresh = key in self._fresh
            self._fresh.discard(key)
            forced = key in self._forced
            self._forced.discard(key)
            seen = self._seen.get(key)
            retrying = key in self._failures  # a retry folded into this run must not be skipped
        try:
            if not (fresh or forced or retrying) and seen is not None and seen == self._versions(key):
                with self._lock:
                    self.skipped += 1
                self.metrics.reconciles_skipped.inc()
                return
            with self._lock:
                self.runs += 1
            result = self._run(namespace, name, fresh)
            versions = self._seen_by_run(key)
            with self._lock:
                self._seen[key] = versions
                attempt = self._failures.pop(key, 0) + 1 if result == "refused" else 0
                if attempt:
                    self._failures[key] = attempt
            if attempt:  # a refused child (RBAC may be fixed, a webhook may change): retried, slowly
                self.enqueue(namespace, name, delay=min(self.max_backoff, REFUSED_RETRY * 2 ** (attempt - 1)))
        except ApiError as error:
            with self._lock:
                self._seen.pop(key, None)
                attempt = self._failures.get(key, 0) + 1
                self._failures[key] = attempt
            delay = min(self.max_backoff, 0.5 * 2 ** (attempt - 1))
            log.warning(
                f"reconcile of {namespace}/{name} failed (attempt {attempt}, retry in {delay:.1f}s): {error}"
            )
            self.enqueue(namespace, name, delay=delay, fresh=True)
        except Exception as error:  # a bug: never let one object take the operator down
            with self._lock:
                self._seen.pop(key, None)
            log.exception(f"reconcile of {namespace}/{name} crashed: {error}")
        finally:
            self.queue.done(key)
            self.metrics.queue_depth.set(len(self.queue))

    def drain(self, timeout: float = 10.0, horizon: float = 1.0) -> int:
        """Run queued keys in this thread until none is due within `horizon` seconds (tests); returns
        how many reconciles ran (queued keys skipped as echoes of our own writes not counted)."""
        before = self.runs
        deadline = time.monotonic() + timeout
        while True:
            self._settle(max(0.0, deadline - time.monotonic()))
            wait = self.queue.next_due()
            if wait is None or wait > horizon:
                return self.runs - before
            key = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            if key is None:
                raise TimeoutError(f"queue not drained within {timeout}s")
            self.process(key)  # type: ignore[arg-type]

    # ---- resync ---------------------------------------------------------------------------------

    def start_resync(
        self, resync: Callable[[], object], interval: float, stop: threading.Event
    ) -> threading.Thread | None:
        """Call `resync` every `interval` seconds until `stop` is set (interval <= 0: never)."""
        if interval <= 0:
            return None

        def loop() -> None:
            while not stop.wait(interval):
                resync()

        thread = threading.Thread(target=loop, name="resync", daemon=True)
        thread.start()
        return thread
