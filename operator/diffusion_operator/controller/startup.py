"""Start lines: status.startup from the runtime's start line (diffusion_runtime.contract.lines) in the head of
each Ready serving container's log, read once per container by a small pool of threads (off the
reconcile workers, so a node that serves logs slowly blocks nothing).

A start newer than what the CR's status shows queues the CR; a pod without the line (a node that serves
no logs, an older runtime) adds nothing; a transient failure is retried, then left to the next Ready
container of that pod.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from queue import SimpleQueue

from diffusion_runtime.contract.lines import parse_ready_line

from diffusion_operator import status as statuses
from diffusion_operator.builders.deployment import RUNTIME_CONTAINER
from diffusion_operator.kube import ApiError, KubeClient

log = logging.getLogger("diffusion_operator")

# a serving pod's start line follows only its start-up logging: read once per container from the head
# of its log, at most this much
START_LOG_BYTES = 1 << 20
# a start line read that failed for a transient reason (5xx, connection) is tried this often, so far apart
START_READ_ATTEMPTS, START_READ_RETRY = 3, 2.0
START_READERS = 2  # threads reading start lines (daemons: a slow log read never holds up the exit)


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


class StartLines:
    """The container of each pod whose start line was read (or is being read), and the newest cold and
    warm start found per CR. `changed(namespace, name)` is called when a CR's starts changed."""

    def __init__(self, client: Callable[[], KubeClient], changed: Callable[[str, str], None]) -> None:
        self._client = client
        self._changed = changed
        self._lock = threading.Lock()
        self._read: dict[tuple[str, str], str] = {}  # (namespace, pod) -> container read
        self._starts: dict[tuple[str, str], dict] = {}  # (namespace, CR name) -> status.startup records
        self._jobs: SimpleQueue[tuple[str, str, str, str] | None] = SimpleQueue()
        self._readers: list[threading.Thread] = []
        self._pending = 0
        self._idle = threading.Condition(self._lock)

    def saw(self, namespace: str, pod: str, owner: str, ready: str | None, gone: bool) -> None:
        """A pod event: a runtime container not read before that is Ready has its start line read."""
        key = (namespace, pod)
        with self._lock:
            read = ready is not None and self._read.get(key) != ready
            if gone:
                self._read.pop(key, None)
            elif read:
                self._read[key] = str(ready)
        if read:
            self._read_later(namespace, pod, owner, str(ready))

    def forget(self, namespace: str, name: str) -> None:
        """The CR is gone."""
        with self._lock:
            self._starts.pop((namespace, name), None)

    def status(self, cr: dict, old_status: dict) -> dict | None:
        """status.startup: what it showed, merged with the starts read since. A start older than the CR
        was a pod of an earlier one of the same name (a read that finished after that one was forgotten)."""
        meta = cr["metadata"]
        with self._lock:
            starts = self._starts.get((meta["namespace"], meta["name"]))
        created = str(meta.get("creationTimestamp") or "")
        starts = {k: v for k, v in (starts or {}).items() if str(v.get("at", "")) >= created}
        return statuses.merge_startup(old_status.get("startup"), starts)

    def wait(self, timeout: float = 10.0) -> bool:
        """Wait for the reads queued or in flight (tests, before draining the queue)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def stop(self) -> None:
        with self._lock:
            readers = len(self._readers)
        for _ in range(readers):
            self._jobs.put(None)

    def _read_later(self, namespace: str, pod: str, owner: str, container: str) -> None:
        with self._lock:
            self._pending += 1
            while len(self._readers) < START_READERS:
                thread = threading.Thread(
                    target=self._reader, name=f"start-read-{len(self._readers)}", daemon=True
                )
                thread.start()
                self._readers.append(thread)
        self._jobs.put((namespace, pod, owner, container))

    def _reader(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._read_start(*job)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _read_start(self, namespace: str, pod: str, owner: str, container: str) -> None:
        """Read a Ready pod's start line into the CR's newest cold / warm start; queue the CR when that
        changed."""
        text = None
        for attempt in range(START_READ_ATTEMPTS):
            try:
                text = self._client().pod_log(namespace, pod, RUNTIME_CONTAINER, limit_bytes=START_LOG_BYTES)
                break
            except ApiError as error:
                if error.permanent or attempt == START_READ_ATTEMPTS - 1:
                    log.info(f"start line of pod {namespace}/{pod} unreadable: {error}")
                    if not error.permanent:
                        with self._lock:  # a later event of this container may try again
                            if self._read.get((namespace, pod)) == container:
                                del self._read[(namespace, pod)]
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
        with self._lock:
            before = self._starts.get(key)
            after = statuses.add_start(before, pod, record)
            if after is not None:
                self._starts[key] = after
        if after != before:
            self._changed(namespace, owner)
