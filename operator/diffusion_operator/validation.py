"""Is a DiffusionDeployment spec one the operator renders and the runtime accepts?

`parse(name, namespace, spec)` never raises on bad input: it returns a `Parsed` whose `errors` name the
offending CR field (`spec.server.maxN: ...`). It runs three layers:
1. the typed spec (`api.types`: what the CRD schema checks at admission, re-checked for CRs the schema
   did not see),
2. `semantic_errors`: cross-field rules (also CEL rules in the CRD where the API server can check
   them) and facts a schema cannot know (block counts of named models, parallel sizes vs the pod's
   GPUs or CPU ranks),
3. the runtime's own preflight (`diffusion_runtime.contract.config.runtime_errors`) on the runtime.yaml
   and cache-dit.yaml the builders render: whatever a pod would refuse is refused here, its runtime
   setting mapped back to the CR field. So a spec reported valid is one the runtime accepts.

This module sits above the builders (it renders through them); nothing below imports it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from diffusion_runtime.contract import cache_dit_facts as facts
from diffusion_runtime.contract.config import QUEUE_URL_ENV, ConfigError, runtime_errors
from pydantic import ValidationError

from diffusion_operator.api.funcs import SETTING_FIELDS, cache_dit_config, device_type, max_unavailable
from diffusion_operator.api.model_facts import model_facts, product_capability
from diffusion_operator.api.types import (
    MAX_RANKS,
    PARALLEL_ON_CPU,
    PARALLEL_ON_GPUS,
    PARALLEL_SIZES,
    SCALE_TO_ZERO_NEEDS_QUEUE,
    DiffusionDeployment,
    DiffusionDeploymentSpec,
)
from diffusion_operator.builders.configmap import render_cache_dit_config, runtime_config


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str
    reason: str = "InvalidSpec"  # or Unsupported: valid, but the runtime does not run it

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def condition_reason(errors: list) -> str:
    """ConfigValid's reason: Unsupported when every error is one, else InvalidSpec."""
    if errors and all(getattr(e, "reason", "InvalidSpec") == "Unsupported" for e in errors):
        return "Unsupported"
    return "InvalidSpec"


@dataclass
class Parsed:
    cr: DiffusionDeployment | None
    errors: list[FieldError]

    @property
    def ok(self) -> bool:
        return self.cr is not None and not self.errors

    @property
    def reason(self) -> str:
        return condition_reason(self.errors)


# ---- validation ---------------------------------------------------------------------------------

_UNION_TAG = re.compile(r"^(int|str|float|bool|function-\w+\[.*\]|list\[.*\]|dict\[.*\])$")
_PLAIN_KEY = re.compile(r"^[A-Za-z_][\w-]*$")


def _loc_path(loc: tuple) -> str:
    """pydantic's error location as a CR field path: `spec.a.b[0]`, map keys that are not plain
    names in brackets (`spec.template.nodeSelector[example.com/zone]`)."""
    path = "spec"
    for part in loc:
        if isinstance(part, str) and _UNION_TAG.match(part):
            continue  # the arm of a union (int | str), not a field
        if isinstance(part, int) or not _PLAIN_KEY.match(part):
            path += f"[{part}]"
        else:
            path += f".{part}"
    return path


def _model_errors(error: ValidationError) -> list[FieldError]:
    out: list[FieldError] = []
    for e in error.errors(include_url=False):
        path = _loc_path(tuple(e["loc"]))
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            message = "is required"
        elif e["type"] == "extra_forbidden":
            message = "unknown field"
        elif "input" in e and not isinstance(e["input"], dict | list):
            message = f"{message}, got {e['input']!r}"
        out.append(FieldError(path, message))
    # one error per field (a union reports each of its arms)
    seen: dict[str, FieldError] = {}
    for fe in out:
        seen.setdefault(fe.field, fe)
    return list(seen.values())


def parse(name: str, namespace: str, spec: Any) -> Parsed:
    if spec is None or spec == {}:
        return Parsed(None, [FieldError("spec", "is required")])
    if not isinstance(spec, dict):
        return Parsed(None, [FieldError("spec", f"must be an object, got {type(spec).__name__}")])
    try:
        cr = DiffusionDeployment(
            name=name, namespace=namespace, spec=DiffusionDeploymentSpec.model_validate(spec)
        )
    except ValidationError as e:
        return Parsed(None, _model_errors(e))
    errors = semantic_errors(cr.spec)
    errors += [e for e in runtime_refusals(cr) if e not in errors]
    return Parsed(cr, errors)


def _adapter_errors(s: DiffusionDeploymentSpec) -> list[FieldError]:
    """spec.adapters: hf:// ones need the model cache (the download Job fetches them), revision and
    weightName for hf:// only (the CRD states both as CEL; unique names: the runtime's own rule and the
    CRD's list-map key)."""
    errors: list[FieldError] = []
    for i, a in enumerate(s.adapters or ()):
        where = f"spec.adapters[{i}]"
        if a.uri.startswith("hf://"):
            if s.model.cache is None:
                errors.append(
                    FieldError(
                        f"{where}.uri",
                        "hf:// adapters are downloaded into spec.model.cache; set it (or use pvc:// or file://)",
                    )
                )
        elif a.revision is not None or a.weight_name is not None:
            field = "revision" if a.revision is not None else "weightName"
            errors.append(FieldError(f"{where}.{field}", "only for hf:// adapters"))
    return errors


def semantic_errors(s: DiffusionDeploymentSpec) -> list[FieldError]:
    """Cross-field rules (the CRD states them as CEL too) and what a schema cannot know: block counts
    of named models, parallel sizes vs the pod's GPUs or CPU ranks."""
    errors: list[FieldError] = []
    if s.autoscaling is not None:
        a = s.autoscaling
        if a.min_replicas == 0 and s.queue is None:
            errors.append(FieldError("spec.autoscaling.minReplicas", SCALE_TO_ZERO_NEEDS_QUEUE))
        if a.min_replicas > a.max_replicas:
            errors.append(
                FieldError("spec.autoscaling.minReplicas", "must be <= spec.autoscaling.maxReplicas")
            )
        if a.target_demand is not None and a.target_queue_depth is not None:
            errors.append(
                FieldError(
                    "spec.autoscaling.targetQueueDepth",
                    "is the deprecated name of targetDemand: set only targetDemand",
                )
            )
        if s.replicas is not None:
            errors.append(
                FieldError(
                    "spec.replicas",
                    "must not be set together with spec.autoscaling (the HPA drives replicas)",
                )
            )
    if str(s.rollout.max_surge) in ("0", "0%") and str(max_unavailable(s)) in ("0", "0%"):
        errors.append(FieldError("spec.rollout", "maxSurge and maxUnavailable cannot both be 0"))
    if any(e.name == "HF_TOKEN" for e in s.template.env or []):
        errors.append(FieldError("spec.template.env", "HF_TOKEN comes only from spec.model.tokenSecretRef"))
    if any(e.name == "DIFFUSION_WEBHOOK_SECRET" for e in s.template.env or []):
        errors.append(
            FieldError(
                "spec.template.env", "DIFFUSION_WEBHOOK_SECRET comes only from spec.server.webhookSecretRef"
            )
        )
    if s.server.auth is not None:
        seen: set[str] = set()
        for i, api_key in enumerate(s.server.auth.keys):
            if api_key.name in seen:
                errors.append(
                    FieldError(f"spec.server.auth.keys[{i}].name", f"duplicate key name {api_key.name!r}")
                )
            seen.add(api_key.name)
    errors += _adapter_errors(s)
    if any(e.name == QUEUE_URL_ENV for e in s.template.env or []):
        errors.append(
            FieldError("spec.template.env", f"{QUEUE_URL_ENV} comes only from spec.queue.secretRef")
        )
    if s.model.cache is not None and not s.model.uri.startswith("hf://"):
        errors.append(
            FieldError(
                "spec.model.cache", "only for hf:// models (a pvc:// or file:// model is on a volume already)"
            )
        )
    if s.device == "cuda" and s.gpu.count == 0:
        errors.append(FieldError("spec.device", "cuda needs spec.gpu.count >= 1"))
    errors += _affinity_errors(s.template.affinity)

    cache_dit = cache_dit_config(s)
    cache = cache_dit.get("cache_config")
    model = model_facts(s.model.uri)
    if isinstance(cache, dict) and model is not None:
        fn = cache.get("Fn_compute_blocks", facts.DBCACHE_DEFAULTS["Fn_compute_blocks"])
        bn = cache.get("Bn_compute_blocks", facts.DBCACHE_DEFAULTS["Bn_compute_blocks"])
        if isinstance(fn, int) and isinstance(bn, int):
            lists = " + ".join(map(str, model.block_lists))
            for key, message in facts.block_limit_errors(fn, bn, model.block_lists):
                errors.append(
                    FieldError(
                        f"spec.cacheDit.cache_config.{key}",
                        f"{message} of {model.name} (cache-dit {facts.CACHE_DIT_VERSION} caches block lists of "
                        f"{lists}; it checks Fn_compute_blocks and Bn_compute_blocks against each separately)",
                    )
                )

    par = cache_dit.get("parallelism_config")
    if isinstance(par, dict):
        sizes = {k: par[k] for k in facts.PARALLEL_SIZE_KEYS if par.get(k) is not None}
        if all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes.values()):
            product = 1
            for v in sizes.values():
                product *= v
            gpus, ranks_on = s.gpu.count, device_type(s)
            where = f"({PARALLEL_SIZES} = {product}, spec.gpu.count = {gpus}, spec.device {s.device})"
            if ranks_on == "cuda" and product != gpus:
                errors.append(FieldError("spec.cacheDit.parallelism_config", f"{PARALLEL_ON_GPUS} {where}"))
            if ranks_on == "cpu" and (gpus != 0 or product > MAX_RANKS):
                errors.append(FieldError("spec.cacheDit.parallelism_config", f"{PARALLEL_ON_CPU} {where}"))
    return errors


def _affinity_errors(affinity: dict | None) -> list[FieldError]:
    """The parts of template.affinity the operator merges its GPU terms into must have their
    core/v1 shape (the rest is the API server's to check when the Deployment is applied)."""
    path = "spec.template.affinity.nodeAffinity"
    node = (affinity or {}).get("nodeAffinity")
    if node is None:
        return []
    if not isinstance(node, dict):
        return [FieldError(path, "must be an object (core/v1 NodeAffinity)")]
    required = node.get("requiredDuringSchedulingIgnoredDuringExecution")
    if required is None:
        return []
    path += ".requiredDuringSchedulingIgnoredDuringExecution"
    if not isinstance(required, dict):
        return [FieldError(path, "must be an object (core/v1 NodeSelector)")]
    terms = required.get("nodeSelectorTerms", [])
    if not isinstance(terms, list) or not all(
        isinstance(t, dict) and isinstance(t.get("matchExpressions", []), list) for t in terms
    ):
        return [
            FieldError(path + ".nodeSelectorTerms", "must be a list of terms with matchExpressions lists")
        ]
    return []


# runtime.yaml / cache-dit.yaml settings -> the CR fields they are rendered from (from the types)
RUNTIME_TO_CR: dict[str, str] = {f.setting: f.cr for f in SETTING_FIELDS}
_RUNTIME_NAMES = re.compile(
    r"(?<![\w.])("
    + "|".join(re.escape(k) for k in sorted(RUNTIME_TO_CR, key=len, reverse=True))
    + r")(?![\w])"
)


def cr_field(runtime_path: str) -> str:
    """The CR field a runtime setting is rendered from (`server.max_n` -> `spec.server.maxN`,
    `cache_config.Fn_compute_blocks` -> `spec.cacheDit.cache_config.Fn_compute_blocks`)."""
    for key in sorted(RUNTIME_TO_CR, key=len, reverse=True):
        if runtime_path == key or runtime_path.startswith((key + ".", key + "[")):
            return RUNTIME_TO_CR[key] + runtime_path[len(key) :]
    return "spec"


def _cr_message(error: ConfigError, s: DiffusionDeploymentSpec) -> str:
    text = str(error)
    if error.path and text.startswith(error.path + ": "):
        text = text[len(error.path) + 2 :]
    elif error.path and text.startswith(error.path + "="):
        text = text[len(error.path) + 1 :]
    text = _RUNTIME_NAMES.sub(lambda m: RUNTIME_TO_CR[m.group(1)], text)
    if "this runtime runs on cpu" in text:
        text += f" (spec.gpu.count {s.gpu.count}, spec.device {s.device})"
    if "this GPU has" in text and s.gpu.product:
        text += f" (spec.gpu.product {s.gpu.product})"
    if cr_field(error.path) == "spec":
        text = f"the operator rendered a runtime setting the runtime refuses ({error.path}): {text}"
    return text


def runtime_refusals(cr: DiffusionDeployment) -> list[FieldError]:
    """The runtime's own preflight on the runtime.yaml and cache-dit.yaml the builders render for `cr`,
    on the device the pod gets (cpu without a GPU; the GPU product's compute capability when known)."""
    s = cr.spec
    on = device_type(s)
    capability = product_capability(s.gpu.product) if s.gpu.product and on == "cuda" else None
    refused = runtime_errors(runtime_config(cr), render_cache_dit_config(cr) or None, on, capability)
    return [
        FieldError(
            cr_field(e.path), _cr_message(e, s), "Unsupported" if e.reason == "Unsupported" else "InvalidSpec"
        )
        for e in refused
    ]
