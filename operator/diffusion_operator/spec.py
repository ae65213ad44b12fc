"""The DiffusionDeployment spec, defined once, and its validation.

`DiffusionDeploymentSpec` (pydantic, camelCase aliases) holds every field's type, default, bounds and
description; tools/gen_crd.py generates the CRD's hand-written part from it (`spec.cacheDit` and
`spec.quantize` are generated from cache-dit's own dataclasses). Server limits, sizes and defaults
come from the runtime's own config type (`diffusion_runtime.contract.config`), cache-dit facts from the shared
torch-free facts module.

`parse(name, namespace, spec)` never raises on bad input: it returns a `Parsed` whose `errors` name the
offending CR field (`spec.server.maxN: ...`). It runs three layers:
1. the model (what the CRD schema checks at admission, re-checked for CRs the schema did not see),
2. `semantic_errors`: cross-field rules (also CEL rules in the CRD where the API server can check
   them) and facts a schema cannot know (block counts of named models, parallel sizes vs the pod's
   GPUs or CPU ranks),
3. the runtime's own preflight (`diffusion_runtime.contract.config.runtime_errors`) on the runtime.yaml and
   cache-dit.yaml the builders render: whatever a pod would refuse is refused here, its runtime
   setting mapped back to the CR field. So a spec reported valid is one the runtime accepts.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Annotated, Any

from diffusion_runtime.contract import cache_dit_facts as facts
from diffusion_runtime.contract import lines as runtime_lines
from diffusion_runtime.contract.config import (
    DEVICES,
    DTYPES,
    ConfigError,
    QualityGateConfig,
    RuntimeConfig,
    runtime_errors,
)
from diffusion_runtime.contract.limits import (
    MAX_N_LIMIT,
    MAX_STEPS_LIMIT,
    MIN_PIXELS,
    QUALITY_GATE_MAX_CANARIES,
    SIZE_PATTERN,
)
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from diffusion_operator.models import ModelFacts, model_facts, product_capability

GROUP = "diffusion.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DiffusionDeployment"
PLURAL = "diffusiondeployments"
SINGULAR = "diffusiondeployment"
SHORT_NAMES = ("dd",)

DEFAULT_IMAGE = "ghcr.io/diffusion-operator/runtime:0.1.0"
URI_PATTERN = (
    r"^(hf://[A-Za-z0-9._-]+/[A-Za-z0-9._-]+|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|file:///.+|/.+)$"
)
IDENTIFIER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
# a non-negative Kubernetes quantity (resources, shmSize): `-1` is refused at admission
QUANTITY_PATTERN = r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE]\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
INT_OR_PERCENT_PATTERN = r"^[0-9]+%?$"
MAX_GPUS = 16
MAX_WARMUP_RESOLUTIONS = 16
# a default the operator applies but the CRD does not (the API server would store it in every CR, so a
# new operator version could never change it)
NO_CRD_DEFAULT = "x-diffusion-no-crd-default"
# the runtime's own defaults: the CR's defaults are these, not copies
_RUNTIME_DEFAULTS = RuntimeConfig()

# ---- field types ------------------------------------------------------------------------------


def _one_of(values: tuple[str, ...]) -> AfterValidator:
    def check(value: str) -> str:
        if value not in values:
            raise ValueError(f"must be one of {', '.join(values)}, got {value!r}")
        return value

    return AfterValidator(check)


def _enum(values: tuple[str, ...]) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", "enum": list(values)})


def _int_or_pattern(pattern: str) -> AfterValidator:
    regex = re.compile(pattern)

    def check(value: int | str) -> int | str:
        if isinstance(value, int) and value < 0 or isinstance(value, str) and not regex.match(value):
            raise ValueError(f"{value!r} must be a non-negative integer or match {pattern}")
        return value

    return AfterValidator(check)


_PULL_POLICIES = ("Always", "IfNotPresent", "Never")
_TOLERATION_OPERATORS = ("Exists", "Equal")
_TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
Dtype = Annotated[str, _one_of(DTYPES), _enum(DTYPES)]
Device = Annotated[str, _one_of(DEVICES), _enum(DEVICES)]
PullPolicy = Annotated[str, _one_of(_PULL_POLICIES), _enum(_PULL_POLICIES)]
TolerationOperator = Annotated[str, _one_of(_TOLERATION_OPERATORS), _enum(_TOLERATION_OPERATORS)]
TaintEffect = Annotated[str, _one_of(_TAINT_EFFECTS), _enum(_TAINT_EFFECTS)]
IntOrPercent = Annotated[
    int | str,
    _int_or_pattern(INT_OR_PERCENT_PATTERN),
    WithJsonSchema({"x-kubernetes-int-or-string": True}),
]
Quantity = Annotated[
    int | str,
    _int_or_pattern(QUANTITY_PATTERN),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN}),
]
Resolution = Annotated[str, Field(pattern=SIZE_PATTERN)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True, frozen=True)


# ---- the spec -----------------------------------------------------------------------------------


class TokenSecretRef(_Model):
    """Secret holding the Hugging Face token; passed to the pod only as env HF_TOKEN via secretKeyRef."""

    name: str = Field(description="Secret name (same namespace).", max_length=253)
    key: str = Field("token", description="Key in the Secret.", max_length=253)


CACHE_ACCESS_MODES = ("ReadWriteOnce", "ReadWriteMany")
CacheAccessMode = Annotated[str, _one_of(CACHE_ACCESS_MODES), _enum(CACHE_ACCESS_MODES)]
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class ModelCacheSpec(_Model):
    """A PersistentVolumeClaim the operator creates and fills once with a download Job (the runtime image's
    `diffusion-runtime download`: the pipeline's files at the revision, verified); serving pods start only
    when it is complete and mount it read-only with the Hub offline. hf:// models only."""

    size: Quantity = Field(
        description="Requested storage, e.g. 60Gi (FLUX.1-dev's pipeline files are about 54 GiB).",
    )
    storage_class_name: str | None = Field(
        None,
        alias="storageClassName",
        description="StorageClass of the claim (the cluster default when unset).",
        max_length=253,
    )
    access_mode: CacheAccessMode = Field(
        "ReadWriteOnce",
        alias="accessMode",
        description="ReadWriteMany (NFS, CephFS, EFS, Filestore ...) lets replicas on any node share the "
        "cache; ReadWriteOnce (any block storage) keeps every replica on the node that holds the volume "
        "(the operator adds a required pod affinity on kubernetes.io/hostname).",
    )
    variant: str | None = Field(
        None,
        description="Weight variant to download (fp16, ...); default: the plain weights.",
        pattern=r"^[A-Za-z0-9_]+$",
        max_length=32,
    )
    backoff_limit: int = Field(
        4, alias="backoffLimit", description="Download retries (the Job's backoffLimit).", ge=0, le=20
    )


class CompileCacheSpec(_Model):
    """A shared PersistentVolumeClaim (yours) for torch.compile artifacts: mounted read-write into every pod and
    rendered as compile_cache_dir in runtime.yaml; use ReadWriteMany to share it across nodes."""

    claim_name: str = Field(
        alias="claimName",
        description="PersistentVolumeClaim name (same namespace).",
        pattern=DNS_LABEL_PATTERN,
        max_length=253,
    )


class ModelSpec(_Model):
    """The diffusers model to serve."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.cache) || self.uri.startsWith('hf://')",
                    "message": "model.cache is only for hf:// models",
                    "fieldPath": ".cache",
                }
            ]
        }
    )

    uri: str = Field(
        description="Where the model comes from: hf://org/name (Hugging Face), pvc://claim/path (a "
        "PersistentVolumeClaim mounted read-only), file:///abs/path or an absolute path inside the image.",
        pattern=URI_PATTERN,
        max_length=512,
    )
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit); hf:// only.", max_length=128
    )
    pipeline: str | None = Field(
        None,
        description="diffusers pipeline class, e.g. FluxPipeline; when empty, model_index.json decides.",
        pattern=IDENTIFIER_PATTERN,
        max_length=128,
    )
    dtype: Dtype = Field(_RUNTIME_DEFAULTS.model.dtype, description="Weights dtype.")
    token_secret_ref: TokenSecretRef | None = Field(None, alias="tokenSecretRef")
    cache: ModelCacheSpec | None = None


class GpuSpec(_Model):
    """GPUs per pod."""

    count: int = Field(1, description="nvidia.com/gpu per pod; 0 runs on CPU nodes.", ge=0, le=MAX_GPUS)
    product: str | None = Field(
        None,
        description="Required GPU product (node label nvidia.com/gpu.product), e.g. NVIDIA-H100-80GB-HBM3.",
        max_length=128,
    )


class WarmupSpec(_Model):
    """Warm generations run before the pod turns Ready."""

    resolutions: list[Resolution] = Field(
        default_factory=lambda: list(_RUNTIME_DEFAULTS.warmup.resolutions),
        description="WIDTHxHEIGHT sizes to warm up (each compiles its own graph); width and height "
        "multiples of 16, width*height within server.maxPixels.",
        max_length=MAX_WARMUP_RESOLUTIONS,
        json_schema_extra={"default": list(_RUNTIME_DEFAULTS.warmup.resolutions)},
    )
    steps: int = Field(
        _RUNTIME_DEFAULTS.warmup.steps,
        description="Inference steps per warmup generation; at most server.maxSteps.",
        ge=1,
        le=MAX_STEPS_LIMIT,
    )
    prompt: str | None = Field(
        None, description=f"Warmup prompt (default {_RUNTIME_DEFAULTS.warmup.prompt!r}).", max_length=1000
    )


class ServerSpec(_Model):
    """Runtime server limits."""

    max_queue: int = Field(
        _RUNTIME_DEFAULTS.server.max_queue,
        alias="maxQueue",
        description="Bounded queue length; a full queue answers 429 with Retry-After.",
        ge=1,
    )
    request_timeout_seconds: int = Field(
        int(_RUNTIME_DEFAULTS.server.request_timeout_seconds),
        alias="requestTimeoutSeconds",
        description="Per-request timeout.",
        ge=1,
    )
    max_pixels: int = Field(
        _RUNTIME_DEFAULTS.server.max_pixels,
        alias="maxPixels",
        description="Largest width*height accepted.",
        ge=MIN_PIXELS,
    )
    max_steps: int = Field(
        _RUNTIME_DEFAULTS.server.max_steps,
        alias="maxSteps",
        description="Largest num_inference_steps accepted.",
        ge=1,
        le=MAX_STEPS_LIMIT,
    )
    max_n: int = Field(
        _RUNTIME_DEFAULTS.server.max_n,
        alias="maxN",
        description="Largest n (images per request) accepted.",
        ge=1,
        le=MAX_N_LIMIT,
    )


AUTOSCALING_ENGINES = ("hpa", "keda")
AutoscalingEngine = Annotated[str, _one_of(AUTOSCALING_ENGINES), _enum(AUTOSCALING_ENGINES)]
SCALING_POLICY_TYPES = ("Pods", "Percent")
ScalingPolicyType = Annotated[str, _one_of(SCALING_POLICY_TYPES), _enum(SCALING_POLICY_TYPES)]
SELECT_POLICIES = ("Max", "Min", "Disabled")
SelectPolicy = Annotated[str, _one_of(SELECT_POLICIES), _enum(SELECT_POLICIES)]
# the per-pod demand a replica is sized for when neither targetDemand nor targetQueueDepth is set: a pod
# generates one request at a time, so 1 = every pod busy with nothing waiting
DEFAULT_TARGET_DEMAND = 1.0


class ScalingPolicy(_Model):
    """One autoscaling/v2 HPAScalingPolicy: change by at most `value` pods (or percent) per `periodSeconds`."""

    type: ScalingPolicyType = Field(description="Pods or Percent.")
    value: int = Field(description="Pods or percent per period.", ge=1)
    period_seconds: int = Field(alias="periodSeconds", description="Period of the policy.", ge=1, le=1800)


class ScalingRules(_Model):
    """autoscaling/v2 HPAScalingRules; a field left unset keeps the operator's default for that direction."""

    stabilization_window_seconds: int | None = Field(
        None,
        alias="stabilizationWindowSeconds",
        description="Look back this long and take the most conservative recommendation.",
        ge=0,
        le=3600,
    )
    select_policy: SelectPolicy | None = Field(
        None, alias="selectPolicy", description="Max, Min or Disabled (no scaling in this direction)."
    )
    policies: list[ScalingPolicy] | None = Field(
        None, description="Rate limits.", min_length=1, max_length=10
    )


class ScalingBehavior(_Model):
    """autoscaling/v2 HorizontalPodAutoscalerBehavior. Defaults: scale up fast (no stabilization, double or
    +4 pods every 15 s), scale down slow (5 min window, one pod a minute)."""

    scale_up: ScalingRules | None = Field(None, alias="scaleUp")
    scale_down: ScalingRules | None = Field(None, alias="scaleDown")


class AutoscalingSpec(_Model):
    """Scale on the runtime's per-pod demand gauge diffusion_demand_requests (waiting + running requests),
    with an autoscaling/v2 HPA (Pods metric, needs a custom-metrics adapter) or a KEDA ScaledObject
    (Prometheus trigger, needs KEDA installed)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.minReplicas <= self.maxReplicas",
                    "message": "autoscaling.minReplicas must be <= autoscaling.maxReplicas",
                },
                {
                    "rule": "!(has(self.targetDemand) && has(self.targetQueueDepth))",
                    "message": "autoscaling.targetQueueDepth is the deprecated name of targetDemand: set only "
                    "targetDemand",
                },
            ]
        }
    )

    engine: AutoscalingEngine = Field(
        "hpa",
        description="hpa: an autoscaling/v2 HorizontalPodAutoscaler on the Pods metric (needs a custom-metrics "
        "adapter); keda: a KEDA ScaledObject with a Prometheus trigger (needs KEDA's CRDs).",
    )
    min_replicas: int = Field(1, alias="minReplicas", description="Lowest replica count.", ge=1)
    max_replicas: int = Field(alias="maxReplicas", description="Highest replica count.", ge=1)
    target_demand: float | None = Field(
        None,
        alias="targetDemand",
        description="Average demand per pod to aim for: requests waiting + running "
        f"(diffusion_demand_requests); default {DEFAULT_TARGET_DEMAND:g}.",
        ge=0.1,
    )
    target_queue_depth: float | None = Field(
        None,
        alias="targetQueueDepth",
        description="Deprecated: the old name of targetDemand (its value is used as targetDemand).",
        ge=0.1,
    )
    behavior: ScalingBehavior | None = Field(
        None, description="Scale-up and scale-down rules (autoscaling/v2 behavior), merged over the defaults."
    )


class RolloutSpec(_Model):
    """Deployment rollout. maxSurge 0 (the default) replaces pods in place, so a rollout never needs extra GPUs."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.maxSurge) && has(self.maxUnavailable) && (self.maxSurge == 0 || "
                    "self.maxSurge == '0' || self.maxSurge == '0%') && (self.maxUnavailable == 0 || "
                    "self.maxUnavailable == '0' || self.maxUnavailable == '0%'))",
                    "message": "rollout.maxSurge and rollout.maxUnavailable cannot both be 0",
                }
            ]
        }
    )

    max_surge: IntOrPercent = Field(
        0, alias="maxSurge", description="Extra pods during a rollout (default 0)."
    )
    max_unavailable: IntOrPercent = Field(
        1,
        alias="maxUnavailable",
        description="Pods that may be down during a rollout (default 1; 0 when qualityGate is on and "
        "maxSurge allows a surge, so a setting that fails the gate never takes a serving pod down).",
        json_schema_extra={NO_CRD_DEFAULT: True},  # the operator decides the default (quality gate)
    )


class DisruptionSpec(_Model):
    """PodDisruptionBudget of the serving pods."""

    max_unavailable: IntOrPercent = Field(
        1, alias="maxUnavailable", description="Pods a voluntary disruption may take down (default 1)."
    )


class Toleration(_Model):
    """A core/v1 Toleration."""

    key: str | None = Field(None, description="Taint key.")
    operator: TolerationOperator | None = Field(None, description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value.")
    effect: TaintEffect | None = Field(None, description="Taint effect.")
    toleration_seconds: int | None = Field(
        None, alias="tolerationSeconds", description="NoExecute toleration time."
    )


class Resources(_Model):
    """cpu/memory requests and limits (nvidia.com/gpu comes from spec.gpu)."""

    requests: dict[str, Quantity] | None = Field(None, description="Requests.")
    limits: dict[str, Quantity] | None = Field(None, description="Limits.")


class EnvVar(_Model):
    """A name/value variable."""

    name: str = Field(description="Variable name.", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    value: str | None = Field(None, description="Variable value.")


class TemplateSpec(_Model):
    """Pod template overrides."""

    image: str = Field(
        DEFAULT_IMAGE,
        description=f"Runtime image (default {DEFAULT_IMAGE}).",
        max_length=512,
        json_schema_extra={NO_CRD_DEFAULT: True},
    )
    image_pull_policy: PullPolicy | None = Field(
        None, alias="imagePullPolicy", description="Image pull policy."
    )
    service_account_name: str | None = Field(
        None, alias="serviceAccountName", description="Service account of the pods.", max_length=253
    )
    node_selector: dict[str, str] | None = Field(
        None, alias="nodeSelector", description="Extra node selector labels."
    )
    tolerations: list[Toleration] | None = Field(
        None, description="Extra tolerations (the nvidia.com/gpu taint is tolerated already)."
    )
    affinity: dict[str, Any] | None = Field(
        None,
        description="A core/v1 Affinity, merged with the operator's GPU affinity.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    resources: Resources | None = None
    env: list[EnvVar] | None = Field(
        None,
        description="Extra environment variables (name/value only; HF_TOKEN is set from model.tokenSecretRef).",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.all(e, e.name != 'HF_TOKEN')",
                    "message": "HF_TOKEN comes only from spec.model.tokenSecretRef",
                }
            ]
        },
    )
    shm_size: Quantity | None = Field(
        None,
        alias="shmSize",
        description="Size limit of the /dev/shm emptyDir (default 8Gi per GPU, one rank each; 1Gi on CPU).",
    )


_GATE_DEFAULTS = QualityGateConfig()


class QualityGateSpec(_Model):
    """Canaries rendered during warmup by the plain and the optimized pipeline, compared (PSNR, SSIM)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.prompts) || !has(self.seeds) || "
                    f"size(self.prompts) * size(self.seeds) <= {QUALITY_GATE_MAX_CANARIES}",
                    "message": f"qualityGate: prompts x seeds must be at most {QUALITY_GATE_MAX_CANARIES} canaries",
                }
            ]
        }
    )

    enabled: bool = Field(True, description="false turns the gate off (same as leaving qualityGate out).")
    prompts: list[Annotated[str, Field(min_length=1, max_length=1000)]] = Field(
        default_factory=lambda: list(_GATE_DEFAULTS.prompts),
        description="Canary prompts.",
        min_length=1,
        max_length=QUALITY_GATE_MAX_CANARIES,
        json_schema_extra={"default": list(_GATE_DEFAULTS.prompts)},
    )
    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: list(_GATE_DEFAULTS.seeds),
        description=f"Seeds; every prompt is rendered with every seed (at most {QUALITY_GATE_MAX_CANARIES} "
        "canaries in all).",
        min_length=1,
        max_length=QUALITY_GATE_MAX_CANARIES,
        json_schema_extra={"default": list(_GATE_DEFAULTS.seeds)},
    )
    steps: int | None = Field(
        None, description="Inference steps of each canary (default warmup.steps).", ge=1, le=MAX_STEPS_LIMIT
    )
    size: Resolution | None = Field(
        None, description="WIDTHxHEIGHT of the canaries (default: the first warmup resolution)."
    )
    min_psnr: float = Field(
        _GATE_DEFAULTS.min_psnr,
        alias="minPSNR",
        description="Lowest PSNR in dB of an optimized canary against its plain twin.",
        ge=0,
    )
    min_ssim: float = Field(
        _GATE_DEFAULTS.min_ssim,
        alias="minSSIM",
        description="Lowest SSIM of an optimized canary against its plain twin.",
        ge=-1,
        le=1,
    )


class CacheDitSpec(_Model):
    """cache-dit's own YAML, keys verbatim (the CRD's schema of each section is generated from cache-dit)."""

    cache_config: dict[str, Any] | None = None
    parallelism_config: dict[str, Any] | None = None
    attention_backend: str | None = None


# Where a parallel replica's ranks run (the world size is the product of the parallel sizes), stated
# once for the CEL rules below and for `semantic_errors`; `ranks_device` is the same fact for Python:
# - on GPUs (spec.gpu.count > 0 and spec.device not cpu): one rank per GPU, NCCL, so the product
#   equals spec.gpu.count;
# - on CPU (spec.device cpu or spec.gpu.count 0): the ranks are CPU processes (gloo) in a pod
#   without GPUs, so spec.gpu.count is 0 and the product is the rank count, at most MAX_RANKS.
MAX_RANKS = MAX_GPUS  # ranks per pod, one per GPU or CPU processes
PARALLEL_SIZES = " * ".join(facts.PARALLEL_SIZE_KEYS)
PARALLEL_ON_GPUS = f"on GPUs {PARALLEL_SIZES} must equal spec.gpu.count (one rank per GPU)"
PARALLEL_ON_CPU = (
    f"on CPU (spec.device cpu or spec.gpu.count 0) the ranks are CPU processes: spec.gpu.count must be 0 "
    f"and {PARALLEL_SIZES} at most {MAX_RANKS}"
)


def ranks_device(device: str, gpu_count: int) -> str:
    """Where the pod's ranks run, as the runtime's `pick_device` resolves it: cpu without a GPU."""
    return "cpu" if device == "cpu" or gpu_count == 0 else "cuda"


_CEL_HAS_PARALLEL = "has(self.cacheDit) && has(self.cacheDit.parallelism_config)"
_CEL_PRODUCT = " * ".join(
    f"(has(self.cacheDit.parallelism_config.{k}) ? self.cacheDit.parallelism_config.{k} : 1)"
    for k in facts.PARALLEL_SIZE_KEYS
)
_CEL_GPU_COUNT = (
    f"(has(self.gpu) && has(self.gpu.count) ? self.gpu.count : {GpuSpec.model_fields['count'].default})"
)
_CEL_ON_GPUS = f"(!(has(self.device) && self.device == 'cpu') && {_CEL_GPU_COUNT} > 0)"  # ranks_device


class DiffusionDeploymentSpec(_Model):
    """Desired state: the model, GPUs, cache-dit and quantization settings, warmup and server limits."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.replicas) && has(self.autoscaling))",
                    "message": "spec.replicas and spec.autoscaling are mutually exclusive: with autoscaling "
                    "the HPA drives the replica count",
                },
                {
                    "rule": f"!({_CEL_HAS_PARALLEL}) || !{_CEL_ON_GPUS} || {_CEL_PRODUCT} == {_CEL_GPU_COUNT}",
                    "message": f"cacheDit.parallelism_config: {PARALLEL_ON_GPUS}",
                    "fieldPath": ".cacheDit.parallelism_config",
                },
                {
                    "rule": f"!({_CEL_HAS_PARALLEL}) || {_CEL_ON_GPUS} || "
                    f"({_CEL_GPU_COUNT} == 0 && {_CEL_PRODUCT} <= {MAX_RANKS})",
                    "message": f"cacheDit.parallelism_config: {PARALLEL_ON_CPU}",
                    "fieldPath": ".cacheDit.parallelism_config",
                },
            ]
        }
    )

    model: ModelSpec
    replicas: int | None = Field(
        None,
        description="Number of serving pods (scale subresource: kubectl scale dd/NAME --replicas N). Leave "
        "unset when spec.autoscaling is set; defaults to 1 otherwise.",
        ge=0,
    )
    gpu: GpuSpec = Field(default_factory=lambda: GpuSpec.model_validate({}))
    device: Device = Field(_RUNTIME_DEFAULTS.device, description="Runtime device.")
    cache_dit: CacheDitSpec | None = Field(None, alias="cacheDit")  # schema: cache-dit's dataclasses
    quantize: dict[str, Any] | None = None  # schema: cache-dit's QuantizeConfig
    compile: bool = Field(
        _RUNTIME_DEFAULTS.compile, description="torch.compile the transformer before warmup."
    )
    warmup: WarmupSpec = Field(default_factory=lambda: WarmupSpec.model_validate({}))
    server: ServerSpec = Field(default_factory=lambda: ServerSpec.model_validate({}))
    startup_timeout_seconds: int | None = Field(
        None,
        alias="startupTimeoutSeconds",
        description="Time allowed for model load, compile and warmup before the startup probe fails the pod. "
        "Sized from the spec (model, compile, warmup) when unset.",
        ge=60,
        le=14400,
    )
    autoscaling: AutoscalingSpec | None = None
    rollout: RolloutSpec = Field(default_factory=lambda: RolloutSpec.model_validate({}))
    disruption: DisruptionSpec = Field(default_factory=lambda: DisruptionSpec.model_validate({}))
    template: TemplateSpec = Field(default_factory=lambda: TemplateSpec.model_validate({}))
    compile_cache: CompileCacheSpec | None = Field(None, alias="compileCache")
    quality_gate: QualityGateSpec | None = Field(None, alias="qualityGate")


# ---- the status (written by the operator; the model is its CRD schema) --------------------------


class Condition(_Model):
    """A condition."""

    type: str = Field(description="Condition type.")
    status: Annotated[str, _one_of(("True", "False", "Unknown")), _enum(("True", "False", "Unknown"))] = (
        Field(description="True, False or Unknown.")
    )
    reason: str | None = Field(None, description="CamelCase reason.")
    message: str | None = Field(None, description="Human-readable detail.")
    last_transition_time: str | None = Field(
        None,
        alias="lastTransitionTime",
        description="When status last changed.",
        json_schema_extra={"format": "date-time"},
    )
    observed_generation: int | None = Field(
        None, alias="observedGeneration", description="Generation the condition was computed from."
    )


MODEL_CACHE_PHASES = ("Pending", "Downloading", "Ready", "Failed")


class ModelCacheStatus(_Model):
    """The model cache (spec.model.cache): phase from the download Job, bytes from its progress lines."""

    phase: Annotated[str, _one_of(MODEL_CACHE_PHASES), _enum(MODEL_CACHE_PHASES)] = Field(
        description="Pending (claim or Job not started), Downloading, Ready (complete and verified) or Failed "
        "(the Job ran out of retries)."
    )
    claim_name: str | None = Field(None, alias="claimName", description="The cache's PersistentVolumeClaim.")
    job_name: str | None = Field(None, alias="jobName", description="The download Job.")
    path: str | None = Field(None, description="Where the pods find the model (model.uri in runtime.yaml).")
    bytes_done: int | None = Field(
        None, alias="bytesDone", description="Bytes of the pipeline's files on the volume."
    )
    bytes_total: int | None = Field(None, alias="bytesTotal", description="Bytes of the pipeline's files.")
    files_done: int | None = Field(None, alias="filesDone", description="Files complete.")
    files_total: int | None = Field(None, alias="filesTotal", description="Files to download.")
    commit: str | None = Field(None, description="The commit the revision resolved to.")
    download_seconds: float | None = Field(
        None, alias="downloadSeconds", description="Duration of the download that completed the cache."
    )
    failed_attempts: int | None = Field(
        None, alias="failedAttempts", description="Download pods that failed."
    )
    message: str | None = Field(None, description="The last error, or where the download stands.")


class StartRecord(_Model):
    """One pod's start, as its runtime reported it (the `diffusion-runtime ready:` line of its log)."""

    pod: str = Field(description="The pod.")
    seconds: float = Field(
        ge=0, description="From the runtime process's start (the container's) to the runtime turning ready."
    )
    at: str = Field(description="When it turned ready.", json_schema_extra={"format": "date-time"})
    model: Annotated[str, _one_of(runtime_lines.MODEL_SOURCES), _enum(runtime_lines.MODEL_SOURCES)] = Field(
        description="downloaded (this pod fetched it from the Hub) or local (a model cache volume, a complete "
        "earlier download, a folder)."
    )
    compile: bool = Field(description="Whether the pod ran torch.compile (spec.compile).")
    compile_cache: Annotated[
        str, _one_of(runtime_lines.COMPILE_CACHE_RESULTS), _enum(runtime_lines.COMPILE_CACHE_RESULTS)
    ] = Field(
        alias="compileCache",
        description="The compile-artifact cache lookup: hit (artifacts restored), miss, corrupt, error, or off "
        "(no spec.compileCache, or no compile).",
    )
    download_seconds: float = Field(ge=0, alias="downloadSeconds", description="Fetching the model.")
    load_seconds: float = Field(ge=0, alias="loadSeconds", description="Loading it from local files.")
    warmup_seconds: float = Field(ge=0, alias="warmupSeconds", description="The warmup generations.")
    compile_seconds: float = Field(
        ge=0, alias="compileSeconds", description="torch.compile, within the warmup."
    )


class StartupStatus(_Model):
    """The newest cold and the newest warm start of the pods, from their runtimes' start lines."""

    last_cold: StartRecord | None = Field(
        None,
        alias="lastCold",
        description="A start that fetched the model from the Hub or ran torch.compile without a compile-cache hit.",
    )
    last_warm: StartRecord | None = Field(
        None,
        alias="lastWarm",
        description="A start with the model from local files and, with compile, the artifacts from the compile cache.",
    )


class DiffusionDeploymentStatus(_Model):
    """Observed state, written by the operator."""

    observed_generation: int | None = Field(
        None, alias="observedGeneration", description="The metadata.generation this status describes."
    )
    replicas: int | None = Field(None, description="Pods of the owned Deployment.")
    ready_replicas: int | None = Field(
        None, alias="readyReplicas", description="Ready pods (Ready means model loaded and warmed up)."
    )
    updated_replicas: int | None = Field(
        None, alias="updatedReplicas", description="Pods running the current configuration."
    )
    ready: str | None = Field(None, description="readyReplicas/desired, for printing.")
    selector: str | None = Field(None, description="Label selector of the pods (scale subresource).")
    endpoint: str | None = Field(None, description="In-cluster URL of the Service.")
    config_hash: str | None = Field(
        None, alias="configHash", description="Hash of the rendered configuration; a change rolls the pods."
    )
    cache_tag: str | None = Field(
        None,
        alias="cacheTag",
        description="cache-dit's summary tag of the cache config (as cache_dit.strify).",
    )
    model_cache: ModelCacheStatus | None = Field(None, alias="modelCache")
    startup: StartupStatus | None = None
    conditions: list[Condition] | None = Field(
        None,
        description="Ready, Progressing, ConfigValid and Synced (children applied), per the Kubernetes API conventions.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


# ---- the parsed view the builders use -----------------------------------------------------------


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


# scale up fast, scale down slow (autoscaling/v2 HPAScalingRules; spec.autoscaling.behavior merges over these)
DEFAULT_BEHAVIOR: dict[str, dict[str, Any]] = {
    "scaleUp": {
        "stabilizationWindowSeconds": 0,
        "selectPolicy": "Max",
        "policies": [
            {"type": "Percent", "value": 100, "periodSeconds": 15},
            {"type": "Pods", "value": 4, "periodSeconds": 15},
        ],
    },
    "scaleDown": {
        "stabilizationWindowSeconds": 300,
        "selectPolicy": "Max",
        "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
    },
}


def _behavior(b: ScalingBehavior | None) -> dict[str, Any]:
    out = copy.deepcopy(DEFAULT_BEHAVIOR)
    for direction in ("scaleUp", "scaleDown"):
        rules = getattr(b, "scale_up" if direction == "scaleUp" else "scale_down", None) if b else None
        if rules is not None:
            out[direction].update(rules.model_dump(by_alias=True, exclude_none=True))
    return out


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
        behavior=_behavior(a.behavior),
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


# runtime.yaml / cache-dit.yaml settings -> the CR fields they are rendered from
RUNTIME_TO_CR: dict[str, str] = {
    "model.uri": "spec.model.uri",
    "model.revision": "spec.model.revision",
    "model.pipeline": "spec.model.pipeline",
    "model.dtype": "spec.model.dtype",
    "device": "spec.device",
    "compile": "spec.compile",
    "warmup.resolutions": "spec.warmup.resolutions",
    "warmup.steps": "spec.warmup.steps",
    "warmup.prompt": "spec.warmup.prompt",
    "server.max_queue": "spec.server.maxQueue",
    "server.request_timeout_seconds": "spec.server.requestTimeoutSeconds",
    "server.max_pixels": "spec.server.maxPixels",
    "server.max_steps": "spec.server.maxSteps",
    "server.max_n": "spec.server.maxN",
    "cache_config": "spec.cacheDit.cache_config",
    "parallelism_config": "spec.cacheDit.parallelism_config",
    "attention_backend": "spec.cacheDit.attention_backend",
    "quantize_config": "spec.quantize",
    "quality_gate": "spec.qualityGate",
    "quality_gate.min_psnr": "spec.qualityGate.minPSNR",
    "quality_gate.min_ssim": "spec.qualityGate.minSSIM",
}
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
    from diffusion_operator.builders.configmap import render_cache_dit_config, runtime_config

    capability = product_capability(s.gpu_product) if s.gpu_product and s.device_type == "cuda" else None
    refused = runtime_errors(runtime_config(s), render_cache_dit_config(s) or None, s.device_type, capability)
    return [
        FieldError(
            cr_field(e.path), _cr_message(e, s), "Unsupported" if e.reason == "Unsupported" else "InvalidSpec"
        )
        for e in refused
    ]


def cache_tag(cache_dit: dict) -> str:
    """cache-dit's `strify()` tag of `cache_config` ('' without one), through cache-dit's own code
    (named masks expanded with its table): see diffusion_runtime.contract.cache_dit_facts.cache_tag."""
    try:
        return facts.cache_tag((cache_dit or {}).get("cache_config"))
    except ValueError:
        return ""


def startup_budget_seconds(s: Spec) -> int:
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
