"""The serving object of the image routes: request -> typed engine parameters -> the one queue ->
`ImagesResponse`. Checks beyond the schema, sync and async (`Prefer: respond-async`) answers, jobs,
results, webhooks and the request metrics live here; the routes (`api.routers`) only call it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from diffusion_runtime.api.auth import key_name
from diffusion_runtime.api.errors import Rejected, error_detail, validation_message
from diffusion_runtime.api.jobs import Job, JobStore, ResultStore
from diffusion_runtime.api.protocol import (
    CacheSteps,
    EditRequestFields,
    ImageData,
    ImageRequestFields,
    ImageResultEvent,
    ImagesResponse,
    JobStatus,
    Protocol,
    Timings,
    prefers_async,
)
from diffusion_runtime.api.state import RuntimeState
from diffusion_runtime.api.webhooks import Delivery, Fence, Outcome, Refused, secret_from_env
from diffusion_runtime.contract.config import parse_size
from diffusion_runtime.contract.limits import SIZE_MULTIPLE
from diffusion_runtime.contract.pipelines import modality
from diffusion_runtime.engine.adapters import labels, requested
from diffusion_runtime.engine.errors import Cancelled
from diffusion_runtime.engine.imaging import decode_upload, encode_result, fit_size, mask_from_upload
from diffusion_runtime.engine.params import (
    EditParams,
    EncodedResult,
    GenerationParams,
    GenerationResult,
    OutputFormat,
    StepCallback,
)
from diffusion_runtime.engine.scheduler import PipelineCall, Scheduler, Work
from diffusion_runtime.metrics import RuntimeMetrics

log = logging.getLogger("diffusion_runtime")

Endpoint = Literal["generations", "edits"]
GENERATIONS_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"
JOBS_PATH = "/v1/images/jobs"
RESULTS_PATH = "/v1/images/results"
ENDPOINTS: dict[str, Endpoint] = {GENERATIONS_PATH: "generations", EDITS_PATH: "edits"}
MAX_FORM_FIELDS = 64
DELETE_WAIT_SECONDS = 5.0  # DELETE of a running job waits this long for it to stop


async def listen_for_disconnect(request: Request) -> None:
    """Returns when the client goes away: awaits the ASGI receive channel (no polling)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _ignore_result(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


@dataclass(frozen=True)
class EditInput:
    """The decoded edit uploads and their bytes as sent (the queue stores the bytes)."""

    image: Any  # PIL, RGB
    mask: Any | None  # PIL, mode L
    image_bytes: bytes
    mask_bytes: bytes | None


def decode_edit_inputs(image_bytes: bytes, mask_bytes: bytes | None) -> tuple[Any, Any | None]:
    """The uploads as PIL images (image RGB, mask L), or InvalidInput/Rejected naming the field."""
    image = decode_upload(image_bytes, "image").convert("RGB")
    if mask_bytes is None:
        return image, None
    mask_img = decode_upload(mask_bytes, "mask")
    if mask_img.size != image.size:
        raise Rejected(
            400,
            f"mask: {mask_img.width}x{mask_img.height} does not match the image's {image.width}x{image.height}",
            param="mask",
        )
    return image, mask_from_upload(mask_img)


def record_inference(m: RuntimeMetrics, result: EncodedResult | GenerationResult) -> None:
    """The pipeline figures of a finished call (where it ran: this pod or a queue worker)."""
    m.inference_duration.observe(result.inference_seconds)
    for s in result.step_seconds:
        m.step_duration.observe(s)
    m.cache_steps.labels(result="cached").inc(result.cached_steps)
    m.cache_steps.labels(result="computed").inc(result.computed_steps)


def record_result(m: RuntimeMetrics, result: EncodedResult, params: GenerationParams) -> None:
    """The inference metrics of a finished image call, by adapter too."""
    record_inference(m, result)
    for adapter in labels(params.adapters):
        m.adapter_requests.labels(adapter=adapter).inc()
        m.adapter_inference_duration.labels(adapter=adapter).observe(result.inference_seconds)
    m.images.inc(len(result.images))


def build_images_response(
    result: EncodedResult, params: GenerationParams, fmt: str, response_format: str, base_url: str,
    put: Callable[[bytes, str], str], queue_wait: float, total: float,
) -> ImagesResponse:  # fmt: skip
    """The response body; `url` images are stored with `put(data, fmt) -> result id`."""
    if response_format == "url":
        base = base_url.rstrip("/")
        data = [ImageData(b64_json=None, url=f"{base}{RESULTS_PATH}/{put(b, fmt)}") for b in result.images]
    else:
        data = [ImageData(b64_json=base64.b64encode(b).decode("ascii"), url=None) for b in result.images]
    return ImagesResponse(
        created=int(time.time()),
        data=data,
        output_format=cast(Any, fmt),
        size=params.size,
        seed=result.seed,
        num_inference_steps=params.steps,
        timings=Timings(
            queue_wait_seconds=round(queue_wait, 6),
            inference_seconds=round(result.inference_seconds, 6),
            total_seconds=round(total, 6),
        ),
        cache=CacheSteps(cached_steps=result.cached_steps, computed_steps=result.computed_steps),
    )


def generation_call(state: RuntimeState, params: GenerationParams, output: OutputFormat) -> PipelineCall:
    """Run a text-to-image call on the engine; its images are encoded in the pipeline thread."""

    def run(cancel: threading.Event, on_step: StepCallback) -> EncodedResult:
        return encode_result(state.loaded().generate(params, cancel, on_step), output)

    return run


def edit_call(state: RuntimeState, params: EditParams, output: OutputFormat) -> PipelineCall:
    """Run an image-to-image (with a mask: inpaint) call on the engine; images encoded as above."""

    def run(cancel: threading.Event, on_step: StepCallback) -> EncodedResult:
        return encode_result(state.loaded().edit(params, cancel, on_step), output)

    return run


class ImageServing:
    """What the image routes share: limits, the scheduler, jobs, results, metrics."""

    # /v1/videos' serving class (api.app builds it); None: api.videos.serving.VideoServing, on this
    # pod's scheduler (the front door's QueueServing names the shared queue's)
    videos_class: ClassVar[type | None] = None

    def __init__(self, state: RuntimeState, protocol: Protocol):
        self.state = state
        self.protocol = protocol
        s = state.config.server
        self.jobs = JobStore(s.max_jobs, s.job_ttl_seconds, s.store_max_bytes)
        self.results = ResultStore(s.max_jobs * s.max_n, s.job_ttl_seconds, s.store_max_bytes)
        self.scheduler: Scheduler | None = None
        self.webhooks = Delivery(
            Fence(s.webhook_allow), secret_from_env(), attempts=s.webhook_attempts,
            backoff_base=s.webhook_backoff_seconds, backoff_max=s.webhook_backoff_max_seconds,
            timeout=s.webhook_timeout_seconds,
        )  # fmt: skip
        self._deliveries: set[asyncio.Task] = set()

    def start(self) -> Scheduler:
        """The queue and its worker (in the server's event loop; the app's lifespan)."""
        self.scheduler = Scheduler(
            self.state.metrics, self.state.config.server, self.state.accepting, run_batch=self._run_batch
        )
        self.scheduler.start()
        return self.scheduler

    def _run_batch(
        self, batch: Sequence[GenerationParams], cancel: threading.Event, on_step: StepCallback
    ) -> list[GenerationResult]:
        """A batch of compatible generations on the engine (the scheduler's pipeline thread)."""
        return self.state.loaded().generate_batch(batch, cancel, on_step)

    @property
    def sched(self) -> Scheduler:
        assert self.scheduler is not None, "lifespan not started"
        return self.scheduler

    def finish(self, endpoint: str, status: int, t0: float, key: str | None = None) -> None:
        """Count an answered image request; `key`: the caller's key name (api.auth), never the key."""
        m = self.state.metrics
        m.request_duration.labels(endpoint=endpoint, status=str(status)).observe(time.perf_counter() - t0)
        m.requests.labels(endpoint=endpoint, status=str(status), key=key or "").inc()

    # ------------------------------------------------------------ checks beyond the schema

    def size(self, size: str | None, default: tuple[int, int] | None = None) -> tuple[int, int]:
        s = self.state.config.server
        if size is None:
            if default is not None:
                return default
            size = (
                self.state.config.warmup.resolutions[0]
                if self.state.config.warmup.resolutions
                else "1024x1024"
            )
        try:
            width, height = parse_size(size)
        except ValueError as e:
            raise Rejected(400, f"size: {e}", param="size") from e
        engine = self.state.engine  # None while loading: admission answers 503 after these checks
        multiple = engine.size_multiple if engine is not None else SIZE_MULTIPLE
        if width < multiple or height < multiple or width % multiple or height % multiple:
            raise Rejected(
                400, f"size: {width}x{height} must be positive multiples of {multiple}", param="size"
            )
        if width * height > s.max_pixels:
            raise Rejected(
                400,
                f"size: {width}x{height} = {width * height} pixels exceeds max_pixels={s.max_pixels}",
                param="size",
            )
        return width, height

    def adapters_of(self, req: ImageRequestFields) -> list[tuple[str, float | None]]:
        """The request's adapters; none, and `model` is an adapter's id (GET /v1/models): that one."""
        wanted: list[tuple[str, float | None]] = [(a.name, a.scale) for a in req.adapters]
        if not wanted and req.model in {a.name for a in self.state.config.adapters}:
            wanted = [(req.model, None)]
        return wanted

    def params(self, req: ImageRequestFields, width: int, height: int) -> GenerationParams:
        """The engine's parameters of a request (generation or edit form): defaults filled in."""
        s = self.state.config.server
        engine = self.state.engine  # a front door loads none: the class its config names, if any
        name = engine.pipeline_name if engine is not None else self.state.config.model.pipeline
        if name and modality(name) != "image":
            raise Rejected(
                400, f"the served pipeline {name} makes videos; use POST /v1/videos", param="model"
            )
        steps = (
            req.num_inference_steps if req.num_inference_steps is not None else self.state.config.warmup.steps
        )
        if not 1 <= steps <= s.max_steps:  # the schema's bound too; kept for configs changed at runtime
            raise Rejected(400, f"num_inference_steps: {steps} is out of range [1, {s.max_steps}]")
        return GenerationParams(
            prompt=req.prompt, width=width, height=height, steps=steps,
            seed=req.seed if req.seed is not None else random.randrange(2**31), n=req.n,
            guidance_scale=req.guidance_scale, negative_prompt=req.negative_prompt,
            true_cfg_scale=req.true_cfg_scale,
            adapters=requested(self.adapters_of(req), self.state.config.adapters),
        )  # fmt: skip

    # ------------------------------------------------------------ the two endpoints

    async def generate(
        self, req: ImageRequestFields, request: Request, prefer: str
    ) -> ImagesResponse | Response:
        width, height = self.size(req.size)
        params = self.params(req, width, height)
        return await self.run_generation(req, params, request, prefer)

    async def edit(self, request: Request, prefer: str) -> ImagesResponse | Response:
        self.admit()  # 503/429 before reading a large upload
        req, images, mask_bytes = await self.read_edit_form(request)
        image, mask = decode_edit_inputs(images[0], mask_bytes)
        default = fit_size(image.width, image.height, self.state.config.server.max_pixels, self.size_multiple)
        width, height = self.size(req.size, default=default)
        edit = EditInput(image=image, mask=mask, image_bytes=images[0], mask_bytes=mask_bytes)
        return await self.run_edit(req, self.params(req, width, height), edit, request, prefer)

    # ------------------------------------------------------------ the backend: this pod's scheduler
    # (`queue.frontdoor.QueueServing` overrides these: the shared queue)

    @property
    def size_multiple(self) -> int:
        engine = self.state.engine
        return engine.size_multiple if engine is not None else SIZE_MULTIPLE

    def admit(self) -> None:
        """Raise unless a new request could be taken now (before reading an upload)."""
        self.sched.admit()

    async def startup(self) -> None:
        self.start()

    async def shutdown(self) -> None:
        await self.sched.stop()

    @property
    def idle(self) -> bool:
        """Nothing queued or running (SIGTERM's drain waits for it)."""
        return self.scheduler is None or self.scheduler.idle

    async def drain(self, deadline: float) -> None:
        """SIGTERM (admissions already stopped): until what was admitted is done, or `deadline`."""
        while not self.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def run_generation(
        self, req: ImageRequestFields, params: GenerationParams, request: Request, prefer: str
    ) -> ImagesResponse | Response:
        output = OutputFormat(req.output_format, req.output_compression)
        work = self.new_work("generations", generation_call(self.state, params, output), params.run_steps)
        work.params, work.output = params, output  # batchable with compatible ones (server.max_batch)
        return await self.respond("generations", work, params, req, request, prefer)

    async def run_edit(
        self, req: ImageRequestFields, base: GenerationParams, edit: EditInput, request: Request, prefer: str
    ) -> ImagesResponse | Response:
        params = EditParams.of(base, edit.image, edit.mask, cast(EditRequestFields, req).strength)
        engine = self.state.loaded()
        engine.prepare_edit(params.kind)
        output = OutputFormat(req.output_format, req.output_compression)
        work = self.new_work("edits", edit_call(self.state, params, output), params.run_steps)
        return await self.respond("edits", work, params, req, request, prefer)

    async def get_job(self, job_id: str, owner: str | None) -> JobStatus:
        job = self.jobs.get(job_id, owner)
        if job is None:
            raise Rejected(404, self.jobs.unknown_reason(job_id, owner), param="job_id")
        return job.view(self.sched)

    async def cancel_job(self, job_id: str, owner: str | None) -> JobStatus:
        job = self.jobs.get(job_id, owner)
        if job is None:
            raise Rejected(404, self.jobs.unknown_reason(job_id, owner), param="job_id")
        if not job.final:
            job.cancel_requested = True
            self.sched.withdraw(job.work)
            if job.task is not None:
                await asyncio.wait({job.task}, timeout=DELETE_WAIT_SECONDS)
        return job.view(self.sched)

    async def get_result(self, result_id: str, owner: str | None) -> tuple[bytes, str]:
        item = self.results.get(result_id, owner)
        if item is None:
            raise Rejected(404, self.results.unknown_reason(result_id, owner), param="result_id")
        return item

    # ------------------------------------------------------------ running

    def new_work(self, endpoint: str, run: PipelineCall, steps: int) -> Work:
        """`endpoint`: generations | edits | videos (the metrics label)."""
        work = Work(
            endpoint=endpoint, run=run, total_steps=steps, future=asyncio.get_running_loop().create_future()
        )
        work.future.add_done_callback(_ignore_result)
        return work

    async def wait(self, work: Work, request: Request) -> EncodedResult:
        timeout = self.state.config.server.request_timeout_seconds
        watcher = asyncio.create_task(listen_for_disconnect(request))
        try:
            done, _ = await asyncio.wait(
                {work.future, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            watcher.cancel()
        if work.future not in done:
            self.sched.withdraw(work)
            if watcher in done:
                raise Rejected(499, "client disconnected")  # nginx's code; nobody reads this answer
            raise Rejected(504, f"request timed out after {timeout:g}s (request_timeout_seconds)")
        exc = work.future.exception()
        if exc is not None:
            log.error(
                "%s failed (key=%s): %s: %s", work.endpoint, key_name(request) or "-", type(exc).__name__, exc
            )
            raise Rejected(500, f"generation failed ({type(exc).__name__}: {exc})")
        result: EncodedResult = work.future.result()
        return result

    def record(self, result: EncodedResult, params: GenerationParams) -> None:
        record_result(self.state.metrics, result, params)

    def images_response(
        self,
        work: Work,
        result: EncodedResult,
        params: GenerationParams,
        req: ImageRequestFields,
        base_url: str,
        t0: float,
        owner: str | None = None,
    ) -> ImagesResponse:
        """`owner`: the key name whose requests may fetch url results (None: auth off)."""
        self.record(result, params)
        return build_images_response(
            result, params, req.output_format, req.response_format, base_url,
            put=lambda data, fmt: self.results.put(data, fmt, owner), queue_wait=work.started - work.enqueued, total=time.perf_counter() - t0,
        )  # fmt: skip

    async def respond(
        self, endpoint: Endpoint, work: Work, params: GenerationParams, req: ImageRequestFields, request: Request,
        prefer: str | None,
    ) -> ImagesResponse | Response:  # fmt: skip
        """Queue the work; answer 202 + job (Prefer: respond-async) or wait and answer the images."""
        t0 = request.scope.get("t0", time.perf_counter())
        base_url = str(request.base_url)
        owner = key_name(request)
        if req.webhook:
            await self.check_webhook(req.webhook)
        if prefers_async(prefer):
            job = Job(endpoint=endpoint, work=work, webhook=req.webhook, owner=owner)
            self.sched.submit(work)
            self.jobs.add(job)
            job.task = asyncio.create_task(self._follow(job, params, req, base_url, t0))
            self.finish(endpoint, 202, t0, owner)
            return JSONResponse(
                _json(job.view(self.sched)), status_code=202,
                headers={"Location": f"{JOBS_PATH}/{job.id}", "Preference-Applied": "respond-async"},
            )  # fmt: skip
        self.sched.submit(work)
        result = await self.wait(work, request)
        body = self.images_response(work, result, params, req, base_url, t0, owner)
        self.finish(endpoint, 200, t0, owner)
        if req.webhook:
            event = ImageResultEvent(endpoint=endpoint, result=body)
            task = asyncio.create_task(
                self.webhooks.deliver(req.webhook, _json(event), self._webhook_outcome)
            )
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)
        return body

    async def check_webhook(self, url: str) -> None:
        """The destination fence at submission: 400 naming the rule (resolved off the event loop)."""
        try:
            await asyncio.to_thread(self.webhooks.fence.check, url)
        except Refused as e:
            self._webhook_outcome("refused")
            raise Rejected(400, str(e), param="webhook") from e

    def _webhook_outcome(self, outcome: Outcome) -> None:
        self.state.metrics.webhooks.labels(result=outcome).inc()

    async def _follow(
        self, job: Job, params: GenerationParams, req: ImageRequestFields, base_url: str, t0: float
    ) -> None:
        work = job.work
        timeout = self.state.config.server.request_timeout_seconds
        try:
            result = await asyncio.wait_for(asyncio.shield(work.future), timeout)
        except TimeoutError:
            self.sched.withdraw(work)
            job.finish(
                "failed", error=error_detail(504, f"timed out after {timeout:g}s (request_timeout_seconds)")
            )
        except Cancelled:
            job.finish("cancelled", error=error_detail(400, "cancelled by DELETE before it finished"))
        except Exception as e:  # noqa: BLE001 - recorded in the job
            log.error("job %s failed (key=%s): %s: %s", job.id, job.owner or "-", type(e).__name__, e)
            job.finish("failed", error=error_detail(500, f"generation failed ({type(e).__name__}: {e})"))
        else:
            job.finish(
                "succeeded", result=self.images_response(work, result, params, req, base_url, t0, job.owner)
            )
        self.state.metrics.jobs.labels(endpoint=job.endpoint, status=job.final).inc()
        if job.webhook:
            await self.webhooks.deliver(job.webhook, _json(job.view(self.sched)), self._webhook_outcome)

    # ------------------------------------------------------------ edits: the multipart form

    async def read_edit_form(self, request: Request) -> tuple[EditRequestFields, list[bytes], bytes | None]:
        try:
            form = await request.form(max_files=8, max_fields=MAX_FORM_FIELDS, max_part_size=1 << 20)
        except MultiPartException as e:
            raise Rejected(400, f"multipart body: {e.message}") from e
        images: list[bytes] = []
        mask: bytes | None = None
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            name = key[:-2] if key.endswith("[]") else key
            if name in ("image", "mask"):
                if not isinstance(value, UploadFile):
                    raise Rejected(
                        400, f"{name}: must be a file part (an image upload), got a text field", param=name
                    )
                data = await value.read()
                if name == "image":
                    images.append(data)
                elif mask is not None:
                    raise Rejected(400, "mask: only one mask may be sent", param="mask")
                else:
                    mask = data
                continue
            if isinstance(value, UploadFile):
                raise Rejected(400, f"{name}: expected a text field, got a file upload", param=name)
            if name in fields:
                raise Rejected(400, f"{name}: sent more than once", param=name)
            fields[name] = value
        await form.close()
        if not images:
            raise Rejected(400, "image: required (a PNG, JPEG or WebP file part named image)", param="image")
        if len(images) > 1:
            raise Rejected(
                400, f"image: this runtime edits one image per request, got {len(images)}", param="image"
            )
        try:
            req = cast(EditRequestFields, self.protocol.edit.model_validate(fields))
        except ValidationError as e:
            msg, param = validation_message(e.errors())  # type: ignore[arg-type]
            raise Rejected(400, msg, param=param) from e
        return req, images, mask


def _json(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
