"""Generate `crds/diffusion.dev_diffusiondeployments.yaml`.

`spec.cacheDit` and `spec.quantize` are generated from the pinned cache-dit version's config
dataclasses (field names, types, defaults and the comment above each field become the schema), so the
CRD stays strict (no x-kubernetes-preserve-unknown-fields there: a typo such as `enable_sperate_cfg`
is refused by the apiserver, where cache-dit itself would silently drop it). The rest of `spec` is
generated from the operator's typed model (`diffusion_operator.api.api_types.DiffusionDeploymentSpec`: types,
defaults, bounds, descriptions, CEL rules), whose limits and defaults come from the runtime's own
config type. cache-dit facts (quant types and aliases, mask policies, integer bounds) come from the
shared facts module. A test checks that the committed CRD equals this script's output.

    .venv/bin/python tools/gen_crd.py            # write the CRD
    .venv/bin/python tools/gen_crd.py --check    # exit 1 if the committed file differs
"""

from __future__ import annotations

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

sys.path[:0] = [str(REPO / "operator"), str(REPO / "runtime"), str(REPO / "tools")]
import _generated as generated  # noqa: E402
from diffusion_operator.api import group, status_types  # noqa: E402
from diffusion_operator.api import types as api_types  # noqa: E402
from diffusion_runtime.contract import cache_dit_facts as facts  # noqa: E402

GROUP, VERSION, KIND, PLURAL = group.GROUP, group.VERSION, group.KIND, group.PLURAL

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
QUANT_TYPES_EXTRA_DOC = (
    " `float8` is accepted as the legacy alias (cache-dit 1.3.0-1.3.4) of `float8_per_row` and rendered as "
    "`float8_per_row`. On CPU (gpu.count 0 or device cpu) only the int8 types run (torchao, no cache-dit); "
    "the rest need CUDA, float8 compute capability >= 8.9."
)


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
        if name in facts.NON_NEGATIVE_INTS:
            schema["minimum"] = 0
        if name in facts.POSITIVE_INTS:
            schema["minimum"] = 1
        if name in facts.INT_MAXIMUMS:
            schema["maximum"] = facts.INT_MAXIMUMS[name]
        return schema
    if hint is float:
        return {"type": "number"}
    if hint is str:
        schema = {"type": "string"}
        if name in facts.FIELD_ENUMS:
            schema["enum"] = list(facts.FIELD_ENUMS[name])
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
    if ns.version != facts.CACHE_DIT_VERSION:
        raise SystemExit(
            f"gen_crd: cache-dit {ns.version} is installed but the facts module is from "
            f"{facts.CACHE_DIT_VERSION}: run tools/gen_cache_dit_facts.py"
        )

    cache_props = _dataclass_properties(ns.DBCacheConfig, ns, skip=set())
    cache_props["cache_type"] = {
        "type": "string",
        "enum": list(facts.CACHE_TYPES),
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
    policies = facts.MASK_POLICIES
    mask_doc = cache_props["steps_computation_mask"]["description"]
    cache_props["steps_computation_mask"] = {
        "x-kubernetes-preserve-unknown-fields": True,
        "description": (
            f"{mask_doc} Either a list of 0/1 of length num_inference_steps, or the name of one of cache-dit's "
            f"predefined masks ({', '.join(policies)}), which needs num_inference_steps. Checked by the "
            "operator (condition ConfigValid)."
        ),
    }
    for key, (kind, doc) in facts.CALIBRATOR_KEYS.items():
        schema = {"type": kind, "description": doc}
        if key in facts.CALIBRATOR_ENUMS:
            schema["enum"] = list(facts.CALIBRATOR_ENUMS[key])
        if kind == "integer":
            schema["minimum"] = 1 if key in facts.POSITIVE_INTS else 0
        cache_props[key] = schema
    cache_config = {
        "type": "object",
        "description": (
            "cache-dit `cache_config` (DBCacheConfig / DBPruneConfig fields plus the calibrator keys that "
            "cache-dit's loader reads), keys verbatim. Fn_compute_blocks and Bn_compute_blocks must each not "
            "exceed the blocks of a cached block list (cache-dit's own check; FLUX.1 caches its 19 + 38 blocks "
            "as one list of 57; checked by the operator for known models)."
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
    for size in facts.PARALLEL_SIZE_KEYS:
        par_props[size]["description"] += (
            " Integers only here (the operator knows the pod's ranks, so cache-dit's `auto` is not needed); "
            f"{api_types.PARALLEL_SIZES} is the pod's rank count."
        )
    parallelism = {
        "type": "object",
        "description": (
            "cache-dit `parallelism_config` (ParallelismConfig), keys verbatim. The pod runs "
            f"{api_types.PARALLEL_SIZES} ranks: {api_types.PARALLEL_ON_GPUS}; {api_types.PARALLEL_ON_CPU}. The sizes "
            "must not all be 1. Python-only fields (cp_plan, callables, free-form kwargs dicts) are not "
            "accepted. A layout the runtime does not run (on CPU: ring_size, tp_size without ulysses_size, "
            "ulysses_float8) is reported as ConfigValid=False with reason Unsupported."
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
    q_props["quant_type"] = {
        "type": "string",
        "enum": list(facts.QUANT_TYPES) + sorted(facts.QUANT_TYPE_ALIASES),
        "description": q_props["quant_type"]["description"] + QUANT_TYPES_EXTRA_DOC,
    }
    q_props["backend"]["enum"] = [b.value for b in ns.QuantizeBackend if b.value != "NONE"]
    quantize = {
        "type": "object",
        "description": (
            "cache-dit `quantize_config` (QuantizeConfig), keys verbatim, rendered under quantize_config in "
            "cache-dit.yaml. cache-dit quantization needs CUDA; float8 types need compute capability >= 8.9, so "
            "the operator adds node affinity on nvidia.com/gpu.compute.major/minor. On CPU the runtime applies "
            "the int8 types with torchao (quant_type, exclude_layers, components_to_quantize as a list)."
        ),
        "properties": dict(sorted(q_props.items(), key=lambda kv: kv[0].lower())),
        "required": ["quant_type"],
    }
    return cache_dit, quantize, ns.version


# ---------------------------------------------------------------------------------------------------
# spec and status from the operator's typed models


def _s(kind: str, description: str, **extra) -> dict:
    return {"type": kind, "description": description, **extra}


def _structural(node: dict, defs: dict) -> dict:
    """A pydantic JSON schema node as a Kubernetes structural schema: $refs inlined, Optional[X] as X,
    titles and `additionalProperties: false` dropped (the API server prunes unknown fields)."""
    node = dict(node)
    ref = node.pop("$ref", None)
    if ref is not None:
        target = _structural(defs[ref.rsplit("/", 1)[-1]], defs)
        node = {**target, **{k: v for k, v in node.items() if k != "title"}}
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        arms = [a for a in any_of if a != {"type": "null"}]
        if len(arms) != 1:
            raise SystemExit(f"gen_crd: no structural schema for anyOf {any_of}")
        arm = _structural(arms[0], defs)
        node = {**arm, **{k: v for k, v in node.items() if k not in ("title",)}}
    node.pop("title", None)
    node.pop(
        api_types.RUNTIME_SETTING, None
    )  # which runtime setting a field is: the operator's, not the CRD's
    node.pop(api_types.AS_IS, None)
    if node.get("default", 0) is None or node.pop(api_types.NO_CRD_DEFAULT, False):
        node.pop("default", None)
    if node.get("additionalProperties") is False or (
        node.get("additionalProperties") is True and node.get("x-kubernetes-preserve-unknown-fields")
    ):
        node.pop("additionalProperties")
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _structural(node["additionalProperties"], defs)
    if "properties" in node:
        node["properties"] = {k: _structural(v, defs) for k, v in node["properties"].items()}
    if isinstance(node.get("items"), dict):
        node["items"] = _structural(node["items"], defs)
    order = ["type", "description"]
    return {k: node[k] for k in order if k in node} | {k: v for k, v in node.items() if k not in order}


def spec_schema(cache_dit: dict, quantize: dict) -> dict:
    """`spec`: the operator's typed model, with cache-dit's generated schemas for cacheDit and quantize."""
    schema = api_types.DiffusionDeploymentSpec.model_json_schema(by_alias=True)
    out = _structural(schema, schema.get("$defs", {}))
    out.pop("$defs", None)
    out["properties"]["cacheDit"] = cache_dit
    out["properties"]["quantize"] = quantize
    return out


def status_schema() -> dict:
    """`status`: the operator's status model."""
    schema = status_types.DiffusionDeploymentStatus.model_json_schema(by_alias=True)
    out = _structural(schema, schema.get("$defs", {}))
    out.pop("$defs", None)
    return out


class _NoAliases(yaml.SafeDumper):
    """Shared lists (an enum used by two fields) are written out in full, never as YAML anchors."""

    def ignore_aliases(self, data) -> bool:
        return True


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
                        {
                            "name": "Reason",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
                            "description": "why Ready is what it is (a failing pod: CrashLoopBackOff, OOMKilled, ...)",
                        },
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                        {
                            "name": "Queue",
                            "type": "integer",
                            "jsonPath": ".status.queue.demand",
                            "description": "spec.queue: jobs waiting + running (the autoscaler's signal)",
                            "priority": 1,
                        },
                        {
                            "name": "Front",
                            "type": "string",
                            "jsonPath": ".status.queue.frontDoor",
                            "description": "spec.queue: ready/desired front-door pods",
                            "priority": 1,
                        },
                        {
                            "name": "Cold",
                            "type": "number",
                            "jsonPath": ".status.startup.lastCold.seconds",
                            "description": "seconds to Ready of the newest cold start",
                            "priority": 1,
                        },
                        {
                            "name": "Warm",
                            "type": "number",
                            "jsonPath": ".status.startup.lastWarm.seconds",
                            "description": "seconds to Ready of the newest warm start",
                            "priority": 1,
                        },
                        {
                            "name": "Message",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Ready")].message',
                            "description": "the Ready condition's message (a failing pod's own words)",
                            "priority": 1,
                        },
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
    return header + yaml.dump(build_crd(), Dumper=_NoAliases, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    return generated.main(__doc__, render, OUTPUT, "tools/gen_crd.py", "CRD", argv)


if __name__ == "__main__":
    sys.exit(main())
