"""A queued job's request, as the front door validated it and a worker runs it (JSON in the job hash).

The front door resolves every default (size, steps, seed, strength) before enqueuing, so a job that is
redelivered to another pod runs exactly the same call (same seed: the same image)."""

from __future__ import annotations

import dataclasses
from typing import Any

from diffusion_runtime.api.protocol import ImageRequestFields
from diffusion_runtime.engine.params import EditParams, GenerationParams, OutputFormat

SPEC_VERSION = 1


def job_spec(
    endpoint: str, params: GenerationParams, req: ImageRequestFields, base_url: str, sync: bool
) -> dict[str, Any]:
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
        "sync": sync,
    }


def generation_params(spec: dict[str, Any]) -> GenerationParams:
    return GenerationParams(**spec["params"])


def output_format(spec: dict[str, Any]) -> OutputFormat:
    return OutputFormat(spec["output_format"], spec.get("output_compression"))
