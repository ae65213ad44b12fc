"""The runtime config file (`runtime.yaml`, see docs/contracts.md): parsing, defaults, validation.

Pure functions only: no torch import here, so the config can be checked cheaply and tested alone.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffusion_runtime import cache_dit_facts as facts

# the limits live in diffusion_runtime.limits; re-exported here for readers of the config
from diffusion_runtime.limits import MAX_JOBS_LIMIT as MAX_JOBS_LIMIT
from diffusion_runtime.limits import MAX_N_LIMIT as MAX_N_LIMIT
from diffusion_runtime.limits import MAX_STEPS_LIMIT as MAX_STEPS_LIMIT
from diffusion_runtime.limits import MIN_PIXELS as MIN_PIXELS
from diffusion_runtime.limits import MIN_UPLOAD_BYTES as MIN_UPLOAD_BYTES
from diffusion_runtime.limits import QUALITY_GATE_MAX_CANARIES as QUALITY_GATE_MAX_CANARIES
from diffusion_runtime.limits import SIZE_MULTIPLE as SIZE_MULTIPLE
from diffusion_runtime.limits import SIZE_PATTERN as SIZE_PATTERN
from diffusion_runtime.parallel import layout_refusal


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


DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cuda", "cpu")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
# quant types the runtime runs on CPU: torchao's int8 configs applied directly (cache-dit's own
# quantization asserts CUDA), see optimize.quantize_with_torchao
CPU_QUANT_TYPES = ("int8_per_row", "int8_per_tensor", "int8_weight_only")
# quantize_config.backend values the runtime runs (cache-dit's QuantizeBackend.from_str aliases of AUTO
# and TORCHAO; CACHE_DIT is SVDQuant's, which needs a CUDA extension and svdq quant types)
QUANTIZE_BACKENDS = ("auto", "torchao", "ao")
# quantize_config keys the CPU torchao path honours; the others need cache-dit's CUDA path
CPU_QUANTIZE_KEYS = ("quant_type", "exclude_layers", "components_to_quantize", "backend", "verbose")


@dataclass
class ModelConfig:
    uri: str = ""
    revision: str | None = None
    pipeline: str | None = None
    dtype: str = "bfloat16"


@dataclass
class WarmupConfig:
    resolutions: list[str] = field(default_factory=lambda: ["1024x1024"])
    steps: int = 28
    prompt: str = "a photo of a cat"


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8000
    metrics_port: int = 9090
    max_queue: int = 16
    request_timeout_seconds: float = 300.0
    max_pixels: int = 4194304
    max_steps: int = 100
    max_n: int = 4
    max_upload_bytes: int = 32 << 20  # body bound of POST /v1/images/edits
    max_jobs: int = 64  # finished async jobs and url results kept in memory ...
    job_ttl_seconds: float = 600.0  # ... for at most this long


# quality gate: defaults and bounds (the CR's qualityGate fields come from here)
QUALITY_GATE_PROMPTS = ("a photo of a cat", "a lighthouse on a cliff at dusk, oil painting")
QUALITY_GATE_MIN_PSNR = 25.0  # dB, optimized vs plain pipeline, worst canary
QUALITY_GATE_MIN_SSIM = 0.75  # worst canary


@dataclass
class QualityGateConfig:
    """Canary images from the plain and the optimized pipeline, compared before the pod turns Ready."""

    prompts: list[str] = field(default_factory=lambda: list(QUALITY_GATE_PROMPTS))
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int | None = None  # default: warmup.steps
    size: str | None = None  # default: the first warmup resolution
    min_psnr: float = QUALITY_GATE_MIN_PSNR
    min_ssim: float = QUALITY_GATE_MIN_SSIM


@dataclass
class RuntimeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache_dit_config: str | None = None
    compile: bool = False
    # shared folder for torch.compile artifacts (diffusion_runtime.compile_cache); None: off
    compile_cache_dir: str | None = None
    device: str = "auto"
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    quality_gate: QualityGateConfig | None = None  # None: no gate

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768) as (width, height)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT (for example 1024x1024)")
    return int(m.group(1)), int(m.group(2))


def _section(raw: dict, key: str, cls: type, where: str) -> Any:
    value = raw.get(key)
    if value is None:
        return cls()
    if not isinstance(value, dict):
        raise ConfigError(f"{where}{key}: expected a mapping, got {type(value).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigError(f"{where}{key}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
    obj = cls()
    for name, v in value.items():
        setattr(obj, name, v)
    return obj


def config_from_dict(raw: dict | None, base_dir: Path | None = None) -> RuntimeConfig:
    """Build and validate a RuntimeConfig from the parsed YAML mapping."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"runtime config: expected a mapping at the top level, got {type(raw).__name__}")
    top = {f.name for f in dataclasses.fields(RuntimeConfig)}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ConfigError(
            f"runtime config: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(top))}"
        )
    cfg = RuntimeConfig(
        model=_section(raw, "model", ModelConfig, ""),
        warmup=_section(raw, "warmup", WarmupConfig, ""),
        server=_section(raw, "server", ServerConfig, ""),
    )
    if "cache_dit_config" in raw and raw["cache_dit_config"] not in (None, ""):
        path = Path(str(raw["cache_dit_config"]))
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        cfg.cache_dit_config = str(path)
    if "compile" in raw:
        cfg.compile = raw["compile"]
    if raw.get("compile_cache_dir") not in (None, ""):
        cfg.compile_cache_dir = raw["compile_cache_dir"]
    if "device" in raw:
        cfg.device = raw["device"]
    if raw.get("quality_gate") is not None:
        cfg.quality_gate = _section(raw, "quality_gate", QualityGateConfig, "")
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


def _int_error(
    path: str, value: Any, lo: int, hi: int | None = None, hi_name: str = ""
) -> ConfigError | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return _error(path, f"expected an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f"{hi}{f' ({hi_name})' if hi_name else ''}" if hi is not None else "inf"
        return _error(path, f"{value} is out of range [{lo}, {bound}]")
    return None


def _size_error(path: str, text: Any, max_pixels: int | None) -> ConfigError | None:
    """A WIDTHxHEIGHT setting: parseable, multiples of SIZE_MULTIPLE, within max_pixels (None: unchecked)."""
    try:
        width, height = parse_size(text)
    except ValueError as e:
        return _error(path, str(e))
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        return _error(path, f"{text}: width and height must be multiples of {SIZE_MULTIPLE}")
    if max_pixels is not None and width * height > max_pixels:
        return _error(path, f"{text} = {width * height} pixels exceeds server.max_pixels={max_pixels}")
    return None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _quality_gate_errors(
    g: QualityGateConfig, max_pixels: int | None, steps_ceiling: int, steps_bound: str
) -> list[ConfigError]:
    errors: list[ConfigError] = []
    if (
        not isinstance(g.prompts, list)
        or not g.prompts
        or not all(isinstance(p, str) and p.strip() for p in g.prompts)
    ):
        errors.append(
            _error("quality_gate.prompts", f"expected a non-empty list of prompts, got {g.prompts!r}")
        )
    if (
        not isinstance(g.seeds, list)
        or not g.seeds
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in g.seeds)
    ):
        errors.append(
            _error("quality_gate.seeds", f"expected a non-empty list of integers >= 0, got {g.seeds!r}")
        )
    elif isinstance(g.prompts, list) and len(g.prompts) * len(g.seeds) > QUALITY_GATE_MAX_CANARIES:
        errors.append(
            _error(
                "quality_gate.seeds",
                f"{len(g.prompts)} prompts x {len(g.seeds)} seeds = {len(g.prompts) * len(g.seeds)} canaries; "
                f"at most {QUALITY_GATE_MAX_CANARIES} (each is generated twice during warmup)",
            )
        )
    if g.steps is not None:
        error = _int_error("quality_gate.steps", g.steps, 1, steps_ceiling, steps_bound)
        if error is not None:
            errors.append(error)
    if g.size is not None:
        error = _size_error("quality_gate.size", g.size, max_pixels)
        if error is not None:
            errors.append(error)
    if not _number(g.min_psnr) or g.min_psnr < 0:
        errors.append(
            _error("quality_gate.min_psnr", f"expected a number of decibels >= 0, got {g.min_psnr!r}")
        )
    if not _number(g.min_ssim) or not -1 <= g.min_ssim <= 1:
        errors.append(_error("quality_gate.min_ssim", f"expected a number in [-1, 1], got {g.min_ssim!r}"))
    return errors


def config_errors(cfg: RuntimeConfig) -> list[ConfigError]:
    """Every setting the runtime refuses, each naming its setting (empty: the config is valid)."""
    errors: list[ConfigError] = []

    def add(error: ConfigError | None) -> None:
        if error is not None:
            errors.append(error)

    m = cfg.model
    if not m.uri or not isinstance(m.uri, str):
        add(_error("model.uri", "required (a folder, file:///path, hf://org/name or org/name)"))
    for key in ("revision", "pipeline"):
        value = getattr(m, key)
        if value is not None and not isinstance(value, str):
            add(_error(f"model.{key}", f"expected a string, got {value!r}"))
    if m.dtype not in DTYPES:
        add(_error("model.dtype", f"{m.dtype!r} is not one of {', '.join(DTYPES)}"))
    if cfg.device not in DEVICES:
        add(_error("device", f"{cfg.device!r} is not one of {', '.join(DEVICES)}"))
    if not isinstance(cfg.compile, bool):
        add(_error("compile", f"expected true or false, got {cfg.compile!r}"))
    if cfg.cache_dit_config is not None and not isinstance(cfg.cache_dit_config, str):
        add(_error("cache_dit_config", f"expected a file name, got {cfg.cache_dit_config!r}"))
    if cfg.compile_cache_dir is not None and (
        not isinstance(cfg.compile_cache_dir, str) or not cfg.compile_cache_dir.startswith("/")
    ):
        add(_error("compile_cache_dir", f"expected an absolute path, got {cfg.compile_cache_dir!r}"))
    s = cfg.server
    if not isinstance(s.host, str) or not s.host:
        add(_error("server.host", f"expected an address, got {s.host!r}"))
    add(_int_error("server.port", s.port, 1, 65535))
    add(_int_error("server.metrics_port", s.metrics_port, 0, 65535))
    if isinstance(s.port, int) and s.metrics_port and s.metrics_port == s.port:
        add(
            _error("server.metrics_port", f"{s.metrics_port} equals server.port; use another port or 0 (off)")
        )
    add(_int_error("server.max_queue", s.max_queue, 1))
    max_pixels_error = _int_error("server.max_pixels", s.max_pixels, MIN_PIXELS)
    add(max_pixels_error)
    max_steps_error = _int_error("server.max_steps", s.max_steps, 1, MAX_STEPS_LIMIT)
    add(max_steps_error)
    add(_int_error("server.max_n", s.max_n, 1, MAX_N_LIMIT))
    add(_int_error("server.max_upload_bytes", s.max_upload_bytes, MIN_UPLOAD_BYTES))
    add(_int_error("server.max_jobs", s.max_jobs, 1, MAX_JOBS_LIMIT))
    ttl = s.job_ttl_seconds
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        add(_error("server.job_ttl_seconds", f"expected a number, got {ttl!r}"))
    elif ttl <= 0:
        add(_error("server.job_ttl_seconds", "must be > 0"))
    timeout = s.request_timeout_seconds
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        add(_error("server.request_timeout_seconds", f"expected a number, got {timeout!r}"))
    elif timeout <= 0:
        add(_error("server.request_timeout_seconds", "must be > 0"))
    w = cfg.warmup
    pixels = s.max_pixels if max_pixels_error is None else None
    if not isinstance(w.resolutions, list):
        add(_error("warmup.resolutions", f"expected a list like ['1024x1024'], got {w.resolutions!r}"))
    else:
        for r in w.resolutions:
            add(_size_error("warmup.resolutions", r, pixels))
    steps_ceiling = s.max_steps if max_steps_error is None else MAX_STEPS_LIMIT
    steps_bound = "server.max_steps" if max_steps_error is None else ""
    add(_int_error("warmup.steps", w.steps, 1, steps_ceiling, steps_bound))
    if cfg.quality_gate is not None:
        errors.extend(_quality_gate_errors(cfg.quality_gate, pixels, steps_ceiling, steps_bound))
    if not isinstance(w.prompt, str) or not w.prompt.strip():
        add(_error("warmup.prompt", "must be a non-empty string"))
    return errors


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
    return errors + cache_dit_errors(cache_dit, device_type, capability, cfg.model.dtype)


def apply_overrides(cfg: RuntimeConfig, **overrides: Any) -> RuntimeConfig:
    """CLI flags win over the file. Keys: model, cache_dit_config, host, port, max_queue, ... (None = unset)."""
    mapping = {
        "model": (cfg.model, "uri"),
        "dtype": (cfg.model, "dtype"),
        "host": (cfg.server, "host"),
        "port": (cfg.server, "port"),
        "metrics_port": (cfg.server, "metrics_port"),
        "max_queue": (cfg.server, "max_queue"),
        "request_timeout": (cfg.server, "request_timeout_seconds"),
        "cache_dit_config": (cfg, "cache_dit_config"),
        "device": (cfg, "device"),
        "compile": (cfg, "compile"),
        "compile_cache_dir": (cfg, "compile_cache_dir"),
        "warmup_steps": (cfg.warmup, "steps"),
        "warmup_resolutions": (cfg.warmup, "resolutions"),
    }
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in mapping:
            raise KeyError(key)
        obj, attr = mapping[key]
        setattr(obj, attr, value)
    return cfg
