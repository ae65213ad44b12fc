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

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from diffusion_runtime.contract import cache_dit_facts as facts
from diffusion_runtime.contract.config import ConfigError, QualityGateConfig, runtime_errors
from pydantic import BaseModel, ValidationError

from diffusion_operator.api.defaults import DEFAULT_BEHAVIOR, DEFAULT_TARGET_DEMAND
from diffusion_operator.api.funcs import SETTING_FIELDS, behavior, ranks_device
from diffusion_operator.api.model_facts import ModelFacts, model_facts, product_capability
from diffusion_operator.api.types import (
    MAX_RANKS,
    PARALLEL_ON_CPU,
    PARALLEL_ON_GPUS,
    PARALLEL_SIZES,
    AutoscalingSpec,
    DiffusionDeploymentSpec,
    QualityGateSpec,
    TokenSecretRef,
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
class Model:
    uri: str
    revision: str | None
    pipeline: str | None
    dtype: str
    token_secret: str | None
    token_key: str

    @property
    def pvc(self) -> tuple[str, str] | None:
        """(claim, path inside the claim) for pvc:// URIs."""
        if not self.uri.startswith("pvc://"):
            return None
        claim, _, path = self.uri[len("pvc://") :].partition("/")
        return claim, path


@dataclass
class ModelCache:
    size: str
    storage_class_name: str | None
    access_mode: str
    variant: str | None
    backoff_limit: int


@dataclass
class Autoscaling:
    min_replicas: int
    max_replicas: int
    target_demand: float
    engine: str = "hpa"
    behavior: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_BEHAVIOR))
    deprecated_target_queue_depth: bool = False  # the CR used the old name


@dataclass
class Spec:
    """The validated spec as the builders read it (values from `DiffusionDeploymentSpec`, defaults applied)."""

    name: str
    namespace: str
    model: Model
    replicas: int
    gpu_count: int
    gpu_product: str | None
    device: str
    cache_dit: dict[str, Any]  # cache-dit keys verbatim
    quantize: dict[str, Any] | None  # quantize_config keys verbatim, quant_type normalised
    quant_type_alias: str | None  # the legacy name the user wrote, if any
    compile: bool
    warmup_resolutions: list[str]
    warmup_steps: int
    warmup_prompt: str | None
    max_queue: int
    request_timeout_seconds: int
    max_pixels: int
    max_steps: int
    max_n: int
    startup_timeout_seconds: int | None
    autoscaling: Autoscaling | None
    max_surge: int | str
    max_unavailable: int | str
    pdb_max_unavailable: int | str
    image: str
    image_pull_policy: str | None
    service_account: str | None
    node_selector: dict[str, str]
    tolerations: list[dict]
    affinity: dict | None
    resources: dict
    env: list[dict]
    shm_size: str | None
    quality_gate: QualityGateConfig | None = None  # rendered into runtime.yaml as it is
    cr: DiffusionDeploymentSpec | None = field(default=None, repr=False)
    model_cache: ModelCache | None = None  # spec.model.cache
    compile_cache_claim: str | None = None  # spec.compileCache.claimName

    @property
    def facts(self) -> ModelFacts | None:
        return model_facts(self.model.uri)

    @property
    def device_type(self) -> str:
        """What the runtime's `pick_device` resolves to in this pod: cpu without a GPU."""
        return ranks_device(self.device, self.gpu_count)

    @property
    def quant_types(self) -> list[str]:
        """Every quant type the quantize config uses (the base one, per-component ones, the precision plan)."""
        if not self.quantize:
            return []
        types = [str(self.quantize.get("quant_type", facts.QUANT_TYPE_DEFAULT))]
        components = self.quantize.get("components_to_quantize")
        if isinstance(components, dict):
            types += [str(v.get("quant_type", "")) for v in components.values() if isinstance(v, dict)]
        plan = self.quantize.get("precision_plan")
        if isinstance(plan, dict):
            types += [str(v) for v in plan.values()]
        return types

    @property
    def required_capability(self) -> tuple[int, int] | None:
        """The compute capability floor cache-dit asserts for the quant types (None: none)."""
        if self.device_type != "cuda":
            return None
        floors = [c for c in (facts.min_capability(t) for t in self.quant_types) if c is not None]
        return max(floors) if floors else None

    @property
    def needs_float8_gpu(self) -> bool:
        return (self.required_capability or (0, 0)) >= facts.FLOAT8_MIN_CAPABILITY

    @property
    def has_cache_dit_file(self) -> bool:
        return bool(self.cache_dit) or bool(self.quantize)


@dataclass
class Parsed:
    spec: Spec | None
    errors: list[FieldError]

    @property
    def ok(self) -> bool:
        return self.spec is not None and not self.errors

    @property
    def reason(self) -> str:
        return condition_reason(self.errors)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(by_alias=True, exclude_none=True)
    return copy.deepcopy(value)


def _view(name: str, namespace: str, cr: DiffusionDeploymentSpec) -> Spec:
    m, t = cr.model, cr.template
    quantize = copy.deepcopy(cr.quantize) if cr.quantize else None
    alias = None
    if quantize and isinstance(quantize.get("quant_type"), str):
        written = quantize["quant_type"]
        current = facts.canonical_quant_type(written)
        if current != written:
            alias, quantize["quant_type"] = written, current
    return Spec(
        name=name,
        namespace=namespace,
        model=Model(
            uri=m.uri,
            revision=m.revision,
            pipeline=m.pipeline,
            dtype=m.dtype,
            token_secret=m.token_secret_ref.name if m.token_secret_ref else None,
            token_key=m.token_secret_ref.key
            if m.token_secret_ref
            else TokenSecretRef.model_fields["key"].default,
        ),
        replicas=1 if cr.replicas is None else cr.replicas,
        gpu_count=cr.gpu.count,
        gpu_product=cr.gpu.product,
        device=cr.device,
        cache_dit=cr.cache_dit.model_dump(exclude_none=True) if cr.cache_dit else {},
        quantize=quantize,
        quant_type_alias=alias,
        compile=cr.compile,
        warmup_resolutions=list(cr.warmup.resolutions),
        warmup_steps=cr.warmup.steps,
        warmup_prompt=cr.warmup.prompt,
        max_queue=cr.server.max_queue,
        request_timeout_seconds=cr.server.request_timeout_seconds,
        max_pixels=cr.server.max_pixels,
        max_steps=cr.server.max_steps,
        max_n=cr.server.max_n,
        startup_timeout_seconds=cr.startup_timeout_seconds,
        autoscaling=_autoscaling(cr.autoscaling) if cr.autoscaling else None,
        max_surge=cr.rollout.max_surge,
        max_unavailable=_max_unavailable(cr),
        pdb_max_unavailable=cr.disruption.max_unavailable,
        image=t.image,
        image_pull_policy=t.image_pull_policy,
        service_account=t.service_account_name,
        node_selector=dict(t.node_selector or {}),
        tolerations=[_plain(x) for x in (t.tolerations or [])],
        affinity=copy.deepcopy(t.affinity) if t.affinity else None,
        resources=_plain(t.resources) if t.resources else {},
        env=[{"name": e.name, "value": e.value or ""} for e in (t.env or [])],
        shm_size=str(t.shm_size) if t.shm_size is not None else None,
        quality_gate=_quality_gate(cr.quality_gate),
        cr=cr,
        model_cache=ModelCache(
            size=str(m.cache.size),
            storage_class_name=m.cache.storage_class_name,
            access_mode=m.cache.access_mode,
            variant=m.cache.variant,
            backoff_limit=m.cache.backoff_limit,
        )
        if m.cache
        else None,
        compile_cache_claim=cr.compile_cache.claim_name if cr.compile_cache else None,
    )


def _is_zero(value: int | str) -> bool:
    return str(value) in ("0", "0%")


def _max_unavailable(cr: DiffusionDeploymentSpec) -> int | str:
    """rollout.maxUnavailable; with an enabled quality gate and room to surge, 0 unless set: a new pod
    that fails the gate never turns Ready, so the old pods keep serving and the rollout stops there."""
    rollout, gate = cr.rollout, cr.quality_gate
    if (
        gate is not None
        and gate.enabled
        and "max_unavailable" not in rollout.model_fields_set
        and not _is_zero(rollout.max_surge)
    ):
        return 0
    return rollout.max_unavailable


def _quality_gate(gate: QualityGateSpec | None) -> QualityGateConfig | None:
    if gate is None or not gate.enabled:
        return None
    return QualityGateConfig.model_construct(
        prompts=list(gate.prompts),
        seeds=list(gate.seeds),
        steps=gate.steps,
        size=gate.size,
        min_psnr=gate.min_psnr,
        min_ssim=gate.min_ssim,
    )


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


def _autoscaling(a: AutoscalingSpec) -> Autoscaling:
    target = a.target_demand if a.target_demand is not None else a.target_queue_depth
    return Autoscaling(
        a.min_replicas,
        a.max_replicas,
        DEFAULT_TARGET_DEMAND if target is None else target,
        engine=a.engine,
        behavior=behavior(a.behavior),
        deprecated_target_queue_depth=a.target_queue_depth is not None,
    )


def parse(name: str, namespace: str, spec: Any) -> Parsed:
    if spec is None or spec == {}:
        return Parsed(None, [FieldError("spec", "is required")])
    if not isinstance(spec, dict):
        return Parsed(None, [FieldError("spec", f"must be an object, got {type(spec).__name__}")])
    try:
        cr = DiffusionDeploymentSpec.model_validate(spec)
    except ValidationError as e:
        return Parsed(None, _model_errors(e))
    s = _view(name, namespace, cr)
    errors = semantic_errors(s)
    errors += [e for e in runtime_refusals(s) if e not in errors]
    return Parsed(s, errors)


def semantic_errors(s: Spec) -> list[FieldError]:
    """Cross-field rules (the CRD states them as CEL too) and what a schema cannot know: block counts
    of named models, parallel sizes vs the pod's GPUs or CPU ranks."""
    errors: list[FieldError] = []
    if s.autoscaling is not None:
        if s.autoscaling.min_replicas > s.autoscaling.max_replicas:
            errors.append(
                FieldError("spec.autoscaling.minReplicas", "must be <= spec.autoscaling.maxReplicas")
            )
        if s.cr is not None and s.cr.autoscaling is not None:
            a = s.cr.autoscaling
            if a.target_demand is not None and a.target_queue_depth is not None:
                errors.append(
                    FieldError(
                        "spec.autoscaling.targetQueueDepth",
                        "is the deprecated name of targetDemand: set only targetDemand",
                    )
                )
        if s.cr is not None and s.cr.replicas is not None:
            errors.append(
                FieldError(
                    "spec.replicas",
                    "must not be set together with spec.autoscaling (the HPA drives replicas)",
                )
            )
    if str(s.max_surge) in ("0", "0%") and str(s.max_unavailable) in ("0", "0%"):
        errors.append(FieldError("spec.rollout", "maxSurge and maxUnavailable cannot both be 0"))
    if any(e["name"] == "HF_TOKEN" for e in s.env):
        errors.append(FieldError("spec.template.env", "HF_TOKEN comes only from spec.model.tokenSecretRef"))
    if s.model_cache is not None and not s.model.uri.startswith("hf://"):
        errors.append(
            FieldError(
                "spec.model.cache", "only for hf:// models (a pvc:// or file:// model is on a volume already)"
            )
        )
    if s.device == "cuda" and s.gpu_count == 0:
        errors.append(FieldError("spec.device", "cuda needs spec.gpu.count >= 1"))
    errors += _affinity_errors(s.affinity)

    cache = s.cache_dit.get("cache_config")
    model = s.facts
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

    par = s.cache_dit.get("parallelism_config")
    if isinstance(par, dict):
        sizes = {k: par[k] for k in facts.PARALLEL_SIZE_KEYS if par.get(k) is not None}
        if all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes.values()):
            product = 1
            for v in sizes.values():
                product *= v
            where = f"({PARALLEL_SIZES} = {product}, spec.gpu.count = {s.gpu_count}, spec.device {s.device})"
            if s.device_type == "cuda" and product != s.gpu_count:
                errors.append(FieldError("spec.cacheDit.parallelism_config", f"{PARALLEL_ON_GPUS} {where}"))
            if s.device_type == "cpu" and (s.gpu_count != 0 or product > MAX_RANKS):
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


def _cr_message(error: ConfigError, s: Spec) -> str:
    text = str(error)
    if error.path and text.startswith(error.path + ": "):
        text = text[len(error.path) + 2 :]
    elif error.path and text.startswith(error.path + "="):
        text = text[len(error.path) + 1 :]
    text = _RUNTIME_NAMES.sub(lambda m: RUNTIME_TO_CR[m.group(1)], text)
    if "this runtime runs on cpu" in text:
        text += f" (spec.gpu.count {s.gpu_count}, spec.device {s.device})"
    if "this GPU has" in text and s.gpu_product:
        text += f" (spec.gpu.product {s.gpu_product})"
    if cr_field(error.path) == "spec":
        text = f"the operator rendered a runtime setting the runtime refuses ({error.path}): {text}"
    return text


def runtime_refusals(s: Spec) -> list[FieldError]:
    """The runtime's own preflight on the runtime.yaml and cache-dit.yaml the builders render for `s`,
    on the device the pod gets (cpu without a GPU; the GPU product's compute capability when known)."""
    capability = product_capability(s.gpu_product) if s.gpu_product and s.device_type == "cuda" else None
    refused = runtime_errors(runtime_config(s), render_cache_dit_config(s) or None, s.device_type, capability)
    return [
        FieldError(
            cr_field(e.path), _cr_message(e, s), "Unsupported" if e.reason == "Unsupported" else "InvalidSpec"
        )
        for e in refused
    ]
