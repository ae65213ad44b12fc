"""The HTTP API's request and response models: one place for every field, bound and answer shape.

Request models are built per runtime config (`build_protocol`), so `/openapi.json` states the limits
this server really enforces (`n`, steps, prompt length, size). Response models are declared, so the
document describes every answer, errors included (`ErrorResponse`, the OpenAI error body).

Limits JSON Schema cannot state are named in the schema instead: `size` carries the custom format
`image-size` (WIDTHxHEIGHT, both multiples of `SIZE_MULTIPLE`, at most `x-max-pixels` pixels) and
the edit uploads carry `contentMediaType` (PNG, JPEG or WebP); `webhook` carries the custom format
`webhook-url` (an http(s) URL whose destination `server.webhook_allow` admits: api/webhooks.py).
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, model_validator

from diffusion_runtime.contract.config import (
    ADAPTER_NAME_PATTERN,
    ADAPTER_SCALE_LIMIT,
    MAX_ADAPTERS,
    RuntimeConfig,
)
from diffusion_runtime.contract.limits import SIZE_MULTIPLE, SIZE_PATTERN

PROMPT_MAX_CHARS = 32000  # OpenAI's limit for GPT image models
SIZE_FORMAT = "image-size"
WEBHOOK_FORMAT = "webhook-url"
OUTPUT_FORMATS = ("png", "jpeg", "webp")
RESPONSE_FORMATS = ("b64_json", "url")
UPLOAD_MEDIA_TYPES = ("image/png", "image/jpeg", "image/webp")
MAX_SEED = 2**53 - 1  # exact in every JSON parser (doubles)
MAX_GUIDANCE = 100.0
JSON_BODY_MAX_BYTES = 1 << 20  # JSON requests: prompts of PROMPT_MAX_CHARS fit many times over
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
PREFER_ASYNC = "respond-async"
WEBHOOK_PATTERN = r"^https?://[^\s/?#]+(?:[/?#]\S*)?$"


def _integral(v: Any) -> Any:
    """JSON Schema's integer includes 53.0; strict models would refuse it."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _int(ge: int, le: int) -> Any:
    """An integer in [ge, le]; bounds inside the type so an Optional keeps them in its schema."""
    return Annotated[int, Field(ge=ge, le=le)]


INT_FIELDS = ("n", "num_inference_steps", "seed", "output_compression")


# ---------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    message: str = Field(description="what was wrong, naming the field")
    type: str = Field(description="invalid_request_error | rate_limit_error | server_error")
    param: str | None = Field(None, description="the offending field, when one is to blame")
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error answer (OpenAI's shape)."""

    error: ErrorDetail


ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Invalid request: a field is missing, malformed or out of the server's limits (message names it)",
    401: "No API key, or not a valid one (server.auth_keys_dir; code invalid_api_key)",
    404: "Not found: an unknown job, result, video or model id (message says why)",
    409: "The video is not completed yet (or failed): its content does not exist (yet)",
    413: "Request body too large (server.max_upload_bytes for uploads, 1 MiB for JSON)",
    415: "Unsupported media type: JSON for generations, multipart/form-data for edits (videos: either)",
    416: "Range not satisfiable: outside the content (Content-Range: bytes */size)",
    429: "Queue full (server.max_queue); retry after the Retry-After header's seconds",
    500: "The pipeline failed while generating",
    503: "Not ready (loading, warming up) or shutting down; retry after Retry-After",
    504: "The request ran past server.request_timeout_seconds; the generation was stopped",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` entries for these status codes, all with the error body."""
    return {c: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[c]} for c in codes}


# ---------------------------------------------------------------- responses


class _AdapterBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    scale: float | None = Field(
        None,
        ge=-ADAPTER_SCALE_LIMIT,
        le=ADAPTER_SCALE_LIMIT,
        allow_inf_nan=False,
        description="default: the adapter's declared scale",
    )


class AdapterRequest(typing.Protocol):
    """What the serving object reads from one adapter of a request (`_adapter_request`'s models)."""

    name: str
    scale: float | None


# the multipart form's `adapters`: `name` or `name:scale`, comma-separated (`watercolor:0.8,ink`)
ADAPTER_SCALE_PATTERN = r"-?(?:10(?:\.0+)?|\d(?:\.\d+)?)"  # [-10, 10]: ADAPTER_SCALE_LIMIT


def adapters_form_pattern(names: list[str]) -> str:
    """The form field's pattern on a server with these adapters (none: only the empty string)."""
    if not names:
        return "^$"
    item = f"(?:{'|'.join(re.escape(n) for n in names)})(?::{ADAPTER_SCALE_PATTERN})?"
    return f"^(?:{item}(?:,{item})*)?$"


def _adapters_form(value: Any) -> Any:
    """A multipart form carries `adapters` as text: `name[:scale],...`; empty: none."""
    if not isinstance(value, str):
        return value
    out: list[dict[str, Any]] = []
    for item in value.split(",") if value.strip() else ():
        name, sep, scale = item.strip().partition(":")
        try:
            out.append({"name": name, **({"scale": float(scale)} if sep else {})})
        except ValueError as e:
            raise ValueError(f"adapters: {item!r} is not name or name:scale") from e
    return out


def _adapter_request(names: list[str]) -> type[BaseModel]:
    """One adapter of a request on a server with these adapters: the schema lists their names (the
    server answers an unknown one with a 400 naming them: engine.adapters.requested)."""
    extra: dict[str, Any] | None = {"enum": list(names)} if names else None
    return create_model(  # type: ignore[call-overload, no-any-return]
        "AdapterRequest",
        __base__=_AdapterBase,
        __doc__="One LoRA adapter of a request: a declared adapter's name (GET /v1/models lists them) "
        "and a scale.",
        name=(
            str,
            Field(
                max_length=63,
                pattern=ADAPTER_NAME_PATTERN,
                description="a declared adapter (config adapters)",
                json_schema_extra=extra,
            ),
        ),
    )


class ImageData(BaseModel):
    b64_json: str | None = Field(None, description="the image, base64 (response_format b64_json)")
    url: str | None = Field(None, description="where to fetch the image (response_format url)")
    revised_prompt: str | None = None


class Timings(BaseModel):
    queue_wait_seconds: float
    inference_seconds: float
    total_seconds: float


class CacheSteps(BaseModel):
    cached_steps: int = Field(description="denoising steps served from cache-dit's cache")
    computed_steps: int


class ImagesResponse(BaseModel):
    """OpenAI's images response plus what a diffusion server knows (seed, timings, cache steps)."""

    created: int
    data: list[ImageData]
    output_format: Literal["png", "jpeg", "webp"]
    size: str
    seed: int
    num_inference_steps: int
    timings: Timings
    cache: CacheSteps


class ImageResultEvent(BaseModel):
    """The webhook body of a synchronous request that named a webhook (an async job's: its JobStatus)."""

    id: None = None
    object: Literal["image.result"] = "image.result"
    endpoint: Literal["generations", "edits"]
    status: Literal["succeeded"] = "succeeded"
    result: ImagesResponse


class JobProgress(BaseModel):
    step: int = Field(description="denoising steps finished")
    total_steps: int
    cancel_requested_at_step: int | None = Field(
        None, description="`step` when DELETE arrived; a running job stops after at most one more step"
    )


class JobStatus(BaseModel):
    """An async job (`Prefer: respond-async`)."""

    id: str
    object: Literal["image.job"] = "image.job"
    endpoint: Literal["generations", "edits"]
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    queue_position: int | None = Field(
        None, description="1 = next to run; null when not waiting. Never increases for a waiting job."
    )
    progress: JobProgress
    cancel_requested: bool = False
    result: ImagesResponse | None = Field(None, description="when succeeded: the normal response")
    error: ErrorDetail | None = Field(None, description="when failed or cancelled")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "diffusion-runtime"
    pipeline: str | None = Field(None, description="the diffusers pipeline class")
    ready: bool
    parent: str | None = Field(
        None, description="a LoRA adapter: the base model's id (request it by name in `adapters`)"
    )
    scale: float | None = Field(None, description="a LoRA adapter: its default scale")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthStatus(BaseModel):
    status: str
    phase: str


class ReadyStatus(BaseModel):
    status: str
    error: str | None = None


# ---------------------------------------------------------------- requests (per config)


def _size_type(max_pixels: int) -> Any:
    extra: dict[str, Any] = {
        "format": SIZE_FORMAT,
        "x-max-pixels": max_pixels,
        "x-multiple-of": SIZE_MULTIPLE,
    }
    return Annotated[str, Field(pattern=SIZE_PATTERN, json_schema_extra=extra)]


def _size_field(max_pixels: int) -> Any:
    return Field(
        None,
        description=(
            f"WIDTHxHEIGHT, both multiples of {SIZE_MULTIPLE}, at most {max_pixels} pixels "
            "(server.max_pixels); default: the first warmup resolution (edits: the image's own size, "
            "scaled down to fit)"
        ),
    )


def _common_fields(cfg: RuntimeConfig) -> dict[str, Any]:
    s = cfg.server
    names = [a.name for a in cfg.adapters]
    return {
        "prompt": (
            str,
            Field(min_length=1, max_length=PROMPT_MAX_CHARS, pattern=r"\S", description="not blank"),
        ),
        "n": (_int(1, s.max_n), Field(1, description="images per request (server.max_n)")),
        "size": (_size_type(s.max_pixels) | None, _size_field(s.max_pixels)),
        "response_format": (
            Literal["b64_json", "url"],
            Field(
                "b64_json",
                description="b64_json: in the body; url: served by this pod at /v1/images/results/{id} "
                "for server.job_ttl_seconds",
            ),
        ),
        "output_format": (Literal["png", "jpeg", "webp"], Field("png", description="image encoding")),
        "output_compression": (
            _int(0, 100) | None,
            Field(None, description="jpeg/webp quality, 0-100 (default 100); png: ignored"),
        ),
        "num_inference_steps": (
            _int(1, s.max_steps) | None,
            Field(None, description="default: warmup.steps (server.max_steps)"),
        ),
        "guidance_scale": (float | None, Field(None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)),
        "true_cfg_scale": (float | None, Field(None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)),
        "seed": (_int(0, MAX_SEED) | None, Field(None, description="default: random")),
        "negative_prompt": (str | None, Field(None, max_length=PROMPT_MAX_CHARS)),
        "webhook": (
            str | None,
            Field(
                None,
                max_length=2048,
                pattern=WEBHOOK_PATTERN,
                description="http(s) URL that receives the finished job (JobStatus JSON) by POST, signed per "
                "Standard Webhooks when the server has a secret; loopback, link-local, private and reserved "
                "destinations are refused (400) unless server.webhook_allow admits them",
                json_schema_extra={"format": WEBHOOK_FORMAT},
            ),
        ),
        "adapters": (
            Annotated[list[_adapter_request(names)], BeforeValidator(_adapters_form)],  # type: ignore[misc]
            Field(
                default_factory=list,
                max_length=MAX_ADAPTERS,
                description="LoRA adapters for this request, each a declared adapter's name with an optional "
                "scale; several combine; empty: the base model (docs/adapters.md). An extension of OpenAI's "
                "body: the openai client sends it in extra_body. Edits (multipart): `name[:scale],...`",
                # a server without adapters takes none (the schema says so; the server's 400 names why)
                json_schema_extra=None if names else {"maxItems": 0},
            ),
        ),
        "model": (
            str | None,
            Field(
                None,
                max_length=256,
                description="an adapter's id from GET /v1/models applies that adapter at its declared scale "
                "(when `adapters` is empty); any other value is accepted and ignored (one model)",
            ),
        ),
        "user": (str | None, Field(None, max_length=256, description="accepted and ignored")),
        "quality": (str | None, Field(None, max_length=64, description="accepted and ignored")),
        "style": (str | None, Field(None, max_length=64, description="accepted and ignored")),
    }


class ImageRequestFields(typing.Protocol):
    """What the serving object reads from a request model (the models are built per config, so their
    classes are not known statically; these are the fields of `_common_fields`)."""

    prompt: str
    n: int
    size: str | None
    response_format: Literal["b64_json", "url"]
    output_format: Literal["png", "jpeg", "webp"]
    output_compression: int | None
    num_inference_steps: int | None
    guidance_scale: float | None
    true_cfg_scale: float | None
    seed: int | None
    negative_prompt: str | None
    webhook: str | None
    adapters: list[AdapterRequest]
    model: str | None


class EditRequestFields(ImageRequestFields, typing.Protocol):
    strength: float | None


class _Strict(BaseModel):
    # JSON: types as the schema states them (no `false` for an integer, no number for a string)
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(isinstance(data.get(k), float) for k in INT_FIELDS):
            data = {k: _integral(v) if k in INT_FIELDS else v for k, v in data.items()}
        return data


class _Form(BaseModel):
    # multipart values arrive as strings: numbers are parsed from them
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Protocol:
    """The request models of one server, built from its config."""

    generation: type[BaseModel]
    edit: type[BaseModel]
    max_pixels: int
    max_upload_bytes: int
    adapters_form_pattern: str = "^$"

    def edit_form_schema(self) -> dict[str, Any]:
        """The multipart/form-data schema of POST /v1/images/edits (fields + uploads)."""
        schema = self.edit.model_json_schema(ref_template="#/components/schemas/{model}")
        props = {name: _no_null(p) for name, p in schema["properties"].items()}
        if "adapters" in props:  # a form field is text
            props["adapters"] = {
                "type": "string",
                "pattern": self.adapters_form_pattern,
                "description": "LoRA adapters: `name` or `name:scale`, comma-separated, e.g. "
                "`watercolor:0.8,ink` (docs/adapters.md); empty: the base model",
            }
        upload = {
            "type": "string",
            "format": "binary",
            "contentMediaType": "image/png",
        }
        props = {
            "image": {
                **upload,
                "description": "the image to edit: PNG, JPEG or WebP, one file (the field may also be "
                "named `image[]`, as the openai client sends it)",
            },
            "mask": {
                **upload,
                "description": "optional; same size as `image`. With alpha: transparent pixels are "
                "edited (OpenAI); without alpha: white pixels are edited (diffusers)",
            },
            **props,
        }
        return {
            "title": "ImageEditForm",
            "type": "object",
            "required": ["image", *schema.get("required", [])],
            "properties": props,
            "additionalProperties": False,
        }

    def edit_request_body(self) -> dict[str, Any]:
        return {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": self.edit_form_schema(),
                    "encoding": {
                        "image": {"contentType": ", ".join(UPLOAD_MEDIA_TYPES)},
                        "mask": {"contentType": ", ".join(UPLOAD_MEDIA_TYPES)},
                    },
                }
            },
        }


def _no_null(prop: dict[str, Any]) -> dict[str, Any]:
    """A form field cannot be null (it is absent instead): drop the null branch of an Optional."""
    variants = prop.get("anyOf")
    if not variants:
        return prop
    rest = [v for v in variants if v.get("type") != "null"]
    out = {k: v for k, v in prop.items() if k != "anyOf"}
    if len(rest) == 1:
        out.update(rest[0])
    else:
        out["anyOf"] = rest
    if out.get("default", 0) is None:
        out.pop("default")
    return out


def build_protocol(cfg: RuntimeConfig) -> Protocol:
    common = _common_fields(cfg)
    generation = create_model(  # type: ignore[call-overload]
        "ImageGenerationRequest",
        __base__=_Strict,
        __doc__="POST /v1/images/generations: OpenAI's fields plus the diffusion knobs.",
        **common,
    )
    edit = create_model(  # type: ignore[call-overload]
        "ImageEditRequest",
        __base__=_Form,
        __doc__="The non-file fields of POST /v1/images/edits.",
        **common,
        strength=(
            float | None,
            Field(
                None,
                gt=0,
                le=1,
                allow_inf_nan=False,
                description="how much of the image is re-noised (default 0.6; with a mask 1.0); "
                "at least one denoising step runs",
            ),
        ),
    )
    return Protocol(
        generation=generation,
        edit=edit,
        max_pixels=cfg.server.max_pixels,
        max_upload_bytes=cfg.server.max_upload_bytes,
        adapters_form_pattern=adapters_form_pattern([a.name for a in cfg.adapters]),
    )


def prefers_async(header: str | None) -> bool:
    """RFC 7240 `Prefer` header: does it ask for respond-async?"""
    if not header:
        return False
    return any(p.split(";")[0].strip().lower() == PREFER_ASYNC for p in header.split(","))
