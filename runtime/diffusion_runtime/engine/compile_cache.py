"""Compile-artifact cache: torch.compile's on-disk caches shared between pods through a volume.

torch.compile (inductor) keeps what it builds in one local folder, `TORCHINDUCTOR_CACHE_DIR`: FX-graph
and AOTAutograd cache entries, the generated C++/Triton kernels and their compiled libraries, and
autotuning results. A process that starts with that folder filled skips most of the work (measured
on CPU with the small test model: warmup 209 s cold, 36 s with the folder restored).
`torch.compiler.save_cache_artifacts()` ("mega-cache") leaves the compiled kernel libraries out, so
it gave only 229 s -> 113 s here; we ship the whole folder instead.

Flow (`serve`): `restore()` before the first compiled call unpacks `<dir>/<key>.ccache` into the
local inductor folder; after warmup a process that missed calls `publish()`, which packs the local
folder and publishes it atomically: written to a temporary file in the shared folder, then
hard-linked to its final name, so the first writer wins and a later writer's copy is dropped. A file
whose header, key or checksum does not match is ignored with one warning (the process recompiles and
replaces it); it never stops the pod.

The key hashes everything that changes the compiled graph: the model (URI, revision and the content
of its `model_index.json` and transformer config), dtype, pipeline class, the whole cache-dit YAML
(cache, parallelism, quantization), warmup resolutions and steps, the versions of torch, diffusers,
cache-dit, torchao and triton, and the hardware (GPU name and compute capability, or the CPU's ISA).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("diffusion_runtime")

MAGIC = "diffusion-compile-cache/1"
SUFFIX = ".ccache"
# files of the local inductor folder that are process-local, not artifacts
_SKIP_DIRS = ("locks",)


def cache_key(facts: dict[str, Any]) -> str:
    """A stable hex key for a mapping of JSON-able facts (order of keys does not matter)."""
    text = json.dumps(facts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def library_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("torch", "diffusers", "cache-dit", "torchao", "triton", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "-"
    out["python"] = platform.python_version()
    return out


def hardware(device: str) -> dict[str, Any]:
    import torch

    if device == "cuda":
        return {
            "device": "cuda",
            "gpu": torch.cuda.get_device_name(),
            "capability": list(torch.cuda.get_device_capability()),
            "cuda": torch.version.cuda,
        }
    return {
        "device": device,
        "machine": platform.machine(),
        "isa": torch.backends.cpu.get_cpu_capability(),
    }


def key_facts(
    *,
    model_uri: str,
    revision: str | None,
    model_path: Path,
    dtype: str,
    pipeline: str,
    cache_dit: dict[str, Any],
    resolutions: list[str],
    steps: int,
    device: str,
) -> dict[str, Any]:
    """Everything that changes the compiled graph, as a JSON-able mapping."""
    return {
        "model": {
            "uri": model_uri,
            "revision": revision,
            "model_index": _file_digest(model_path / "model_index.json"),
            "transformer": _file_digest(model_path / "transformer" / "config.json"),
        },
        "dtype": dtype,
        "pipeline": pipeline,
        "cache_dit": cache_dit,
        "warmup": {"resolutions": list(resolutions), "steps": steps},
        "versions": library_versions(),
        "hardware": hardware(device),
    }


def _pack(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if rel.parts[0] in _SKIP_DIRS or not (path.is_file() or path.is_dir()) or path.is_symlink():
                continue
            tar.add(path, arcname=str(rel), recursive=False)
    return buf.getvalue()


def _extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Unpack a payload into `dest`: tarfile's `data` filter where this Python has it (3.11.4 and later),
    the same refusals by hand before that (Debian bookworm's python3 is 3.11.2): only files and folders,
    nothing outside `dest`, no special permission bits. Raises tarfile.TarError on a member it refuses."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for member in tar.getmembers():
        target = (root / member.name).resolve()
        if member.name.startswith("/") or (target != root and root not in target.parents):
            raise tarfile.TarError(f"{member.name!r} would be written outside {dest}")
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
        elif member.isfile():
            source = tar.extractfile(member)
            if source is None:
                raise tarfile.TarError(f"{member.name!r} has no data")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read())
            target.chmod((member.mode & 0o755) | 0o600)
        else:
            raise tarfile.TarError(f"{member.name!r} is not a file or a folder")


def _read(path: Path, key: str) -> bytes:
    """The payload of a cache file; ValueError (with the reason) when it is not a valid one for `key`."""
    with path.open("rb") as f:
        header_line = f.readline(4096)
        payload = f.read()
    try:
        header = json.loads(header_line)
    except ValueError as e:
        raise ValueError("unreadable header") from e
    if not isinstance(header, dict) or header.get("magic") != MAGIC:
        raise ValueError("not a compile-cache file")
    if header.get("key") != key:
        raise ValueError(f"key {header.get('key')!r} does not match {key!r}")
    if header.get("size") != len(payload) or header.get("sha256") != hashlib.sha256(payload).hexdigest():
        raise ValueError("checksum mismatch (truncated or corrupted)")
    return payload


@dataclass
class CompileCache:
    """One process's view of the shared compile cache (`root`) for one key."""

    root: Path
    key: str
    facts: dict[str, Any] = field(default_factory=dict)
    local: Path | None = None
    result: str = "off"  # set by restore(): hit | miss | corrupt | error
    published: bool = False
    restore_seconds: float = 0.0

    @property
    def path(self) -> Path:
        return self.root / f"{self.key}{SUFFIX}"

    def use_local_folder(self) -> Path:
        """The inductor cache folder of this process (TORCHINDUCTOR_CACHE_DIR; made private if unset)."""
        if self.local is None:
            configured = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
            self.local = Path(configured) if configured else Path(tempfile.mkdtemp(prefix="inductor-"))
        self.local.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.local)
        return self.local

    def restore(self) -> str:
        """Unpack the shared artifacts into the local folder (never raises).

        Returns 'hit', 'miss' (no file for this key), 'corrupt' (a file that is not a valid one for this
        key: replaced after warmup) or 'error' (the shared folder cannot be read).
        """
        t0 = time.perf_counter()
        local = self.use_local_folder()
        try:
            payload = _read(self.path, self.key)
        except FileNotFoundError:
            self.result = "miss"
            log.info("compile cache: miss for key %s (%s); compiling, then saving", self.key, self.path)
            return self.result
        except OSError as e:
            self.result = "error"
            log.warning("compile cache: cannot read %s (%s); compiling from scratch", self.path, e)
            return self.result
        except ValueError as e:
            self.result = "corrupt"
            log.warning("compile cache: ignoring %s (%s); compiling from scratch", self.path, e)
            return self.result
        try:
            with tarfile.open(fileobj=io.BytesIO(payload), mode="r") as tar:
                _extract(tar, local)
        except (tarfile.TarError, OSError, ValueError) as e:
            self.result = "corrupt"
            log.warning("compile cache: cannot unpack %s (%s); compiling from scratch", self.path, e)
            shutil.rmtree(local, ignore_errors=True)
            local.mkdir(parents=True, exist_ok=True)
            return self.result
        self.result = "hit"
        self.restore_seconds = time.perf_counter() - t0
        log.info(
            "compile cache: hit for key %s (%.1f MiB restored in %.2fs)",
            self.key,
            len(payload) / 2**20,
            self.restore_seconds,
        )
        return self.result

    def publish(self) -> bool:
        """Save the local folder for later processes; True if this process's copy was published.

        After a hit nothing is written. A corrupt file is replaced; a valid file another process
        published meanwhile is kept (first writer wins). Failures are logged, never raised.
        """
        if self.result not in ("miss", "corrupt", "error") or self.local is None:
            return False
        tmp = self.root / f".{self.key}.{uuid.uuid4().hex}.tmp"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            payload = _pack(self.local)
            header = {
                "magic": MAGIC,
                "key": self.key,
                "size": len(payload),
                "sha256": hashlib.sha256(payload).hexdigest(),
                "created": time.time(),
                "facts": self.facts,
            }
            with tmp.open("wb") as f:
                f.write(json.dumps(header, sort_keys=True, default=str).encode() + b"\n")
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            if self.result == "corrupt":
                os.replace(tmp, self.path)
            else:
                try:
                    os.link(tmp, self.path)
                except FileExistsError:
                    log.info("compile cache: another process saved key %s first; keeping its copy", self.key)
                    return False
            self.published = True
            log.info(
                "compile cache: saved key %s (%.1f MiB) to %s", self.key, len(payload) / 2**20, self.path
            )
            return True
        except OSError as e:
            log.warning("compile cache: cannot save to %s (%s); later pods will compile again", self.root, e)
            return False
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def compile_seconds() -> float:
    """Seconds torch.compile has spent compiling in this process (dynamo's own timer, 0 if unknown)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:  # pragma: no cover - private API moved
        return 0.0
    return float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))


def for_model(config: Any, model: Any) -> CompileCache | None:
    """The compile cache of a loaded `diffusion_runtime.engine.model.Model`, or None when it is off.

    On when the config compiles (`compile: true`) and names a shared folder (`compile_cache_dir`).
    """
    root = getattr(config, "compile_cache_dir", None)
    if not config.compile or not root:
        return None
    from diffusion_runtime.engine.optimize import read_cache_dit_yaml

    cache_dit = read_cache_dit_yaml(config.cache_dit_config) if config.cache_dit_config else {}
    facts = key_facts(
        model_uri=config.model.uri,
        revision=config.model.revision,
        model_path=Path(model.model_path),
        dtype=config.model.dtype,
        pipeline=model.pipeline_name,
        cache_dit=cache_dit,
        resolutions=list(config.warmup.resolutions),
        steps=config.warmup.steps,
        device=model.device,
    )
    return CompileCache(root=Path(root), key=cache_key(facts), facts=facts)
