"""The lines the runtime writes for the operator to read (pod logs, termination messages), and the
small parsers the operator reads them with. Torch-free, like the rest of the contract.

- the start line: `diffusion-runtime ready: {...}`, printed once just before `/ready` turns 200
  (`diffusion_runtime.startup` writes it; the operator keeps the newest cold and warm start in
  `status.startup`);
- the download's progress lines: one JSON object per line, `{"modelDownload": PHASE, ...}`
  (`diffusion_runtime.download` writes them; the operator's `status.modelCache` reads them), and the
  folder layout of a model inside a cache (`local_folder`);
- the quality gate's failure line, starting with `GATE_FAILED` (the pod's termination message).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from typing import Any, Literal, get_args

# ---- the start line ------------------------------------------------------------------------------

READY_PREFIX = "diffusion-runtime ready: "
COLD, WARM = "cold", "warm"
# compile-cache lookup results (compile_cache.CompileCache.restore), plus "off": no cache consulted
CompileCacheResult = Literal["hit", "miss", "corrupt", "error", "off"]
COMPILE_CACHE_RESULTS: tuple[str, ...] = get_args(CompileCacheResult)
ModelSource = Literal["downloaded", "local"]
MODEL_SOURCES: tuple[str, ...] = get_args(ModelSource)
SECONDS_FIELDS = ("seconds", "downloadSeconds", "loadSeconds", "warmupSeconds", "compileSeconds")


def ready_line(record: dict[str, Any]) -> str:
    return READY_PREFIX + json.dumps(record, sort_keys=True, separators=(",", ":"))


def _valid(record: Any) -> bool:
    if not isinstance(record, dict):
        return False
    if record.get("start") not in (COLD, WARM) or not isinstance(record.get("at"), str):
        return False
    if record.get("compileCache") not in COMPILE_CACHE_RESULTS or record.get("model") not in MODEL_SOURCES:
        return False
    if not isinstance(record.get("compile"), bool):
        return False
    for key in SECONDS_FIELDS:
        value = record.get(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            return False
    try:
        dt.datetime.strptime(record["at"], "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return False
    return True


def parse_ready_line(text: str) -> dict[str, Any] | None:
    """The start record of the first well-formed ready line in `text` (a log), None without one."""
    for line in text.splitlines():
        index = line.find(READY_PREFIX)
        if index < 0:
            continue
        try:
            record = json.loads(line[index + len(READY_PREFIX) :])
        except ValueError:
            continue
        if _valid(record):
            return record
    return None


# ---- the download's progress lines -----------------------------------------------------------------

PROGRESS_KEY = "modelDownload"  # every progress line is {"modelDownload": PHASE, ...}
PHASES = ("Resolving", "Downloading", "Verifying", "Complete", "Failed")


def progress_line(phase: str, **fields: Any) -> str:
    """One machine-readable line: {"modelDownload": phase, "bytesDone": ..., ...} (no newline)."""
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r} is not one of {PHASES}")
    return json.dumps({PROGRESS_KEY: phase, **fields}, sort_keys=True, separators=(",", ":"))


def parse_progress_line(line: str) -> dict[str, Any] | None:
    """The progress record in one log line, or None for any other line (logs, warnings, garbage)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get(PROGRESS_KEY) not in PHASES:
        return None
    return data


def last_progress(text: str) -> dict[str, Any] | None:
    """The last progress record in a block of log text (a log tail or a termination message)."""
    found = None
    for line in text.splitlines():
        parsed = parse_progress_line(line)
        if parsed is not None:
            found = parsed
    return found


def local_folder(repo_id: str, revision: str | None) -> str:
    """`org--name/revision`: a model's folder inside a cache (the operator's claim uses the same shape)."""
    parts = [repo_id.replace("/", "--"), revision or "main"]
    return "/".join(re.sub(r"[^A-Za-z0-9._-]", "_", p).strip(".") or "_" for p in parts)


# ---- the quality gate's failure line -----------------------------------------------------------------

# how a failed gate's one line starts (the pod's termination message; the operator looks for it)
GATE_FAILED = "quality gate failed: "
