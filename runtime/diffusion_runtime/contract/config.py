"""The runtime config file (`runtime.yaml`, see docs/contracts.md): one typed model, its defaults,
bounds, descriptions and cross-field rules, and the runtime's whole preflight.

The models are pydantic (strict: `"80"` is not a port, `true` is not a number). A setting is written
once, here: the runtime reads it, the CLI's flags come from it (`OVERRIDES`), and the operator's CR
reuses the fields it exposes (camelCase aliases; `diffusion_operator.api.types`), so the CRD carries
the same bounds, defaults and descriptions.

Two steps, as the runtime needs them: `config_from_dict` builds the object (unknown keys and
non-mapping sections refused, values as written), flags may override values, then `validate` /
`config_errors` check every value. Pure functions only: no torch import here.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from diffusion_runtime.contract import cache_dit_facts as facts
from diffusion_runtime.contract.limits import (
    MAX_BATCH_LIMIT,
    MAX_FPS_LIMIT,
    MAX_FRAMES_LIMIT,
    MAX_JOBS_LIMIT,
    MAX_N_LIMIT,
    MAX_STEPS_LIMIT,
    MAX_VIDEO_SECONDS_LIMIT,
    MIN_PIXELS,
    MIN_STORE_BYTES,
    MIN_UPLOAD_BYTES,
    QUALITY_GATE_MAX_CANARIES,
    SIZE_MULTIPLE,
)
from diffusion_runtime.contract.parallel import layout_refusal
from diffusion_runtime.contract.pipelines import WAN_DEFAULT_FPS, video_frame_multiple


class ConfigError(ValueError):
    """A setting the runtime cannot honour; the message is one line naming the setting.

    `path` is the setting (`server.max_n`, `cache_config.Fn_compute_blocks`, ...) and `reason` is
    `Invalid`, or `Unsupported` for a valid setting this runtime does not run (the operator reports it
    as the ConfigValid reason)."""

    def __init__(self, message: str, path: str = "", reason: str = "Invalid") -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason


def _error(path: str, message: str, reason: str = "Invalid") -> ConfigError:
    return ConfigError(f"{path}: {message}", path, reason)


class _Refused(ValueError):
    """Several ConfigErrors from one cross-field rule (pydantic keeps one exception per validator)."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__("; ".join(map(str, errors)))
        self.errors = errors


Dtype = Literal["float32", "bfloat16", "float16"]
Device = Literal["auto", "cuda", "cpu"]
DTYPES: tuple[str, ...] = get_args(Dtype)
DEVICES: tuple[str, ...] = get_args(Device)
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
# quant types the runtime runs on CPU: torchao's int8 configs applied directly (cache-dit's own
# quantization asserts CUDA), see optimize.quantize_with_torchao
CPU_QUANT_TYPES = ("int8_per_row", "int8_per_tensor", "int8_weight_only")
# quantize_config.backend values the runtime runs (cache-dit's QuantizeBackend.from_str aliases of AUTO
# and TORCHAO; CACHE_DIT is SVDQuant's, which needs a CUDA extension and svdq quant types)
QUANTIZE_BACKENDS = ("auto", "torchao", "ao")
# quantize_config keys the CPU torchao path honours; the others need cache-dit's CUDA path
CPU_QUANTIZE_KEYS = ("quant_type", "exclude_layers", "components_to_quantize", "backend", "verbose")


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768) as (width, height)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT (for example 1024x1024)")
    return int(m.group(1)), int(m.group(2))


def _check_size(text: str) -> str:
    width, height = parse_size(text)
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise ValueError(f"{text}: width and height must be multiples of {SIZE_MULTIPLE}")
    return text


def _pixels_error(path: str, text: str, max_pixels: int) -> ConfigError | None:
    width, height = parse_size(text)
    if width * height > max_pixels:
        return _error(path, f"{text} = {width * height} pixels exceeds server.max_pixels={max_pixels}")
    return None


def _steps_error(path: str, steps: int, max_steps: int) -> ConfigError | None:
    if steps > max_steps:
        return _error(path, f"{steps} is out of range [1, {max_steps} (server.max_steps)]")
    return None


def _non_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must be a non-empty string")
    return text


# WIDTHxHEIGHT, width and height multiples of SIZE_MULTIPLE (within server.max_pixels: RuntimeConfig)
Size = Annotated[str, AfterValidator(_check_size)]
NonBlank = Annotated[str, AfterValidator(_non_blank)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(warnings=False)


class ModelConfig(_Section):
    uri: str = Field(
        default="",
        description="The model: a folder, file:///path, hf://org/name or org/name.",
    )
    revision: str | None = Field(
        default=None, description="Hub revision (branch, tag or commit); hf:// only."
    )
    pipeline: str | None = Field(
        default=None,
        description="diffusers pipeline class, e.g. FluxPipeline; when empty, model_index.json decides.",
    )
    dtype: Dtype = Field(default="bfloat16", description="Weights dtype.")

    @field_validator("uri")
    @classmethod
    def _uri_required(cls, value: str) -> str:
        if not value:
            raise ValueError("required (a folder, file:///path, hf://org/name or org/name)")
        return value


class WarmupConfig(_Section):
    resolutions: list[Size] = Field(
        default_factory=lambda: ["1024x1024"],
        description="WIDTHxHEIGHT sizes to warm up (each compiles its own graph); width and height "
        f"multiples of {SIZE_MULTIPLE}, width*height within server.max_pixels.",
    )
    steps: int = Field(
        default=28,
        description="Inference steps per warmup generation; at most server.max_steps.",
        ge=1,
        le=MAX_STEPS_LIMIT,
    )
    prompt: NonBlank = Field(default="a photo of a cat", description="Warmup prompt.")
    frames: int = Field(
        default=9,
        description="Frames per warmup clip of a video pipeline (k*4+1 for Wan); at most server.max_frames.",
        ge=1,
        le=MAX_FRAMES_LIMIT,
    )


def _absolute(path: str | None) -> str | None:
    if path is not None and not path.startswith("/"):
        raise ValueError(f"expected an absolute path, got {path!r}")
    return path


# An API key's name (a file name in server.auth_keys_dir, a metrics label, a log field; never the key):
# the operator's CR refuses other names, the runtime ignores other files (the kubelet's `..data`)
API_KEY_NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$"


HOST_NAME = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?"
)


class ServerConfig(_Section):
    host: NonBlank = Field(default="0.0.0.0", description="Address to listen on.")
    port: int = Field(default=8000, description="HTTP port (API, /health, /ready, /metrics).", ge=1, le=65535)
    metrics_port: int = Field(
        default=9090, description="Second listener serving only /metrics (0 = off).", ge=0, le=65535
    )
    max_queue: int = Field(
        default=16, description="Bounded queue length; a full queue answers 429 with Retry-After.", ge=1
    )
    request_timeout_seconds: float = Field(default=300.0, description="Per-request timeout.", gt=0)
    max_pixels: int = Field(default=4194304, description="Largest width*height accepted.", ge=MIN_PIXELS)
    max_steps: int = Field(
        default=100, description="Largest num_inference_steps accepted.", ge=1, le=MAX_STEPS_LIMIT
    )
    max_retry_after_seconds: int | None = Field(
        default=None,
        description="Longest Retry-After a full queue answers; unset, it is the estimated wait (average "
        "generation time x the requests ahead), however long.",
        ge=1,
    )
    max_n: int = Field(
        default=4, description="Largest n (images per request) accepted.", ge=1, le=MAX_N_LIMIT
    )
    max_upload_bytes: int = Field(
        default=32 << 20, description="Body bound of POST /v1/images/edits.", ge=MIN_UPLOAD_BYTES
    )
    max_batch: int = Field(
        default=1,
        description="Most images one pipeline call runs: waiting text-to-image requests with the same "
        "size, steps, guidance, negative-prompt use and LoRA adapters are batched into one call, each "
        "with its own seed, cancellation and result (1 = off: one request per call).",
        ge=1,
        le=MAX_BATCH_LIMIT,
    )
    max_batch_delay_seconds: float = Field(
        default=0.02,
        description="With server.max_batch > 1: how long the first request of a batch waits for company "
        "before its call starts without a full batch.",
        ge=0,
        le=1.0,
    )
    max_jobs: int = Field(
        default=64, description="Finished async jobs and url results kept in memory.", ge=1, le=MAX_JOBS_LIMIT
    )
    job_ttl_seconds: float = Field(default=600.0, description="How long a finished job is kept.", gt=0)
    store_max_bytes: int = Field(
        default=512 << 20,
        description="Image data kept in memory by each store (finished async jobs' results, url results); "
        "oldest out first.",
        ge=MIN_STORE_BYTES,
    )
    max_frames: int = Field(
        default=129, description="Most frames of one clip (POST /v1/videos).", ge=1, le=MAX_FRAMES_LIMIT
    )
    max_video_seconds: int = Field(
        default=12,
        description="Longest clip (`seconds` of POST /v1/videos).",
        ge=1,
        le=MAX_VIDEO_SECONDS_LIMIT,
    )
    max_video_pixels: int = Field(
        default=1280 * 720 * 81,
        description="Largest width*height*frames of one clip (the latent volume bounds memory and time).",
        ge=MIN_PIXELS,
    )
    video_fps: int = Field(
        default=WAN_DEFAULT_FPS,
        description="Frame rate of a clip when the request sends no `fps`.",
        ge=1,
        le=MAX_FPS_LIMIT,
    )
    video_crf: int = Field(
        default=20,
        description="H.264 constant rate factor of the MP4s (0 lossless .. 51 worst; 18-23 look good).",
        ge=0,
        le=51,
    )
    video_store_max_bytes: int = Field(
        default=2 << 30,
        description="MP4 and thumbnail bytes of finished clips kept in memory; oldest out first.",
        ge=MIN_STORE_BYTES,
    )
    webhook_allow: list[Annotated[NonBlank, Field(max_length=253)]] = Field(
        default_factory=list,
        description="Webhook destinations allowed besides public addresses: host names and/or addresses "
        "or CIDRs (e.g. 10.0.0.0/8, hooks.internal). Loopback, link-local (169.254.169.254), private, "
        "shared and reserved addresses are refused unless listed here.",
        max_length=64,
    )
    webhook_attempts: int = Field(
        default=5,
        description="Webhook delivery attempts in all (5xx, 429, timeouts are retried).",
        ge=1,
        le=10,
    )
    webhook_backoff_seconds: float = Field(
        default=1.0, description="Webhook retry backoff base (full jitter, doubling per retry).", gt=0, le=60
    )
    webhook_backoff_max_seconds: float = Field(
        default=30.0, description="Longest webhook retry backoff.", gt=0, le=600
    )
    webhook_timeout_seconds: float = Field(
        default=10.0, description="Timeout of one webhook attempt.", gt=0, le=120
    )
    auth_keys_dir: Annotated[str | None, AfterValidator(_absolute)] = Field(
        default=None,
        description="Folder of API key files (file name: the key's name, content: the key). Set, every /v1 "
        "request needs `Authorization: Bearer <key>` (401 otherwise) and sees only its own key's jobs; "
        "files are re-read when they change. Unset: no authentication (docs/security.md).",
    )

    @model_validator(mode="after")
    def _webhook_allow_entries(self) -> ServerConfig:
        for entry in self.webhook_allow:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                if "/" in entry or not HOST_NAME.fullmatch(entry.strip()):
                    raise _error(
                        "server.webhook_allow",
                        f"{entry!r} is neither an address, a CIDR (10.0.0.0/8, fd00::/8) nor a host name",
                    ) from None
        return self

    @model_validator(mode="after")
    def _ports_differ(self) -> ServerConfig:
        if self.metrics_port and self.metrics_port == self.port:
            raise _error(
                "server.metrics_port", f"{self.metrics_port} equals server.port; use another port or 0 (off)"
            )
        return self


# quality gate: defaults and bounds (the CR's qualityGate fields come from here)
QUALITY_GATE_PROMPTS = ("a photo of a cat", "a lighthouse on a cliff at dusk, oil painting")
QUALITY_GATE_MIN_PSNR = 25.0  # dB, optimized vs plain pipeline, worst canary
QUALITY_GATE_MIN_SSIM = 0.75  # worst canary


class QualityGateConfig(_Section):
    """Canary images from the plain and the optimized pipeline, compared before the pod turns Ready."""

    prompts: list[Annotated[NonBlank, Field(max_length=1000)]] = Field(
        default_factory=lambda: list(QUALITY_GATE_PROMPTS),
        description="Canary prompts.",
        min_length=1,
        max_length=QUALITY_GATE_MAX_CANARIES,
    )
    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0],
        description=f"Seeds; every prompt is rendered with every seed (at most {QUALITY_GATE_MAX_CANARIES} "
        "canaries in all).",
        min_length=1,
        max_length=QUALITY_GATE_MAX_CANARIES,
    )
    steps: int | None = Field(
        default=None,
        description="Inference steps of each canary (default warmup.steps).",
        ge=1,
        le=MAX_STEPS_LIMIT,
    )
    size: Size | None = Field(
        default=None, description="WIDTHxHEIGHT of the canaries (default: the first warmup resolution)."
    )
    min_psnr: float = Field(
        default=QUALITY_GATE_MIN_PSNR,
        description="Lowest PSNR in dB of an optimized canary against its plain twin.",
        ge=0,
    )
    min_ssim: float = Field(
        default=QUALITY_GATE_MIN_SSIM,
        description="Lowest SSIM of an optimized canary against its plain twin.",
        ge=-1,
        le=1,
    )

    @model_validator(mode="after")
    def _canaries(self) -> QualityGateConfig:
        count = len(self.prompts) * len(self.seeds)
        if count > QUALITY_GATE_MAX_CANARIES:
            raise _error(
                "quality_gate.seeds",
                f"{len(self.prompts)} prompts x {len(self.seeds)} seeds = {count} canaries; "
                f"at most {QUALITY_GATE_MAX_CANARIES} (each is generated twice during warmup)",
            )
        return self


# A LoRA adapter's name: what requests name (`adapters[].name`), a /v1/models id and a metrics label
ADAPTER_NAME_PATTERN = r"^[a-z0-9]([a-z0-9_.-]{0,61}[a-z0-9])?$"
ADAPTER_SCALE_LIMIT = 10.0  # |scale| of a declared default and of a request's scale
MAX_ADAPTERS = 16  # declared per deployment: each one's low-rank terms run in every call (docs/adapters.md)


class AdapterConfig(_Section):
    """A LoRA adapter loaded at start; requests name it with a scale (docs/adapters.md)."""

    name: Annotated[str, Field(pattern=ADAPTER_NAME_PATTERN)] = Field(
        description="What requests name in `adapters` and /v1/models lists: lowercase letters, digits, "
        "`-`, `_`, `.`; at most 63 characters.",
    )
    path: Annotated[str, AfterValidator(_absolute)] = Field(
        description="Absolute path of the diffusers-format LoRA: a .safetensors file, or a folder holding "
        "pytorch_lora_weights.safetensors.",
    )
    scale: float = Field(
        default=1.0,
        description="Scale of the adapter when a request names it without one.",
        ge=-ADAPTER_SCALE_LIMIT,
        le=ADAPTER_SCALE_LIMIT,
        allow_inf_nan=False,
    )


QUEUE_URL_ENV = "DIFFUSION_QUEUE_URL"  # redis://[:password@]host:port/db, from a Secret (docs/queue.md)
QUEUE_MAX_ATTEMPTS_LIMIT = 10


class QueueConfig(_Section):
    """The shared work queue (Redis Streams): the front door enqueues, runtime pods pull only when they
    have room. Absent: the runtime serves its own HTTP API alone (one pod, a workstation, tests).
    The server's address and password never sit here: they come from the `DIFFUSION_QUEUE_URL`
    environment variable, filled from a Secret by reference."""

    name: NonBlank = Field(
        description="The deployment's queue: every key and stream of it starts with this name "
        "(the operator writes NAMESPACE/NAME).",
        max_length=253,
    )
    max_attempts: int = Field(
        default=3,
        description="Times a job is started in all: a pod that dies mid-job has its job redelivered until "
        "then, after which the job fails naming the reason.",
        ge=1,
        le=QUEUE_MAX_ATTEMPTS_LIMIT,
    )
    claim_idle_seconds: float = Field(
        default=30.0,
        description="A started job whose pod stopped renewing it for this long is redelivered to another "
        "pod (a running job is renewed every third of it).",
        ge=3,
        le=3600,
    )
    max_waiting: int = Field(
        default=10000,
        description="Jobs waiting in the queue (not yet started) beyond which the front door answers 429.",
        ge=1,
        le=1000000,
    )

    @property
    def prefix(self) -> str:
        """The key prefix of this deployment's queue in the Redis server."""
        return f"dq:{self.name}:"

    @property
    def stream(self) -> str:
        """The work stream (KEDA's redis-streams scaler reads it with QUEUE_GROUP)."""
        return self.prefix + "work"


QUEUE_GROUP = "workers"  # the stream's consumer group: every runtime pod of the deployment


class RuntimeConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    cache_dit_config: str | None = Field(
        default=None,
        description="cache-dit YAML (cache_config, quantize_config, ...); in runtime.yaml, relative to its folder.",
    )
    compile: bool = Field(default=False, description="torch.compile the transformer before warmup.")
    compile_cache_dir: Annotated[str | None, AfterValidator(_absolute)] = Field(
        default=None, description="Shared folder for torch.compile artifacts (with compile)."
    )
    device: Device = Field(default="auto", description="Runtime device.")
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    quality_gate: QualityGateConfig | None = None  # None: no gate
    queue: QueueConfig | None = None  # None: no shared queue, the pod's own HTTP API only
    adapters: list[AdapterConfig] = Field(
        default_factory=list,
        description="LoRA adapters loaded at start; a request names zero, one or several with scales "
        "(docs/adapters.md).",
        max_length=MAX_ADAPTERS,
    )

    @model_validator(mode="after")
    def _adapter_names_unique(self) -> RuntimeConfig:
        seen: set[str] = set()
        for i, a in enumerate(self.adapters):
            if a.name in seen:
                raise _error(f"adapters[{i}].name", f"{a.name!r} is declared more than once")
            seen.add(a.name)
        return self

    @model_validator(mode="after")
    def _within_server_limits(self) -> RuntimeConfig:
        """Warmup and canary sizes within server.max_pixels, their steps within server.max_steps; a named
        video pipeline's warmup frame counts (and no quality gate: image canaries only)."""
        s, w, g = self.server, self.warmup, self.quality_gate
        found = [_pixels_error("warmup.resolutions", r, s.max_pixels) for r in w.resolutions]
        found.append(_steps_error("warmup.steps", w.steps, s.max_steps))
        if w.frames > s.max_frames:
            found.append(_error("warmup.frames", f"{w.frames} exceeds server.max_frames={s.max_frames}"))
        video = video_frame_multiple(self.model.pipeline)
        if video is not None and g is not None:
            found.append(
                _error(
                    "quality_gate",
                    f"not supported for the video pipeline {self.model.pipeline} (image canaries only)",
                    "Unsupported",
                )
            )
        if video is not None and (w.frames - 1) % video:
            found.append(
                _error(
                    "warmup.frames",
                    f"{w.frames} is not a frame count {self.model.pipeline} renders (k*{video}+1)",
                )
            )
        if g is not None:
            if g.steps is not None:
                found.append(_steps_error("quality_gate.steps", g.steps, s.max_steps))
            if g.size is not None:
                found.append(_pixels_error("quality_gate.size", g.size, s.max_pixels))
        errors = [e for e in found if e is not None]
        if errors:
            raise _Refused(errors)
        return self


def _section_type(annotation: Any) -> type[_Section] | None:
    for arm in (annotation, *get_args(annotation)):
        if isinstance(arm, type) and issubclass(arm, _Section):
            return arm
    return None


def _values(cls: type[_Section], raw: dict, where: str) -> dict[str, Any]:
    """The values of `cls` as written (checked by `validate`): unknown keys refused, a section built
    from its mapping, an absent or null section left to its default."""
    known = cls.model_fields
    unknown = sorted(set(raw) - set(known))
    if unknown:
        known_names = sorted(known) if cls is RuntimeConfig else list(known)
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(known_names)}"
        )
    values: dict[str, Any] = {}
    for name, value in raw.items():
        section = _section_type(known[name].annotation)
        if section is not None and get_origin(known[name].annotation) is list and isinstance(value, list):
            # a list of sections (adapters): each mapping built like a section, anything else left to validate
            values[name] = [
                section.model_construct(**_values(section, item, f"{name}[{i}]"))
                if isinstance(item, dict)
                else item
                for i, item in enumerate(value)
            ]
        elif section is None:
            values[name] = value
        elif value is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
            values[name] = section.model_construct(**_values(section, value, name))
    return values


def config_from_dict(raw: dict | None, base_dir: Path | None = None) -> RuntimeConfig:
    """Build a RuntimeConfig from the parsed YAML mapping (`validate` checks the values)."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"runtime config: expected a mapping at the top level, got {type(raw).__name__}")
    # a file name or folder left empty is unset
    raw = {
        k: v
        for k, v in raw.items()
        if not (k in ("cache_dit_config", "compile_cache_dir") and v in (None, ""))
    }
    cfg = RuntimeConfig.model_construct(**_values(RuntimeConfig, raw, "runtime config"))
    if isinstance(cfg.cache_dit_config, str):
        path = Path(cfg.cache_dit_config)
        if not path.is_absolute() and base_dir is not None:
            cfg.cache_dit_config = str(base_dir / path)
    return cfg


def load_config_file(path: str | Path) -> RuntimeConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read ({e.strerror or e})") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: invalid YAML ({str(e).splitlines()[0]})") from e
    return config_from_dict(raw, base_dir=path.parent.resolve())


def _setting(loc: tuple) -> str:
    """A pydantic error location as a setting path (list indices dropped: `warmup.resolutions`)."""
    return ".".join(str(p) for p in loc if isinstance(p, str))


def errors_of(error: ValidationError) -> list[ConfigError]:
    """A ValidationError of the config models as ConfigErrors, one line each, naming the setting."""
    out: list[ConfigError] = []
    for e in error.errors(include_url=False):
        raised = (e.get("ctx") or {}).get("error")
        if isinstance(raised, _Refused):
            out += raised.errors
            continue
        if isinstance(raised, ConfigError) and raised.path:
            out.append(raised)
            continue
        path = _setting(tuple(e["loc"]))
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = "unknown key"
        elif not isinstance(raised, ValueError):
            message = f"{message[:1].lower()}{message[1:]}, got {e.get('input')!r}"
        out.append(_error(path, message))
    seen: dict[str, ConfigError] = {}
    for ce in out:
        seen.setdefault(str(ce), ce)
    return list(seen.values())


def config_errors(cfg: RuntimeConfig) -> list[ConfigError]:
    """Every setting the runtime refuses, each naming its setting (empty: the config is valid)."""
    try:
        RuntimeConfig.model_validate(cfg.model_dump(warnings=False))
    except ValidationError as e:
        return errors_of(e)
    return []


def validate(cfg: RuntimeConfig) -> RuntimeConfig:
    """Check types and ranges; raise ConfigError naming the first bad setting."""
    errors = config_errors(cfg)
    if errors:
        raise errors[0]
    return cfg


# ---- the cache-dit YAML (cache_config, parallelism_config, attention_backend, quantize_config) ----

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "string": (str,),
    "array": (list,),
    "object": (dict,),
}


_PLAIN_KEY = re.compile(r"^[A-Za-z_][\w-]*$")


def _key(prefix: str, key: Any) -> str:
    """`prefix.key`, or `prefix[key]` for a key that is not a plain name (so paths stay unambiguous)."""
    if isinstance(key, str) and _PLAIN_KEY.match(key):
        return f"{prefix}.{key}" if prefix else key
    return f"{prefix}[{key}]"


def _typed(path: str, value: Any, kind: str) -> ConfigError | None:
    if value is None:
        return None
    if isinstance(value, bool) and kind != "boolean":
        return _error(path, f"expected {kind}, got {value!r}")
    if not isinstance(value, _JSON_TYPES[kind]):
        return _error(path, f"expected {kind}, got {value!r}")
    return None


def parallel_layout_error(
    parallelism_config: dict[str, Any], device_type: str, dtype: str | None = None
) -> ConfigError | None:
    """Which parallel layouts this runtime runs on `device_type` (docs/multi-gpu.md): the runtime
    starts one rank per device; `parallel.layout_refusal` holds the rules.

    The one place that decides it: the runtime's preflight and the operator (ConfigValid=False,
    reason Unsupported) both ask here."""
    refusal = layout_refusal(parallelism_config, device_type, dtype)
    if refusal is None:
        return None
    key, message = refusal
    return _error(f"parallelism_config.{key}", message, reason="Unsupported")


def _cache_config_errors(cc: dict) -> list[ConfigError]:
    errors: list[ConfigError] = []
    for key in sorted(set(cc) - set(facts.CACHE_CONFIG_FIELDS)):
        errors.append(_error(_key("cache_config", key), "unknown key (cache-dit would silently drop it)"))
    for key, value in cc.items():
        kind = facts.CACHE_CONFIG_FIELDS.get(key)
        if kind is None or value is None:
            continue
        if key == "steps_computation_mask":
            continue  # list or policy name, checked below
        error = _typed(f"cache_config.{key}", value, kind)
        if error is not None:
            errors.append(error)
            continue
        if kind == "integer":
            lo = 1 if key in facts.POSITIVE_INTS else 0 if key in facts.NON_NEGATIVE_INTS else None
            hi = facts.INT_MAXIMUMS.get(key)
            if lo is not None and value < lo:
                errors.append(_error(f"cache_config.{key}", f"must be >= {lo}, got {value}"))
            elif hi is not None and value > hi:
                errors.append(_error(f"cache_config.{key}", f"must be <= {hi}, got {value}"))
        choices = facts.FIELD_ENUMS.get(key) or facts.CALIBRATOR_ENUMS.get(key)
        if key == "cache_type":
            choices = facts.CACHE_TYPES
        if choices and value not in choices:
            errors.append(_error(f"cache_config.{key}", f"{value!r} is not one of {', '.join(choices)}"))
    flags = [k for k in ("enable_taylorseer", "enable_dmd", "enable_foca") if cc.get(k) is True]
    if len(flags) > 1:
        errors.append(_error(f"cache_config.{flags[1]}", f"{', '.join(flags)} are mutually exclusive"))
    mask = cc.get("steps_computation_mask")
    if mask is not None:
        path = "cache_config.steps_computation_mask"
        steps = cc.get("num_inference_steps")
        if isinstance(mask, str):
            try:
                facts.expand_mask(cc)
            except ValueError as e:
                errors.append(_error(path, str(e)))
        elif (
            not isinstance(mask, list) or not mask or any(type(x) is not int or x not in (0, 1) for x in mask)
        ):
            errors.append(
                _error(path, f"must be a non-empty list of 0/1 or one of {', '.join(facts.MASK_POLICIES)}")
            )
        elif isinstance(steps, int) and not isinstance(steps, bool) and len(mask) != steps:
            errors.append(_error(path, f"has {len(mask)} entries but num_inference_steps is {steps}"))
    return errors


def _quantize_errors(qc: dict, device_type: str, capability: tuple[int, int] | None) -> list[ConfigError]:
    errors: list[ConfigError] = []
    for key in sorted(set(qc) - set(facts.QUANTIZE_CONFIG_FIELDS)):
        errors.append(_error(_key("quantize_config", key), "unknown key"))
    backend = qc.get("backend")
    if backend is not None and str(backend).lower() not in QUANTIZE_BACKENDS:
        errors.append(
            _error(
                "quantize_config.backend",
                f"{backend!r}: this runtime quantizes with torchao only (backend {' or '.join(QUANTIZE_BACKENDS[:2])}); "
                "cache-dit's own backend is for SVDQuant types",
            )
        )
    raw_type = qc.get("quant_type", facts.QUANT_TYPE_DEFAULT)
    if not isinstance(raw_type, str):
        return [*errors, _error("quantize_config.quant_type", f"expected a string, got {raw_type!r}")]
    quant_type = facts.canonical_quant_type(raw_type)
    if quant_type not in facts.QUANT_TYPES:
        return [
            *errors,
            ConfigError(
                f"quantize_config.quant_type={raw_type!r} is not one of {', '.join(facts.QUANT_TYPES)}",
                "quantize_config.quant_type",
            ),
        ]
    if device_type != "cuda":
        if quant_type not in CPU_QUANT_TYPES:
            floor = facts.min_capability(quant_type)
            errors.append(
                ConfigError(
                    f"quantize_config.quant_type={quant_type} needs a CUDA GPU"
                    f"{f' with compute capability >= {floor[0]}.{floor[1]}' if floor else ''}; "
                    f"this runtime runs on {device_type} (int8 types only: {', '.join(CPU_QUANT_TYPES)})",
                    "quantize_config.quant_type",
                )
            )
        # known keys only (an unknown one is reported above, at its own path)
        for key in sorted((set(qc) & set(facts.QUANTIZE_CONFIG_FIELDS)) - set(CPU_QUANTIZE_KEYS)):
            if qc[key] is not None:
                errors.append(
                    _error(
                        _key("quantize_config", key),
                        f"not supported on {device_type} (the torchao int8 path)",
                    )
                )
        if isinstance(qc.get("components_to_quantize"), dict):
            errors.append(
                _error(
                    "quantize_config.components_to_quantize",
                    f"per-component quant types are not supported on {device_type}; give a list of names",
                )
            )
        return errors
    raw_plan = qc.get("precision_plan")
    plan: dict = raw_plan if isinstance(raw_plan, dict) else {}
    components = qc.get("components_to_quantize")
    used: list[tuple[str, Any]] = [("quantize_config.quant_type", quant_type)]
    used += [(f"quantize_config.precision_plan[{k}]", v) for k, v in plan.items()]
    if isinstance(components, dict):
        used += [
            (f"quantize_config.components_to_quantize[{k}].quant_type", v.get("quant_type"))
            for k, v in components.items()
            if isinstance(v, dict) and v.get("quant_type") is not None
        ]
    for path, value in used:
        if not isinstance(value, str) or facts.canonical_quant_type(value) not in facts.QUANT_TYPES:
            if path != "quantize_config.quant_type":
                errors.append(_error(path, f"{value!r} is not one of {', '.join(facts.QUANT_TYPES)}"))
            continue
        floor = facts.min_capability(value)
        if floor is not None and capability is not None and capability < floor:
            name = facts.canonical_quant_type(value)
            errors.append(
                ConfigError(
                    f"{path}={name} needs compute capability >= {floor[0]}.{floor[1]}; "
                    f"this GPU has {capability[0]}.{capability[1]}",
                    path,
                )
            )
    return errors


def cache_dit_errors(
    raw: Any, device_type: str, capability: tuple[int, int] | None = None, dtype: str | None = None
) -> list[ConfigError]:
    """Everything the runtime refuses in a cache-dit YAML mapping for `device_type` ('cpu' | 'cuda')
    and, when known, the GPU's compute capability and model.dtype. Torch-free: the facts come from the generated
    `_cache_dit_pinned` module (the pinned cache-dit's own)."""
    if raw is None:
        return []
    if not isinstance(raw, dict):
        return [ConfigError("cache-dit config: expected a mapping at the top level", "")]
    errors: list[ConfigError] = []
    for key in sorted(set(raw) - set(facts.TOP_LEVEL_KEYS)):
        errors.append(
            ConfigError(
                f"cache-dit config: unknown top-level key {key}; known: {', '.join(facts.TOP_LEVEL_KEYS)}",
                _key("", key),
            )
        )
    cc = raw.get("cache_config")
    if cc is not None:
        if isinstance(cc, dict):
            errors += _cache_config_errors(cc)
        else:
            errors.append(_error("cache_config", "must be a mapping"))
    pc = raw.get("parallelism_config")
    if pc is not None:
        if not isinstance(pc, dict):
            errors.append(_error("parallelism_config", "must be a mapping"))
        else:
            for key in sorted(set(pc) - set(facts.PARALLELISM_CONFIG_FIELDS)):
                errors.append(_error(_key("parallelism_config", key), "unknown key"))
            sizes = {k: pc[k] for k in facts.PARALLEL_SIZE_KEYS if pc.get(k) is not None}
            bad = [k for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
            if bad:
                errors.append(_error("parallelism_config", f"sizes must be integers >= 1, got {sizes}"))
            elif all(v == 1 for v in sizes.values()):
                errors.append(
                    _error(
                        "parallelism_config",
                        f"{', '.join(facts.PARALLEL_SIZE_KEYS)} are all 1 (cache-dit raises on that); remove it",
                    )
                )
            else:
                layout = parallel_layout_error(pc, device_type, dtype)
                if layout is not None:
                    errors.append(layout)
    backend = raw.get("attention_backend")
    if backend is not None and not isinstance(backend, str):
        errors.append(_error("attention_backend", f"expected a string, got {backend!r}"))
    qc = raw.get("quantize_config")
    if qc is not None:
        if isinstance(qc, dict):
            errors += _quantize_errors(qc, device_type, capability)
        else:
            errors.append(_error("quantize_config", "must be a mapping"))
    return errors


def runtime_errors(
    cfg: RuntimeConfig,
    cache_dit: dict | None,
    device_type: str,
    capability: tuple[int, int] | None = None,
) -> list[ConfigError]:
    """The runtime's whole preflight for a config and its cache-dit YAML on `device_type`: what
    `diffusion-runtime serve` refuses before it loads a model. The operator runs exactly this on the
    runtime.yaml it renders."""
    errors = config_errors(cfg)
    if device_type == "cpu" and cfg.model.dtype == "float16":
        errors.append(_error("model.dtype", "float16 is not supported on cpu; use float32 or bfloat16"))
    if cfg.device == "cuda" and device_type != "cuda":
        errors.append(_error("device", "cuda requested but this pod has no GPU"))
    if cfg.adapters and isinstance(cache_dit, dict):
        # peft's LoRA layers wrap the transformer's Linear modules: untested over torchao's quantized
        # weights and over cache-dit's tensor-parallel shards (context parallelism splits tokens: fine)
        if cache_dit.get("quantize_config") is not None:
            errors.append(
                _error("adapters", "not supported together with quantize_config", reason="Unsupported")
            )
        tp = (cache_dit.get("parallelism_config") or {}).get("tp_size")
        if isinstance(tp, int) and tp > 1:
            errors.append(
                _error("adapters", "not supported together with parallelism_config.tp_size > 1",
                       reason="Unsupported")
            )  # fmt: skip
    return errors + cache_dit_errors(cache_dit, device_type, capability, cfg.model.dtype)


# `diffusion-runtime serve --FLAG` (dashes for underscores) -> the setting it overrides; cli.py builds
# each flag from its setting's type, choices and description
OVERRIDES: dict[str, str] = {
    "model": "model.uri",
    "dtype": "model.dtype",
    "host": "server.host",
    "port": "server.port",
    "metrics_port": "server.metrics_port",
    "max_queue": "server.max_queue",
    "request_timeout": "server.request_timeout_seconds",
    "cache_dit_config": "cache_dit_config",
    "device": "device",
    "compile": "compile",
    "compile_cache_dir": "compile_cache_dir",
    "warmup_steps": "warmup.steps",
    "warmup_size": "warmup.resolutions",  # repeatable
    "auth_keys_dir": "server.auth_keys_dir",
}


def setting_field(path: str) -> Any:
    """The pydantic FieldInfo of a setting (`server.max_queue`)."""
    cls: Any = RuntimeConfig
    *sections, name = path.split(".")
    for section in sections:
        cls = _section_type(cls.model_fields[section].annotation)
    return cls.model_fields[name]


def apply_overrides(cfg: RuntimeConfig, **overrides: Any) -> RuntimeConfig:
    """CLI flags win over the file. Keys: those of `OVERRIDES` (model, port, max_queue, ...; None = unset)."""
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in OVERRIDES:
            raise KeyError(key)
        *sections, attr = OVERRIDES[key].split(".")
        obj: Any = cfg
        for section in sections:
            obj = getattr(obj, section)
        setattr(obj, attr, value)
    return cfg
