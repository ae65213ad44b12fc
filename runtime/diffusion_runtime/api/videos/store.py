"""The clips of this pod, in memory, bounded like the image jobs (api.jobs): an unfinished clip is
never dropped (their number is bounded by the queue); finished ones are kept for at most
`server.job_ttl_seconds`, at most `server.max_jobs` of them and at most `server.video_store_max_bytes`
of MP4 and thumbnail bytes, oldest out first (the newest finished clip stays whatever its size). A
clip the pod no longer knows answers 404 naming the rule that dropped it (or DELETE), to its owner."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from diffusion_runtime.api.jobs import BoundedStore
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


class VideoStore(BoundedStore[VideoJob]):
    noun, plural, created, gone = "video", "clips", "never created here", "is gone from this pod"
    held, bytes_of, bytes_setting = "the finished clips", "clips", "server.video_store_max_bytes"
