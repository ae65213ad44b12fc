"""The clips of this pod, in memory, bounded like the image jobs (api.jobs): an unfinished clip is
never dropped (their number is bounded by the queue); finished ones are kept for at most
`server.job_ttl_seconds`, at most `server.max_jobs` of them and at most `server.video_store_max_bytes`
of MP4 and thumbnail bytes, oldest out first (the newest finished clip stays whatever its size). A
clip the pod no longer knows answers 404 naming the rule that dropped it (or DELETE), to its owner."""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from diffusion_runtime.api.jobs import Evicted
from diffusion_runtime.api.videos.protocol import VideoError
from diffusion_runtime.engine.params import VideoParams
from diffusion_runtime.engine.scheduler import Work
from diffusion_runtime.engine.video import EncodedVideo


@dataclass(eq=False)
class VideoJob:
    work: Work
    params: VideoParams
    model: str
    seconds: str
    webhook: str | None = None
    owner: str | None = None  # the creating request's key name (api.auth); None: auth off
    id: str = field(default_factory=lambda: "video_" + uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    final: Literal["completed", "failed"] | None = None
    encoding: bool = False  # the pipeline call is done, the MP4 is being written
    video: EncodedVideo | None = None
    cached_steps: int | None = None
    error: VideoError | None = None
    task: asyncio.Task | None = None

    @property
    def nbytes(self) -> int:
        return self.video.nbytes if self.video is not None else 0

    def finish(self, video: EncodedVideo | None = None, error: VideoError | None = None) -> None:
        self.final = "completed" if video is not None else "failed"
        self.video, self.error = video, error
        self.finished_at = time.time()
        self.encoding = False


class VideoStore:
    def __init__(self, max_finished: int, ttl_seconds: float, max_bytes: int):
        self.max_finished = max_finished
        self.ttl = ttl_seconds
        self.max_bytes = max_bytes
        self._jobs: collections.OrderedDict[str, VideoJob] = collections.OrderedDict()
        self.evicted = Evicted()

    def add(self, job: VideoJob) -> None:
        self.prune()
        self._jobs[job.id] = job

    def get(self, video_id: str, owner: str | None = None) -> VideoJob | None:
        self.prune()
        job = self._jobs.get(video_id)
        return job if job is not None and job.owner == owner else None

    def remove(self, job: VideoJob, why: str) -> None:
        if self._jobs.pop(job.id, None) is not None:
            self.evicted.add(job.id, why, job.owner)

    def owned(self, owner: str | None) -> list[VideoJob]:
        """The owner's clips, oldest first."""
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
            why[j.id] = f"{self.max_finished} more recent clips finished after it (server.max_jobs)"
        held = sum(j.nbytes for j in keep if j.id not in why)
        for j in keep[:-1]:
            if held <= self.max_bytes:
                break
            if j.id not in why:
                why[j.id] = (
                    f"the finished clips exceeded {self.max_bytes} bytes (server.video_store_max_bytes): "
                    "oldest out first"
                )
                held -= j.nbytes
        for video_id, reason in why.items():
            self.remove(self._jobs[video_id], reason)

    def unknown_reason(self, video_id: str, owner: str | None = None) -> str:
        why = self.evicted.get(video_id, owner)
        if why is not None:
            return f"video {video_id!r} is gone from this pod: {why}"
        return (
            f"video {video_id!r} is not known to this pod: never created here, or finished more than "
            f"{self.ttl:g}s ago or beyond the {self.max_finished} most recent or {self.max_bytes} bytes "
            "of clips (server.job_ttl_seconds, server.max_jobs, server.video_store_max_bytes)"
        )
