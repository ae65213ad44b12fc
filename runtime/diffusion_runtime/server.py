"""HTTP server: OpenAI-style image API over one pipeline, one generation at a time.

- `/health` answers as soon as the process listens; `/ready` is 200 only after load AND warmup.
- Admission: a bounded FIFO queue in front of a single worker thread; full -> 429 + Retry-After;
  not ready or draining -> 503 + Retry-After.
- A request that times out or whose client disconnects leaves the queue at once; if it is already
  running, the pipeline stops at the next step (the step callback raises).
- SIGTERM: /ready turns 503, admissions stop, queued and running requests finish, then exit 0.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import io
import logging
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from diffusion_runtime.config import RuntimeConfig, parse_size
from diffusion_runtime.metrics import RuntimeMetrics

log = logging.getLogger("diffusion_runtime")
GENERATIONS_PATH = "/v1/images/generations"


class ImageRequest(BaseModel):
    """OpenAI images API fields plus the diffusion knobs (SGLang-compatible names)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    n: int = 1
    size: str | None = Field(None, description="WIDTHxHEIGHT; default: the first warmup resolution")
    response_format: str = "b64_json"
    num_inference_steps: int | None = Field(None, description="default: warmup.steps")
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    model: str | None = None
    user: str | None = None
    quality: str | None = None
    style: str | None = None


@dataclass
class Job:
    prompt: str
    width: int
    height: int
    steps: int
    seed: int
    n: int
    guidance_scale: float | None
    negative_prompt: str | None
    true_cfg_scale: float | None
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    cancel: threading.Event = field(default_factory=threading.Event)


class Rejected(Exception):
    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


@dataclass
class RuntimeState:
    config: RuntimeConfig
    metrics: RuntimeMetrics
    model: Any = None  # diffusion_runtime.model.Model once loaded
    phase: str = "loading"  # loading | warming up | ready | draining | failed
    error: str | None = None
    draining: bool = False

    @property
    def ready(self) -> bool:
        return self.phase == "ready" and not self.draining


class Scheduler:
    """FIFO queue of Jobs in front of one worker thread that owns the pipeline."""

    def __init__(self, state: RuntimeState):
        self.state = state
        self.queue: collections.deque[Job] = collections.deque()
        self.running: Job | None = None
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._avg_seconds = 0.0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def idle(self) -> bool:
        return not self.queue and self.running is None

    def retry_after(self) -> int:
        per_job = self._avg_seconds or 1.0
        return max(1, math.ceil(per_job * (len(self.queue) + 1)))

    def _gauge(self) -> None:
        self.state.metrics.queue_depth.set(len(self.queue))

    def submit(self, job: Job) -> None:
        if self.state.draining:
            raise Rejected(503, "server is shutting down; retry on another replica", retry_after=1)
        if self.state.phase != "ready":
            raise Rejected(503, f"model not ready ({self.state.phase})", retry_after=5)
        if len(self.queue) >= self.state.config.server.max_queue:
            raise Rejected(429, f"queue full ({len(self.queue)} waiting)", retry_after=self.retry_after())
        self.queue.append(job)
        self._gauge()
        self._wakeup.set()

    def withdraw(self, job: Job) -> None:
        """Drop a job that nobody waits for: out of the queue, or stop it at the next step."""
        job.cancel.set()
        try:
            self.queue.remove(job)
        except ValueError:
            pass
        self._gauge()

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            job = self.queue.popleft()
            self._gauge()
            if job.cancel.is_set() or job.future.done():
                continue
            self.running = job
            job.started = time.perf_counter()
            self.state.metrics.queue_wait.observe(job.started - job.enqueued)
            self.state.metrics.in_flight.set(1)
            try:
                result = await loop.run_in_executor(self.executor, _run_job, self.state.model, job)
                self._avg_seconds = (
                    0.7 * self._avg_seconds + 0.3 * result["inference_seconds"]
                    if self._avg_seconds
                    else result["inference_seconds"]
                )
                if not job.future.done():
                    job.future.set_result(result)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                if not job.future.done():
                    job.future.set_exception(e)
            finally:
                self.running = None
                self.state.metrics.in_flight.set(0)


def _encode_png(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # fast zlib level: latency over bytes
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _run_job(model: Any, job: Job) -> dict[str, Any]:
    """Runs in the pipeline thread: generate, then encode (keeps the event loop free)."""
    result = model.generate(
        job.prompt, job.width, job.height, job.steps, job.seed, n=job.n,
        guidance_scale=job.guidance_scale, negative_prompt=job.negative_prompt,
        true_cfg_scale=job.true_cfg_scale, cancel=job.cancel,
    )  # fmt: skip
    return {
        "b64": [_encode_png(im) for im in result.images],
        "inference_seconds": result.inference_seconds,
        "step_seconds": result.step_seconds,
        "cached_steps": result.cached_steps,
        "computed_steps": result.computed_steps,
        "seed": result.seed,
    }


def _error(
    status: int, message: str, retry_after: int | None = None, param: str | None = None
) -> JSONResponse:
    kind = "invalid_request_error" if 400 <= status < 500 and status not in (429,) else "server_error"
    if status == 429:
        kind = "rate_limit_error"
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param}}, status_code=status, headers=headers
    )


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "json_invalid":
            parts.append(f"malformed JSON body ({err.get('ctx', {}).get('error', 'invalid JSON')})")
        elif err.get("type") == "missing" and not loc:
            parts.append("request body is required (JSON object)")
        else:
            parts.append(f"{loc or 'body'}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request"


def check_request(req: ImageRequest, state: RuntimeState) -> tuple[int, int, int]:
    """Field checks against the server limits; returns (width, height, steps) or raises Rejected(400)."""
    s = state.config.server
    if not req.prompt.strip():
        raise Rejected(400, "prompt: must not be empty")
    if req.response_format != "b64_json":
        raise Rejected(400, f"response_format: only 'b64_json' is supported, got {req.response_format!r}")
    if not 1 <= req.n <= s.max_n:
        raise Rejected(400, f"n: {req.n} is out of range [1, {s.max_n}]")
    default_size = state.config.warmup.resolutions[0] if state.config.warmup.resolutions else "1024x1024"
    size = req.size if req.size is not None else default_size
    try:
        width, height = parse_size(size)
    except ValueError as e:
        raise Rejected(400, f"size: {e}") from e
    multiple = state.model.size_multiple if state.model is not None else 16
    if width < multiple or height < multiple or width % multiple or height % multiple:
        raise Rejected(400, f"size: {width}x{height} must be positive multiples of {multiple}")
    if width * height > s.max_pixels:
        raise Rejected(
            400, f"size: {width}x{height} = {width * height} pixels exceeds max_pixels={s.max_pixels}"
        )
    steps = req.num_inference_steps if req.num_inference_steps is not None else state.config.warmup.steps
    if not 1 <= steps <= s.max_steps:
        raise Rejected(400, f"num_inference_steps: {steps} is out of range [1, {s.max_steps}]")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise Rejected(400, f"seed: {req.seed} is out of range [0, 2^63)")
    for name in ("guidance_scale", "true_cfg_scale"):
        v = getattr(req, name)
        if v is not None and (not math.isfinite(v) or not 0 <= v <= 100):
            raise Rejected(400, f"{name}: {v} is out of range [0, 100]")
    return width, height, steps


def create_app(state: RuntimeState) -> FastAPI:
    scheduler: Scheduler | None = None
    metrics = state.metrics

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal scheduler
        scheduler = Scheduler(state)
        scheduler.start()
        app.state.scheduler = scheduler
        app.state.loop = asyncio.get_running_loop()
        try:
            yield
        finally:
            await scheduler.stop()

    app = FastAPI(title="diffusion-runtime", version="0.1.0", lifespan=lifespan)

    def finish(status: int, t0: float) -> None:
        metrics.request_duration.labels(status=str(status)).observe(time.perf_counter() - t0)
        metrics.requests.labels(status=str(status)).inc()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        if request.url.path == GENERATIONS_PATH:
            finish(400, request.scope.get("t0", time.perf_counter()))
        return _error(400, _validation_message(exc))

    app.add_middleware(_StampMiddleware)

    @app.get("/health")
    async def health():
        return {"status": "alive", "phase": state.phase}

    @app.get("/ready")
    async def ready():
        if state.ready:
            return {"status": "ready"}
        phase = "draining" if state.draining else state.phase
        return JSONResponse(
            {"status": phase, "error": state.error}, status_code=503, headers={"Retry-After": "5"}
        )

    @app.get("/metrics")
    async def metrics_endpoint():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post(GENERATIONS_PATH)
    async def generations(req: ImageRequest, request: Request):
        t0 = request.scope.get("t0", time.perf_counter())
        assert scheduler is not None
        try:
            width, height, steps = check_request(req, state)
            seed = req.seed if req.seed is not None else random.randrange(2**31)
            job = Job(
                prompt=req.prompt, width=width, height=height, steps=steps, seed=seed, n=req.n,
                guidance_scale=req.guidance_scale, negative_prompt=req.negative_prompt,
                true_cfg_scale=req.true_cfg_scale, future=asyncio.get_running_loop().create_future(),
            )  # fmt: skip
            scheduler.submit(job)
        except Rejected as r:
            finish(r.status, t0)
            return _error(r.status, r.message, r.retry_after)
        timeout = state.config.server.request_timeout_seconds
        watcher = asyncio.create_task(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait(
                {job.future, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            watcher.cancel()
        if job.future not in done:
            scheduler.withdraw(job)
            if watcher in done:
                finish(499, t0)  # nginx's "client closed request"; nobody reads this response
                return _error(499, "client disconnected")
            finish(504, t0)
            return _error(504, f"request timed out after {timeout:g}s (request_timeout_seconds)")
        exc = job.future.exception()
        if exc is not None:
            log.error("generation failed: %s: %s", type(exc).__name__, exc)
            finish(500, t0)
            return _error(500, f"generation failed ({type(exc).__name__}: {exc})")
        result = job.future.result()
        metrics.inference_duration.observe(result["inference_seconds"])
        for s in result["step_seconds"]:
            metrics.step_duration.observe(s)
        metrics.cache_steps.labels(result="cached").inc(result["cached_steps"])
        metrics.cache_steps.labels(result="computed").inc(result["computed_steps"])
        metrics.images.inc(len(result["b64"]))
        total = time.perf_counter() - t0
        finish(200, t0)
        return {
            "created": int(time.time()),
            "data": [{"b64_json": b} for b in result["b64"]],
            "seed": result["seed"],
            "size": f"{width}x{height}",
            "num_inference_steps": steps,
            "timings": {
                "queue_wait_seconds": round(job.started - job.enqueued, 6),
                "inference_seconds": round(result["inference_seconds"], 6),
                "total_seconds": round(total, 6),
            },
            "cache": {"cached_steps": result["cached_steps"], "computed_steps": result["computed_steps"]},
        }

    return app


class _StampMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware, which hides client disconnects): request start time."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope["t0"] = time.perf_counter()
        await self.app(scope, receive, send)


async def _wait_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)


def make_server(app: FastAPI, state: RuntimeState, host: str, port: int):
    """A uvicorn server whose SIGTERM/SIGINT drains instead of dropping connections."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # called from the signal handler
            if state.draining or state.phase != "ready":
                if state.draining and sig == signal.SIGINT:
                    self.force_exit = True
                self.should_exit = True
                return
            state.draining = True
            state.metrics.ready.set(0)
            loop = getattr(app.state, "loop", None)
            if loop is None:
                self.should_exit = True
                return
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

        async def _drain(self) -> None:
            log.info("signal received: not ready, no new admissions, finishing queued and running requests")
            scheduler: Scheduler = app.state.scheduler
            deadline = time.monotonic() + state.config.server.request_timeout_seconds + 5
            while not scheduler.idle and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)  # let the last responses flush
            self.should_exit = True

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=30,
    )
    return DrainingServer(config)
