"""The serving object of /v1/videos: request -> `VideoParams` -> the image API's one queue (its
scheduler: one pipeline thread for every call) -> frames -> MP4 (PyAV, in a worker thread, so the
pipeline takes the next call while a clip is encoded) -> the store. Always asynchronous."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import re
import threading
import time
from collections.abc import AsyncIterator
from typing import Any, Literal, cast

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from diffusion_runtime.api.auth import key_name
from diffusion_runtime.api.errors import Rejected, validation_message
from diffusion_runtime.api.routers import model_id
from diffusion_runtime.api.serving import DELETE_WAIT_SECONDS, MAX_FORM_FIELDS, ImageServing, record_inference
from diffusion_runtime.api.state import RuntimeState
from diffusion_runtime.api.videos import reference
from diffusion_runtime.api.videos.protocol import (
    DEFAULT_SECONDS,
    VideoDeleted,
    VideoError,
    VideoList,
    VideoObject,
    VideoRequestFields,
    build_video_requests,
)
from diffusion_runtime.api.videos.store import VideoJob, VideoStore
from diffusion_runtime.contract.pipelines import (
    VIDEO_PIPELINES,
    Modality,
    common_frame_multiple,
    frames_for,
    modality,
    video_frame_multiple,
)
from diffusion_runtime.engine.errors import Cancelled
from diffusion_runtime.engine.params import GenerationResult, StepCallback, VideoParams
from diffusion_runtime.engine.scheduler import PipelineCall
from diffusion_runtime.engine.video import EncodedVideo, encode_video
from diffusion_runtime.metrics import RuntimeMetrics

log = logging.getLogger("diffusion_runtime")
ENDPOINT = "videos"  # the metrics label
CHUNK_BYTES = 256 << 10  # content is streamed in chunks of this size
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def video_call(state: RuntimeState, params: VideoParams) -> PipelineCall:
    """A clip's pipeline call (the scheduler's thread; on this pod or a queue worker)."""

    def run(cancel: threading.Event, on_step: StepCallback) -> GenerationResult:
        return state.loaded().generate(params, cancel, on_step)

    # the scheduler's calls are typed by the image API's result; a video call returns its frames
    return cast(PipelineCall, run)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) byte of a single `Range: bytes=...` header (RFC 9110 14.1.2: `N-M`,
    open `N-`, suffix `-N`); None: the whole body (no header, or one this server ignores). Rejected
    416 when it cannot be satisfied."""
    if not header:
        return None
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None  # not one bytes range (malformed, several, another unit): ignored (RFC 9110 14.2)
    first_s, last_s = m.groups()
    if not first_s:  # suffix: the last N bytes
        n = int(last_s)
        if n == 0:
            raise Rejected(416, f"Range: {header!r} asks for no bytes")
        return max(0, size - n), size - 1
    first = int(first_s)
    last = min(int(last_s), size - 1) if last_s else size - 1
    if first >= size or (last_s and int(last_s) < first):
        raise Rejected(416, f"Range: {header!r} is outside the {size} bytes of the content")
    return first, last


async def chunks(data: bytes, first: int, last: int) -> AsyncIterator[bytes]:
    view = memoryview(data)
    for start in range(first, last + 1, CHUNK_BYTES):
        yield bytes(view[start : min(start + CHUNK_BYTES, last + 1)])


class VideoServing:
    """What the video routes share: the image API's serving object (its scheduler, admission,
    metrics and webhooks) and this pod's clips."""

    def __init__(self, images: ImageServing):
        self.images = images
        self.state = images.state
        self.json_model, self.form_model = build_video_requests(self.state.config)

    @functools.cached_property
    def store(self) -> VideoStore:
        """This pod's clips (made on first use: the front door's backend keeps its clips in Redis)."""
        s = self.state.config.server
        return VideoStore(s.max_jobs, s.job_ttl_seconds, s.video_store_max_bytes)

    # ------------------------------------------------------------ checks

    def served_pipeline(self) -> tuple[str, Modality, int | None] | None:
        """(class, modality, frame multiple) of the served pipeline: the loaded engine's, else the one
        the config names (a front door loads no model); None: not known here (a front door whose
        config names no pipeline: its workers check again with the loaded pipeline)."""
        engine = self.state.engine
        if engine is not None:
            return engine.pipeline_name, engine.modality, engine.frame_multiple
        name = self.state.config.model.pipeline
        return (name, modality(name), video_frame_multiple(name)) if name else None

    def _check_pipeline(self) -> None:
        """503 while loading / draining, 429 with a full queue, 400 on an image pipeline."""
        self.images.admit()  # Unavailable (503) / QueueFull (429) before reading the body
        served = self.served_pipeline()
        if served is not None and served[1] != "video":
            raise Rejected(
                400,
                f"the served pipeline {served[0]} makes images, not videos; /v1/videos needs a "
                f"video pipeline ({', '.join(VIDEO_PIPELINES)}); use /v1/images/generations",
                param="model",
            )

    async def read_fields(self, request: Request) -> tuple[VideoRequestFields, bytes | None]:
        """The request's fields and its input_reference's bytes (None: not sent)."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        fields: dict[str, Any] = {}
        image: bytes | None = None
        model = self.form_model if ctype == "multipart/form-data" else self.json_model
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=1 << 20)
            except MultiPartException as e:
                raise Rejected(400, f"multipart body: {e.message}") from e
            for key, value in form.multi_items():
                if key in (reference.PARAM, reference.FORM_URL_FIELD):
                    if image is not None:
                        await form.close()
                        raise Rejected(400, f"{reference.PARAM}: sent more than once", param=reference.PARAM)
                    if isinstance(value, UploadFile):
                        image = await value.read()
                    elif key == reference.FORM_URL_FIELD:
                        image = reference.from_data_url(value)
                    else:
                        await form.close()
                        raise Rejected(
                            400, f"{key}: must be a file part (an image upload), got a text field", param=key
                        )
                    continue
                if isinstance(value, UploadFile):
                    await form.close()
                    raise Rejected(400, f"{key}: expected a text field, got a file upload", param=key)
                if key in fields:
                    raise Rejected(400, f"{key}: sent more than once", param=key)
                fields[key] = value
            await form.close()
        else:
            try:
                fields = json.loads(await request.body() or b"null")
            except ValueError as e:
                raise Rejected(400, f"malformed JSON body ({e})") from e
            if not isinstance(fields, dict):
                raise Rejected(400, "request body must be a JSON object (or multipart/form-data)")
            image = reference.from_json(fields.pop(reference.PARAM, None))
        try:
            return cast(VideoRequestFields, model.model_validate(fields)), image
        except ValidationError as e:
            msg, param = validation_message(e.errors())  # type: ignore[arg-type]
            raise Rejected(400, msg, param=param) from e

    def params(self, req: VideoRequestFields, image: bytes | None = None) -> tuple[VideoParams, str]:
        """The engine's parameters and the clip's `seconds`, every limit checked (400 naming it);
        `image`: input_reference's bytes, the first frame of an image-to-video pipeline."""
        s = self.state.config.server
        served = self.served_pipeline()
        name = served[0] if served is not None else "the video pipeline"
        multiple = (served[2] if served is not None else None) or common_frame_multiple()
        width, height = self.images.size(req.size)
        fps = req.fps if req.fps is not None else s.video_fps
        if req.num_frames is not None:
            if req.seconds is not None:
                raise Rejected(400, "seconds, num_frames: send one of them", param="num_frames")
            frames = req.num_frames
            if (frames - 1) % multiple:
                lower = (frames - 1) // multiple * multiple + 1
                raise Rejected(
                    400,
                    f"num_frames: {frames} is not a frame count {name} renders "
                    f"(k*{multiple}+1: {lower} or {lower + multiple})",
                    param="num_frames",
                )
            seconds = f"{frames / fps:g}"
        else:
            wanted = int(req.seconds) if req.seconds is not None else DEFAULT_SECONDS
            if wanted > s.max_video_seconds:  # the schema's bound too (a config changed at runtime)
                raise Rejected(
                    400, f"seconds: {wanted} exceeds server.max_video_seconds={s.max_video_seconds}",
                    param="seconds",
                )  # fmt: skip
            frames, seconds = frames_for(wanted, fps, multiple), str(wanted)
        if frames > s.max_frames:
            raise Rejected(
                400,
                f"seconds: {seconds}s at {fps} fps is {frames} frames, more than server.max_frames="
                f"{s.max_frames}; ask for fewer seconds or a lower fps",
                param="num_frames" if req.num_frames is not None else "seconds",
            )
        if width * height * frames > s.max_video_pixels:
            raise Rejected(
                400,
                f"size x frames: {width}x{height} x {frames} frames = {width * height * frames} exceeds "
                f"server.max_video_pixels={s.max_video_pixels}",
                param="size",
            )
        steps = (
            req.num_inference_steps if req.num_inference_steps is not None else self.state.config.warmup.steps
        )
        params = VideoParams(
            prompt=req.prompt, width=width, height=height, steps=steps,
            seed=req.seed if req.seed is not None else random.randrange(2**31),
            guidance_scale=req.guidance_scale, negative_prompt=req.negative_prompt, frames=frames, fps=fps,
            image=reference.first_frame(served[0] if served is not None else None, image, width, height),
        )  # fmt: skip
        return params, seconds

    # ------------------------------------------------------------ the routes' calls

    async def create(self, request: Request) -> VideoObject:
        t0 = request.scope.get("t0", time.perf_counter())
        self._check_pipeline()
        req, image = await self.read_fields(request)
        params, seconds = self.params(req, image)
        if req.webhook:
            await self.images.check_webhook(req.webhook)
        owner = key_name(request)
        video = await self.submit(req, params, seconds, owner)
        self.images.finish(ENDPOINT, 200, t0, owner)
        return video

    # ------------------------------------------------------------ the backend: this pod's scheduler
    # (`queue.videos.QueueVideoServing` overrides these: the shared queue and store)

    async def submit(
        self, req: VideoRequestFields, params: VideoParams, seconds: str, owner: str | None
    ) -> VideoObject:
        work = self.images.new_work(ENDPOINT, video_call(self.state, params), params.run_steps)
        self.images.sched.submit(work)
        job = VideoJob(
            work=work, params=params, model=req.model or model_id(self.state.config.model.uri), seconds=seconds,
            webhook=req.webhook, owner=owner,
        )  # fmt: skip
        self.store.add(job)
        job.task = asyncio.create_task(self._follow(job))
        return self.view(job)

    async def retrieve(self, video_id: str, owner: str | None) -> VideoObject:
        return self.view(self._job(video_id, owner))

    async def list(self, owner: str | None, after: str | None, limit: int, order: str) -> VideoList:
        jobs = self.store.owned(owner)
        if after is not None and after not in {j.id for j in jobs}:
            raise Rejected(404, self.store.unknown_reason(after, owner), param="after")
        return paginate([self.view(j) for j in jobs], after, limit, order)

    async def delete(self, video_id: str, owner: str | None) -> VideoDeleted:
        """Drop a clip; a queued one leaves the queue, a running one stops at its next step."""
        job = self._job(video_id, owner)
        if not job.final:
            self.images.sched.withdraw(job.work)
            if job.task is not None:
                await asyncio.wait({job.task}, timeout=DELETE_WAIT_SECONDS)
        self.store.remove(job, "deleted by DELETE /v1/videos/{id}")
        return VideoDeleted(id=job.id, deleted=True)

    async def content(self, video_id: str, owner: str | None, variant: str) -> tuple[bytes, str]:
        """The MP4 (or the thumbnail) of a completed clip: (bytes, media type)."""
        from diffusion_runtime.engine.video import MP4_MEDIA_TYPE, THUMBNAIL_MEDIA_TYPE

        job = self._job(video_id, owner)
        if job.video is None:
            status = self.view(job).status
            raise Rejected(
                409 if status != "failed" else 404,
                f"video {video_id!r} is {status}; its content exists once it is completed",
                param="video_id",
            )
        if variant == "thumbnail":
            return job.video.thumbnail, THUMBNAIL_MEDIA_TYPE
        return job.video.mp4, MP4_MEDIA_TYPE

    # ------------------------------------------------------------ internals

    def _job(self, video_id: str, owner: str | None) -> VideoJob:
        job = self.store.get(video_id, owner)
        if job is None:
            raise Rejected(404, self.store.unknown_reason(video_id, owner), param="video_id")
        return job

    def view(self, job: VideoJob) -> VideoObject:
        sched = self.images.sched
        w, p = job.work, job.params
        status: Literal["queued", "in_progress", "completed", "failed"]
        if job.final:
            status = job.final
        elif job.encoding or w.started or sched.is_running(w):  # started: taken by the pipeline thread
            status = "in_progress"
        else:
            status = "queued"
        if job.final == "completed":
            progress = 100
        elif job.encoding:
            progress = 99
        else:
            progress = min(99, 100 * w.step // max(1, w.total_steps))
        ttl = self.store.ttl
        return VideoObject(
            id=job.id, model=job.model, status=status, progress=progress, created_at=int(job.created_at),
            completed_at=int(job.finished_at) if job.final == "completed" and job.finished_at else None,
            expires_at=int(job.finished_at + ttl) if job.finished_at else None,
            prompt=p.prompt, seconds=job.seconds, size=p.size, error=job.error, frames=p.frames, fps=p.fps,
            num_inference_steps=p.steps, step=w.step,
            queue_position=sched.position(w) if status == "queued" else None, seed=p.seed,
            bytes=len(job.video.mp4) if job.video else None, cached_steps=job.cached_steps,
        )  # fmt: skip

    async def _follow(self, job: VideoJob) -> None:
        work, m = job.work, self.state.metrics
        timeout = self.state.config.server.request_timeout_seconds
        try:
            result: GenerationResult = await asyncio.wait_for(asyncio.shield(work.future), timeout)
            job.encoding = True
            record_inference(m, result)
            video = await asyncio.to_thread(
                encode_video, result.images[0], job.params.fps, self.state.config.server.video_crf
            )
        except TimeoutError:
            self.images.sched.withdraw(work)
            job.finish(
                error=VideoError(
                    code="timeout", message=f"timed out after {timeout:g}s (request_timeout_seconds)"
                )
            )
        except Cancelled:
            job.finish(error=VideoError(code="cancelled", message="deleted before it finished"))
        except Exception as e:  # noqa: BLE001 - recorded in the clip
            log.error("video %s failed (key=%s): %s: %s", job.id, job.owner or "-", type(e).__name__, e)
            job.finish(error=VideoError(code="generation_failed", message=f"{type(e).__name__}: {e}"))
        else:
            job.cached_steps = result.cached_steps
            job.finish(video=video)
            record_video(m, job.id, result, video)
        outcome = "succeeded" if job.final == "completed" else "failed"
        if job.error is not None and job.error.code == "cancelled":
            outcome = "cancelled"
        m.jobs.labels(endpoint=ENDPOINT, status=outcome).inc()
        if job.webhook:
            body = _json(self.view(job))
            await self.images.webhooks.deliver(job.webhook, body, self.images._webhook_outcome)


def record_video(m: RuntimeMetrics, video_id: str, result: GenerationResult, video: EncodedVideo) -> None:
    """The video figures of an encoded clip (frames, frames/s generated, encode time, bytes) and its log line."""
    m.video_frames.inc(video.frames)
    m.video_fps.observe(video.frames / max(result.inference_seconds, 1e-9))
    m.video_encode_duration.observe(video.encode_seconds)
    m.video_bytes.inc(len(video.mp4))
    log.info(
        "video %s: %d frames %dx%d in %.2fs, encoded in %.3fs (%d bytes)", video_id, video.frames,
        video.width, video.height, result.inference_seconds, video.encode_seconds, len(video.mp4),
    )  # fmt: skip


def paginate(videos: list[VideoObject], after: str | None, limit: int, order: str) -> VideoList:
    """One page of a key's clips (oldest first in `videos`), OpenAI's cursor rules: after the clip `after`
    (which the caller checked is in `videos`), at most `limit`, `order` asc|desc by creation."""
    if order == "desc":
        videos = videos[::-1]
    if after is not None:
        videos = videos[[v.id for v in videos].index(after) + 1 :]
    page = videos[:limit]
    return VideoList(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=len(videos) > limit,
    )


def _json(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
