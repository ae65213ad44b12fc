"""The routes: images (generations, edits, jobs, results), models, and operations.

No `from __future__ import annotations` here: FastAPI reads the per-config request models from the
handlers' annotations at import time.
"""

import asyncio
import base64
import logging
import random
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from diffusion_runtime.contract.config import parse_size
from diffusion_runtime.images import MEDIA_TYPES, decode_upload, fit_size, mask_from_upload
from diffusion_runtime.jobs import Job, JobStore, ResultStore, deliver_webhook
from diffusion_runtime.pipelines import (
    DEFAULT_STRENGTH,
    EditPipelines,
    edit_call,
    edit_steps,
    generation_call,
)
from diffusion_runtime.protocol import (
    ErrorResponse,
    HealthStatus,
    ImagesResponse,
    JobStatus,
    ModelCard,
    ModelList,
    Protocol,
    ReadyStatus,
    error_responses,
    prefers_async,
)
from diffusion_runtime.scheduler import Rejected, Scheduler, Work

log = logging.getLogger("diffusion_runtime")

GENERATIONS_PATH = "/v1/images/generations"
EDITS_PATH = "/v1/images/edits"
JOBS_PATH = "/v1/images/jobs"
RESULTS_PATH = "/v1/images/results"
ENDPOINTS = {GENERATIONS_PATH: "generations", EDITS_PATH: "edits"}
MAX_FORM_FIELDS = 64
DELETE_WAIT_SECONDS = 5.0

PreferHeader = Annotated[
    str,
    Header(
        examples=["respond-async"],
        description="`respond-async`: answer 202 with a job (poll GET /v1/images/jobs/{id}) instead of "
        "holding the connection until the images are done (RFC 7240)",
    ),
]


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    if status == 429:
        kind = "rate_limit_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def error_response(
    status: int, message: str, retry_after: int | None = None, param: str | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """pydantic/FastAPI errors -> one line naming the fields, and the first field."""
    parts, first = [], None
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        first = first or (loc or None)
        if err.get("type") == "json_invalid":
            parts.append(f"malformed JSON body ({err.get('ctx', {}).get('error', 'invalid JSON')})")
        elif err.get("type") == "missing" and not loc:
            parts.append("request body is required (JSON object)")
        else:
            parts.append(f"{loc or 'body'}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", first


async def listen_for_disconnect(request: Request) -> None:
    """Returns when the client goes away: awaits the ASGI receive channel (no polling)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _ignore_result(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


class ImageApi:
    """What the image routes share: limits, the scheduler, jobs, results, edit pipelines, metrics."""

    def __init__(self, state: Any, protocol: Protocol):
        self.state = state
        self.protocol = protocol
        s = state.config.server
        self.jobs = JobStore(s.max_jobs, s.job_ttl_seconds)
        self.results = ResultStore(s.max_jobs * s.max_n, s.job_ttl_seconds)
        self._edit_pipes: EditPipelines | None = None
        self.scheduler: Scheduler | None = None

    @property
    def sched(self) -> Scheduler:
        assert self.scheduler is not None, "lifespan not started"
        return self.scheduler

    @property
    def metrics(self) -> Any:
        return self.state.metrics

    def finish(self, endpoint: str, status: int, t0: float) -> None:
        m = self.metrics
        m.request_duration.labels(endpoint=endpoint, status=str(status)).observe(time.perf_counter() - t0)
        m.requests.labels(endpoint=endpoint, status=str(status)).inc()

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
        multiple = self.state.model.size_multiple if self.state.model is not None else 16
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

    def common(self, req: Any, width: int, height: int) -> dict[str, Any]:
        s = self.state.config.server
        steps = (
            req.num_inference_steps if req.num_inference_steps is not None else self.state.config.warmup.steps
        )
        if not 1 <= steps <= s.max_steps:  # the schema's bound too; kept for configs changed at runtime
            raise Rejected(400, f"num_inference_steps: {steps} is out of range [1, {s.max_steps}]")
        return {
            "prompt": req.prompt, "width": width, "height": height, "steps": steps, "run_steps": steps,
            "seed": req.seed if req.seed is not None else random.randrange(2**31), "n": req.n,
            "guidance_scale": req.guidance_scale, "negative_prompt": req.negative_prompt,
            "true_cfg_scale": req.true_cfg_scale, "output_format": req.output_format,
            "output_compression": req.output_compression, "response_format": req.response_format,
        }  # fmt: skip

    def edit_pipes(self) -> EditPipelines:
        if self._edit_pipes is None or self._edit_pipes.model is not self.state.model:
            self._edit_pipes = EditPipelines(self.state.model)
        return self._edit_pipes

    # ------------------------------------------------------------ running

    def new_work(self, endpoint: str, run: Any, steps: int) -> Work:
        work = Work(
            endpoint=endpoint, run=run, total_steps=steps, future=asyncio.get_running_loop().create_future()
        )
        work.future.add_done_callback(_ignore_result)
        return work

    async def wait(self, work: Work, request: Request) -> dict[str, Any]:
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
            log.error("%s failed: %s: %s", work.endpoint, type(exc).__name__, exc)
            raise Rejected(500, f"generation failed ({type(exc).__name__}: {exc})")
        result: dict[str, Any] = work.future.result()
        return result

    def record(self, result: dict[str, Any]) -> None:
        m = self.metrics
        m.inference_duration.observe(result["inference_seconds"])
        for s in result["step_seconds"]:
            m.step_duration.observe(s)
        m.cache_steps.labels(result="cached").inc(result["cached_steps"])
        m.cache_steps.labels(result="computed").inc(result["computed_steps"])
        m.images.inc(len(result["images"]))

    def images_response(
        self, work: Work, result: dict[str, Any], p: dict[str, Any], base_url: str, t0: float
    ) -> dict[str, Any]:
        self.record(result)
        fmt = p["output_format"]
        if p["response_format"] == "url":
            base = base_url.rstrip("/")
            data = [{"url": f"{base}{RESULTS_PATH}/{self.results.put(b, fmt)}"} for b in result["images"]]
        else:
            data = [{"b64_json": base64.b64encode(b).decode("ascii")} for b in result["images"]]
        return {
            "created": int(time.time()),
            "data": data,
            "output_format": fmt,
            "seed": result["seed"],
            "size": f"{p['width']}x{p['height']}",
            "num_inference_steps": p["steps"],
            "timings": {
                "queue_wait_seconds": round(work.started - work.enqueued, 6),
                "inference_seconds": round(result["inference_seconds"], 6),
                "total_seconds": round(time.perf_counter() - t0, 6),
            },
            "cache": {"cached_steps": result["cached_steps"], "computed_steps": result["computed_steps"]},
        }

    async def respond(
        self, endpoint: str, work: Work, p: dict[str, Any], request: Request, prefer: str | None,
        webhook: str | None, t0: float,
    ) -> Any:  # fmt: skip
        """Queue the work; answer 202 + job (Prefer: respond-async) or wait and answer the images."""
        base_url = str(request.base_url)
        if prefers_async(prefer):
            job = Job(endpoint=endpoint, work=work, webhook=webhook)
            self.sched.submit(work)
            self.jobs.add(job)
            job.task = asyncio.create_task(self._follow(job, p, base_url, t0))
            self.finish(endpoint, 202, t0)
            return JSONResponse(
                job.view(self.sched), status_code=202,
                headers={"Location": f"{JOBS_PATH}/{job.id}", "Preference-Applied": "respond-async"},
            )  # fmt: skip
        self.sched.submit(work)
        result = await self.wait(work, request)
        body = self.images_response(work, result, p, base_url, t0)
        self.finish(endpoint, 200, t0)
        if webhook:
            payload = {
                "id": None,
                "object": "image.result",
                "endpoint": endpoint,
                "status": "succeeded",
                "result": body,
            }
            asyncio.create_task(deliver_webhook(webhook, payload, self._webhook_done))
        return body

    def _webhook_done(self, ok: bool) -> None:
        self.metrics.webhooks.labels(result="ok" if ok else "error").inc()

    async def _follow(self, job: Job, p: dict[str, Any], base_url: str, t0: float) -> None:
        from diffusion_runtime.model import Cancelled

        work = job.work
        timeout = self.state.config.server.request_timeout_seconds
        try:
            result = await asyncio.wait_for(asyncio.shield(work.future), timeout)
        except TimeoutError:
            self.sched.withdraw(work)
            job.finish(
                "failed",
                error=error_body(504, f"timed out after {timeout:g}s (request_timeout_seconds)")["error"],
            )
        except Cancelled:
            job.finish("cancelled", error=error_body(400, "cancelled by DELETE before it finished")["error"])
        except Exception as e:  # noqa: BLE001 - recorded in the job
            log.error("job %s failed: %s: %s", job.id, type(e).__name__, e)
            job.finish(
                "failed", error=error_body(500, f"generation failed ({type(e).__name__}: {e})")["error"]
            )
        else:
            job.finish("succeeded", result=self.images_response(work, result, p, base_url, t0))
        self.metrics.jobs.labels(endpoint=job.endpoint, status=job.final).inc()
        if job.webhook:
            await deliver_webhook(job.webhook, job.view(self.sched), self._webhook_done)

    # ------------------------------------------------------------ edits: the multipart form

    async def read_edit_form(self, request: Request) -> tuple[Any, list[bytes], bytes | None]:
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
            req = self.protocol.edit.model_validate(fields)
        except ValidationError as e:
            msg, param = validation_message(e.errors())  # type: ignore[arg-type]
            raise Rejected(400, msg, param=param) from e
        return req, images, mask


def images_router(api: ImageApi) -> APIRouter:
    router = APIRouter(tags=["images"])
    GenerationRequest: Any = api.protocol.generation
    answers: dict[int | str, dict[str, Any]] = {
        200: {"description": "the images"},
        202: {"model": JobStatus, "description": "Prefer: respond-async: the job"},
    }

    @router.post(
        GENERATIONS_PATH,
        operation_id="createImage",
        response_model=ImagesResponse,
        responses={**answers, **error_responses(400, 413, 415, 429, 500, 503, 504)},
        summary="Create images from a prompt (OpenAI images API)",
    )
    async def generations(req: GenerationRequest, request: Request, prefer: PreferHeader = "") -> Any:
        t0 = request.scope.get("t0", time.perf_counter())
        try:
            width, height = api.size(req.size)
            p = api.common(req, width, height)
            work = api.new_work("generations", generation_call(api.state.model, p), p["steps"])
            return await api.respond("generations", work, p, request, prefer, req.webhook, t0)
        except Rejected as r:
            api.finish("generations", r.status, t0)
            return error_response(r.status, r.message, r.retry_after, r.param)

    @router.post(
        EDITS_PATH,
        operation_id="createImageEdit",
        response_model=ImagesResponse,
        responses={**answers, **error_responses(400, 413, 415, 429, 500, 503, 504)},
        openapi_extra={"requestBody": api.protocol.edit_request_body()},
        summary="Edit an image (image-to-image; with a mask, inpainting), OpenAI's multipart fields",
    )
    async def edits(request: Request, prefer: PreferHeader = "") -> Any:
        t0 = request.scope.get("t0", time.perf_counter())
        try:
            api.sched.admit()  # 503/429 before reading a large upload
            req, images, mask_bytes = await api.read_edit_form(request)
            image = decode_upload(images[0], "image").convert("RGB")
            mask = None
            if mask_bytes is not None:
                mask_img = decode_upload(mask_bytes, "mask")
                if mask_img.size != image.size:
                    raise Rejected(
                        400,
                        f"mask: {mask_img.width}x{mask_img.height} does not match the image's "
                        f"{image.width}x{image.height}",
                        param="mask",
                    )
                mask = mask_from_upload(mask_img)
            multiple = api.state.model.size_multiple
            default = fit_size(image.width, image.height, api.state.config.server.max_pixels, multiple)
            width, height = api.size(req.size, default=default)
            p = api.common(req, width, height)
            kind = "inpaint" if mask is not None else "img2img"
            pipe = api.edit_pipes().get(kind)
            strength = req.strength if req.strength is not None else DEFAULT_STRENGTH[kind]
            p["run_steps"], p["strength"] = edit_steps(p["steps"], strength)
            p["image"], p["mask"] = image, mask
            work = api.new_work("edits", edit_call(api.state.model, pipe, p), p["run_steps"])
            return await api.respond("edits", work, p, request, prefer, req.webhook, t0)
        except Rejected as r:
            api.finish("edits", r.status, t0)
            return error_response(r.status, r.message, r.retry_after, r.param)

    @router.get(
        JOBS_PATH + "/{job_id}",
        operation_id="getImageJob",
        response_model=JobStatus,
        responses=error_responses(404),
        summary="An async job: status, queue position, step progress and, when done, the result",
    )
    async def get_job(job_id: str) -> Any:
        job = api.jobs.get(job_id)
        if job is None:
            return error_response(404, api.jobs.unknown_reason(job_id), param="job_id")
        return job.view(api.sched)

    @router.delete(
        JOBS_PATH + "/{job_id}",
        operation_id="cancelImageJob",
        response_model=JobStatus,
        responses=error_responses(404),
        summary="Cancel an async job: a queued job leaves the queue, a running one stops at its next step",
    )
    async def cancel_job(job_id: str) -> Any:
        job = api.jobs.get(job_id)
        if job is None:
            return error_response(404, api.jobs.unknown_reason(job_id), param="job_id")
        if not job.final:
            job.cancel_requested = True
            api.sched.withdraw(job.work)
            if job.task is not None:
                await asyncio.wait({job.task}, timeout=DELETE_WAIT_SECONDS)
        return job.view(api.sched)

    binary = {"schema": {"type": "string", "format": "binary"}}

    @router.get(
        RESULTS_PATH + "/{result_id}",
        operation_id="getImageResult",
        response_class=Response,
        responses={
            200: {"description": "the image", "content": {t: binary for t in MEDIA_TYPES.values()}},
            **error_responses(404),
        },
        summary="An image of a response_format=url answer, served for server.job_ttl_seconds",
    )
    async def get_result(result_id: str) -> Response:
        item = api.results.get(result_id)
        if item is None:
            return error_response(404, api.results.unknown_reason(result_id), param="result_id")
        data, fmt = item
        return Response(content=data, media_type=MEDIA_TYPES[fmt])

    return router


def model_id(uri: str) -> str:
    for prefix in ("hf://", "file://"):
        if uri.startswith(prefix):
            return uri[len(prefix) :]
    return uri


def models_router(state: Any, started: float) -> APIRouter:
    router = APIRouter(tags=["models"])

    def card() -> dict[str, Any]:
        return {
            "id": model_id(state.config.model.uri),
            "object": "model",
            "created": int(started),
            "owned_by": "diffusion-runtime",
            "pipeline": state.model.pipeline_name if state.model is not None else None,
            "ready": bool(state.ready),
        }

    @router.get(
        "/v1/models",
        operation_id="listModels",
        response_model=ModelList,
        summary="The served model (OpenAI's list shape)",
    )
    async def list_models() -> Any:
        return {"object": "list", "data": [card()]}

    @router.get(
        "/v1/models/{model_id:path}",
        operation_id="retrieveModel",
        response_model=ModelCard,
        responses=error_responses(404),
        summary="One model by id",
    )
    async def get_model(model_id: str) -> Any:
        c = card()
        if model_id != c["id"]:
            return error_response(404, f"model {model_id!r} is not served here; this pod serves {c['id']!r}")
        return c

    return router


def ops_router(state: Any) -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get(
        "/health", response_model=HealthStatus, summary="Alive (answers as soon as the process listens)"
    )
    async def health() -> Any:
        return {"status": "alive", "phase": state.phase}

    @router.get(
        "/ready",
        operation_id="ready",
        response_model=ReadyStatus,
        responses={503: {"model": ReadyStatus, "description": "loading, warming up, draining or failed"}},
        summary="Ready: 200 only after load and warmup, 503 before and while draining",
    )
    async def ready() -> Any:
        if state.ready:
            return {"status": "ready", "error": None}
        phase = "draining" if state.draining else state.phase
        return JSONResponse(
            {"status": phase, "error": state.error}, status_code=503, headers={"Retry-After": "5"}
        )

    @router.get(
        "/metrics",
        operation_id="metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
        summary="Prometheus metrics",
    )
    async def metrics_endpoint() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router


__all__ = [
    "EDITS_PATH",
    "GENERATIONS_PATH",
    "ENDPOINTS",
    "ErrorResponse",
    "ImageApi",
    "BaseModel",
    "error_body",
    "error_response",
    "images_router",
    "models_router",
    "ops_router",
    "validation_message",
]
