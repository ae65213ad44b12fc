"""Small functions of a DiffusionDeployment spec: what the builders and the validation read beyond
the fields themselves (where the ranks run, the rendered cache-dit settings, the startup budget)."""

from __future__ import annotations

import copy
from typing import Any

from diffusion_runtime.contract import cache_dit_facts as facts

from diffusion_operator.api.defaults import DEFAULT_BEHAVIOR
from diffusion_operator.api.types import ScalingBehavior


def ranks_device(device: str, gpu_count: int) -> str:
    """Where the pod's ranks run, as the runtime's `pick_device` resolves it: cpu without a GPU."""
    return "cpu" if device == "cpu" or gpu_count == 0 else "cuda"


def behavior(b: ScalingBehavior | None) -> dict[str, Any]:
    out = copy.deepcopy(DEFAULT_BEHAVIOR)
    for direction in ("scaleUp", "scaleDown"):
        rules = getattr(b, "scale_up" if direction == "scaleUp" else "scale_down", None) if b else None
        if rules is not None:
            out[direction].update(rules.model_dump(by_alias=True, exclude_none=True))
    return out


def cache_tag(cache_dit: dict) -> str:
    """cache-dit's `strify()` tag of `cache_config` ('' without one), through cache-dit's own code
    (named masks expanded with its table): see diffusion_runtime.contract.cache_dit_facts.cache_tag."""
    try:
        return facts.cache_tag((cache_dit or {}).get("cache_config"))
    except ValueError:
        return ""


def startup_budget_seconds(s: Any) -> int:
    """Load + compile + warmup budget for the startup probe."""
    if s.startup_timeout_seconds:
        return s.startup_timeout_seconds
    model = s.facts
    load = model.startup_seconds if model else 600
    if not s.model.uri.startswith("hf://") or s.model_cache is not None:
        load = load // 2  # no download in the pod (a volume, or the model cache filled by its Job)
    per_resolution = 60 + s.warmup_steps * 2
    if s.compile:
        per_resolution += 300
    return load + per_resolution * max(1, len(s.warmup_resolutions))
