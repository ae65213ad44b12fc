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


class ConfigError(ValueError):
    """A setting the runtime cannot honour; the message is one line naming the setting."""


DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cuda", "cpu")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


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


@dataclass
class RuntimeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache_dit_config: str | None = None
    compile: bool = False
    device: str = "auto"
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

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
    if "device" in raw:
        cfg.device = raw["device"]
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


def validate(cfg: RuntimeConfig) -> RuntimeConfig:
    """Check types and ranges; raise ConfigError naming the first bad setting."""

    def _int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if value < lo or (hi is not None and value > hi):
            raise ConfigError(f"{name}: {value} is out of range [{lo}, {hi if hi is not None else 'inf'}]")
        return value

    if not cfg.model.uri or not isinstance(cfg.model.uri, str):
        raise ConfigError("model.uri: required (a folder, file:///path, hf://org/name or org/name)")
    if cfg.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype: {cfg.model.dtype!r} is not one of {', '.join(DTYPES)}")
    if cfg.device not in DEVICES:
        raise ConfigError(f"device: {cfg.device!r} is not one of {', '.join(DEVICES)}")
    if not isinstance(cfg.compile, bool):
        raise ConfigError(f"compile: expected true or false, got {cfg.compile!r}")
    s = cfg.server
    _int("server.port", s.port, 1, 65535)
    _int("server.metrics_port", s.metrics_port, 0, 65535)
    if s.metrics_port and s.metrics_port == s.port:
        raise ConfigError(
            f"server.metrics_port: {s.metrics_port} equals server.port; use another port or 0 (off)"
        )
    _int("server.max_queue", s.max_queue, 1)
    _int("server.max_pixels", s.max_pixels, 256)
    _int("server.max_steps", s.max_steps, 1, 1000)
    _int("server.max_n", s.max_n, 1, 64)
    if isinstance(s.request_timeout_seconds, bool) or not isinstance(s.request_timeout_seconds, int | float):
        raise ConfigError(
            f"server.request_timeout_seconds: expected a number, got {s.request_timeout_seconds!r}"
        )
    if s.request_timeout_seconds <= 0:
        raise ConfigError("server.request_timeout_seconds: must be > 0")
    w = cfg.warmup
    if not isinstance(w.resolutions, list):
        raise ConfigError(f"warmup.resolutions: expected a list like ['1024x1024'], got {w.resolutions!r}")
    for r in w.resolutions:
        try:
            width, height = parse_size(r)
        except ValueError as e:
            raise ConfigError(f"warmup.resolutions: {e}") from e
        if width % 16 or height % 16 or width * height > s.max_pixels:
            raise ConfigError(
                f"warmup.resolutions: {r} must be multiples of 16 within server.max_pixels={s.max_pixels}"
            )
    _int("warmup.steps", w.steps, 1, s.max_steps)
    if not isinstance(w.prompt, str) or not w.prompt.strip():
        raise ConfigError("warmup.prompt: must be a non-empty string")
    return cfg


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
