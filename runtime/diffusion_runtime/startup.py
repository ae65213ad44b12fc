"""How this process started: the one `diffusion-runtime ready: {...}` line (torch-free).

The runtime prints it on stdout once, just before `/ready` turns 200. The operator reads it from the
pod's log (read-only, as it reads the download's progress lines) with `parse_ready_line` and keeps
the newest cold and the newest warm start in `status.startup`.

- `seconds`: from this process's start (the container's start: the runtime is its process) to the
  moment it is ready; the kubelet's readiness probe sees that within its period.
- `start`: `cold` when this start redid work a cache could have saved: it fetched the model from the
  Hub, or it compiled (`compile: true`) without restoring compile artifacts (no compile cache, or a
  lookup that was not a hit); `warm` otherwise: the model came from local files (a model cache volume,
  a complete earlier download, a folder in the image) and, with `compile`, the compiled artifacts
  came from the compile cache.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from diffusion_runtime.contract.lines import COLD, WARM
from diffusion_runtime.contract.lines import COMPILE_CACHE_RESULTS as COMPILE_CACHE_RESULTS
from diffusion_runtime.contract.lines import MODEL_SOURCES as MODEL_SOURCES
from diffusion_runtime.contract.lines import READY_PREFIX as READY_PREFIX
from diffusion_runtime.contract.lines import parse_ready_line as parse_ready_line
from diffusion_runtime.contract.lines import ready_line as ready_line


def start_kind(model_downloaded: bool, compile: bool, compile_cache: str) -> str:
    """cold: the model was fetched, or compiled without a compile-cache hit; warm otherwise."""
    if model_downloaded or (compile and compile_cache != "hit"):
        return COLD
    return WARM


def process_start_time() -> float:
    """When this process started (Unix time): the kernel's record, so interpreter start and imports
    count too."""
    import psutil

    return float(psutil.Process().create_time())


def utc_iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def summary(
    *,
    started: float,
    ready: float,
    model_downloaded: bool,
    compile: bool,
    compile_cache: str,
    download_seconds: float,
    load_seconds: float,
    warmup_seconds: float,
    compile_seconds: float,
) -> dict[str, Any]:
    """The start record (`started`, `ready`: Unix times)."""
    return {
        "start": start_kind(model_downloaded, compile, compile_cache),
        "seconds": round(max(0.0, ready - started), 3),
        "at": utc_iso(ready),
        "model": "downloaded" if model_downloaded else "local",
        "compile": bool(compile),
        "compileCache": compile_cache,
        "downloadSeconds": round(download_seconds, 3),
        "loadSeconds": round(load_seconds, 3),
        "warmupSeconds": round(warmup_seconds, 3),
        "compileSeconds": round(compile_seconds, 3),
    }
