"""ConfigMap `<name>-config`: runtime.yaml (docs/contracts.md) and cache-dit.yaml (cache-dit's keys verbatim)."""

from __future__ import annotations

from typing import Any

import yaml
from diffusion_runtime.contract.config import RuntimeConfig, config_from_dict

from diffusion_operator.api.funcs import runtime_settings
from diffusion_operator.builders.common import HTTP_PORT, METRICS_PORT, metadata

CONFIG_DIR = "/etc/diffusion"
MODELS_DIR = "/models"
CACHE_DIT_FILE = "cache-dit.yaml"  # beside runtime.yaml; the runtime resolves it from that folder


COMPILE_CACHE_MOUNT = "/var/cache/diffusion-compile"  # spec.compileCache's claim, read-write


def model_uri_in_pod(spec) -> str:
    """pvc://claim/path is mounted at /models/claim; the runtime sees a plain path. With spec.model.cache
    the model is the folder the download Job filled (builders.modelcache)."""
    if getattr(spec, "model_cache", None) is not None:
        from diffusion_operator.builders.modelcache import model_path_in_pod

        return model_path_in_pod(spec)
    pvc = spec.model.pvc
    if pvc is None:
        return spec.model.uri
    claim, path = pvc
    return f"{MODELS_DIR}/{claim}/{path}".rstrip("/")


def render_cache_dit_config(spec) -> dict:
    """What `cache_dit.load_configs` reads: cache_config, parallelism_config, attention_backend, quantize_config."""
    out: dict = {}
    for key in ("cache_config", "parallelism_config", "attention_backend"):
        if spec.cache_dit.get(key) is not None:
            out[key] = spec.cache_dit[key]
    if spec.quantize:
        out["quantize_config"] = spec.quantize
    return out


def render_cache_dit_yaml(spec) -> str:
    return yaml.safe_dump(render_cache_dit_config(spec), sort_keys=False)


def _put(raw: dict, path: str, value: Any) -> None:
    *sections, name = path.split(".")
    for section in sections:
        raw = raw.setdefault(section, {})
    raw[name] = value


def runtime_config(spec) -> RuntimeConfig:
    """runtime.yaml as the runtime's own config type (the operator validates this very object): every
    CR field that is a runtime setting as it is (`api.funcs.runtime_settings`), plus what the pod
    decides (the model's path in the pod, ports, mounted files)."""
    cr = spec.cr
    raw: dict[str, Any] = {}
    for path, value in runtime_settings(cr).items():
        if not path.startswith("quality_gate.") or cr.quality_gate.enabled:
            _put(raw, path, value)
    _put(raw, "model.uri", model_uri_in_pod(spec))
    _put(raw, "server.host", "0.0.0.0")
    _put(raw, "server.port", HTTP_PORT)
    _put(raw, "server.metrics_port", METRICS_PORT)
    if spec.has_cache_dit_file:
        raw["cache_dit_config"] = CACHE_DIT_FILE
    if cr.compile_cache is not None:
        raw["compile_cache_dir"] = COMPILE_CACHE_MOUNT
    return config_from_dict(raw)


def _without_none(value):
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def render_runtime_config(spec) -> dict:
    """runtime.yaml's mapping: `runtime_config(spec)`, unset (None) settings left out."""
    return _without_none(runtime_config(spec).to_dict())


def configmap_name(spec) -> str:
    return f"{spec.name}-config"


def build_configmap(spec, owner: dict) -> dict:
    data = {"runtime.yaml": yaml.safe_dump(render_runtime_config(spec), sort_keys=False)}
    if spec.has_cache_dit_file:
        data[CACHE_DIT_FILE] = render_cache_dit_yaml(spec)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(configmap_name(spec), spec, owner),
        "data": data,
    }
