"""The /v1/videos routes (OpenAI's videos API as the official client calls it). Each route parses,
calls the serving object (`api.videos.serving.VideoServing`, from `app.state.videos`) and answers.
No `from __future__ import annotations`: FastAPI reads the handlers' annotations."""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response, StreamingResponse

from diffusion_runtime.api.auth import key_name, require_key
from diffusion_runtime.api.errors import Rejected
from diffusion_runtime.api.protocol import error_responses
from diffusion_runtime.api.videos.protocol import (
    LIST_LIMIT_MAX,
    VIDEOS_PATH,
    VideoDeleted,
    VideoList,
    VideoObject,
    create_request_body,
)
from diffusion_runtime.api.videos.serving import VideoServing, byte_range, chunks
from diffusion_runtime.engine.video import MP4_MEDIA_TYPE, THUMBNAIL_MEDIA_TYPE


def _videos(request: Request) -> VideoServing:
    videos: VideoServing = request.app.state.videos
    return videos


Videos = Annotated[VideoServing, Depends(_videos)]


def videos_router(videos: VideoServing) -> APIRouter:
    router = APIRouter(tags=["videos"], dependencies=[Depends(require_key)])

    @router.post(
        VIDEOS_PATH,
        operation_id="createVideo",
        response_model=VideoObject,
        responses=error_responses(400, 413, 415, 429, 500, 503),
        openapi_extra={"requestBody": create_request_body(videos.json_model, videos.form_model)},
        summary="Queue a clip from a prompt (always asynchronous: poll GET /v1/videos/{id})",
    )
    async def create(request: Request, api: Videos) -> Any:
        return await api.create(request)

    @router.get(
        VIDEOS_PATH,
        operation_id="listVideos",
        response_model=VideoList,
        responses=error_responses(400, 404),
        summary="This key's clips on this pod (cursor pagination: after, limit, order)",
    )
    async def list_videos(
        request: Request,
        api: Videos,
        after: str | None = None,
        limit: Annotated[int, Query(ge=1, le=LIST_LIMIT_MAX)] = 20,
        order: Literal["asc", "desc"] = "desc",
    ) -> Any:
        return await api.list(key_name(request), after, limit, order)

    @router.get(
        VIDEOS_PATH + "/{video_id}",
        operation_id="retrieveVideo",
        response_model=VideoObject,
        responses=error_responses(404),
        summary="A clip: status, progress (denoising steps), queue position, error",
    )
    async def retrieve(video_id: str, request: Request, api: Videos) -> Any:
        return await api.retrieve(video_id, key_name(request))

    @router.delete(
        VIDEOS_PATH + "/{video_id}",
        operation_id="deleteVideo",
        response_model=VideoDeleted,
        responses=error_responses(404),
        summary="Delete a clip: a queued one leaves the queue, a running one stops at its next step",
    )
    async def delete(video_id: str, request: Request, api: Videos) -> Any:
        return await api.delete(video_id, key_name(request))

    binary = {"schema": {"type": "string", "format": "binary"}}

    @router.get(
        VIDEOS_PATH + "/{video_id}/content",
        operation_id="downloadVideoContent",
        response_class=Response,
        responses={
            200: {
                "description": "the MP4 (H.264) or the thumbnail (WebP)",
                "content": {MP4_MEDIA_TYPE: binary, THUMBNAIL_MEDIA_TYPE: binary},
            },
            206: {"description": "the bytes of the Range asked for", "content": {MP4_MEDIA_TYPE: binary}},
            **error_responses(400, 404),
            **error_responses(409, 416),
        },  # fmt: skip
        summary="A completed clip's MP4 (HTTP Range supported) or, with variant=thumbnail, its first frame",
    )
    async def content(
        video_id: str,
        request: Request,
        api: Videos,
        variant: Annotated[
            Literal["video", "thumbnail"],
            Query(description="video: the MP4; thumbnail: its first frame (WebP). No spritesheet."),
        ] = "video",
        range_: Annotated[str | None, Header(alias="range")] = None,
    ) -> Response:
        data, media_type = await api.content(video_id, key_name(request), variant)
        try:
            span = byte_range(range_, len(data))
        except Rejected as e:
            resp = e.response()
            resp.headers["Content-Range"] = f"bytes */{len(data)}"
            return resp
        headers = {"Accept-Ranges": "bytes", "Cache-Control": "private, max-age=0"}
        if span is None:
            headers["Content-Length"] = str(len(data))
            return StreamingResponse(chunks(data, 0, len(data) - 1), media_type=media_type, headers=headers)
        first, last = span
        headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        headers["Content-Length"] = str(last - first + 1)
        return StreamingResponse(
            chunks(data, first, last), status_code=206, media_type=media_type, headers=headers
        )

    return router
