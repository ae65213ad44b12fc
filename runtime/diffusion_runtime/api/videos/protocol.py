"""Request and response models of /v1/videos: OpenAI's shapes (as the official client 3.51 sends and
parses them) plus the diffusion knobs; bounds come from the config (`server.max_*`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from diffusion_runtime.api.protocol import (
    MAX_GUIDANCE,
    MAX_SEED,
    PROMPT_MAX_CHARS,
    SIZE_FORMAT,
    WEBHOOK_FORMAT,
    WEBHOOK_PATTERN,
    _no_null,
)
from diffusion_runtime.api.videos import reference
from diffusion_runtime.contract.config import RuntimeConfig
from diffusion_runtime.contract.limits import MAX_FPS_LIMIT, SIZE_MULTIPLE, SIZE_PATTERN

VIDEOS_PATH = "/v1/videos"
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
    queue_position: int | None = Field(None, description="1 = next to run; only while queued")
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
    seconds: str | int | None
    num_frames: int | None
    fps: int | None
    num_inference_steps: int | None
    guidance_scale: float | None
    negative_prompt: str | None
    seed: int | None
    webhook: str | None


def _int(ge: int, le: int) -> Any:
    return Annotated[int, Field(ge=ge, le=le)]


INT_FIELDS = ("num_frames", "fps", "num_inference_steps", "seed")


class _Strict(BaseModel):
    """JSON: types as the schema states them (53.0 is an integer, "53" is not)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {
                k: int(v) if k in INT_FIELDS and isinstance(v, float) and v.is_integer() else v
                for k, v in data.items()
            }
        return data


class _Form(BaseModel):
    """multipart/form-data (what the openai client sends): values arrive as text, numbers are parsed."""

    model_config = ConfigDict(extra="forbid")


def _fields(cfg: RuntimeConfig, form: bool) -> dict[str, Any]:
    s = cfg.server
    size_extra: dict[str, Any] = {
        "format": SIZE_FORMAT,
        "x-max-pixels": s.max_pixels,
        "x-multiple-of": SIZE_MULTIPLE,
    }
    # OpenAI's `seconds` is a string enum ("4", "8", "12"); here "1" .. server.max_video_seconds, and
    # in JSON the integer too
    second_strings = Literal[tuple(str(i) for i in range(1, s.max_video_seconds + 1))]  # type: ignore[valid-type]
    seconds_type: Any = second_strings if form else second_strings | _int(1, s.max_video_seconds)
    return dict(
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
            seconds_type | None,
            Field(
                None,
                description=f"clip length; default {DEFAULT_SECONDS}; at most server.max_video_seconds="
                f"{s.max_video_seconds}. Frames: seconds * fps rounded up to a count the pipeline renders "
                f"(Wan: 4k+1), at most server.max_frames={s.max_frames} and width*height*frames at most "
                f"server.max_video_pixels={s.max_video_pixels} (400 naming the limit)",
            ),
        ),
        num_frames=(
            _int(1, s.max_frames) | None,
            Field(None, description="frames, instead of seconds (Wan: 4k+1); at most server.max_frames"),
        ),
        fps=(
            _int(1, MAX_FPS_LIMIT) | None,
            Field(None, description=f"default: server.video_fps={s.video_fps}"),
        ),
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
                json_schema_extra={"format": WEBHOOK_FORMAT},
                description="http(s) URL that receives the finished clip (the video object) by POST "
                "(docs/webhooks.md: the same signing and destination fence as the image jobs)",
            ),
        ),  # fmt: skip
    )


def build_video_requests(cfg: RuntimeConfig) -> tuple[type[BaseModel], type[BaseModel]]:
    """The fields of POST /v1/videos: (the JSON model, the multipart form model)."""
    json_model = create_model(  # type: ignore[call-overload]
        "VideoCreateRequest", __base__=_Strict, __doc__="POST /v1/videos (JSON): OpenAI's fields plus the diffusion knobs.",
        **_fields(cfg, form=False),
    )  # fmt: skip
    form_model = create_model(  # type: ignore[call-overload]
        "VideoCreateForm", __base__=_Form, __doc__="POST /v1/videos (multipart/form-data, as the openai client sends it).",
        **_fields(cfg, form=True),
    )  # fmt: skip
    return json_model, form_model


def create_request_body(json_model: type[BaseModel], form_model: type[BaseModel]) -> dict[str, Any]:
    """POST /v1/videos' body: the openai client sends multipart/form-data; JSON is taken too. Both
    state `input_reference` (read by the serving object itself, `api.videos.reference`): a binary
    part in the form, `{"image_url": data URL}` in JSON."""
    ref = "#/components/schemas/{model}"
    form = form_model.model_json_schema(ref_template=ref)
    form["properties"] = {name: _no_null(p) for name, p in form["properties"].items()}
    form["properties"][reference.PARAM] = reference.FORM_SCHEMA
    body = json_model.model_json_schema(ref_template=ref)
    body["properties"][reference.PARAM] = reference.JSON_SCHEMA
    return {
        "required": True,
        "content": {"multipart/form-data": {"schema": form}, "application/json": {"schema": body}},
    }
