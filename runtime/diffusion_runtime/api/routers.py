"""The routes: images (generations, edits, jobs, results), models, and operations.

Each route parses, calls the serving object (`api.serving.ImageServing`, from `app.state.serving`)
and answers; nothing else. The routers are built from the protocol only (the request models depend
on the config); the serving object and the state come with each request. No `from __future__ import annotations` here: FastAPI reads the per-config request models from the
handlers' annotations at import time.
"""

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from diffusion_runtime.api.auth import key_name, require_key
from diffusion_runtime.api.errors import error_response
from diffusion_runtime.api.protocol import (
    HealthStatus,
    ImagesResponse,
    JobStatus,
    ModelCard,
    ModelList,
    Protocol,
    ReadyStatus,
    error_responses,
)
from diffusion_runtime.api.serving import (
    EDITS_PATH,
    GENERATIONS_PATH,
    JOBS_PATH,
    RESULTS_PATH,
    ImageServing,
)
from diffusion_runtime.api.state import RuntimeState
from diffusion_runtime.engine.imaging import MEDIA_TYPES


def _serving(request: Request) -> ImageServing:
    serving: ImageServing = request.app.state.serving
    return serving


def _state(request: Request) -> RuntimeState:
    return _serving(request).state


Serving = Annotated[ImageServing, Depends(_serving)]
State = Annotated[RuntimeState, Depends(_state)]

PreferHeader = Annotated[
    str,
    Header(
        examples=["respond-async"],
        description="`respond-async`: answer 202 with a job (poll GET /v1/images/jobs/{id}) instead of "
        "holding the connection until the images are done (RFC 7240)",
    ),
]


# every /v1 route: an API key when server.auth_keys_dir is set (api.auth); sets request.state.key_name
AUTHENTICATED = [Depends(require_key)]


def images_router(protocol: Protocol) -> APIRouter:
    router = APIRouter(tags=["images"], dependencies=AUTHENTICATED)
    GenerationRequest: Any = protocol.generation
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
    async def generations(
        req: GenerationRequest, request: Request, api: Serving, prefer: PreferHeader = ""
    ) -> Any:
        return await api.generate(req, request, prefer)

    @router.post(
        EDITS_PATH,
        operation_id="createImageEdit",
        response_model=ImagesResponse,
        responses={**answers, **error_responses(400, 413, 415, 429, 500, 503, 504)},
        openapi_extra={"requestBody": protocol.edit_request_body()},
        summary="Edit an image (image-to-image; with a mask, inpainting), OpenAI's multipart fields",
    )
    async def edits(request: Request, api: Serving, prefer: PreferHeader = "") -> Any:
        return await api.edit(request, prefer)

    @router.get(
        JOBS_PATH + "/{job_id}",
        operation_id="getImageJob",
        response_model=JobStatus,
        responses=error_responses(404),
        summary="An async job: status, queue position, step progress and, when done, the result",
    )
    async def get_job(job_id: str, request: Request, api: Serving) -> Any:
        return await api.get_job(job_id, key_name(request))

    @router.delete(
        JOBS_PATH + "/{job_id}",
        operation_id="cancelImageJob",
        response_model=JobStatus,
        responses=error_responses(404),
        summary="Cancel an async job: a queued job leaves the queue, a running one stops at its next step",
    )
    async def cancel_job(job_id: str, request: Request, api: Serving) -> Any:
        return await api.cancel_job(job_id, key_name(request))

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
    async def get_result(result_id: str, request: Request, api: Serving) -> Response:
        data, fmt = await api.get_result(result_id, key_name(request))
        return Response(content=data, media_type=MEDIA_TYPES[fmt])

    return router


def model_id(uri: str) -> str:
    for prefix in ("hf://", "file://"):
        if uri.startswith(prefix):
            return uri[len(prefix) :]
    return uri


def models_router(started: float) -> APIRouter:
    router = APIRouter(tags=["models"], dependencies=AUTHENTICATED)

    def card(state: RuntimeState) -> ModelCard:
        return ModelCard(
            id=model_id(state.config.model.uri),
            created=int(started),
            pipeline=state.engine.pipeline_name if state.engine is not None else None,
            ready=state.ready,
            parent=None,
            scale=None,
        )

    def cards(state: RuntimeState) -> list[ModelCard]:
        """The base model, then each declared LoRA adapter (its id: the adapter's name)."""
        base = card(state)
        return [base] + [
            base.model_copy(update={"id": a.name, "parent": base.id, "scale": a.scale})
            for a in state.config.adapters
        ]

    @router.get(
        "/v1/models",
        operation_id="listModels",
        response_model=ModelList,
        summary="The served model and its LoRA adapters (OpenAI's list shape)",
    )
    async def list_models(state: State) -> Any:
        return ModelList(data=cards(state))

    @router.get(
        "/v1/models/{model_id:path}",
        operation_id="retrieveModel",
        response_model=ModelCard,
        responses=error_responses(404),
        summary="One model by id",
    )
    async def get_model(model_id: str, state: State) -> Any:
        served = cards(state)
        for c in served:
            if model_id == c.id:
                return c
        ids = ", ".join(repr(c.id) for c in served)
        return error_response(404, f"model {model_id!r} is not served here; this pod serves {ids}")

    return router


def ops_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get(
        "/health", response_model=HealthStatus, summary="Alive (answers as soon as the process listens)"
    )
    async def health(state: State) -> Any:
        return HealthStatus(status="alive", phase=str(state.phase))

    @router.get(
        "/ready",
        operation_id="ready",
        response_model=ReadyStatus,
        responses={503: {"model": ReadyStatus, "description": "loading, warming up, draining or failed"}},
        summary="Ready: 200 only after load and warmup, 503 before and while draining",
    )
    async def ready(state: State) -> Any:
        if state.ready:
            return ReadyStatus(status="ready")
        return JSONResponse(
            ReadyStatus(status=state.status, error=state.error).model_dump(),
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @router.get(
        "/metrics",
        operation_id="metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
        summary="Prometheus metrics",
    )
    async def metrics_endpoint(state: State) -> PlainTextResponse:
        # in a thread: a collector may do I/O (the front door's queue gauges read Redis)
        body = await asyncio.to_thread(generate_latest, state.metrics.registry)
        return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)

    return router
