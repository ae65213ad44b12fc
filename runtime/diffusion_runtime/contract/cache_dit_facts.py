"""cache-dit facts shared by the operator, the CRD generator and the runtime, without torch.

The pinned cache-dit's own facts live in the generated `_cache_dit_pinned` module (tools/
gen_cache_dit_facts.py, checked by a test like the CRD): quant types, capability floors, config
fields and defaults, the `steps_mask` policy table and `strify`, copied from cache-dit's source. This
module adds the few rules built on them: the legacy quant alias, named masks expanded the way
`cache_dit.load_configs` does, the status tag computed the way `strify` does, and the block limits
cache-dit asserts.
"""

from __future__ import annotations

import types
from typing import Any

from diffusion_runtime.contract._cache_dit_pinned import (
    CACHE_CONFIG_FIELDS,
    CACHE_DIT_VERSION,
    CALIBRATOR_KEYS,
    DBCACHE_DEFAULTS,
    DBPRUNE_DEFAULTS,
    FLOAT8_MIN_CAPABILITY,
    FLUX_ENABLE_DUMMY_BLOCKS,
    MASK_POLICIES,
    MODEL_BLOCK_LISTS,
    NVFP4_MIN_CAPABILITY,
    NVFP4_TYPES,
    PARALLEL_SIZE_KEYS,
    PARALLELISM_CONFIG_FIELDS,
    QUANT_TYPE_ALIASES,
    QUANT_TYPE_DEFAULT,
    QUANT_TYPES,
    QUANTIZE_CONFIG_FIELDS,
    TOP_LEVEL_KEYS,
    dbcache_strify,
    dbprune_strify,
    steps_mask,
)
from diffusion_runtime.contract.limits import MAX_STEPS_LIMIT

__all__ = [
    "CACHE_CONFIG_FIELDS",
    "CACHE_DIT_VERSION",
    "CACHE_TYPES",
    "CALIBRATOR_ENUMS",
    "CALIBRATOR_KEYS",
    "FIELD_ENUMS",
    "FLOAT8_MIN_CAPABILITY",
    "FLUX_ENABLE_DUMMY_BLOCKS",
    "INT_MAXIMUMS",
    "MASK_POLICIES",
    "MODEL_BLOCK_LISTS",
    "NON_NEGATIVE_INTS",
    "NVFP4_MIN_CAPABILITY",
    "PARALLEL_SIZE_KEYS",
    "PARALLELISM_CONFIG_FIELDS",
    "POSITIVE_INTS",
    "QUANT_TYPE_ALIASES",
    "QUANT_TYPE_DEFAULT",
    "QUANT_TYPES",
    "QUANTIZE_CONFIG_FIELDS",
    "TOP_LEVEL_KEYS",
    "block_limit_errors",
    "cache_tag",
    "canonical_quant_type",
    "expand_mask",
    "min_capability",
    "steps_mask",
]

CACHE_TYPES = ("DBCache", "DBPrune")  # load_cache_options_from_dict: anything else raises
# value sets cache-dit documents in its field comments (not enums in its code)
FIELD_ENUMS = {
    "steps_computation_policy": ("dynamic", "static"),
    "force_refresh_step_policy": ("once", "repeat"),
}
CALIBRATOR_ENUMS = {
    "taylorseer_cache_type": ("residual", "hidden_states"),
    "calibrator_cache_type": ("residual", "hidden_states"),
}
# integer bounds of cache_config / parallelism_config keys (the CRD and the runtime check the same)
NON_NEGATIVE_INTS = frozenset(
    {"Bn_compute_blocks", "max_warmup_steps", "dmd_history", "dmd_rank", "ray_master_port"}
)
POSITIVE_INTS = frozenset(
    {
        "Fn_compute_blocks",  # cache_manager asserts Fn_compute_blocks >= 1
        "warmup_interval",
        "taylorseer_order",
        "num_inference_steps",
        *PARALLEL_SIZE_KEYS,
    }
)


# upper bounds (the runtime's own limits): a named mask is expanded into num_inference_steps digits
INT_MAXIMUMS = {"num_inference_steps": MAX_STEPS_LIMIT}


def canonical_quant_type(quant_type: str) -> str:
    """The current name: cache-dit lower-cases quant_type; `float8` is the 1.3.0-1.3.4 alias of
    `float8_per_row`."""
    value = quant_type.lower()
    return QUANT_TYPE_ALIASES.get(value, value)


def min_capability(quant_type: str) -> tuple[int, int] | None:
    """The CUDA compute capability cache-dit asserts for this quant type (None: no floor)."""
    value = canonical_quant_type(quant_type)
    if value in NVFP4_TYPES:
        return NVFP4_MIN_CAPABILITY
    if "float8" in value:  # QuantizeAOContext.is_float8
        return FLOAT8_MIN_CAPABILITY
    return None


def expand_mask(cache_config: dict[str, Any]) -> list[int] | None:
    """steps_computation_mask as cache-dit's loader sees it: a policy name becomes 0/1 digits with
    cache-dit's own `steps_mask(total_steps=num_inference_steps, mask_policy=name)`.

    Raises ValueError where cache-dit's loader would fail (unknown policy, a step count the table has
    no mask for, no num_inference_steps)."""
    mask = cache_config.get("steps_computation_mask")
    if not isinstance(mask, str):
        return mask
    steps = cache_config.get("num_inference_steps")
    if not isinstance(steps, int) or isinstance(steps, bool):
        raise ValueError(f"the named mask {mask!r} needs cache_config.num_inference_steps")
    if mask not in MASK_POLICIES:
        raise ValueError(f"{mask!r} is not one of cache-dit's masks {', '.join(MASK_POLICIES)}")
    if not 1 <= steps <= MAX_STEPS_LIMIT:
        raise ValueError(f"num_inference_steps={steps} is out of range [1, {MAX_STEPS_LIMIT}]")
    try:
        return steps_mask(total_steps=steps, mask_policy=mask)
    except (AssertionError, ValueError, IndexError) as e:
        detail = str(e) or type(e).__name__
        raise ValueError(f"cache-dit has no {mask!r} mask for num_inference_steps={steps} ({detail})") from e


def cache_tag(cache_config: dict[str, Any] | None) -> str:
    """cache-dit's `strify()` of the cache config `cache_dit.load_configs` builds from this mapping
    ('' without one): defaults of DBCacheConfig / DBPruneConfig, updated with the non-None values
    (BasicCacheConfig.update), a named mask expanded first."""
    if not isinstance(cache_config, dict):
        return ""
    prune = str(cache_config.get("cache_type", "DBCache")) == "DBPrune"
    values = dict(DBPRUNE_DEFAULTS if prune else DBCACHE_DEFAULTS)
    values.update({k: v for k, v in cache_config.items() if k in values and v is not None})
    if isinstance(values.get("steps_computation_mask"), str):
        values["steps_computation_mask"] = expand_mask(cache_config)
    view = types.SimpleNamespace(**values)
    return str(dbprune_strify(view) if prune else dbcache_strify(view))


def block_limit_errors(fn: int, bn: int, block_lists: tuple[int, ...]) -> list[tuple[str, str]]:
    """(key, message) for each limit cache-dit asserts per cached block list
    (pattern_base._check_cache_params: Fn_compute_blocks <= len(blocks), Bn_compute_blocks <= len(blocks))."""
    errors: list[tuple[str, str]] = []
    for key, value in (("Fn_compute_blocks", fn), ("Bn_compute_blocks", bn)):
        for length in block_lists:
            if value > length:
                errors.append((key, f"{value} exceeds the {length} blocks of a cached block list"))
                break
    return errors
