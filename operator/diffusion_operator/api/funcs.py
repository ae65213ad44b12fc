"""Small functions of a DiffusionDeployment spec: what the builders and the validation read beyond
the fields themselves (where the ranks run, the rendered cache-dit settings, the startup budget)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from diffusion_runtime.contract import cache_dit_facts as facts
from diffusion_runtime.contract.pipelines import modality
from pydantic import BaseModel

from diffusion_operator.api.defaults import DEFAULT_BEHAVIOR, DEFAULT_TARGET_DEMAND
from diffusion_operator.api.model_facts import model_facts
from diffusion_operator.api.types import (
    AS_IS,
    RUNTIME_SETTING,
    AutoscalingSpec,
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


def replicas(spec: DiffusionDeploymentSpec) -> int:
    """spec.replicas, 1 when unset (with spec.autoscaling the autoscaler drives the count)."""
    return 1 if spec.replicas is None else spec.replicas


def device_type(spec: DiffusionDeploymentSpec) -> str:
    """What the runtime's `pick_device` resolves to in this pod: cpu without a GPU."""
    return ranks_device(spec.device, spec.gpu.count)


def model_pvc(spec: DiffusionDeploymentSpec) -> tuple[str, str] | None:
    """(claim, path inside the claim) for pvc:// URIs."""
    if not spec.model.uri.startswith("pvc://"):
        return None
    claim, _, path = spec.model.uri[len("pvc://") :].partition("/")
    return claim, path


def token_secret(spec: DiffusionDeploymentSpec) -> tuple[str, str] | None:
    """(Secret name, key) of the Hugging Face token, None without one."""
    ref = spec.model.token_secret_ref
    return (ref.name, ref.key) if ref is not None else None


def cache_dit_config(spec: DiffusionDeploymentSpec) -> dict[str, Any]:
    """spec.cacheDit: cache-dit's keys verbatim, unset sections left out."""
    return spec.cache_dit.model_dump(exclude_none=True) if spec.cache_dit else {}


def quantize_config(spec: DiffusionDeploymentSpec) -> dict[str, Any] | None:
    """spec.quantize, keys verbatim, a legacy quant_type alias written as its current name."""
    if not spec.quantize:
        return None
    out = copy.deepcopy(spec.quantize)
    if isinstance(out.get("quant_type"), str):
        out["quant_type"] = facts.canonical_quant_type(out["quant_type"])
    return out


def quant_type_alias(spec: DiffusionDeploymentSpec) -> str | None:
    """The legacy quant_type name the user wrote (`float8`), None when it is the current one."""
    written = (spec.quantize or {}).get("quant_type")
    if isinstance(written, str) and facts.canonical_quant_type(written) != written:
        return written
    return None


def has_cache_dit_file(spec: DiffusionDeploymentSpec) -> bool:
    return bool(cache_dit_config(spec)) or bool(spec.quantize)


def quant_types(spec: DiffusionDeploymentSpec) -> list[str]:
    """Every quant type the quantize config uses (the base one, per-component ones, the precision plan)."""
    quantize = quantize_config(spec)
    if not quantize:
        return []
    types = [str(quantize.get("quant_type", facts.QUANT_TYPE_DEFAULT))]
    components = quantize.get("components_to_quantize")
    if isinstance(components, dict):
        types += [str(v.get("quant_type", "")) for v in components.values() if isinstance(v, dict)]
    plan = quantize.get("precision_plan")
    if isinstance(plan, dict):
        types += [str(v) for v in plan.values()]
    return types


def required_capability(spec: DiffusionDeploymentSpec) -> tuple[int, int] | None:
    """The compute capability floor cache-dit asserts for the quant types (None: none)."""
    if device_type(spec) != "cuda":
        return None
    floors = [c for c in (facts.min_capability(t) for t in quant_types(spec)) if c is not None]
    return max(floors) if floors else None


def quality_gate_on(spec: DiffusionDeploymentSpec) -> bool:
    return spec.quality_gate is not None and spec.quality_gate.enabled


def _is_zero(value: int | str) -> bool:
    return str(value) in ("0", "0%")


def max_unavailable(spec: DiffusionDeploymentSpec) -> int | str:
    """rollout.maxUnavailable; with an enabled quality gate and room to surge, 0 unless set: a new pod
    that fails the gate never turns Ready, so the old pods keep serving and the rollout stops there."""
    rollout = spec.rollout
    if (
        quality_gate_on(spec)
        and "max_unavailable" not in rollout.model_fields_set
        and not _is_zero(rollout.max_surge)
    ):
        return 0
    return rollout.max_unavailable


def target_demand(autoscaling: AutoscalingSpec) -> float:
    """targetDemand (or its deprecated name targetQueueDepth), DEFAULT_TARGET_DEMAND when unset."""
    target = autoscaling.target_demand
    if target is None:
        target = autoscaling.target_queue_depth
    return DEFAULT_TARGET_DEMAND if target is None else target


def queue_name(namespace: str, name: str) -> str:
    """runtime.yaml's queue.name: every key of the deployment's queue starts with it (NAMESPACE/NAME)."""
    return f"{namespace}/{name}"


def queue_url_secret(spec: DiffusionDeploymentSpec) -> tuple[str, str] | None:
    """(Secret name, key) of the queue server's redis:// URL, None without spec.queue."""
    return (spec.queue.secret_ref.name, spec.queue.secret_ref.key) if spec.queue is not None else None


def tolerations(spec: DiffusionDeploymentSpec) -> list[dict[str, Any]]:
    """template.tolerations as core/v1 Tolerations."""
    return [t.model_dump(by_alias=True, exclude_none=True) for t in spec.template.tolerations or []]


def template_env(spec: DiffusionDeploymentSpec) -> list[dict[str, str]]:
    """template.env as core/v1 EnvVars (a value left out is the empty string)."""
    return [{"name": e.name, "value": e.value or ""} for e in spec.template.env or []]


def startup_budget_seconds(spec: DiffusionDeploymentSpec) -> int:
    """Load + compile + warmup budget for the startup probe."""
    if spec.startup_timeout_seconds:
        return spec.startup_timeout_seconds
    model = model_facts(spec.model.uri)
    load = model.startup_seconds if model else 600
    if not spec.model.uri.startswith("hf://") or spec.model.cache is not None:
        load = load // 2  # no download in the pod (a volume, or the model cache filled by its Job)
    per_resolution = 60 + spec.warmup.steps * 2
    pipeline = spec.model.pipeline or (model.pipeline if model else None)
    if pipeline is not None and modality(pipeline) == "video":
        # a warmup clip: the steps' cost grows with its frames (docs/video.md), 2 s per step per 16 frames
        per_resolution = 60 + spec.warmup.steps * 2 * -(-spec.warmup.frames // 16)
    if spec.compile:
        per_resolution += 300
    return load + per_resolution * max(1, len(spec.warmup.resolutions))
