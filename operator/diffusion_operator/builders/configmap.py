"""ConfigMap `<name>-config`: runtime.yaml (docs/contracts.md) and cache-dit.yaml (cache-dit's keys verbatim)."""

from __future__ import annotations

from typing import Any

import yaml
from diffusion_runtime.contract.config import RuntimeConfig, config_from_dict

from diffusion_operator.api.funcs import (
    cache_dit_config,
    has_cache_dit_file,
    model_pvc,
    quality_gate_on,
    quantize_config,
    queue_name,
    runtime_settings,
)
from diffusion_operator.api.types import AdapterSpec, DiffusionDeployment
from diffusion_operator.builders.common import HTTP_PORT, METRICS_PORT, metadata
from diffusion_operator.builders.modelcache import adapter_folder_in_pod, adapter_weight, model_path_in_pod

CONFIG_DIR = "/etc/diffusion"
MODELS_DIR = "/models"
CACHE_DIT_FILE = "cache-dit.yaml"  # beside runtime.yaml; the runtime resolves it from that folder


COMPILE_CACHE_MOUNT = "/var/cache/diffusion-compile"  # spec.compileCache's claim, read-write
# spec.server.auth's keys, one file per key name (a projected volume of the Secrets): server.auth_keys_dir
API_KEYS_MOUNT = "/etc/diffusion-keys"


def model_uri_in_pod(dd: DiffusionDeployment) -> str:
    """pvc://claim/path is mounted at /models/claim; the runtime sees a plain path. With spec.model.cache
    the model is the folder the download Job filled (builders.modelcache)."""
    if dd.spec.model.cache is not None:
        return model_path_in_pod(dd)
    pvc = model_pvc(dd.spec)
    if pvc is None:
        return dd.spec.model.uri
    claim, path = pvc
    return f"{MODELS_DIR}/{claim}/{path}".rstrip("/")


def adapter_claim(a: AdapterSpec) -> str | None:
    """The claim of a pvc:// adapter (mounted read-only at /models/<claim>, like a pvc:// model)."""
    return a.uri[len("pvc://") :].partition("/")[0] if a.uri.startswith("pvc://") else None


def adapter_path_in_pod(a: AdapterSpec) -> str:
    """runtime.yaml's adapters[].path: hf:// -> its file in the model cache; pvc://claim/path ->
    /models/claim/path; file:///path -> /path."""
    if a.uri.startswith("hf://"):
        return f"{adapter_folder_in_pod(a)}/{adapter_weight(a)}"
    if a.uri.startswith("pvc://"):
        return f"{MODELS_DIR}/{a.uri[len('pvc://') :]}"
    return a.uri[len("file://") :]


def render_cache_dit_config(dd: DiffusionDeployment) -> dict:
    """What `cache_dit.load_configs` reads: cache_config, parallelism_config, attention_backend, quantize_config."""
    out: dict = {}
    cache_dit = cache_dit_config(dd.spec)
    for key in ("cache_config", "parallelism_config", "attention_backend"):
        if cache_dit.get(key) is not None:
            out[key] = cache_dit[key]
    quantize = quantize_config(dd.spec)
    if quantize:
        out["quantize_config"] = quantize
    return out


def render_cache_dit_yaml(dd: DiffusionDeployment) -> str:
    return yaml.safe_dump(render_cache_dit_config(dd), sort_keys=False)


def _put(raw: dict, path: str, value: Any) -> None:
    *sections, name = path.split(".")
    for section in sections:
        raw = raw.setdefault(section, {})
    raw[name] = value


def runtime_config(dd: DiffusionDeployment) -> RuntimeConfig:
    """runtime.yaml as the runtime's own config type (the operator validates this very object): every
    CR field that is a runtime setting as it is (`api.funcs.runtime_settings`), plus what the pod
    decides (the model's path in the pod, ports, mounted files)."""
    cr = dd.spec
    raw: dict[str, Any] = {}
    for path, value in runtime_settings(cr).items():
        if not path.startswith("quality_gate.") or quality_gate_on(cr):
            _put(raw, path, value)
    _put(raw, "model.uri", model_uri_in_pod(dd))
    _put(raw, "server.host", "0.0.0.0")
    _put(raw, "server.port", HTTP_PORT)
    _put(raw, "server.metrics_port", METRICS_PORT)
    if has_cache_dit_file(cr):
        raw["cache_dit_config"] = CACHE_DIT_FILE
    if cr.compile_cache is not None:
        raw["compile_cache_dir"] = COMPILE_CACHE_MOUNT
    if cr.server.auth is not None:
        _put(raw, "server.auth_keys_dir", API_KEYS_MOUNT)
    if cr.adapters:
        raw["adapters"] = [
            {"name": a.name, "path": adapter_path_in_pod(a), "scale": a.scale} for a in cr.adapters
        ]
    if cr.queue is not None:
        _put(raw, "queue.name", queue_name(dd.namespace, dd.name))
    return config_from_dict(raw)


def _without_none(value):
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def render_runtime_config(dd: DiffusionDeployment) -> dict:
    """runtime.yaml's mapping: `runtime_config(dd)`, unset (None) settings left out."""
    return _without_none(runtime_config(dd).to_dict())


def configmap_name(dd: DiffusionDeployment) -> str:
    return f"{dd.name}-config"


def build_configmap(dd: DiffusionDeployment, owner: dict) -> dict:
    data = {"runtime.yaml": yaml.safe_dump(render_runtime_config(dd), sort_keys=False)}
    if has_cache_dit_file(dd.spec):
        data[CACHE_DIT_FILE] = render_cache_dit_yaml(dd)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(configmap_name(dd), dd, owner),
        "data": data,
    }
