"""Small functions of a DiffusionDeployment spec: what the builders and the validation read beyond
the fields themselves (where the ranks run, the rendered cache-dit settings, the startup budget)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from diffusion_runtime.contract import cache_dit_facts as facts
from pydantic import BaseModel

from diffusion_operator.api.defaults import DEFAULT_BEHAVIOR
from diffusion_operator.api.types import (
    AS_IS,
    RUNTIME_SETTING,
    DiffusionDeploymentSpec,
    ScalingBehavior,
    section_type,
)


@dataclass(frozen=True)
class SettingField:
    """A CR field that is rendered into a runtime setting (`api.types.setting` / `renders`)."""

    setting: str  # the runtime.yaml / cache-dit.yaml setting: server.max_queue
    cr: str  # the CR field: spec.server.maxQueue
    attrs: tuple[str, ...]  # attribute path from the spec: ("server", "max_queue")
    as_is: bool  # rendered as it is (else the builders render it their own way)

    def value(self, spec: DiffusionDeploymentSpec) -> Any:
        """The field's value in `spec`; None when it or a section above it is unset."""
        value: Any = spec
        for attr in self.attrs:
            value = getattr(value, attr, None)
            if value is None:
                return None
        return value


def _setting_fields(model: type[BaseModel], cr: str, attrs: tuple[str, ...]) -> list[SettingField]:
    out = []
    for name, info in model.model_fields.items():
        path, where = (*attrs, name), f"{cr}.{info.alias or name}"
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if RUNTIME_SETTING in extra:
            out.append(SettingField(str(extra[RUNTIME_SETTING]), where, path, bool(extra.get(AS_IS))))
        section = section_type(info.annotation)
        if section is not None:
            out += _setting_fields(section, where, path)
    return out


# every CR field that is a runtime setting, read from the types (not written twice)
SETTING_FIELDS: tuple[SettingField, ...] = tuple(_setting_fields(DiffusionDeploymentSpec, "spec", ()))


def runtime_settings(spec: DiffusionDeploymentSpec) -> dict[str, Any]:
    """The runtime settings rendered as they are, by setting path (`server.max_queue`: 16); unset
    fields left out (the runtime's default applies)."""
    out = {}
    for f in SETTING_FIELDS:
        value = f.value(spec) if f.as_is else None
        if value is not None:
            out[f.setting] = copy.deepcopy(list(value) if isinstance(value, tuple) else value)
    return out


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
