"""The HTTP app: OpenAI-style image API over one pipeline, one pipeline call at a time.

- `/health` answers as soon as the process listens; `/ready` is 200 only after load AND warmup.
- Admission: one bounded FIFO queue in front of one worker thread (`engine/scheduler.py`) for every path
  (generations, edits, async jobs); full -> 429 + Retry-After; not ready or draining -> 503.
- A request that times out or whose client disconnects leaves the queue at once; if it is already
  running, the pipeline stops at the next step (the step callback raises).
- Bodies are bounded before they are read (`_Guard`): 413 past the limit, 415 for a wrong media type.
- SIGTERM: /ready turns 503, admissions stop, queued and running requests finish, then exit 0.
- With `server.auth_keys_dir`, every /v1 route needs an API key (`api/auth.py`); /health, /ready and
  /metrics never do.

Models: `api/protocol.py`; state and phase: `api/state.py`; errors: `api/errors.py`; the serving
object: `api/serving.py`; routes: `api/routers.py`; jobs: `api/jobs.py`; queue and worker:
`engine/scheduler.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from diffusion_runtime.api import auth
from diffusion_runtime.api.errors import Rejected, error_response, validation_message
from diffusion_runtime.api.protocol import (
    ERROR_DESCRIPTIONS,
    JSON_BODY_MAX_BYTES,
    SIZE_FORMAT,
    Protocol,
    build_protocol,
)
from diffusion_runtime.api.routers import images_router, models_router, ops_router
from diffusion_runtime.api.serving import EDITS_PATH, ENDPOINTS, ImageServing
from diffusion_runtime.api.state import Phase, RuntimeState
from diffusion_runtime.api.videos.protocol import VIDEOS_PATH
from diffusion_runtime.api.videos.router import videos_router
from diffusion_runtime.api.videos.serving import ENDPOINT as VIDEOS_ENDPOINT
from diffusion_runtime.api.videos.serving import VideoServing
from diffusion_runtime.engine.errors import EngineError

log = logging.getLogger("diffusion_runtime")
API_VERSION = "0.2.0"


ServingFactory = Callable[[RuntimeState, Protocol], ImageServing]


def create_app(
    state: RuntimeState, serving: ServingFactory = ImageServing, title: str = "diffusion-runtime"
) -> FastAPI:
    """The app over one serving object: this pod's scheduler (`ImageServing`), or another backend
    of the same routes and checks (the shared queue: `queue.frontdoor.QueueServing`)."""
    protocol = build_protocol(state.config)
    api = serving(state, protocol)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loop = asyncio.get_running_loop()
        await api.startup()
        try:
            yield
        finally:
            await api.shutdown()

    app = FastAPI(
        title=title,
        version=API_VERSION,
        lifespan=lifespan,
        description=(
            "OpenAI-compatible images API (generations, edits) over one diffusers pipeline with "
            "cache-dit, plus async jobs (`Prefer: respond-async`); a video pipeline (Wan) serves OpenAI's "
            "videos API (`/v1/videos`, always asynchronous) instead. Every error answer has the body "
            f"`ErrorResponse`. `size` has the custom format `{SIZE_FORMAT}`: WIDTHxHEIGHT, both "
            "multiples of `x-multiple-of`, at most `x-max-pixels` pixels."
        ),
    )
    app.state.serving = api
    # /v1/videos: on this pod's scheduler, or (the front door) through the shared queue (docs/video.md)
    videos = (api.videos_class or VideoServing)(api)
    app.state.videos = videos
    keys = auth.install(app, state.config.server)  # ConfigError: unreadable folder, no key

    def count(request: Request, status: int) -> None:
        """An error answer of a request that creates work counts in its endpoint's request metrics."""
        endpoint = counted_endpoint(request.scope)
        if endpoint:
            api.finish(endpoint, status, request.scope.get("t0", time.perf_counter()), auth.key_name(request))

    @app.exception_handler(Rejected)
    @app.exception_handler(EngineError)
    async def _rejected(request: Request, exc: Exception):
        """Every route's refusals (`Rejected`) and the engine's (`EngineError`, mapped by `Rejected.of`)."""
        r = exc if isinstance(exc, Rejected) else Rejected.of(cast(EngineError, exc))
        count(request, r.status)
        return r.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        count(request, 400)
        message, param = validation_message(list(exc.errors()))
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        count(request, exc.status_code)
        resp = error_response(exc.status_code, str(exc.detail), param=None, code=getattr(exc, "code", None))
        resp.headers.update(exc.headers or {})
        if exc.status_code == 405:  # Allow: every method any route serves at this path
            methods = set()
            for route in app.router.routes:
                match, _ = route.matches(request.scope)
                if match != Match.NONE:
                    methods |= set(getattr(route, "methods", None) or ())
            resp.headers["Allow"] = ", ".join(sorted(methods))
        return resp

    app.add_middleware(_Guard, state=state, max_upload_bytes=protocol.max_upload_bytes)
    app.include_router(images_router(protocol))
    app.include_router(videos_router(videos))
    app.include_router(models_router(time.time()))
    app.include_router(ops_router())

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            # validation errors answer 400 with the error body (OpenAI's behaviour), never 422
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            if keys is not None:  # declared only where it is enforced
                _declare_auth(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _declare_auth(schema: dict[str, Any]) -> None:
    """The bearer scheme on every /v1 operation, with its 401 answer."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(auth.security_scheme())
    ref = {"$ref": "#/components/schemas/ErrorResponse"}  # every route declares an error answer
    for path, item in schema.get("paths", {}).items():
        if not path.startswith("/v1/"):
            continue
        for op in item.values():
            op["security"] = [{auth.SCHEME: []}]
            op.setdefault("responses", {})["401"] = {
                "description": ERROR_DESCRIPTIONS[401],
                "content": {"application/json": {"schema": ref}},
            }


def counted_endpoint(scope: Mapping[str, Any]) -> str | None:
    """The endpoint whose request metrics a request counts in: the image endpoints' paths, and the
    POST that creates a clip (the other /v1/videos routes read or delete, and are not counted)."""
    path = scope["path"]
    if path == VIDEOS_PATH:
        return VIDEOS_ENDPOINT if scope["method"] == "POST" else None
    return ENDPOINTS.get(path)


class _Guard:
    """Pure ASGI (BaseHTTPMiddleware would hide client disconnects): stamps the request start and
    bounds the image endpoints' bodies before they are read: Content-Length over the limit is 413 at
    once, a body that grows past it while streaming is 413 at that point; a wrong media type is 415.
    """

    def __init__(self, app: Any, state: RuntimeState, max_upload_bytes: int):
        self.app = app
        self.state = state
        self.max_upload_bytes = max_upload_bytes

    async def _reject(self, send: Any, scope: dict, status: int, message: str) -> None:
        api: ImageServing = scope["app"].state.serving
        api.finish(cast(str, counted_endpoint(scope)), status, scope["t0"])
        resp = error_response(status, message)
        await resp(scope, _no_receive, send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope["t0"] = time.perf_counter()
        path = scope["path"]
        if scope["method"] != "POST" or counted_endpoint(scope) is None:
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if path == VIDEOS_PATH:  # the openai client sends a form; JSON is taken too
            limit, what = self.max_upload_bytes, "server.max_upload_bytes"
            if ctype not in ("multipart/form-data", "application/json"):
                await self._reject(
                    send,
                    scope,
                    415,
                    f"content-type: {ctype or 'none'}; send multipart/form-data or application/json",
                )
                return
        elif path == EDITS_PATH:
            limit, what = self.max_upload_bytes, "server.max_upload_bytes"
            if ctype != "multipart/form-data":
                await self._reject(
                    send, scope, 415,
                    f"content-type: {ctype or 'none'}; send multipart/form-data (image, mask and fields as parts)",
                )  # fmt: skip
                return
        else:
            limit, what = JSON_BODY_MAX_BYTES, "the JSON body limit"
            if ctype and ctype != "application/json" and not ctype.endswith("+json"):
                await self._reject(send, scope, 415, f"content-type: {ctype}; send application/json")
                return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._reject(
                send, scope, 413, f"request body of {int(length)} bytes exceeds {limit} bytes ({what})"
            )
            return
        seen = 0

        async def bounded_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise StarletteHTTPException(413, f"request body exceeds {limit} bytes ({what})")
            return message

        await self.app(scope, bounded_receive, send)


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}


def make_server(app: FastAPI, state: RuntimeState, host: str, port: int):
    """A uvicorn server whose SIGTERM/SIGINT drains instead of dropping connections."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # called from the signal handler
            if state.draining or state.phase != Phase.READY:
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
            api: ImageServing = app.state.serving
            await api.drain(time.monotonic() + state.config.server.request_timeout_seconds + 5)
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
