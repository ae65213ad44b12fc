"""Request and response models of /v1/videos: OpenAI's shapes (as the official client 3.51 sends and
parses them) plus the diffusion knobs; bounds come from the config (`server.max_*`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from diffusion_runtime.api.protocol import (
    MAX_GUIDANCE,
    MAX_SEED,
    PROMPT_MAX_CHARS,
    SIZE_FORMAT,
    WEBHOOK_PATTERN,
)
from diffusion_runtime.contract.config import RuntimeConfig
from diffusion_runtime.contract.limits import MAX_FPS_LIMIT, SIZE_MULTIPLE, SIZE_PATTERN

VIDEOS_PATH = "/v1/videos"
VIDEO_STATUSES = ("queued", "in_progress", "completed", "failed")
VARIANTS = ("video", "thumbnail", "spritesheet")
DEFAULT_SECONDS = 4  # OpenAI's default clip length
LIST_LIMIT_MAX = 100


class VideoError(BaseModel):
    code: str = Field(description="invalid_request | timeout | generation_failed | cancelled")
    message: str


class VideoObject(BaseModel):
    """A clip job (OpenAI's `Video`), plus this runtime's fields (frames, fps, steps, queue position)."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int = Field(description="0-100: denoising steps done (99 while encoding, 100 once completed)")
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = Field(None, description="when the content is dropped (server.job_ttl_seconds)")
    prompt: str | None = None
    seconds: str = Field(description="the clip's length: frames / fps")
    size: str = Field(description="WIDTHxHEIGHT")
    remixed_from_video_id: str | None = None
    error: VideoError | None = None
    frames: int = Field(description="frames of the clip")
    fps: int = Field(description="frames per second of the MP4")
    num_inference_steps: int
    step: int = Field(description="denoising steps done")
    queue_position: int | None = Field(None, description="0: next to run; only while queued")
    seed: int
    bytes: int | None = Field(None, description="MP4 size, once completed")
    cached_steps: int | None = Field(
        None, description="cache-dit: steps served from the cache (once completed)"
    )


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool


class VideoRequestFields:
    """What the serving object reads from a request (the model is built per config)."""

    prompt: str
    model: str | None
    size: str | None
    seconds: int | None
    num_frames: int | None
    fps: int | None
    num_inference_steps: int | None
    guidance_scale: float | None
    negative_prompt: str | None
    seed: int | None
    webhook: str | None


def _int(ge: int, le: int) -> Any:
    return Annotated[int, Field(ge=ge, le=le)]


def build_video_request(cfg: RuntimeConfig) -> type[BaseModel]:
    """The fields of POST /v1/videos (multipart form or JSON; numbers may come as strings, as the
    openai client sends them in a form)."""
    s = cfg.server
    size_extra: dict[str, Any] = {"format": SIZE_FORMAT, "x-max-pixels": s.max_pixels, "x-multiple-of": SIZE_MULTIPLE}
    return create_model(  # type: ignore[call-overload, no-any-return]
        "VideoCreateRequest",
        __config__=ConfigDict(extra="forbid"),
        __doc__="POST /v1/videos: OpenAI's fields plus the diffusion knobs.",
        prompt=(
            str,
            Field(min_length=1, max_length=PROMPT_MAX_CHARS, pattern=r"\S", description="not blank"),
        ),
        model=(str | None, Field(None, max_length=256, description="accepted; the served model answers")),
        size=(
            Annotated[str, Field(pattern=SIZE_PATTERN, json_schema_extra=size_extra)] | None,
            Field(
                None,
                description=f"WIDTHxHEIGHT, multiples of the pipeline's size multiple ({SIZE_MULTIPLE} for Wan), "
                f"at most {s.max_pixels} pixels (server.max_pixels); default: the first warmup resolution",
            ),
        ),
        seconds=(
            _int(1, s.max_video_seconds) | None,
            Field(
                None,
                description=f'clip length (OpenAI sends it as a string, e.g. "4"); default {DEFAULT_SECONDS}; '
                f"at most server.max_video_seconds={s.max_video_seconds}. Frames: seconds * fps rounded up "
                "to a count the pipeline renders (Wan: 4k+1)",
            ),
        ),
        num_frames=(
            _int(1, s.max_frames) | None,
            Field(None, description="frames, instead of seconds (Wan: 4k+1); at most server.max_frames"),
        ),
        fps=(_int(1, MAX_FPS_LIMIT) | None, Field(None, description="default: server.video_fps")),
        num_inference_steps=(
            _int(1, s.max_steps) | None,
            Field(None, description="default: warmup.steps (server.max_steps)"),
        ),
        guidance_scale=(float | None, Field(None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)),
        negative_prompt=(str | None, Field(None, max_length=PROMPT_MAX_CHARS)),
        seed=(_int(0, MAX_SEED) | None, Field(None, description="default: random")),
        webhook=(
            str | None,
            Field(
                None,
                max_length=2048,
                pattern=WEBHOOK_PATTERN,
                description="http(s) URL that receives the finished clip (the video object) by POST "
                "(docs/webhooks.md: the same signing and destination fence as the image jobs)",
            ),
        ),  # fmt: skip
    )


def create_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """POST /v1/videos' body: the openai client sends multipart/form-data; JSON is taken too."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("title", None)
    return {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"title": "VideoCreateForm", **schema}},
            "application/json": {"schema": {"title": "VideoCreateRequest", **schema}},
        },
    }
