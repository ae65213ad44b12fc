"""The DiffusionDeployment spec, defined once: every field's type, default, bounds and description
(pydantic, camelCase aliases). tools/gen_crd.py generates the CRD's hand-written part from it
(`spec.cacheDit` and `spec.quantize` are generated from cache-dit's own dataclasses). Server limits,
sizes and defaults come from the runtime's own config type (`diffusion_runtime.contract.config`),
cache-dit facts from the shared torch-free facts module."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal, get_args

import annotated_types
from diffusion_runtime.contract import cache_dit_facts as facts
from diffusion_runtime.contract.config import (
    API_KEY_NAME_PATTERN,
    MAX_ADAPTERS,
    QUEUE_URL_ENV,
    Device,
    Dtype,
    QualityGateConfig,
    RuntimeConfig,
    setting_field,
)
from diffusion_runtime.contract.limits import (
    QUALITY_GATE_MAX_CANARIES,
    SIZE_PATTERN,
)
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

from diffusion_operator.api.defaults import (
    DEFAULT_FRONT_DOOR_REPLICAS,
    DEFAULT_IMAGE,
    DEFAULT_QUEUE_SECRET,
    DEFAULT_QUEUE_SECRET_KEYS,
    DEFAULT_TARGET_DEMAND,
)

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
_RUNTIME_DEFAULTS = RuntimeConfig.model_construct()

# ---- field types ------------------------------------------------------------------------------


def _int_or_pattern(pattern: str) -> AfterValidator:
    regex = re.compile(pattern)

    def check(value: int | str) -> int | str:
        if isinstance(value, int) and value < 0 or isinstance(value, str) and not regex.match(value):
            raise ValueError(f"{value!r} must be a non-negative integer or match {pattern}")
        return value

    return AfterValidator(check)


PullPolicy = Literal["Always", "IfNotPresent", "Never"]
TolerationOperator = Literal["Exists", "Equal"]
TaintEffect = Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]
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


class _Types(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True, frozen=True)


# ---- CR fields that are runtime settings ---------------------------------------------------------

# json_schema_extra keys (tools/gen_crd.py leaves them out of the CRD): the runtime.yaml / cache-dit.yaml
# setting a CR field is rendered into, and whether the builders render its value as it is
RUNTIME_SETTING = "x-diffusion-runtime-setting"
AS_IS = "x-diffusion-as-is"
_SETTING_NAME = re.compile(r"\b(server|warmup|quality_gate|queue)\.([a-z][a-z_]*)\b")


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _cr_names(text: str) -> str:
    """Runtime setting names in a description as the CR's (`server.max_pixels` -> `server.maxPixels`)."""
    return _SETTING_NAME.sub(lambda m: f"{camel(m.group(1))}.{camel(m.group(2))}", text)


def setting(path: str, *, bounds: bool = True, **field: Any) -> Any:
    """A CR field that is the runtime setting `path` (`server.max_queue`): its default, bounds and
    description come from the runtime's own field (`diffusion_runtime.contract.config`), its alias is
    the camelCase name, `field` overrides (Field keyword arguments; `bounds=False` drops the runtime's
    bounds). The builders render its value as it is into runtime.yaml."""
    base = setting_field(path)
    kwargs: dict[str, Any] = {"alias": camel(path.rsplit(".", 1)[-1])}
    if base.description:
        kwargs["description"] = _cr_names(base.description)
    if "default" not in field and base.default_factory is not None:
        kwargs["default_factory"] = base.default_factory
    elif "default_factory" not in field:
        kwargs["default"] = base.default
    kwargs.update(field)
    extra = {**(kwargs.pop("json_schema_extra", None) or {}), RUNTIME_SETTING: path, AS_IS: True}
    info = Field(**kwargs, json_schema_extra=extra)
    if bounds:  # the constraints (ge, le, max_length ...), not the runtime's own validators
        info.metadata += [m for m in base.metadata if isinstance(m, annotated_types.BaseMetadata)]
    return info


def section_type(annotation: Any) -> type[BaseModel] | None:
    """The model of a field that is a section (`WarmupSpec`, `QualityGateSpec | None`), else None."""
    for arm in (annotation, *get_args(annotation)):
        if isinstance(arm, type) and issubclass(arm, BaseModel):
            return arm
    return None


def renders(path: str, **extra: Any) -> dict[str, Any]:
    """json_schema_extra of a CR field the builders render into the runtime setting `path` their own way."""
    return {**extra, RUNTIME_SETTING: path}


# ---- the spec -----------------------------------------------------------------------------------


class TokenSecretRef(_Types):
    """Secret holding the Hugging Face token; passed to the pod only as env HF_TOKEN via secretKeyRef."""

    name: str = Field(description="Secret name (same namespace).", max_length=253)
    key: str = Field("token", description="Key in the Secret.", max_length=253)


class WebhookSecretRef(_Types):
    """Secret holding the Standard Webhooks signing secret (whsec_<base64>); passed to the pod only as
    env DIFFUSION_WEBHOOK_SECRET via secretKeyRef. Without it, webhook deliveries are unsigned."""

    name: str = Field(description="Secret name (same namespace).", max_length=253)
    key: str = Field("secret", description="Key in the Secret.", max_length=253)


CacheAccessMode = Literal["ReadWriteOnce", "ReadWriteMany"]
CACHE_ACCESS_MODES: tuple[str, ...] = get_args(CacheAccessMode)
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class ModelCacheSpec(_Types):
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


class CompileCacheSpec(_Types):
    """A shared PersistentVolumeClaim (yours) for torch.compile artifacts: mounted read-write into every pod and
    rendered as compile_cache_dir in runtime.yaml; use ReadWriteMany to share it across nodes."""

    claim_name: str = Field(
        alias="claimName",
        description="PersistentVolumeClaim name (same namespace).",
        pattern=DNS_LABEL_PATTERN,
        max_length=253,
    )


class ModelSpec(_Types):
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
        json_schema_extra=renders("model.uri"),
        description="Where the model comes from: hf://org/name (Hugging Face), pvc://claim/path (a "
        "PersistentVolumeClaim mounted read-only), file:///abs/path or an absolute path inside the image.",
        pattern=URI_PATTERN,
        max_length=512,
    )
    revision: str | None = setting("model.revision", max_length=128)
    pipeline: str | None = setting("model.pipeline", pattern=IDENTIFIER_PATTERN, max_length=128)
    dtype: Dtype = setting("model.dtype")
    token_secret_ref: TokenSecretRef | None = Field(None, alias="tokenSecretRef")
    cache: ModelCacheSpec | None = None


ADAPTER_URI_PATTERN = (
    r"^(hf://[A-Za-z0-9._-]+/[A-Za-z0-9._-]+|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.+|file:///.+)$"
)
# a file inside a Hub repository: relative, no segment starting with a dot (so no `..`)
WEIGHT_NAME_PATTERN = r"^([A-Za-z0-9_-][A-Za-z0-9._-]*/)*[A-Za-z0-9_-][A-Za-z0-9._-]*\.safetensors$"
DEFAULT_ADAPTER_WEIGHT = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes


class AdapterSpec(_Types):
    """A LoRA adapter every pod loads at start; requests name it (docs/adapters.md)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.uri.startsWith('hf://') || (!has(self.revision) && !has(self.weightName))",
                    "message": "revision and weightName are for hf:// adapters only",
                    "fieldPath": ".revision",
                }
            ]
        }
    )

    name: str = setting("adapters.name", max_length=63)
    uri: str = Field(
        description="Where the adapter comes from: hf://org/name (its `weightName` file at `revision`, "
        "downloaded into spec.model.cache), pvc://claim/path/file.safetensors (the claim mounted read-only) "
        "or file:///abs/path inside the image (a .safetensors file, or a folder holding "
        f"{DEFAULT_ADAPTER_WEIGHT}).",
        pattern=ADAPTER_URI_PATTERN,
        max_length=512,
    )
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit; default main); hf:// only.", max_length=128
    )
    weight_name: str | None = Field(
        None,
        alias="weightName",
        description=f"The LoRA's safetensors file in the repository (default {DEFAULT_ADAPTER_WEIGHT}); "
        "hf:// only.",
        pattern=WEIGHT_NAME_PATTERN,
        max_length=256,
    )
    scale: float = setting("adapters.scale")


class GpuSpec(_Types):
    """GPUs per pod."""

    count: int = Field(1, description="nvidia.com/gpu per pod; 0 runs on CPU nodes.", ge=0, le=MAX_GPUS)
    product: str | None = Field(
        None,
        description="Required GPU product (node label nvidia.com/gpu.product), e.g. NVIDIA-H100-80GB-HBM3.",
        max_length=128,
    )


class WarmupSpec(_Types):
    """Warm generations run before the pod turns Ready."""

    resolutions: list[Resolution] = setting(
        "warmup.resolutions",
        max_length=MAX_WARMUP_RESOLUTIONS,
        json_schema_extra={"default": list(_RUNTIME_DEFAULTS.warmup.resolutions)},
    )
    steps: int = setting("warmup.steps")
    frames: int = setting("warmup.frames")
    prompt: str | None = setting(
        "warmup.prompt",
        default=None,
        description=f"Warmup prompt (default {_RUNTIME_DEFAULTS.warmup.prompt!r}).",
        max_length=1000,
    )


SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"  # DNS subdomain
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"  # a key in a Secret's data
MAX_API_KEYS = 32


class SecretKeyRef(_Types):
    """One key of a Secret in the CR's namespace."""

    name: str = Field(
        description="Secret name (same namespace).", pattern=SECRET_NAME_PATTERN, max_length=253
    )
    key: str = Field(description="Key in the Secret.", pattern=SECRET_KEY_PATTERN, max_length=253)


class ApiKey(_Types):
    """A named API key. The name (never the key) is what metrics and logs show and what owns jobs."""

    name: str = Field(
        description="The key's name: a label on diffusion_requests_total, a log field, the owner of the "
        "jobs it creates (letters, digits, '-', '_', '.'; at most 63).",
        pattern=API_KEY_NAME_PATTERN,
        max_length=63,
    )
    secret_ref: SecretKeyRef = Field(
        alias="secretRef",
        description="Where the key is: mounted into the pods as a file (a projected volume), never read by "
        "the operator; editing the Secret rotates the key without a restart.",
    )


class AuthSpec(_Types):
    """API keys: every /v1 request needs `Authorization: Bearer <key>` of one of them (401 otherwise);
    /health, /ready and /metrics stay open (docs/security.md)."""

    keys: list[ApiKey] = Field(
        description="The accepted keys, names unique.",
        min_length=1,
        max_length=MAX_API_KEYS,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )


class ServerSpec(_Types):
    """Runtime server limits."""

    max_queue: int = setting("server.max_queue")
    request_timeout_seconds: int = setting(
        "server.request_timeout_seconds",
        bounds=False,
        default=int(_RUNTIME_DEFAULTS.server.request_timeout_seconds),
        ge=1,
    )
    max_pixels: int = setting("server.max_pixels")
    max_steps: int = setting("server.max_steps")
    max_n: int = setting("server.max_n")
    max_frames: int = setting("server.max_frames")
    max_video_seconds: int = setting("server.max_video_seconds")
    max_video_pixels: int = setting("server.max_video_pixels")
    video_fps: int = setting("server.video_fps")
    max_retry_after_seconds: int | None = setting("server.max_retry_after_seconds")
    max_batch: int = setting("server.max_batch")
    max_batch_delay_seconds: float = setting("server.max_batch_delay_seconds")
    webhook_allow: list[str] | None = setting("server.webhook_allow", default=None)
    webhook_secret_ref: WebhookSecretRef | None = Field(
        None,
        alias="webhookSecretRef",
        description="Secret with the webhook signing secret (Standard Webhooks, whsec_<base64>); reaches "
        "the pod only as DIFFUSION_WEBHOOK_SECRET via secretKeyRef. Unset: deliveries are unsigned.",
    )
    auth: AuthSpec | None = Field(
        None,
        json_schema_extra=renders("server.auth_keys_dir"),
        description="API keys from Secrets, by reference. Unset: the API needs no key.",
    )


AutoscalingEngine = Literal["hpa", "keda"]
AUTOSCALING_ENGINES: tuple[str, ...] = get_args(AutoscalingEngine)
ScalingPolicyType = Literal["Pods", "Percent"]
SelectPolicy = Literal["Max", "Min", "Disabled"]


class ScalingPolicy(_Types):
    """One autoscaling/v2 HPAScalingPolicy: change by at most `value` pods (or percent) per `periodSeconds`."""

    type: ScalingPolicyType = Field(description="Pods or Percent.")
    value: int = Field(description="Pods or percent per period.", ge=1)
    period_seconds: int = Field(alias="periodSeconds", description="Period of the policy.", ge=1, le=1800)


class ScalingRules(_Types):
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


class ScalingBehavior(_Types):
    """autoscaling/v2 HorizontalPodAutoscalerBehavior. Defaults: scale up fast (no stabilization, double or
    +4 pods every 15 s), scale down slow (5 min window, one pod a minute)."""

    scale_up: ScalingRules | None = Field(None, alias="scaleUp")
    scale_down: ScalingRules | None = Field(None, alias="scaleDown")


class AutoscalingSpec(_Types):
    """Scale on the demand: without spec.queue the runtime's per-pod demand diffusion_demand_requests
    (waiting + running requests, averaged over a minute), with an autoscaling/v2 HPA (Pods metric, needs a custom-metrics adapter)
    or a KEDA ScaledObject (Prometheus trigger, needs KEDA installed); with spec.queue the queue's own
    demand, which exists at zero pods (HPA: Object metric diffusion_queue_demand of the front door;
    KEDA: redis-streams triggers on the work stream)."""

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
    min_replicas: int = Field(
        1,
        alias="minReplicas",
        description="Lowest replica count; 0 (scale to zero) needs spec.queue: the front door holds requests "
        "while no runtime pod exists and the queue's demand wakes the deployment.",
        ge=0,
    )
    max_replicas: int = Field(alias="maxReplicas", description="Highest replica count.", ge=1)
    target_demand: float | None = Field(
        None,
        alias="targetDemand",
        description="Average demand per pod to aim for: requests waiting + running, averaged over a minute "
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


class RolloutSpec(_Types):
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


class DisruptionSpec(_Types):
    """PodDisruptionBudget of the serving pods."""

    max_unavailable: IntOrPercent = Field(
        1, alias="maxUnavailable", description="Pods a voluntary disruption may take down (default 1)."
    )


def _cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError as error:
        raise ValueError(f"{value!r} is not a CIDR (10.0.0.0/8, fd00::/8): {error}") from None
    return value


Cidr = Annotated[
    str,
    Field(max_length=49),
    AfterValidator(_cidr),
    WithJsonSchema({"type": "string", "maxLength": 49, "x-kubernetes-validations": [
        {"rule": "isCIDR(self) && cidr(self).masked() == cidr(self)",
         "message": "must be a CIDR with no host bits set (10.0.0.0/8, fd00::/8)"}]}),
]  # fmt: skip


SelectorOperator = Literal["In", "NotIn", "Exists", "DoesNotExist"]


class LabelSelectorRequirement(_Types):
    """A meta/v1 LabelSelectorRequirement."""

    key: str = Field(description="Label key.", max_length=317)
    operator: SelectorOperator = Field(description="In, NotIn, Exists or DoesNotExist.")
    values: list[Annotated[str, Field(max_length=63)]] | None = Field(
        None, description="Values (In, NotIn: at least one; Exists, DoesNotExist: none)."
    )


class LabelSelector(_Types):
    """A meta/v1 LabelSelector; empty selects everything."""

    match_labels: dict[str, str] | None = Field(None, alias="matchLabels", description="Labels to match.")
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        None, alias="matchExpressions", description="Label requirements, all of them."
    )


class NetworkPeer(_Types):
    """Who may call the API: a networking/v1 NetworkPolicyPeer by labels. namespaceSelector alone: every
    pod of those namespaces; podSelector alone: those pods of the DiffusionDeployment's namespace; both:
    those pods of those namespaces."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.namespaceSelector) || has(self.podSelector)",
                    "message": "networkPolicy.apiFrom: a peer needs namespaceSelector and/or podSelector",
                }
            ]
        }
    )

    namespace_selector: LabelSelector | None = Field(None, alias="namespaceSelector")
    pod_selector: LabelSelector | None = Field(None, alias="podSelector")


class NetworkPolicySpec(_Types):
    """The serving pods' NetworkPolicy (on unless enabled is false). Ingress: the API port from the front
    door and `apiFrom`, the metrics port from the monitoring namespace the operator is configured with.
    Egress: DNS, public addresses when `publicEgress` (the Hugging Face Hub, public webhook receivers),
    and the addresses and CIDRs of spec.server.webhookAllow (host names there cannot be expressed: allow
    their addresses here through `egressCIDRs`). See docs/network.md."""

    enabled: bool = Field(True, description="false: no NetworkPolicy (an existing one is deleted).")
    api_from: list[NetworkPeer] | None = Field(
        None,
        alias="apiFrom",
        description="Who may call the API port besides the front door. Unset: every pod of the "
        "DiffusionDeployment's namespace; []: the front door only.",
        max_length=32,
    )
    public_egress: bool = Field(
        True,
        alias="publicEgress",
        description="Allow egress to public addresses (everything but loopback, link-local, private and shared "
        "ranges): the Hugging Face Hub (hf:// models without model.cache) and public webhook receivers.",
    )
    egress_cidrs: list[Cidr] | None = Field(
        None,
        alias="egressCIDRs",
        description="More egress destinations, as CIDRs (e.g. the addresses of a webhook host name listed in "
        "server.webhookAllow, an in-cluster Hub mirror).",
        max_length=64,
    )


class Toleration(_Types):
    """A core/v1 Toleration."""

    key: str | None = Field(None, description="Taint key.")
    operator: TolerationOperator | None = Field(None, description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value.")
    effect: TaintEffect | None = Field(None, description="Taint effect.")
    toleration_seconds: int | None = Field(
        None, alias="tolerationSeconds", description="NoExecute toleration time."
    )


class Resources(_Types):
    """cpu/memory requests and limits (nvidia.com/gpu comes from spec.gpu)."""

    requests: dict[str, Quantity] | None = Field(None, description="Requests.")
    limits: dict[str, Quantity] | None = Field(None, description="Limits.")


class EnvVar(_Types):
    """A name/value variable."""

    name: str = Field(description="Variable name.", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    value: str | None = Field(None, description="Variable value.")


class TemplateSpec(_Types):
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
        description="Extra environment variables (name/value only; HF_TOKEN is set from model.tokenSecretRef, "
        f"DIFFUSION_WEBHOOK_SECRET from server.webhookSecretRef, {QUEUE_URL_ENV} from queue.secretRef).",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.all(e, e.name != 'HF_TOKEN')",
                    "message": "HF_TOKEN comes only from spec.model.tokenSecretRef",
                },
                {
                    "rule": "self.all(e, e.name != 'DIFFUSION_WEBHOOK_SECRET')",
                    "message": "DIFFUSION_WEBHOOK_SECRET comes only from spec.server.webhookSecretRef",
                },
                {
                    "rule": f"self.all(e, e.name != '{QUEUE_URL_ENV}')",
                    "message": f"{QUEUE_URL_ENV} comes only from spec.queue.secretRef",
                },
            ]
        },
    )
    shm_size: Quantity | None = Field(
        None,
        alias="shmSize",
        description="Size limit of the /dev/shm emptyDir (default 8Gi per GPU, one rank each; 1Gi on CPU).",
    )


class QueueSecretRef(_Types):
    """Secret holding the queue server's address (same namespace): `key` a redis://[:password@]host:port/db
    URL, reaching the pods only as DIFFUSION_QUEUE_URL via secretKeyRef. Engine keda also reads
    `addressKey` (host:port) and `passwordKey` from it (KEDA's redis-streams scaler takes no URL). The
    chart's queue server writes this Secret (name diffusion-queue, every key)."""

    name: str = Field(DEFAULT_QUEUE_SECRET, description="Secret name (same namespace).", max_length=253)
    key: str = Field(DEFAULT_QUEUE_SECRET_KEYS["url"], description="Key of the redis:// URL.", max_length=253)
    address_key: str = Field(
        DEFAULT_QUEUE_SECRET_KEYS["address"],
        alias="addressKey",
        description="Key of host:port (autoscaling engine keda only).",
        max_length=253,
    )
    password_key: str = Field(
        DEFAULT_QUEUE_SECRET_KEYS["password"],
        alias="passwordKey",
        description="Key of the password (autoscaling engine keda only).",
        max_length=253,
    )


class FrontDoorSpec(_Types):
    """The front door: a CPU-only Deployment of the runtime image (`diffusion-runtime front-door`) serving
    the same API; it validates, enqueues and answers from the shared queue, on any replica."""

    replicas: int = Field(
        DEFAULT_FRONT_DOOR_REPLICAS,
        description="Front-door pods (a PodDisruptionBudget keeps all but one).",
        ge=1,
        le=100,
    )
    resources: Resources | None = Field(
        None,
        description="cpu/memory of the front-door container (default: requests 100m / 256Mi, limit 1Gi).",
    )
    node_selector: dict[str, str] | None = Field(
        None,
        alias="nodeSelector",
        description="Node selector labels of the front-door pods (CPU nodes; spec.template's placement is the "
        "runtime pods').",
    )
    tolerations: list[Toleration] | None = Field(None, description="Tolerations of the front-door pods.")
    affinity: dict[str, Any] | None = Field(
        None,
        description="A core/v1 Affinity of the front-door pods (default: prefer one pod per node, so a node "
        "going away leaves the other replicas answering).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class QueueSpec(_Types):
    """The shared work queue (Redis Streams) between the API and the GPUs: a front door takes every request,
    runtime pods pull work when they have room, any front-door replica answers for any job, and
    autoscaling.minReplicas may be 0. The Redis server is yours or the chart's (queue.enabled)."""

    secret_ref: QueueSecretRef = Field(
        default_factory=lambda: QueueSecretRef.model_validate({}), alias="secretRef"
    )
    max_attempts: int = setting("queue.max_attempts")
    claim_idle_seconds: float = setting("queue.claim_idle_seconds")
    max_waiting: int = setting("queue.max_waiting")
    front_door: FrontDoorSpec = Field(
        default_factory=lambda: FrontDoorSpec.model_validate({}), alias="frontDoor"
    )


_GATE_DEFAULTS = QualityGateConfig.model_construct()


class QualityGateSpec(_Types):
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
    prompts: list[Annotated[str, Field(min_length=1, max_length=1000)]] = setting(
        "quality_gate.prompts", json_schema_extra={"default": list(_GATE_DEFAULTS.prompts)}
    )
    seeds: list[Annotated[int, Field(ge=0)]] = setting(
        "quality_gate.seeds", json_schema_extra={"default": list(_GATE_DEFAULTS.seeds)}
    )
    steps: int | None = setting("quality_gate.steps")
    size: Resolution | None = setting("quality_gate.size")
    min_psnr: float = setting("quality_gate.min_psnr", alias="minPSNR")
    min_ssim: float = setting("quality_gate.min_ssim", alias="minSSIM")


class CacheDitSpec(_Types):
    """cache-dit's own YAML, keys verbatim (the CRD's schema of each section is generated from cache-dit)."""

    cache_config: dict[str, Any] | None = Field(None, json_schema_extra=renders("cache_config"))
    parallelism_config: dict[str, Any] | None = Field(None, json_schema_extra=renders("parallelism_config"))
    attention_backend: str | None = Field(None, json_schema_extra=renders("attention_backend"))


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


SCALE_TO_ZERO_NEEDS_QUEUE = (
    "0 (scale to zero) needs spec.queue: without the queue's front door nothing holds a request while no "
    "runtime pod exists"
)
_CEL_HAS_PARALLEL = "has(self.cacheDit) && has(self.cacheDit.parallelism_config)"
_CEL_PRODUCT = " * ".join(
    f"(has(self.cacheDit.parallelism_config.{k}) ? self.cacheDit.parallelism_config.{k} : 1)"
    for k in facts.PARALLEL_SIZE_KEYS
)
_CEL_GPU_COUNT = (
    f"(has(self.gpu) && has(self.gpu.count) ? self.gpu.count : {GpuSpec.model_fields['count'].default})"
)
_CEL_ON_GPUS = f"(!(has(self.device) && self.device == 'cpu') && {_CEL_GPU_COUNT} > 0)"  # ranks_device


class DiffusionDeploymentSpec(_Types):
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
                    "rule": "!has(self.adapters) || has(self.model.cache) || "
                    "self.adapters.all(a, !a.uri.startsWith('hf://'))",
                    "message": "adapters: hf:// adapters are downloaded into spec.model.cache; set it (or use "
                    "pvc:// or file:// adapters)",
                    "fieldPath": ".adapters",
                },
                {
                    "rule": "!has(self.autoscaling) || !has(self.autoscaling.minReplicas) || "
                    "self.autoscaling.minReplicas >= 1 || has(self.queue)",
                    "message": f"autoscaling.minReplicas {SCALE_TO_ZERO_NEEDS_QUEUE}",
                    "fieldPath": ".autoscaling.minReplicas",
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
    device: Device = setting("device")
    cache_dit: CacheDitSpec | None = Field(None, alias="cacheDit")  # schema: cache-dit's dataclasses
    # schema: cache-dit's QuantizeConfig
    quantize: dict[str, Any] | None = Field(None, json_schema_extra=renders("quantize_config"))
    compile: bool = setting("compile")
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
    compile_cache: CompileCacheSpec | None = Field(
        None, alias="compileCache", json_schema_extra=renders("compile_cache_dir")
    )
    quality_gate: QualityGateSpec | None = Field(
        None, alias="qualityGate", json_schema_extra=renders("quality_gate")
    )
    network_policy: NetworkPolicySpec = Field(
        default_factory=lambda: NetworkPolicySpec.model_validate({}), alias="networkPolicy"
    )
    adapters: list[AdapterSpec] | None = Field(
        None,
        description="LoRA adapters served beside the model; a request names zero, one or several with "
        "scales, GET /v1/models lists them (docs/adapters.md). Adding or removing one changes runtime.yaml: "
        "a rolling restart.",
        max_length=MAX_ADAPTERS,
        json_schema_extra=renders(
            "adapters", **{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}
        ),
    )
    queue: QueueSpec | None = Field(None, json_schema_extra=renders("queue"))


class DiffusionDeployment(_Types):
    """One DiffusionDeployment as the builders read it: its name, namespace and validated spec (not part
    of the CRD: the object's metadata is the API server's)."""

    name: str
    namespace: str
    spec: DiffusionDeploymentSpec
