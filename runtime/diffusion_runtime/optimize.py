"""cache-dit and quantization: read the cache-dit YAML, validate it against the pipeline and the
device, then apply it. Validation happens before anything is applied, because a failed cache-dit
setup leaves hooks behind on the transformer.

The YAML is cache-dit's own format (keys `cache_config`, `parallelism_config`, `attention_backend`,
`quantize_config`) and is handed to `cache_dit.load_configs` unchanged, except for the two rewrites
documented here: the legacy quant alias `float8` becomes `float8_per_row`, and on CPU the int8
quantization is applied with torchao directly (cache-dit asserts CUDA) and removed from what
cache-dit sees.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from diffusion_runtime.config import ConfigError

log = logging.getLogger("diffusion_runtime")

TOP_LEVEL_KEYS = ("cache_config", "parallelism_config", "attention_backend", "quantize_config")
QUANT_TYPES = (
    "float8_per_row",
    "float8_per_tensor",
    "float8_per_block",
    "float8_weight_only",
    "int8_per_row",
    "int8_per_tensor",
    "int8_weight_only",
    "int4_weight_only",
    "nvfp4",
    "nvfp4_weight_only",
)
QUANT_ALIASES = {"float8": "float8_per_row"}  # cache-dit 1.3.0-1.3.4 name
CPU_QUANT_TYPES = ("int8_per_row", "int8_per_tensor", "int8_weight_only")
# keys load_cache_config understands inside cache_config besides the DBCache/DBPrune dataclass fields
_CALIBRATOR_KEYS = {
    "enable_taylorseer", "enable_encoder_taylorseer", "taylorseer_cache_type", "taylorseer_order",
    "enable_dmd", "enable_encoder_dmd", "calibrator_cache_type", "dmd_history", "dmd_rank", "dmd_ridge",
    "dmd_svd_precision", "enable_foca", "enable_encoder_foca",
}  # fmt: skip


@dataclass
class CacheDitPlan:
    """The validated cache-dit YAML plus what the runtime does with it."""

    raw: dict[str, Any]  # what cache_dit.load_configs receives
    quant_type: str | None = None  # after alias resolution
    quant_via_torchao: bool = False  # CPU int8: applied by us, removed from `raw`
    notes: tuple[str, ...] = ()

    @property
    def uses_cache_dit(self) -> bool:
        return any(k in self.raw for k in TOP_LEVEL_KEYS)


def read_cache_dit_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cache_dit_config {path}: cannot read ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"cache_dit_config {path}: invalid YAML ({str(e).splitlines()[0]})") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"cache_dit_config {path}: expected a mapping at the top level")
    return raw


def _cache_config_keys() -> set[str]:
    from cache_dit import DBCacheConfig, DBPruneConfig

    fields = {f.name for f in dataclasses.fields(DBCacheConfig)} | {
        f.name for f in dataclasses.fields(DBPruneConfig)
    }
    return fields | _CALIBRATOR_KEYS


def _quantize_config_keys() -> set[str]:
    from cache_dit import QuantizeConfig

    return {f.name for f in dataclasses.fields(QuantizeConfig)}


def plan_cache_dit(
    raw: dict[str, Any], device_type: str, capability: tuple[int, int] | None = None
) -> CacheDitPlan:
    """Validate the YAML mapping for `device_type` ('cpu' | 'cuda'); nothing is applied here."""
    raw = copy.deepcopy(raw or {})
    notes: list[str] = []
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(
            f"cache-dit config: unknown top-level key(s) {', '.join(unknown)}; known: {', '.join(TOP_LEVEL_KEYS)}"
        )
    cc = raw.get("cache_config")
    if cc is not None:
        if not isinstance(cc, dict):
            raise ConfigError("cache-dit config: cache_config must be a mapping")
        bad = sorted(set(cc) - _cache_config_keys())
        if bad:
            raise ConfigError(f"cache-dit config: unknown cache_config key(s) {', '.join(bad)}")
        for k in ("Fn_compute_blocks", "Bn_compute_blocks"):
            if k in cc and (isinstance(cc[k], bool) or not isinstance(cc[k], int) or cc[k] < 0):
                raise ConfigError(
                    f"cache-dit config: cache_config.{k} must be an integer >= 0, got {cc[k]!r}"
                )
        mask = cc.get("steps_computation_mask")
        if isinstance(mask, str) and not isinstance(cc.get("num_inference_steps"), int):
            raise ConfigError(
                f"cache-dit config: cache_config.steps_computation_mask {mask!r} needs cache_config.num_inference_steps"
            )
        if cc.get("steps_computation_policy", "dynamic") not in ("dynamic", "static"):
            raise ConfigError(
                "cache-dit config: cache_config.steps_computation_policy must be dynamic or static"
            )
    pc = raw.get("parallelism_config")
    if pc is not None:
        if not isinstance(pc, dict):
            raise ConfigError("cache-dit config: parallelism_config must be a mapping")
        sizes = [pc.get(k, 1) for k in ("ulysses_size", "ring_size", "tp_size")]
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ConfigError(
                f"cache-dit config: parallelism_config sizes must be integers >= 1, got {sizes}"
            )
        total = sizes[0] * sizes[1] * sizes[2]
        if total == 1:
            raise ConfigError(
                "cache-dit config: parallelism_config with all sizes 1 is refused by cache-dit; remove it"
            )
        raise ConfigError(
            f"cache-dit config: parallelism_config needs {total} ranks under torch.distributed; "
            "this runtime serves one process on one device"
        )
    qc = raw.get("quantize_config")
    quant_type = None
    via_torchao = False
    if qc is not None:
        if not isinstance(qc, dict):
            raise ConfigError("cache-dit config: quantize_config must be a mapping")
        bad = sorted(set(qc) - _quantize_config_keys())
        if bad:
            raise ConfigError(f"cache-dit config: unknown quantize_config key(s) {', '.join(bad)}")
        quant_type = qc.get("quant_type", "float8_per_row")
        if quant_type in QUANT_ALIASES:
            notes.append(
                f"quantize_config.quant_type {quant_type!r} is a legacy alias of {QUANT_ALIASES[quant_type]!r}"
            )
            quant_type = QUANT_ALIASES[quant_type]
            qc["quant_type"] = quant_type
        if quant_type not in QUANT_TYPES:
            raise ConfigError(
                f"quantize_config.quant_type={quant_type!r} is not one of {', '.join(QUANT_TYPES)}"
            )
        if device_type != "cuda":
            if quant_type not in CPU_QUANT_TYPES:
                raise ConfigError(
                    f"quantize_config.quant_type={quant_type} needs a CUDA GPU"
                    f"{' with compute capability >= 8.9' if quant_type.startswith('float8') else ''}; "
                    f"this runtime runs on {device_type} (int8 types only: {', '.join(CPU_QUANT_TYPES)})"
                )
            via_torchao = True
        elif quant_type.startswith("float8") and capability is not None and capability < (8, 9):
            raise ConfigError(
                f"quantize_config.quant_type={quant_type} needs compute capability >= 8.9; "
                f"this GPU has {capability[0]}.{capability[1]}"
            )
        elif quant_type.startswith("nvfp4") and capability is not None and capability < (10, 0):
            raise ConfigError(f"quantize_config.quant_type={quant_type} needs compute capability >= 10.0")
    plan_raw = dict(raw)
    if via_torchao:
        plan_raw.pop("quantize_config")
    return CacheDitPlan(
        raw=plan_raw, quant_type=quant_type, quant_via_torchao=via_torchao, notes=tuple(notes)
    )


def transformer_block_count(pipe: Any) -> int:
    """How many blocks cache-dit's DBCache splits into Fn / middle / Bn for this pipeline.

    FluxTransformer2DModel: cache-dit's adapter joins the double- and single-stream blocks into one
    sequence (dummy-blocks mode, the default), so the count is their sum. Other transformers: each
    `*blocks` ModuleList is cached on its own, so the smallest one bounds Fn + Bn.
    """
    import torch

    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ConfigError(f"cache-dit config: pipeline {type(pipe).__name__} has no transformer to cache")
    name = type(transformer).__name__
    if name == "FluxTransformer2DModel":
        from cache_dit.envs import ENV

        if ENV.CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS:
            return len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    lists = [
        len(m)
        for n, m in transformer.named_children()
        if isinstance(m, torch.nn.ModuleList) and "blocks" in n
    ]
    if not lists:
        raise ConfigError(f"cache-dit config: {name} has no block lists cache-dit can cache")
    return min(lists)


def check_against_pipeline(plan: CacheDitPlan, pipe: Any) -> None:
    cc = plan.raw.get("cache_config")
    if not cc:
        return
    import cache_dit

    if not cache_dit.BlockAdapterRegister.is_supported(pipe):
        raise ConfigError(f"cache-dit config: cache-dit has no adapter for {type(pipe).__name__}")
    fn = cc.get("Fn_compute_blocks", 8)
    bn = cc.get("Bn_compute_blocks", 0)
    count = transformer_block_count(pipe)
    if fn + bn > count:
        raise ConfigError(
            f"cache_config.Fn_compute_blocks ({fn}) + cache_config.Bn_compute_blocks ({bn}) = {fn + bn} "
            f"exceeds the {count} transformer blocks of {type(pipe.transformer).__name__}"
        )


def _exclude_filter(exclude: list[str]):
    import torch

    def keep(module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and not any(p in fqn for p in exclude)

    return keep


def quantize_with_torchao(pipe: Any, quantize_config: dict[str, Any], quant_type: str) -> int:
    """CPU int8 path: torchao's quantize_ on the configured components. Returns quantized Linear count."""
    import torch
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
        PerTensor,
        quantize_,
    )

    configs = {
        "int8_weight_only": lambda: Int8WeightOnlyConfig(),
        "int8_per_row": lambda: Int8DynamicActivationInt8WeightConfig(granularity=PerRow()),
        "int8_per_tensor": lambda: Int8DynamicActivationInt8WeightConfig(granularity=PerTensor()),
    }
    from cache_dit import QuantizeConfig

    default_exclude = QuantizeConfig().exclude_layers
    exclude = quantize_config.get("exclude_layers", default_exclude) or []
    components = quantize_config.get("components_to_quantize") or ["transformer"]
    if isinstance(components, dict):
        components = list(components)
    total = 0
    for name in components:
        module = getattr(pipe, name, None)
        if not isinstance(module, torch.nn.Module):
            raise ConfigError(f"quantize_config.components_to_quantize: pipeline has no module {name!r}")
        keep = _exclude_filter(list(exclude))
        total += sum(1 for fqn, m in module.named_modules() if keep(m, fqn))
        quantize_(module, configs[quant_type](), filter_fn=keep)
    return total


def apply_plan(pipe: Any, plan: CacheDitPlan, quantize_raw: dict[str, Any] | None) -> None:
    """Apply a validated plan: torchao first (CPU int8), then cache-dit with the rest."""
    if plan.quant_via_torchao and quantize_raw is not None and plan.quant_type:
        n = quantize_with_torchao(pipe, quantize_raw, plan.quant_type)
        log.info("quantized %d Linear layers with torchao %s (CPU path)", n, plan.quant_type)
    if plan.uses_cache_dit:
        import cache_dit

        cache_dit.enable_cache(pipe, **cache_dit.load_configs(copy.deepcopy(plan.raw)))


def cache_tag(pipe: Any) -> str:
    import cache_dit

    try:
        return cache_dit.strify(pipe) or "none"
    except Exception:  # noqa: BLE001 - strify of an uncached pipeline is informational only
        return "none"


def cache_step_counts(pipe: Any) -> tuple[int, int]:
    """(cached, computed) transformer steps of the last pipeline call, from cache_dit.summary."""
    import cache_dit

    stats = [s for s in cache_dit.summary(pipe, logging=False) if s.cache_options]
    if not stats:
        return 0, 0
    s = stats[0]
    cached = int(s.accumulated_cached_steps or 0)
    executed = int(s.accumulated_executed_steps or 0)
    return cached, max(executed - cached, 0)
