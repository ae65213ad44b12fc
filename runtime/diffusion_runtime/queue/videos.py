"""/v1/videos in the front door: the checks of a runtime pod (`api.videos.serving.VideoServing`: the
same request models, limits and 400s), then the shared queue instead of this process's scheduler.

A clip is a queue job (endpoint `videos`, id `video_…`) that any runtime pod pulls like an image job;
the pod encodes the MP4 and keeps it in Redis (`P clip:ID`, bounded by `server.video_store_max_bytes`
and `server.job_ttl_seconds`), so every front-door replica answers for every clip, and a scale-down or a
dead pod loses none (its job is redelivered). A key's clips are listed from `P videos:OWNER`.
"""

from __future__ import annotations

import collections
import contextlib
import io
import time
from typing import Any, Protocol, cast

from diffusion_runtime.api.errors import Rejected
from diffusion_runtime.api.routers import model_id
from diffusion_runtime.api.serving import ImageServing
from diffusion_runtime.api.videos.protocol import VideoDeleted, VideoList, VideoObject, VideoRequestFields
from diffusion_runtime.api.videos.serving import ENDPOINT, VideoServing, paginate
from diffusion_runtime.contract.config import QueueConfig
from diffusion_runtime.engine.params import VideoParams
from diffusion_runtime.queue.spec import video_spec
from diffusion_runtime.queue.store import QueueStore, new_video_id
from diffusion_runtime.queue.views import video_view

# a clip stays listed under its key this long after it was created at most (its run + the TTL; the
# index also drops clips whose job is gone each time it is listed)
INDEX_SLACK_SECONDS = 86400


def png(image: Any) -> bytes:
    """The fitted first frame of an image-to-video clip, losslessly, for the job's hash."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class QueueBackend(Protocol):
    """What the clips need of the front door's image backend (`queue.frontdoor.QueueServing`)."""

    store: QueueStore
    cfg: QueueConfig
    mine: collections.OrderedDict[str, str]

    def guard(self) -> contextlib.AbstractContextManager[None]: ...
    def queue_full(self, waiting: int) -> Rejected: ...
    def remember(self, job_id: str, endpoint: str) -> None: ...
    async def stop(self, job_id: str, h: dict[str, Any], why: str, webhook: bool) -> None: ...


class QueueVideoServing(VideoServing):
    def __init__(self, images: ImageServing):
        super().__init__(images)
        self.queue = cast(QueueBackend, images)
        self.ttl = float(self.state.config.server.job_ttl_seconds)

    # ------------------------------------------------------------ the backend: the shared queue

    async def submit(
        self, req: VideoRequestFields, params: VideoParams, seconds: str, owner: str | None
    ) -> VideoObject:
        q = self.queue
        video_id = new_video_id()
        model = req.model or model_id(self.state.config.model.uri)
        spec = video_spec(params, seconds, model, owner, bool(req.webhook))
        with q.guard():
            added, waiting = await q.store.enqueue(
                video_id, spec, endpoint=ENDPOINT, total_steps=params.run_steps, owner=owner,
                webhook=req.webhook, sync=False, image=png(params.image) if params.image is not None else None,
            )  # fmt: skip
        if not added:
            raise q.queue_full(waiting)
        q.remember(video_id, ENDPOINT)
        keep = self.ttl + INDEX_SLACK_SECONDS
        with q.guard():
            await q.store.index_video(owner, video_id, time.time(), keep)
        return await self.retrieve(video_id, owner)

    async def _hash(self, video_id: str, owner: str | None) -> dict[str, Any]:
        with self.queue.guard():
            h = await self.queue.store.job(video_id)
        if h is None or h.get("endpoint") != ENDPOINT or (h.get("owner") or None) != owner:
            raise Rejected(404, self._unknown(video_id), param="video_id")
        return h

    def _unknown(self, video_id: str) -> str:
        return (
            f"video {video_id!r} is not known: never created, deleted, or finished more than "
            f"{self.ttl:g}s ago (server.job_ttl_seconds)"
        )

    async def _view(self, video_id: str, h: dict[str, Any]) -> VideoObject:
        position = None
        if h["status"] == "queued":
            with self.queue.guard():
                position = await self.queue.store.position(video_id) or None
        return video_view(video_id, h, position, self.ttl)

    async def retrieve(self, video_id: str, owner: str | None) -> VideoObject:
        return await self._view(video_id, await self._hash(video_id, owner))

    async def list(self, owner: str | None, after: str | None, limit: int, order: str) -> VideoList:
        with self.queue.guard():
            owned = await self.queue.store.owned_videos(owner)
        if after is not None and after not in {vid for vid, _ in owned}:
            raise Rejected(404, self._unknown(after), param="after")
        queued = [vid for vid, h in owned if h["status"] == "queued"]
        with self.queue.guard():
            positions = dict(zip(queued, await self.queue.store.positions(queued), strict=True))
        views = [video_view(vid, h, positions.get(vid) or None, self.ttl) for vid, h in owned]
        return paginate(views, after, limit, order)

    async def delete(self, video_id: str, owner: str | None) -> VideoDeleted:
        """Drop a clip; a queued one leaves the queue, a running one stops at its next step (its pod
        stores nothing: the job is gone)."""
        q = self.queue
        await q.stop(video_id, await self._hash(video_id, owner), "deleted by DELETE /v1/videos/{id}", False)
        with q.guard():
            await q.store.drop_video(video_id, owner)
        return VideoDeleted(id=video_id, deleted=True)

    async def content(self, video_id: str, owner: str | None, variant: str) -> tuple[bytes, str]:
        from diffusion_runtime.engine.video import MP4_MEDIA_TYPE, THUMBNAIL_MEDIA_TYPE

        h = await self._hash(video_id, owner)
        if h["status"] != "succeeded":
            status = video_view(video_id, h, None, self.ttl).status
            raise Rejected(
                409 if status != "failed" else 404,
                f"video {video_id!r} is {status}; its content exists once it is completed",
                param="video_id",
            )
        with self.queue.guard():
            data = await self.queue.store.clip(video_id, "t" if variant == "thumbnail" else "m")
        if data is None:
            why = h.get("evicted") or f"it finished more than {self.ttl:g}s ago (server.job_ttl_seconds)"
            raise Rejected(404, f"video {video_id!r}: its content is gone: {why}", param="video_id")
        return data, THUMBNAIL_MEDIA_TYPE if variant == "thumbnail" else MP4_MEDIA_TYPE
