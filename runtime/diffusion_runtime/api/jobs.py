"""Async jobs (`Prefer: respond-async`) and served results (`response_format: url`), in memory.

Both stores are bounded: an unfinished job is never dropped (their number is bounded by the queue),
finished jobs and results are kept for at most `server.job_ttl_seconds`, at most `server.max_jobs`
of them (results: `max_jobs * max_n` images) and at most `STORE_MAX_BYTES` of image data each,
oldest first out. A job or result the pod no longer knows answers 404 with that reason.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from diffusion_runtime.api.protocol import ErrorDetail, ImagesResponse, JobProgress, JobStatus
from diffusion_runtime.engine.scheduler import Scheduler, Work

log = logging.getLogger("diffusion_runtime")
FINAL = ("succeeded", "failed", "cancelled")
STORE_MAX_BYTES = 512 << 20  # image data kept by each store (finished jobs' results, url results)


def _result_bytes(result: ImagesResponse | None) -> int:
    if result is None:
        return 0
    return sum(len(d.b64_json or "") for d in result.data)


@dataclass(eq=False)
class Job:
    endpoint: Literal["generations", "edits"]
    work: Work
    webhook: str | None = None
    owner: str | None = None  # the API key's name (auth on): GET/DELETE by another key answer 404
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
        elif scheduler.running is w:
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


class JobStore:
    def __init__(self, max_finished: int, ttl_seconds: float, max_bytes: int = STORE_MAX_BYTES):
        self.max_finished = max_finished
        self.ttl = ttl_seconds
        self.max_bytes = max_bytes
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()

    def add(self, job: Job) -> None:
        self.prune()
        self._jobs[job.id] = job

    def get(self, job_id: str) -> Job | None:
        self.prune()
        return self._jobs.get(job_id)

    def prune(self) -> None:
        now = time.time()
        finished = [j for j in self._jobs.values() if j.final]
        expired = {j.id for j in finished if j.finished_at is not None and now - j.finished_at > self.ttl}
        keep = [j for j in finished if j.id not in expired]
        keep.sort(key=lambda j: j.finished_at or 0.0)
        expired |= {j.id for j in keep[: max(0, len(keep) - self.max_finished)]}
        held = sum(j.nbytes for j in keep if j.id not in expired)
        for j in keep:  # oldest first, until the results fit the byte budget
            if held <= self.max_bytes:
                break
            if j.id not in expired:
                expired.add(j.id)
                held -= j.nbytes
        for job_id in expired:
            del self._jobs[job_id]

    def unknown_reason(self, job_id: str) -> str:
        return (
            f"job {job_id!r} is not known to this pod: never submitted here, or finished more than "
            f"{self.ttl:g}s ago or beyond the {self.max_finished} most recent or {self.max_bytes >> 20} MiB "
            "of results (server.job_ttl_seconds, server.max_jobs)"
        )


class ResultStore:
    """Encoded images served at /v1/images/results/{id} for `response_format: url`."""

    def __init__(self, max_items: int, ttl_seconds: float, max_bytes: int = STORE_MAX_BYTES):
        self.max_items = max_items
        self.ttl = ttl_seconds
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: collections.OrderedDict[str, tuple[bytes, str, float]] = collections.OrderedDict()

    def put(self, data: bytes, fmt: str) -> str:
        self.prune()
        rid = f"img_{uuid.uuid4().hex}.{fmt}"
        self._items[rid] = (data, fmt, time.time())
        self.nbytes += len(data)
        while len(self._items) > 1 and (len(self._items) > self.max_items or self.nbytes > self.max_bytes):
            self._drop_oldest()
        return rid

    def _drop_oldest(self) -> None:
        _, (data, _, _) = self._items.popitem(last=False)
        self.nbytes -= len(data)

    def get(self, rid: str) -> tuple[bytes, str] | None:
        self.prune()
        item = self._items.get(rid)
        return (item[0], item[1]) if item else None

    def prune(self) -> None:
        now = time.time()
        while self._items:
            _, (_, _, t) = next(iter(self._items.items()))
            if now - t <= self.ttl:
                break
            self._drop_oldest()

    def unknown_reason(self, rid: str) -> str:
        return (
            f"result {rid!r} is not known to this pod: results are kept {self.ttl:g}s, at most "
            f"{self.max_items} images and {self.max_bytes >> 20} MiB (server.job_ttl_seconds, server.max_jobs)"
        )
