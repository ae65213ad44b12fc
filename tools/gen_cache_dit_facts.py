"""Generate `runtime/diffusion_runtime/contract/_cache_dit_pinned.py`: the pinned cache-dit's facts, torch-free.

The operator image has no torch, and cache-dit imports torch, so the operator, the CRD generator and
the runtime's config validation read cache-dit's facts from this generated module instead: the quant
types and their capability floors, the config dataclasses' fields, types and defaults, the
`steps_mask` policy table and `strify` (cache-dit's own source, copied verbatim), the parallel size
keys, the FLUX dummy-blocks default and the block lists of known models as cache-dit's adapters see
them. A test checks that the committed module equals this script's output (like the CRD).

    .venv/bin/python tools/gen_cache_dit_facts.py            # write the module
    .venv/bin/python tools/gen_cache_dit_facts.py --check    # exit 1 if the committed file differs
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import logging
import os
import pprint
import re
import sys
import textwrap
import typing
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "runtime" / "diffusion_runtime" / "contract" / "_cache_dit_pinned.py"

sys.path.insert(0, str(REPO / "tools"))
import _generated as generated  # noqa: E402

# Keys cache-dit's loader (`load_cache_options_from_dict`) reads from `cache_config` besides the
# DBCache/DBPrune dataclass fields; it builds the calibrator dataclasses from them. Each key is checked
# to appear in that loader's source, so a cache-dit upgrade that renames one fails here.
CALIBRATOR_KEYS: dict[str, tuple[str, str]] = {
    "enable_taylorseer": (
        "boolean",
        "Enable the TaylorSeer calibrator (mutually exclusive with enable_dmd and enable_foca).",
    ),
    "enable_encoder_taylorseer": (
        "boolean",
        "Also calibrate the encoder stream with TaylorSeer (default false).",
    ),
    "taylorseer_cache_type": ("string", "What TaylorSeer caches: `residual` (default) or `hidden_states`."),
    "taylorseer_order": ("integer", "TaylorSeer expansion order (default 1)."),
    "enable_dmd": (
        "boolean",
        "Enable the DMD calibrator (mutually exclusive with enable_taylorseer and enable_foca).",
    ),
    "enable_encoder_dmd": ("boolean", "Also calibrate the encoder stream with DMD (defaults to enable_dmd)."),
    "calibrator_cache_type": (
        "string",
        "What the DMD/FoCa calibrator caches: `residual` (default) or `hidden_states`.",
    ),
    "dmd_history": ("integer", "DMD history length (default 6)."),
    "dmd_rank": ("integer", "DMD rank, 0 = automatic (default 0)."),
    "dmd_ridge": ("number", "DMD ridge regularisation (default 1e-8)."),
    "dmd_svd_precision": ("string", "DMD SVD precision (default `medium`)."),
    "enable_foca": (
        "boolean",
        "Enable the FoCa calibrator (mutually exclusive with enable_taylorseer and enable_dmd).",
    ),
    "enable_encoder_foca": ("boolean", "Also calibrate the encoder stream with FoCa (default false)."),
}

# `float8` was cache-dit's name of `float8_per_row` in 1.3.0 to 1.3.4 only; configs written for those
# versions still use it. Not a fact of the pinned version, so it is stated here.
QUANT_TYPE_ALIASES = {"float8": "float8_per_row"}

# Transformer block lists of known models (from each model's transformer config: num_layers,
# num_single_layers, ...). Which lists cache-dit caches, and whether it joins them, is cache-dit's
# adapter rule, applied below (see `_cached_lists`).
MODELS: dict[str, tuple[str, dict[str, int]]] = {
    "FLUX.1-dev": ("FluxTransformer2DModel", {"transformer_blocks": 19, "single_transformer_blocks": 38}),
    "FLUX.1-schnell": (
        "FluxTransformer2DModel",
        {"transformer_blocks": 19, "single_transformer_blocks": 38},
    ),
    "FLUX.1-Kontext-dev": (
        "FluxTransformer2DModel",
        {"transformer_blocks": 19, "single_transformer_blocks": 38},
    ),
    "Qwen-Image": ("QwenImageTransformer2DModel", {"transformer_blocks": 60}),
    "Qwen-Image-Edit": ("QwenImageTransformer2DModel", {"transformer_blocks": 60}),
    "stable-diffusion-3-medium-diffusers": ("SD3Transformer2DModel", {"transformer_blocks": 24}),
    "stable-diffusion-3.5-medium": ("SD3Transformer2DModel", {"transformer_blocks": 24}),
    "stable-diffusion-3.5-large": ("SD3Transformer2DModel", {"transformer_blocks": 38}),
    "stable-diffusion-3.5-large-turbo": ("SD3Transformer2DModel", {"transformer_blocks": 38}),
    "Wan2.1-T2V-1.3B-Diffusers": ("WanTransformer3DModel", {"blocks": 30}),
    "Wan2.1-T2V-14B-Diffusers": ("WanTransformer3DModel", {"blocks": 40}),
    "Wan2.1-I2V-14B-480P-Diffusers": ("WanTransformer3DModel", {"blocks": 40}),
    "HunyuanVideo": (
        "HunyuanVideoTransformer3DModel",
        {"transformer_blocks": 20, "single_transformer_blocks": 40},
    ),
    "CogVideoX-5b": ("CogVideoXTransformer3DModel", {"transformer_blocks": 42}),
}


def _tiny_model() -> tuple[str, dict[str, int]]:
    """The runtime's tiny random-weight FLUX (samples/tiny-cpu.yaml: file:///models/tiny-flux)."""
    sys.path.insert(0, str(REPO / "runtime"))
    from diffusion_runtime.tiny import SPECS

    tiny = SPECS["tiny"]
    return (
        "FluxTransformer2DModel",
        {"transformer_blocks": tiny.num_layers, "single_transformer_blocks": tiny.num_single_layers},
    )


def _quiet_import():
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    # the facts are cache-dit's defaults, not this shell's overrides
    os.environ.pop("CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS", None)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import cache_dit

    logging.disable(logging.NOTSET)
    return cache_dit


def _json_type(hint) -> str:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        simple = [a for a in args if a in (int, float, bool, str) or typing.get_origin(a) in (list, dict)]
        if any(a is float for a in args):
            return "number"  # residual_diff_threshold: Union[torch.Tensor, float]
        if len(args) == 1:
            return _json_type(args[0])
        if any(typing.get_origin(a) is list or a is list for a in args):
            return "array"
        return _json_type(simple[0]) if simple else "object"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "string"
    if hint is bool:
        return "boolean"
    if hint is int:
        return "integer"
    if hint is float:
        return "number"
    if hint is str:
        return "string"
    if hint is list or origin is list:
        return "array"
    return "object"


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _fields(cls) -> tuple[dict[str, str], dict[str, object]]:
    hints = typing.get_type_hints(cls)
    types: dict[str, str] = {}
    defaults: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        types[f.name] = _json_type(hints[f.name])
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = _plain(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
            defaults[f.name] = value if isinstance(value, list | dict) else None
    return types, defaults


def _function_source(func, name: str) -> str:
    source = textwrap.dedent(inspect.getsource(func))
    source = re.sub(r"^def \w+\(", f"def {name}(", source, count=1, flags=re.MULTILINE)
    return source.rstrip() + "\n"


def _capability(source: str, predicate: str) -> tuple[int, int]:
    match = re.search(
        rf"if self\.{predicate}\(\):\s*assert current_platform\.get_device_capability\(\) >= \(\s*(\d+),\s*(\d+),?\s*\)",
        source,
    )
    if not match:
        raise SystemExit(f"gen_cache_dit_facts: no capability floor for {predicate} in cache-dit")
    return int(match.group(1)), int(match.group(2))


def _cached_lists(transformer: str, lists: dict[str, int], flux_dummy: bool) -> tuple[int, ...]:
    """The block lists cache-dit's adapter caches for this transformer (see flux_adapter)."""
    if transformer == "FluxTransformer2DModel" and flux_dummy:
        return (sum(lists.values()),)  # transformer_blocks + single_transformer_blocks, one list
    return tuple(lists.values())


def collect() -> dict:
    cache_dit = _quiet_import()
    from cache_dit import DBCacheConfig, DBPruneConfig, ParallelismConfig, QuantizeConfig
    from cache_dit.caching.cache_contexts.cache_config import BasicCacheConfig

    loader = importlib.import_module("cache_dit.caching.load_configs")
    loader_source = inspect.getsource(loader.load_cache_options_from_dict)
    for key in CALIBRATOR_KEYS:
        if f'"{key}"' not in loader_source:
            raise SystemExit(
                f"gen_cache_dit_facts: cache-dit's loader no longer reads cache_config key {key!r}"
            )
    if "steps_mask(total_steps=num_inference_steps" not in inspect.getsource(loader.load_cache_config):
        raise SystemExit(
            "gen_cache_dit_facts: cache-dit's loader no longer expands named masks with steps_mask"
        )

    quantize_ao = importlib.import_module("cache_dit.quantization.torchao.quantize_ao")
    ao_source = inspect.getsource(quantize_ao)
    quant_types = tuple(quantize_ao._ALLOWED_QUANTIZE_TYPES)
    float8_source = inspect.getsource(quantize_ao.QuantizeAOContext.is_float8)
    if 'return "float8" in self.quant_type' not in float8_source:
        raise SystemExit("gen_cache_dit_facts: cache-dit's is_float8 changed")
    nvfp4_source = inspect.getsource(quantize_ao.QuantizeAOContext.is_nvfp4)
    nvfp4_types = tuple(re.findall(r'"([a-z0-9_]+)"', nvfp4_source))

    envs = importlib.import_module("cache_dit.envs")
    adapters = importlib.import_module("cache_dit.caching.block_adapters.adapters")
    flux_source = inspect.getsource(adapters.flux_adapter)
    if (
        "pipe.transformer.transformer_blocks + pipe.transformer.single_transformer_blocks" not in flux_source
        or "CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS" not in flux_source
    ):
        raise SystemExit("gen_cache_dit_facts: cache-dit's FLUX adapter no longer joins the block lists")
    pattern_base = importlib.import_module("cache_dit.caching.cache_blocks.pattern_base")
    check_source = inspect.getsource(pattern_base.CachedBlocks_Pattern_Base._check_cache_params)
    for needle in (
        "Fn_compute_blocks() <= len(self.transformer_blocks)",
        "Bn_compute_blocks() <= len(self.transformer_blocks)",
    ):
        if needle not in check_source:
            raise SystemExit(f"gen_cache_dit_facts: cache-dit's block check changed ({needle})")
    manager = importlib.import_module("cache_dit.caching.cache_contexts.cache_manager")
    if "Fn_compute_blocks >= 1" not in inspect.getsource(manager):
        raise SystemExit("gen_cache_dit_facts: cache-dit no longer asserts Fn_compute_blocks >= 1")
    flux_dummy = bool(envs.ENV.CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS)

    cache_types, dbcache_defaults = _fields(DBCacheConfig)
    prune_types, dbprune_defaults = _fields(DBPruneConfig)
    cache_fields = dict(cache_types)
    cache_fields.update({k: v for k, v in prune_types.items() if k not in cache_fields})
    cache_fields["cache_type"] = "string"
    for key, (kind, _) in CALIBRATOR_KEYS.items():
        cache_fields[key] = kind
    quant_fields, quant_defaults = _fields(QuantizeConfig)
    par_fields, _ = _fields(ParallelismConfig)
    parallel_sizes = tuple(k for k in par_fields if k.endswith("_size"))

    interface = importlib.import_module("cache_dit.caching.cache_interface")
    mask_source = inspect.getsource(interface.steps_mask)
    block = mask_source[mask_source.index("predefined_policies = {") :]
    policies = tuple(re.findall(r'^\s*"([a-z]+)"\s*:', block[: block.index("\n  }")], re.MULTILINE))

    return {
        "version": getattr(cache_dit, "__version__", "unknown"),
        "quant_types": quant_types,
        "quant_default": quant_defaults["quant_type"],
        "float8_capability": _capability(ao_source, "is_float8"),
        "nvfp4_capability": _capability(ao_source, "is_nvfp4"),
        "nvfp4_types": nvfp4_types,
        "cache_fields": dict(sorted(cache_fields.items())),
        "dbcache_defaults": dbcache_defaults,
        "dbprune_defaults": dbprune_defaults,
        "quant_fields": quant_fields,
        "par_fields": par_fields,
        "parallel_sizes": parallel_sizes,
        "policies": policies,
        "flux_dummy": flux_dummy,
        "models": {
            name: _cached_lists(transformer, lists, flux_dummy)
            for name, (transformer, lists) in {**MODELS, "tiny-flux": _tiny_model()}.items()
        },
        "steps_mask_src": _function_source(interface._steps_mask, "_steps_mask")
        + "\n\n"
        + _function_source(interface.steps_mask, "steps_mask"),
        "dbcache_strify_src": _function_source(BasicCacheConfig.strify, "dbcache_strify"),
        "dbprune_strify_src": _function_source(DBPruneConfig.strify, "dbprune_strify"),
    }


def _const(name: str, value, comment: str = "") -> str:
    text = pprint.pformat(value, width=100, sort_dicts=False)
    lead = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
    return f"{lead}{name} = {text}\n"


def render() -> str:
    f = collect()
    parts = [
        f"# Generated by tools/gen_cache_dit_facts.py from cache-dit {f['version']}: do not edit by hand.\n"
        "# The functions below the constants are cache-dit's own source (Apache-2.0), copied verbatim.\n"
        '"""The pinned cache-dit\'s facts, without importing torch (see diffusion_runtime.contract.cache_dit_facts)."""\n\n'
        "import copy\nfrom typing import List, Optional\n\n",
        _const("CACHE_DIT_VERSION", f["version"]),
        _const(
            "TOP_LEVEL_KEYS", ("cache_config", "parallelism_config", "attention_backend", "quantize_config")
        ),
        _const("QUANT_TYPES", f["quant_types"], "quantization.torchao.quantize_ao._ALLOWED_QUANTIZE_TYPES"),
        _const("QUANT_TYPE_DEFAULT", f["quant_default"], "QuantizeConfig.quant_type default"),
        _const(
            "QUANT_TYPE_ALIASES",
            QUANT_TYPE_ALIASES,
            "cache-dit 1.3.0-1.3.4 names: accepted, and rendered as the current name",
        ),
        _const(
            "FLOAT8_MIN_CAPABILITY", f["float8_capability"], "QuantizeAOContext.__post_init__: is_float8()"
        ),
        _const("NVFP4_MIN_CAPABILITY", f["nvfp4_capability"], "QuantizeAOContext.__post_init__: is_nvfp4()"),
        _const("NVFP4_TYPES", f["nvfp4_types"]),
        _const(
            "CACHE_CONFIG_FIELDS",
            f["cache_fields"],
            "cache_config keys (DBCacheConfig, DBPruneConfig, the loader's calibrator keys): JSON type",
        ),
        _const("CALIBRATOR_KEYS", CALIBRATOR_KEYS),
        _const("DBCACHE_DEFAULTS", f["dbcache_defaults"]),
        _const("DBPRUNE_DEFAULTS", f["dbprune_defaults"]),
        _const("QUANTIZE_CONFIG_FIELDS", f["quant_fields"]),
        _const("PARALLELISM_CONFIG_FIELDS", f["par_fields"]),
        _const("PARALLEL_SIZE_KEYS", f["parallel_sizes"]),
        _const("MASK_POLICIES", f["policies"], "steps_mask's predefined_policies"),
        _const(
            "FLUX_ENABLE_DUMMY_BLOCKS",
            f["flux_dummy"],
            "envs.CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS default: FLUX.1's double + single blocks are one list",
        ),
        _const(
            "MODEL_BLOCK_LISTS",
            f["models"],
            "block lists of known models as cache-dit's adapters cache them; pattern_base._check_cache_params\n"
            "asserts Fn_compute_blocks <= len(blocks) and Bn_compute_blocks <= len(blocks) for each",
        ),
        "\n\n# cache_interface._steps_mask and steps_mask\n",
        f["steps_mask_src"],
        "\n\n# BasicCacheConfig.strify (DBCacheConfig)\n",
        f["dbcache_strify_src"],
        "\n\n# DBPruneConfig.strify\n",
        f["dbprune_strify_src"],
    ]
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    return generated.main(__doc__, render, OUTPUT, "tools/gen_cache_dit_facts.py", "module", argv)


if __name__ == "__main__":
    sys.exit(main())
