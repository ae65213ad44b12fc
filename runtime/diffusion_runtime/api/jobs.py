"""Async jobs (`Prefer: respond-async`) and served results (`response_format: url`), in memory.

Both stores are bounded: an unfinished job is never dropped (their number is bounded by the queue),
finished jobs and results are kept for at most `server.job_ttl_seconds`, at most `server.max_jobs`
of them (results: `max_jobs * max_n` images) and at most `server.store_max_bytes` of image data each,
oldest first out. A job or result the pod no longer knows answers 404 with the reason: the rule that
evicted it (the last `EVICTED_REMEMBERED` evictions of each store are remembered), else the rules.

Each job and result belongs to the API key name that created it (`owner`, `api.auth`; None when auth
is off): asked with another key, it is unknown, the same 404 as one never submitted (an eviction's
reason is told only to its owner).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

from diffusion_runtime.api.protocol import ErrorDetail, ImagesResponse, JobProgress, JobStatus
from diffusion_runtime.engine.scheduler import Scheduler, Work

log = logging.getLogger("diffusion_runtime")
FINAL = ("succeeded", "failed", "cancelled")
EVICTED_REMEMBERED = 4096  # evicted ids (and why) each store remembers for its 404s: ~100 bytes each


class Evicted:
    """The reasons of the most recent evictions of one store, with their owners, bounded."""

    def __init__(self, limit: int = EVICTED_REMEMBERED) -> None:
        self.limit = limit
        self._why: collections.OrderedDict[str, tuple[str | None, str]] = collections.OrderedDict()

    def add(self, key: str, why: str, owner: str | None = None) -> None:
        self._why[key] = (owner, why)
        while len(self._why) > self.limit:
            self._why.popitem(last=False)

    def get(self, key: str, owner: str | None = None) -> str | None:
        """Why `key` was evicted, if `owner` (the caller's key name) created it."""
        item = self._why.get(key)
        return item[1] if item is not None and item[0] == owner else None


def _result_bytes(result: ImagesResponse | None) -> int:
    if result is None:
        return 0
    return sum(len(d.b64_json or "") for d in result.data)


@dataclass(eq=False)
class Job:
    endpoint: Literal["generations", "edits"]
    work: Work
    webhook: str | None = None
    owner: str | None = None  # the creating request's key name (api.auth); None: auth off
    id: str = field(default_factory=lambda: "imgjob_" + uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    final: Literal["succeeded", "failed", "cancelled"] | None = None  # once finished
    result: ImagesResponse | None = None
    error: ErrorDetail | None = None
    cancel_requested: bool = False
    task: asyncio.Task | None = None
    nbytes: int = 0

    def finish(
        self,
        status: Literal["succeeded", "failed", "cancelled"],
        result: ImagesResponse | None = None,
        error: ErrorDetail | None = None,
    ) -> None:
        self.final, self.result, self.error = status, result, error
        self.finished_at = time.time()
        self.nbytes = _result_bytes(result)

    def view(self, scheduler: Scheduler) -> JobStatus:
        """The JobStatus body."""
        w = self.work
        status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
        if self.final:
            status = self.final
        elif scheduler.is_running(w):
            status = "running"
        else:
            status = "queued"
        if w.started and self.started_at is None:
            self.started_at = self.created_at + (w.started - w.enqueued)
        return JobStatus(
            id=self.id,
            endpoint=self.endpoint,
            status=status,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            queue_position=scheduler.position(w) if status == "queued" else None,
            progress=JobProgress(
                step=w.step, total_steps=w.total_steps, cancel_requested_at_step=w.cancel_step
            ),
            cancel_requested=self.cancel_requested,
            result=self.result,
            error=self.error,
        )


class _Held(Protocol):
    """What a bounded store reads of its entries (read-only, so each entry type keeps its own Literals)."""

    @property
    def id(self) -> str: ...
    @property
    def owner(self) -> str | None: ...
    @property
    def final(self) -> str | None: ...
    @property
    def finished_at(self) -> float | None: ...
    @property
    def nbytes(self) -> int: ...


H = TypeVar("H", bound=_Held)


class BoundedStore(Generic[H]):
    """Entries of this pod by id, owned by an API key name: unfinished ones are never dropped; finished
    ones go after `ttl_seconds`, beyond the `max_finished` most recent, and oldest first while their
    bytes exceed `max_bytes` (the newest finished entry stays whatever its size, so its client can read
    what it waited for). A subclass names its entries in the 404 reasons."""

    noun = "entry"  # "job 'imgjob_…' is not known to this pod"
    plural = "entries"
    created = "never created here"
    gone = "was evicted from this pod"
    held = "the finished entries"  # "... exceeded N bytes (setting)"
    bytes_of = "data"  # "... or N bytes of <bytes_of>"
    bytes_setting = "server.store_max_bytes"

    def __init__(self, max_finished: int, ttl_seconds: float, max_bytes: int):
        self.max_finished = max_finished
        self.ttl = ttl_seconds
        self.max_bytes = max_bytes
        self._jobs: collections.OrderedDict[str, H] = collections.OrderedDict()
        self.evicted = Evicted()

    def add(self, job: H) -> None:
        self.prune()
        self._jobs[job.id] = job

    def get(self, job_id: str, owner: str | None = None) -> H | None:
        """The entry, if `owner` (the caller's key name) created it."""
        self.prune()
        job = self._jobs.get(job_id)
        return job if job is not None and job.owner == owner else None

    def remove(self, job: H, why: str) -> None:
        if self._jobs.pop(job.id, None) is not None:
            self.evicted.add(job.id, why, job.owner)

    def owned(self, owner: str | None) -> list[H]:
        """The owner's entries, oldest first."""
        self.prune()
        return [j for j in self._jobs.values() if j.owner == owner]

    @property
    def held_bytes(self) -> int:
        return sum(j.nbytes for j in self._jobs.values())

    def prune(self) -> None:
        now = time.time()
        finished = [j for j in self._jobs.values() if j.final]
        why: dict[str, str] = {}
        for j in finished:
            if j.finished_at is not None and now - j.finished_at > self.ttl:
                why[j.id] = f"it finished more than {self.ttl:g}s ago (server.job_ttl_seconds)"
        keep = sorted((j for j in finished if j.id not in why), key=lambda j: j.finished_at or 0.0)
        for j in keep[: max(0, len(keep) - self.max_finished)]:
            why[j.id] = f"{self.max_finished} more recent {self.plural} finished after it (server.max_jobs)"
        held = sum(j.nbytes for j in keep if j.id not in why)
        for j in keep[:-1]:  # oldest first; the newest finished entry stays whatever its size
            if held <= self.max_bytes:
                break
            if j.id not in why:
                why[j.id] = (
                    f"{self.held} exceeded {self.max_bytes} bytes ({self.bytes_setting}): oldest out first"
                )
                held -= j.nbytes
        for job_id, reason in why.items():
            self.remove(self._jobs[job_id], reason)

    def unknown_reason(self, job_id: str, owner: str | None = None) -> str:
        why = self.evicted.get(job_id, owner)
        if why is not None:
            return f"{self.noun} {job_id!r} {self.gone}: {why}"
        return (
            f"{self.noun} {job_id!r} is not known to this pod: {self.created}, or finished more than "
            f"{self.ttl:g}s ago or beyond the {self.max_finished} most recent or {self.max_bytes} bytes "
            f"of {self.bytes_of} (server.job_ttl_seconds, server.max_jobs, {self.bytes_setting})"
        )


class JobStore(BoundedStore[Job]):
    noun, plural, created, gone = "job", "jobs", "never submitted here", "was evicted from this pod"
    held, bytes_of, bytes_setting = "the finished jobs' images", "results", "server.store_max_bytes"


class ResultStore:
    """Encoded images served at /v1/images/results/{id} for `response_format: url`."""

    def __init__(self, max_items: int, ttl_seconds: float, max_bytes: int):
        self.max_items = max_items
        self.ttl = ttl_seconds
        self.max_bytes = max_bytes
        self.nbytes = 0
        # id -> (image, format, stored at, owner key name)
        self._items: collections.OrderedDict[str, tuple[bytes, str, float, str | None]] = (
            collections.OrderedDict()
        )
        self.evicted = Evicted()

    def put(self, data: bytes, fmt: str, owner: str | None = None) -> str:
        self.prune()
        rid = f"img_{uuid.uuid4().hex}.{fmt}"
        self._items[rid] = (data, fmt, time.time(), owner)
        self.nbytes += len(data)
        while len(self._items) > 1 and (len(self._items) > self.max_items or self.nbytes > self.max_bytes):
            if len(self._items) > self.max_items:
                why = f"{self.max_items} more recent images were stored after it (server.max_jobs * server.max_n)"
            else:
                why = f"the stored images exceeded {self.max_bytes} bytes (server.store_max_bytes): oldest out first"
            self._drop_oldest(why)
        return rid

    def _drop_oldest(self, why: str) -> None:
        rid, (data, _, _, owner) = self._items.popitem(last=False)
        self.nbytes -= len(data)
        self.evicted.add(rid, why, owner)

    def get(self, rid: str, owner: str | None = None) -> tuple[bytes, str] | None:
        """The image, if `owner` (the caller's key name) created it."""
        self.prune()
        item = self._items.get(rid)
        return (item[0], item[1]) if item and item[3] == owner else None

    def prune(self) -> None:
        now = time.time()
        while self._items:
            _, (_, _, t, _) = next(iter(self._items.items()))
            if now - t <= self.ttl:
                break
            self._drop_oldest(f"it was stored more than {self.ttl:g}s ago (server.job_ttl_seconds)")

    def unknown_reason(self, rid: str, owner: str | None = None) -> str:
        why = self.evicted.get(rid, owner)
        if why is not None:
            return f"result {rid!r} was evicted from this pod: {why}"
        return (
            f"result {rid!r} is not known to this pod: results are kept {self.ttl:g}s, at most "
            f"{self.max_items} images and {self.max_bytes} bytes "
            "(server.job_ttl_seconds, server.max_jobs * server.max_n, server.store_max_bytes)"
        )
