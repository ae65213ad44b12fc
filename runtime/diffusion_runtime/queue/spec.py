"""A queued job's request, as the front door validated it and a worker runs it (JSON in the job hash).

The front door resolves every default (size, steps, seed, strength) before enqueuing, so a job that is
redelivered to another pod runs exactly the same call (same seed: the same image)."""

from __future__ import annotations

import dataclasses
from typing import Any

from diffusion_runtime.api.protocol import ImageRequestFields
from diffusion_runtime.engine.params import EditParams, GenerationParams, OutputFormat, VideoParams

SPEC_VERSION = 1


def job_spec(
    endpoint: str, params: GenerationParams, req: ImageRequestFields, base_url: str, reply: str | None
) -> dict[str, Any]:
    """`reply`: a sync job's front-door channel (the result goes there with the notice); None: async."""
    base = {f.name: getattr(params, f.name) for f in dataclasses.fields(GenerationParams)}
    return {
        "v": SPEC_VERSION,
        "endpoint": endpoint,
        "params": base,
        "strength": params.strength if isinstance(params, EditParams) else None,
        "output_format": req.output_format,
        "output_compression": req.output_compression,
        "response_format": req.response_format,
        "base_url": base_url,
        "webhook": bool(req.webhook),
        "sync": reply is not None,
        "reply": reply,
    }


def _call_fields(spec: dict[str, Any]) -> dict[str, Any]:
    fields = dict(spec["params"])
    # JSON has lists where the dataclass has tuples: ((name, scale), ...)
    fields["adapters"] = tuple((str(name), float(scale)) for name, scale in fields.get("adapters") or ())
    return fields


def generation_params(spec: dict[str, Any]) -> GenerationParams:
    return GenerationParams(**_call_fields(spec))


def output_format(spec: dict[str, Any]) -> OutputFormat:
    return OutputFormat(spec["output_format"], spec.get("output_compression"))


def video_spec(
    params: VideoParams, seconds: str, model: str, owner: str | None, webhook: bool
) -> dict[str, Any]:
    """A /v1/videos job: the clip's call with every default resolved, and what its VideoObject shows."""
    return {
        "v": SPEC_VERSION,
        "endpoint": "videos",
        # the first frame of an image-to-video clip travels as PNG in the job's hash (`image`), not here
        "params": {
            f.name: getattr(params, f.name) for f in dataclasses.fields(VideoParams) if f.name != "image"
        },
        "seconds": seconds,
        "model": model,
        "owner": owner,
        "webhook": webhook,
        "sync": False,
        "reply": None,
    }


def video_params(spec: dict[str, Any]) -> VideoParams:
    return VideoParams(**_call_fields(spec))
