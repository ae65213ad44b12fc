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
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from diffusion_runtime.contract import cache_dit_facts as facts
from diffusion_runtime.contract.config import ConfigError, cache_dit_errors
from diffusion_runtime.engine import cache_dit_adapter

log = logging.getLogger("diffusion_runtime")


@dataclass
class CacheDitPlan:
    """The validated cache-dit YAML plus what the runtime does with it."""

    raw: dict[str, Any]  # what cache_dit.load_configs receives
    quant_type: str | None = None  # after alias resolution
    quant_via_torchao: bool = False  # CPU int8: applied by us, removed from `raw`
    notes: tuple[str, ...] = ()

    @property
    def uses_cache_dit(self) -> bool:
        return any(k in self.raw for k in facts.TOP_LEVEL_KEYS)


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


def plan_cache_dit(
    raw: dict[str, Any], device_type: str, capability: tuple[int, int] | None = None
) -> CacheDitPlan:
    """Validate the YAML mapping for `device_type` ('cpu' | 'cuda'); nothing is applied here.

    The checks are `config.cache_dit_errors` (torch-free, the same function the operator runs on the
    YAML it renders); the first error is raised."""
    errors = cache_dit_errors(raw or {}, device_type, capability)
    if errors:
        raise errors[0]
    raw = copy.deepcopy(raw or {})
    notes: list[str] = []
    qc = raw.get("quantize_config")
    quant_type = None
    via_torchao = False
    if qc is not None:
        written = qc.get("quant_type", facts.QUANT_TYPE_DEFAULT)
        quant_type = facts.canonical_quant_type(written)
        if quant_type != written:
            notes.append(f"quantize_config.quant_type {written!r} is a legacy alias of {quant_type!r}")
            qc["quant_type"] = quant_type
        via_torchao = device_type != "cuda"
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
        if cache_dit_adapter.flux_dummy_blocks():
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
    check_parallel_heads(plan, pipe)
    cc = plan.raw.get("cache_config")
    if not cc:
        return
    if not cache_dit_adapter.is_supported(pipe):
        raise ConfigError(f"cache-dit config: cache-dit has no adapter for {type(pipe).__name__}")
    fn = cc.get("Fn_compute_blocks", facts.DBCACHE_DEFAULTS["Fn_compute_blocks"])
    bn = cc.get("Bn_compute_blocks", facts.DBCACHE_DEFAULTS["Bn_compute_blocks"])
    count = transformer_block_count(pipe)
    for key, message in facts.block_limit_errors(fn, bn, (count,)):
        raise ConfigError(
            f"cache_config.{key}: {message} of {type(pipe.transformer).__name__}", f"cache_config.{key}"
        )


def check_parallel_heads(plan: CacheDitPlan, pipe: Any) -> None:
    """The loaded transformer's heads against the layout (parallel.heads_refusal)."""
    from diffusion_runtime.contract.parallel import heads_refusal

    transformer = getattr(pipe, "transformer", None)
    heads = getattr(getattr(transformer, "config", None), "num_attention_heads", None)
    refusal = heads_refusal(plan.raw, type(transformer).__name__, heads)
    if refusal is not None:
        raise ConfigError(refusal)


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
    exclude = quantize_config.get("exclude_layers", cache_dit_adapter.default_exclude_layers()) or []
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
        cache_dit_adapter.enable(pipe, plan.raw)
