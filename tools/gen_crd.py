"""Generate `crds/diffusion.dev_diffusiondeployments.yaml`.

`spec.cacheDit` and `spec.quantize` are generated from the pinned cache-dit version's config
dataclasses (field names, types, defaults and the comment above each field become the schema), so the
CRD stays strict (no x-kubernetes-preserve-unknown-fields there: a typo such as `enable_sperate_cfg`
is refused by the apiserver, where cache-dit itself would silently drop it). The rest of the schema is
written by hand below. A test checks that the committed CRD equals this script's output.

    .venv/bin/python tools/gen_crd.py            # write the CRD
    .venv/bin/python tools/gen_crd.py --check    # exit 1 if the committed file differs
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import inspect
import logging
import os
import re
import sys
import types
import typing
import warnings
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "crds" / "diffusion.dev_diffusiondeployments.yaml"

GROUP = "diffusion.dev"
VERSION = "v1alpha1"
KIND = "DiffusionDeployment"
PLURAL = "diffusiondeployments"

# Fields of cache-dit's dataclasses that cannot be written as YAML (callables, tensors, modules,
# device meshes) or that take free-form dicts (which would need preserve-unknown-fields and so break
# strictness). They are left out of the schema on purpose; everything else is accepted verbatim.
EXCLUDED = {
    "ParallelismConfig": {
        "cp_plan",
        "ray_transfer_fn",
        "ray_runtime_env",
        "ray_init_kwargs",
        "ray_worker_options",
        "extra_parallel_kwargs",
        "parallel_kwargs",
    },
    "QuantizeConfig": {"filter_fn", "calibrate_fn", "svdq_kwargs"},
    "DBPruneConfig": set(),
    "DBCacheConfig": set(),
}

# cache-dit reads these calibrator keys from `cache_config` itself (load_cache_options_from_dict) and
# builds the calibrator dataclasses from them. The generator checks each key appears in that loader's
# source, so a cache-dit upgrade that renames one fails here instead of silently.
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
CALIBRATOR_ENUMS = {
    "taylorseer_cache_type": ["residual", "hidden_states"],
    "calibrator_cache_type": ["residual", "hidden_states"],
}
FIELD_ENUMS = {
    "steps_computation_policy": ["dynamic", "static"],
    "force_refresh_step_policy": ["once", "repeat"],
}
NON_NEGATIVE_INTS = {
    "Fn_compute_blocks",
    "Bn_compute_blocks",
    "max_warmup_steps",
    "dmd_history",
    "dmd_rank",
    "ray_master_port",
}
POSITIVE_INTS = {
    "warmup_interval",
    "taylorseer_order",
    "num_inference_steps",
    "ulysses_size",
    "ring_size",
    "tp_size",
}

# `float8` was an alias of `float8_per_row` in cache-dit 1.3.0-1.3.4; the operator accepts it and
# renders the current name.
QUANT_TYPE_ALIASES = {"float8": "float8_per_row"}
QUANT_TYPES_EXTRA_DOC = " `float8` is accepted as the legacy alias (cache-dit 1.3.0-1.3.4) of `float8_per_row` and rendered as `float8_per_row`."


def _quiet_import():
    """Import cache-dit (torch underneath) without its import-time chatter."""
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import importlib

    import cache_dit  # noqa: F401

    loader = importlib.import_module("cache_dit.caching.load_configs")
    from cache_dit.caching.cache_contexts import DBCacheConfig, DBPruneConfig
    from cache_dit.distributed import ParallelismConfig
    from cache_dit.distributed.backend import ParallelismBackend
    from cache_dit.quantization import QuantizeConfig
    from cache_dit.quantization.backend import QuantizeBackend

    logging.disable(logging.NOTSET)
    return types.SimpleNamespace(
        version=cache_dit.__version__ if hasattr(cache_dit, "__version__") else "unknown",
        loader=loader,
        DBCacheConfig=DBCacheConfig,
        DBPruneConfig=DBPruneConfig,
        ParallelismConfig=ParallelismConfig,
        ParallelismBackend=ParallelismBackend,
        QuantizeConfig=QuantizeConfig,
        QuantizeBackend=QuantizeBackend,
    )


def _field_comments(cls: type) -> dict[str, str]:
    """The `# ...` comment block right above each field in the class bodies along the MRO."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        block: list[str] = []
        for raw in source.splitlines():
            line = raw.strip()
            if line.startswith("#"):
                block.append(line.lstrip("#").strip())
                continue
            match = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:", line)
            if match and block:
                text = " ".join(b for b in block if b)
                # the cache-dit style `name (`type`, *required*, defaults to X):` preamble
                text = re.sub(r"^" + re.escape(match.group(1)) + r"\s*:?\s*\([^)]*\)\s*:?\s*", "", text)
                comments[match.group(1)] = text
            block = []
    return comments


def _type_schema(hint, name: str, ns) -> dict | None:
    """JSON schema (structural) for a dataclass field type; None when not representable."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        simple = [
            a
            for a in args
            if a in (int, float, bool, str, list, dict) or typing.get_origin(a) in (list, dict)
        ]
        if name == "residual_diff_threshold":  # Union[torch.Tensor, float]
            return {"type": "number"}
        if name == "components_to_quantize":  # List[str] | Dict[...]: lists only here
            return {"type": "array", "items": {"type": "string"}}
        if name == "backend":  # str | QuantizeBackend
            return {"type": "string", "enum": [b.value for b in ns.QuantizeBackend]}
        if len(args) == 1:
            return _type_schema(args[0], name, ns)
        if not simple:
            return None
        return _type_schema(simple[0], name, ns)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"type": "string", "enum": [m.value for m in hint if m.value != "NONE"]}
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        schema: dict = {"type": "integer"}
        if name in NON_NEGATIVE_INTS:
            schema["minimum"] = 0
        if name in POSITIVE_INTS:
            schema["minimum"] = 1
        return schema
    if hint is float:
        return {"type": "number"}
    if hint is str:
        schema = {"type": "string"}
        if name in FIELD_ENUMS:
            schema["enum"] = FIELD_ENUMS[name]
        return schema
    if hint is list or origin is list:
        inner = typing.get_args(hint)
        item = inner[0] if inner else str
        if typing.get_origin(item) in (typing.Union, types.UnionType):
            item = str  # List[str | nn.Module]: names only in YAML
        item_schema = _type_schema(item, name + "[]", ns)
        if item_schema is None:
            return None
        return {"type": "array", "items": item_schema}
    if origin is dict:
        key, value = typing.get_args(hint)
        if value is str:
            return {"type": "object", "additionalProperties": {"type": "string"}}
        return None
    return None


def _dataclass_properties(cls: type, ns, skip: set[str]) -> dict:
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    properties: dict[str, dict] = {}
    for field in dataclasses.fields(cls):
        if (
            field.name.startswith("_")
            or field.name in skip
            or field.name in EXCLUDED.get(cls.__name__, set())
        ):
            continue
        schema = _type_schema(hints[field.name], field.name, ns)
        if schema is None:
            raise SystemExit(
                f"gen_crd: no schema for {cls.__name__}.{field.name}: {hints[field.name]!r}; "
                "map it in _type_schema or list it in EXCLUDED"
            )
        default = field.default
        if isinstance(default, enum.Enum):
            default = default.value
        doc = comments.get(field.name) or f"cache-dit {cls.__name__}.{field.name}."
        if default is not dataclasses.MISSING and default is not None and not callable(default):
            doc = f"{doc} (cache-dit default: {default})"
        schema["description"] = f"{doc}".strip()
        properties[field.name] = schema
    return properties


def cache_dit_schemas() -> tuple[dict, dict, str]:
    """(spec.cacheDit schema, spec.quantize schema, cache-dit version)."""
    ns = _quiet_import()
    loader_source = inspect.getsource(ns.loader.load_cache_options_from_dict)
    for key in CALIBRATOR_KEYS:
        if f'"{key}"' not in loader_source:
            raise SystemExit(f"gen_crd: cache-dit's loader no longer reads cache_config key {key!r}")

    cache_props = _dataclass_properties(ns.DBCacheConfig, ns, skip=set())
    cache_props["cache_type"] = {
        "type": "string",
        "enum": ["DBCache", "DBPrune"],
        "description": "Cache algorithm: DBCache (dual block cache, the default) or DBPrune (dynamic block prune).",
    }
    prune_props = _dataclass_properties(ns.DBPruneConfig, ns, skip=set(cache_props))
    for name, schema in prune_props.items():
        schema["description"] = f"DBPrune only. {schema['description']}"
        cache_props[name] = schema
    # cache-dit's loader also takes a predefined policy name here (it expands it with
    # `steps_mask(total_steps=num_inference_steps, mask_policy=...)`): a list or one of the names.
    # A structural schema has no array-or-string type and CEL cannot type an untyped node, so this
    # one node keeps any value and the operator checks it (ConfigValid=False naming the field).
    policies = _mask_policies(ns)
    mask_doc = cache_props["steps_computation_mask"]["description"]
    cache_props["steps_computation_mask"] = {
        "x-kubernetes-preserve-unknown-fields": True,
        "description": (
            f"{mask_doc} Either a list of 0/1 of length num_inference_steps, or the name of one of cache-dit's "
            f"predefined masks ({', '.join(policies)}), which needs num_inference_steps. Checked by the "
            "operator (condition ConfigValid)."
        ),
    }
    for key, (kind, doc) in CALIBRATOR_KEYS.items():
        schema = {"type": kind, "description": doc}
        if key in CALIBRATOR_ENUMS:
            schema["enum"] = CALIBRATOR_ENUMS[key]
        if kind == "integer":
            schema["minimum"] = 1 if key in POSITIVE_INTS else 0
        cache_props[key] = schema
    cache_config = {
        "type": "object",
        "description": (
            "cache-dit `cache_config` (DBCacheConfig / DBPruneConfig fields plus the calibrator keys that "
            "cache-dit's loader reads), keys verbatim. Fn_compute_blocks + Bn_compute_blocks must not exceed "
            "the transformer's block count (checked by the operator for known models)."
        ),
        "properties": dict(sorted(cache_props.items(), key=lambda kv: kv[0].lower())),
        "x-kubernetes-validations": [
            {
                "rule": "[has(self.enable_taylorseer) && self.enable_taylorseer, has(self.enable_dmd) && self.enable_dmd, "
                "has(self.enable_foca) && self.enable_foca].filter(x, x).size() <= 1",
                "message": "enable_taylorseer, enable_dmd and enable_foca are mutually exclusive",
            }
        ],
    }

    par_props = _dataclass_properties(ns.ParallelismConfig, ns, skip=set())
    par_props["backend"]["enum"] = [b.value for b in ns.ParallelismBackend if b.value != "None"]
    for size in ("ulysses_size", "ring_size", "tp_size"):
        par_props[size]["description"] += (
            " Integers only here (the operator knows gpu.count, so cache-dit's `auto` is not needed); "
            "ulysses_size * ring_size * tp_size must equal spec.gpu.count."
        )
    parallelism = {
        "type": "object",
        "description": (
            "cache-dit `parallelism_config` (ParallelismConfig), keys verbatim. Sizes must multiply to "
            "spec.gpu.count and must not all be 1. Python-only fields (cp_plan, callables, free-form kwargs "
            "dicts) are not accepted."
        ),
        "properties": dict(sorted(par_props.items(), key=lambda kv: kv[0].lower())),
    }
    cache_dit = {
        "type": "object",
        "description": (
            "cache-dit's own YAML (what `cache_dit.load_configs` and `sglang generate --cache-dit-config` read), "
            f"keys verbatim, schema generated from cache-dit {ns.version}. Unknown keys are refused. Rendered into "
            "the ConfigMap as cache-dit.yaml."
        ),
        "properties": {
            "cache_config": cache_config,
            "parallelism_config": parallelism,
            "attention_backend": {
                "type": "string",
                "description": "Attention backend for the transformer, e.g. `native`, `_native_cudnn`, `flash`, `_flash_3`, `sage`.",
            },
        },
    }

    q_props = _dataclass_properties(ns.QuantizeConfig, ns, skip=set())
    quant_values = _quant_types(ns)
    q_props["quant_type"] = {
        "type": "string",
        "enum": quant_values + sorted(QUANT_TYPE_ALIASES),
        "description": q_props["quant_type"]["description"] + QUANT_TYPES_EXTRA_DOC,
    }
    q_props["backend"]["enum"] = [b.value for b in ns.QuantizeBackend if b.value != "NONE"]
    quantize = {
        "type": "object",
        "description": (
            "cache-dit `quantize_config` (QuantizeConfig), keys verbatim, rendered under quantize_config in "
            "cache-dit.yaml. cache-dit quantization needs CUDA; float8 types need compute capability >= 8.9, so "
            "the operator adds node affinity on nvidia.com/gpu.compute.major/minor."
        ),
        "properties": dict(sorted(q_props.items(), key=lambda kv: kv[0].lower())),
        "required": ["quant_type"],
    }
    return cache_dit, quantize, ns.version


def _mask_policies(ns) -> list[str]:
    """The predefined `steps_mask` policy names, read from cache-dit's source."""
    import importlib

    source = inspect.getsource(importlib.import_module("cache_dit.caching.cache_interface").steps_mask)
    block = source[source.index("predefined_policies = {") :]
    names = re.findall(r'^\s*"([a-z]+)"\s*:', block[: block.index("\n  }")], re.MULTILINE)
    if "fast" not in names:
        raise SystemExit("gen_crd: could not read cache-dit's steps_mask policies")
    return names


def _quant_types(ns) -> list[str]:
    """quant_type values cache-dit's torchao path dispatches on, read from its source."""
    import importlib

    quantize_ao = importlib.import_module("cache_dit.quantization.torchao.quantize_ao")
    found = re.findall(r'quant_type == "([a-z0-9_]+)"', inspect.getsource(quantize_ao))
    ordered: list[str] = []
    for value in found:
        if value not in ordered and not value.startswith("svdq"):
            ordered.append(value)
    if "float8_per_row" not in ordered:
        raise SystemExit("gen_crd: could not read cache-dit's quant_type values")
    return ordered


# ---------------------------------------------------------------------------------------------------
# the hand-written rest of the schema


def _s(kind: str, description: str, **extra) -> dict:
    return {"type": kind, "description": description, **extra}


def _int_or_string(description: str) -> dict:
    return {"x-kubernetes-int-or-string": True, "description": description}


def spec_schema(cache_dit: dict, quantize: dict) -> dict:
    quantity_map = {
        "type": "object",
        "additionalProperties": {
            "x-kubernetes-int-or-string": True,
            "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
        },
    }
    return {
        "type": "object",
        "description": "Desired state: the model, GPUs, cache-dit and quantization settings, warmup and server limits.",
        "required": ["model"],
        "properties": {
            "model": {
                "type": "object",
                "description": "The diffusers model to serve.",
                "required": ["uri"],
                "properties": {
                    "uri": _s(
                        "string",
                        "Where the model comes from: hf://org/name (Hugging Face), pvc://claim/path (a "
                        "PersistentVolumeClaim mounted read-only), file:///abs/path or an absolute path inside the image.",
                        pattern=r"^(hf://[A-Za-z0-9._-]+/[A-Za-z0-9._-]+|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|file:///.+|/.+)$",
                        maxLength=512,
                    ),
                    "revision": _s(
                        "string", "Hub revision (branch, tag or commit); hf:// only.", maxLength=128
                    ),
                    "pipeline": _s(
                        "string",
                        "diffusers pipeline class, e.g. FluxPipeline; when empty, model_index.json decides.",
                        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                        maxLength=128,
                    ),
                    "dtype": _s(
                        "string",
                        "Weights dtype.",
                        enum=["bfloat16", "float16", "float32"],
                        default="bfloat16",
                    ),
                    "tokenSecretRef": {
                        "type": "object",
                        "description": "Secret holding the Hugging Face token; passed to the pod only as env HF_TOKEN via secretKeyRef.",
                        "required": ["name"],
                        "properties": {
                            "name": _s("string", "Secret name (same namespace).", maxLength=253),
                            "key": _s("string", "Key in the Secret.", default="token", maxLength=253),
                        },
                    },
                },
            },
            "replicas": _s(
                "integer",
                "Number of serving pods (scale subresource: kubectl scale dd/NAME --replicas N). Leave unset "
                "when spec.autoscaling is set; defaults to 1 otherwise.",
                minimum=0,
            ),
            "gpu": {
                "type": "object",
                "description": "GPUs per pod.",
                "default": {"count": 1},
                "properties": {
                    "count": _s(
                        "integer",
                        "nvidia.com/gpu per pod; 0 runs on CPU nodes.",
                        minimum=0,
                        maximum=16,
                        default=1,
                    ),
                    "product": _s(
                        "string",
                        "Required GPU product (node label nvidia.com/gpu.product), e.g. NVIDIA-H100-80GB-HBM3.",
                        maxLength=128,
                    ),
                },
            },
            "device": _s("string", "Runtime device.", enum=["auto", "cuda", "cpu"], default="auto"),
            "cacheDit": cache_dit,
            "quantize": quantize,
            "compile": _s("boolean", "torch.compile the transformer before warmup.", default=False),
            "warmup": {
                "type": "object",
                "description": "Warm generations run before the pod turns Ready.",
                "properties": {
                    "resolutions": {
                        "type": "array",
                        "description": "WIDTHxHEIGHT sizes to warm up (each compiles its own graph).",
                        "maxItems": 16,
                        "items": {"type": "string", "pattern": r"^[1-9][0-9]{1,4}x[1-9][0-9]{1,4}$"},
                    },
                    "steps": _s("integer", "Inference steps per warmup generation.", minimum=1, maximum=1000),
                    "prompt": _s("string", "Warmup prompt.", maxLength=1000),
                },
            },
            "server": {
                "type": "object",
                "description": "Runtime server limits.",
                "properties": {
                    "maxQueue": _s(
                        "integer",
                        "Bounded queue length; a full queue answers 429 with Retry-After.",
                        minimum=1,
                        default=16,
                    ),
                    "requestTimeoutSeconds": _s("integer", "Per-request timeout.", minimum=1, default=300),
                    "maxPixels": _s("integer", "Largest width*height accepted.", minimum=1, default=4194304),
                    "maxSteps": _s(
                        "integer", "Largest num_inference_steps accepted.", minimum=1, default=100
                    ),
                    "maxN": _s("integer", "Largest n (images per request) accepted.", minimum=1, default=4),
                },
            },
            "startupTimeoutSeconds": _s(
                "integer",
                "Time allowed for model load, compile and warmup before the startup probe fails the pod. Sized "
                "from the spec (model, compile, warmup) when unset.",
                minimum=60,
                maximum=14400,
            ),
            "autoscaling": {
                "type": "object",
                "description": "Scale on the runtime's per-pod queue depth (autoscaling/v2 HPA, Pods metric diffusion_queue_depth).",
                "required": ["maxReplicas"],
                "properties": {
                    "minReplicas": _s("integer", "Lowest replica count.", minimum=1, default=1),
                    "maxReplicas": _s("integer", "Highest replica count.", minimum=1),
                    "targetQueueDepth": _s(
                        "number", "Average queued images per pod to aim for.", minimum=0.1, default=2
                    ),
                },
                "x-kubernetes-validations": [
                    {
                        "rule": "self.minReplicas <= self.maxReplicas",
                        "message": "autoscaling.minReplicas must be <= autoscaling.maxReplicas",
                    }
                ],
            },
            "rollout": {
                "type": "object",
                "description": "Deployment rollout. maxSurge 0 (the default) replaces pods in place, so a rollout never needs extra GPUs.",
                "properties": {
                    "maxSurge": _int_or_string("Extra pods during a rollout (default 0)."),
                    "maxUnavailable": _int_or_string("Pods that may be down during a rollout (default 1)."),
                },
                "x-kubernetes-validations": [
                    {
                        "rule": "!(has(self.maxSurge) && has(self.maxUnavailable) && (self.maxSurge == 0 || self.maxSurge == '0' || self.maxSurge == '0%') && (self.maxUnavailable == 0 || self.maxUnavailable == '0' || self.maxUnavailable == '0%'))",
                        "message": "rollout.maxSurge and rollout.maxUnavailable cannot both be 0",
                    }
                ],
            },
            "disruption": {
                "type": "object",
                "description": "PodDisruptionBudget of the serving pods.",
                "properties": {
                    "maxUnavailable": _int_or_string("Pods a voluntary disruption may take down (default 1).")
                },
            },
            "template": {
                "type": "object",
                "description": "Pod template overrides.",
                "properties": {
                    "image": _s("string", "Runtime image.", maxLength=512),
                    "imagePullPolicy": _s(
                        "string", "Image pull policy.", enum=["Always", "IfNotPresent", "Never"]
                    ),
                    "serviceAccountName": _s("string", "Service account of the pods.", maxLength=253),
                    "nodeSelector": {
                        "type": "object",
                        "description": "Extra node selector labels.",
                        "additionalProperties": {"type": "string"},
                    },
                    "tolerations": {
                        "type": "array",
                        "description": "Extra tolerations (the nvidia.com/gpu taint is tolerated already).",
                        "items": {
                            "type": "object",
                            "description": "A core/v1 Toleration.",
                            "properties": {
                                "key": _s("string", "Taint key."),
                                "operator": _s("string", "Exists or Equal.", enum=["Exists", "Equal"]),
                                "value": _s("string", "Taint value."),
                                "effect": _s(
                                    "string",
                                    "Taint effect.",
                                    enum=["NoSchedule", "PreferNoSchedule", "NoExecute"],
                                ),
                                "tolerationSeconds": _s("integer", "NoExecute toleration time."),
                            },
                        },
                    },
                    "affinity": {
                        "type": "object",
                        "description": "A core/v1 Affinity, merged with the operator's GPU affinity.",
                        "x-kubernetes-preserve-unknown-fields": True,
                    },
                    "resources": {
                        "type": "object",
                        "description": "cpu/memory requests and limits (nvidia.com/gpu comes from spec.gpu).",
                        "properties": {
                            "requests": {**quantity_map, "description": "Requests."},
                            "limits": {**quantity_map, "description": "Limits."},
                        },
                    },
                    "env": {
                        "type": "array",
                        "description": "Extra environment variables (name/value only; HF_TOKEN is set from model.tokenSecretRef).",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "description": "A name/value variable.",
                            "properties": {
                                "name": _s("string", "Variable name.", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"),
                                "value": _s("string", "Variable value."),
                            },
                        },
                    },
                    "shmSize": _int_or_string(
                        "Size limit of the /dev/shm emptyDir (default 8Gi; 1Gi on CPU)."
                    ),
                },
            },
        },
        "x-kubernetes-validations": [
            {
                "rule": "!(has(self.replicas) && has(self.autoscaling))",
                "message": "spec.replicas and spec.autoscaling are mutually exclusive: with autoscaling the HPA drives the replica count",
            },
            {
                "rule": "!has(self.cacheDit) || !has(self.cacheDit.parallelism_config) || "
                "(has(self.cacheDit.parallelism_config.ulysses_size) ? self.cacheDit.parallelism_config.ulysses_size : 1) * "
                "(has(self.cacheDit.parallelism_config.ring_size) ? self.cacheDit.parallelism_config.ring_size : 1) * "
                "(has(self.cacheDit.parallelism_config.tp_size) ? self.cacheDit.parallelism_config.tp_size : 1) == "
                "(has(self.gpu) && has(self.gpu.count) ? self.gpu.count : 1)",
                "message": "cacheDit.parallelism_config: ulysses_size * ring_size * tp_size must equal gpu.count",
                "fieldPath": ".cacheDit.parallelism_config",
            },
        ],
    }


def status_schema() -> dict:
    return {
        "type": "object",
        "description": "Observed state, written by the operator.",
        "properties": {
            "observedGeneration": _s("integer", "The metadata.generation this status describes."),
            "replicas": _s("integer", "Pods of the owned Deployment."),
            "readyReplicas": _s("integer", "Ready pods (Ready means model loaded and warmed up)."),
            "updatedReplicas": _s("integer", "Pods running the current configuration."),
            "ready": _s("string", "readyReplicas/desired, for printing."),
            "selector": _s("string", "Label selector of the pods (scale subresource)."),
            "endpoint": _s("string", "In-cluster URL of the Service."),
            "configHash": _s("string", "Hash of the rendered configuration; a change rolls the pods."),
            "cacheTag": _s("string", "cache-dit's summary tag of the cache config (as cache_dit.strify)."),
            "conditions": {
                "type": "array",
                "description": "Ready, Progressing and ConfigValid, per the Kubernetes API conventions.",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
                "items": {
                    "type": "object",
                    "required": ["type", "status"],
                    "description": "A condition.",
                    "properties": {
                        "type": _s("string", "Condition type."),
                        "status": _s("string", "True, False or Unknown.", enum=["True", "False", "Unknown"]),
                        "reason": _s("string", "CamelCase reason."),
                        "message": _s("string", "Human-readable detail."),
                        "lastTransitionTime": _s("string", "When status last changed.", format="date-time"),
                        "observedGeneration": _s("integer", "Generation the condition was computed from."),
                    },
                },
            },
        },
    }


def build_crd() -> dict:
    cache_dit, quantize, version = cache_dit_schemas()
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "annotations": {"diffusion.dev/cache-dit-version": version},
            "labels": {
                "app.kubernetes.io/name": "diffusion-operator",
                "app.kubernetes.io/part-of": "diffusion-operator",
            },
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": "diffusiondeployment",
                "shortNames": ["dd"],
                "categories": ["diffusion", "all"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri"},
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": ".status.ready",
                            "description": "ready/desired pods",
                        },
                        {"name": "Cache", "type": "string", "jsonPath": ".status.cacheTag"},
                        {"name": "Quant", "type": "string", "jsonPath": ".spec.quantize.quant_type"},
                        {
                            "name": "Status",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": (
                                "DiffusionDeployment serves a diffusion model (diffusers) with cache-dit caching and "
                                "torchao quantization on GPU pods behind an OpenAI-images-compatible API."
                            ),
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": _s("string", "API version."),
                                "kind": _s("string", "Kind."),
                                "metadata": {"type": "object"},
                                "spec": spec_schema(cache_dit, quantize),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated by tools/gen_crd.py from cache-dit's config dataclasses: do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed CRD differs")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run tools/gen_crd.py", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
