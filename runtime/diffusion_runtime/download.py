"""`diffusion-runtime download`: fill a model cache folder from the Hugging Face Hub, once.

What it does (the operator's download Job runs exactly this):
1. resolve the revision to a commit (`HfApi.repo_info`), so every file comes from one commit even if
   a branch moves meanwhile; list the commit's files with their sizes and checksums;
2. fetch `model_index.json` and select what the pipeline needs (`select_files`): the component
   folders it names, safetensors only where a folder has them, no variant files (`fp16`, ...)
   unless `--variant` asks for one; nothing else (README, sample images, other formats);
3. `huggingface_hub.snapshot_download(revision=<commit>, allow_patterns=<those files>,
   local_dir=DEST)`: files already complete in DEST are not fetched again (the client's local-dir
   metadata), a connection dropped mid-file is resumed with an HTTP Range request by the client;
4. verify every selected file (size, and sha256 for LFS files / the git blob id for the others) and
   only then write the completion marker `DEST/.download-complete.json` atomically (temporary file,
   fsync, rename). A folder without it is never served (`check_complete`, used by the runtime).

The token comes from the environment (HF_TOKEN; the operator fills it from a Secret by reference).
Progress goes to stdout as one JSON object per line (`progress_line`/`parse_progress_line`, also
imported by the operator), and the final line is written to `--termination-log` too (a pod's
termination message). Nothing here imports torch or, at import time, huggingface_hub: the operator
imports the line format and marker name from this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusion_runtime.contract.lines import (
    PHASES as PHASES,
)
from diffusion_runtime.contract.lines import (
    PROGRESS_KEY as PROGRESS_KEY,
)
from diffusion_runtime.contract.lines import last_progress as last_progress
from diffusion_runtime.contract.lines import local_folder as local_folder
from diffusion_runtime.contract.lines import parse_progress_line as parse_progress_line
from diffusion_runtime.contract.lines import progress_line as progress_line

COMPLETE_MARKER = ".download-complete.json"
# huggingface_hub's local_dir bookkeeping folder: its presence marks DEST as a download target
HF_LOCAL_DIR_METADATA = ".cache/huggingface"

WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".ckpt",
    ".pt",
    ".pth",
    ".msgpack",
    ".h5",
    ".onnx",
    ".gguf",
    ".pb",
    ".onnx_data",
)
_WEIGHT_RE = re.compile(
    r"^(?P<stem>[^.]+?)(?:\.(?P<variant>[A-Za-z0-9_]+))?(?:-\d{5}-of-\d{5})?(?P<ext>\.[A-Za-z0-9_]+)$"
)
_INDEX_RE = re.compile(r"^(?P<stem>[^.]+)(?P<ext>\.[a-z]+)\.index(?:\.(?P<variant>[A-Za-z0-9_]+))?\.json$")


class DownloadError(RuntimeError):
    """The download cannot complete; the message is one line."""


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    blob_id: str | None = None  # git blob sha1
    sha256: str | None = None  # LFS files


# ---------------------------------------------------------------- progress lines (operator contract)


# ---------------------------------------------------------------- file selection (pure)


def pipeline_components(model_index: Mapping[str, Any]) -> list[str]:
    """The component folders a diffusers model_index.json names: entries [library, class] not null."""
    out = []
    for key, value in model_index.items():
        if key.startswith("_"):
            continue
        if isinstance(value, list) and len(value) == 2 and value[0] is not None and value[1] is not None:
            out.append(key)
    return sorted(out)


def _weight_info(name: str) -> tuple[str, str | None, str] | None:
    """(stem, variant, format) of a weight or weight-index file name, else None."""
    m = _INDEX_RE.match(name)
    if m:
        return m.group("stem"), m.group("variant"), m.group("ext")
    if not name.endswith(WEIGHT_SUFFIXES):
        return None
    m = _WEIGHT_RE.match(name)
    if m is None:
        return name, None, Path(name).suffix
    return m.group("stem"), m.group("variant"), m.group("ext")


def select_files(
    files: Iterable[str], model_index: Mapping[str, Any], variant: str | None = None
) -> list[str]:
    """The files a diffusers pipeline loads: model_index.json plus, per component folder named by it,
    its configs/tokenizer files and one weight format (safetensors when the folder has it, else the
    others), of the requested variant (no variant: the plain files)."""
    components = set(pipeline_components(model_index))
    by_folder: dict[str, list[str]] = {}
    for path in files:
        folder, _, name = path.partition("/")
        if folder in components and name:
            by_folder.setdefault(folder, []).append(path)
    selected = ["model_index.json"]
    for folder in sorted(by_folder):
        paths = by_folder[folder]
        weights = {p: info for p in paths if (info := _weight_info(p.rsplit("/", 1)[-1])) is not None}
        wanted = {p: i for p, i in weights.items() if i[1] == variant}
        if variant is not None and not wanted:
            wanted = {p: i for p, i in weights.items() if i[1] is None}  # diffusers falls back too
        formats = {i[2] for i in wanted.values()}
        fmt = ".safetensors" if ".safetensors" in formats else (sorted(formats)[0] if formats else None)
        for p in sorted(paths):
            if p in weights:
                if p in wanted and wanted[p][2] == fmt:
                    selected.append(p)
            elif not p.rsplit("/", 1)[-1].startswith("."):
                selected.append(p)  # configs, tokenizer and scheduler files
    return selected


# ---------------------------------------------------------------- completion marker


def marker_path(dest: str | Path) -> Path:
    return Path(dest) / COMPLETE_MARKER


def read_marker(dest: str | Path) -> dict[str, Any] | None:
    try:
        data = json.loads(marker_path(dest).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_complete(folder: str | Path) -> str | None:
    """None when `folder` may be served; else why not. A folder that was never a download target (no
    huggingface_hub local-dir metadata) is served as it is; a download target only with its marker."""
    folder = Path(folder)
    if not (folder / HF_LOCAL_DIR_METADATA).is_dir() and not marker_path(folder).exists():
        return None
    marker = read_marker(folder)
    if marker is None:
        return f"{folder} is an incomplete model download (no {COMPLETE_MARKER}); it is not served"
    missing = [f for f, size in marker.get("files", {}).items() if not _size_is(folder / f, size)]
    if missing:
        return (
            f"{folder}: {len(missing)} file(s) of the completed download changed or vanished ({missing[0]})"
        )
    return None


def _size_is(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def verify(dest: Path, remote: Mapping[str, RemoteFile]) -> list[str]:
    """Problems with the downloaded files (empty: every file is whole and matches the Hub's checksum)."""
    problems = []
    for path, f in remote.items():
        local = dest / path
        try:
            size = local.stat().st_size
        except OSError:
            problems.append(f"{path}: missing")
            continue
        if size != f.size:
            problems.append(f"{path}: {size} bytes, the Hub says {f.size}")
            continue
        if f.sha256:
            digest = _file_digest(local, hashlib.sha256())
            if digest != f.sha256:
                problems.append(f"{path}: sha256 {digest[:12]}... differs from the Hub's {f.sha256[:12]}...")
        elif f.blob_id:
            h = hashlib.sha1(b"blob %d\0" % size)  # noqa: S324 - git's blob id, not security
            if _file_digest(local, h) != f.blob_id:
                problems.append(f"{path}: git blob id differs from the Hub's")
    return problems


def _file_digest(path: Path, h: Any) -> str:
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return str(h.hexdigest())


# ---------------------------------------------------------------- the download


def _bytes_on_disk(dest: Path, remote: Mapping[str, RemoteFile]) -> tuple[int, int]:
    """(bytes, whole files) of the selected files present in DEST, plus partial downloads in flight."""
    done = files = 0
    for path, f in remote.items():
        if _size_is(dest / path, f.size):
            done += f.size
            files += 1
    partial = dest / HF_LOCAL_DIR_METADATA / "download"
    if partial.is_dir():
        for p in partial.rglob("*.incomplete"):
            try:
                done += p.stat().st_size
            except OSError:
                pass
    return done, files


class _Reporter:
    """Prints a progress line every `interval` seconds from a thread, reading the bytes on disk."""

    def __init__(
        self, dest: Path, remote: Mapping[str, RemoteFile], emit: Callable[[str], None], interval: float
    ) -> None:
        self.dest, self.remote, self.emit, self.interval = dest, remote, emit, interval
        self.total = sum(f.size for f in remote.values())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="download-progress", daemon=True)

    def line(self, phase: str = "Downloading", **extra: Any) -> str:
        done, files = _bytes_on_disk(self.dest, self.remote)
        return progress_line(
            phase,
            bytesDone=min(done, self.total),
            bytesTotal=self.total,
            filesDone=files,
            filesTotal=len(self.remote),
            **extra,
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.emit(self.line())

    def __enter__(self) -> _Reporter:
        self.emit(self.line())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.emit(self.line())  # where it stands, also when the download failed


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def repo_id_of(uri: str) -> str:
    repo_id = uri[len("hf://") :] if uri.startswith("hf://") else uri
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise DownloadError(f"--model {uri}: not a Hugging Face id (hf://org/name or org/name)")
    return repo_id


def download(
    uri: str,
    dest: str | Path,
    revision: str | None = None,
    variant: str | None = None,
    interval: float = 2.0,
    emit: Callable[[str], None] | None = None,
    max_workers: int = 8,
    files: list[str] | None = None,
) -> dict[str, Any]:
    """Fill DEST with the pipeline's files at `revision`; return the completion record (the marker)
    with `cached`: True when nothing was fetched. `files`: exactly these files of the repository
    instead of a pipeline's (a LoRA adapter's weight file), verified and marked the same way.

    Already complete for this repo and revision (the marker says so and the files are there): nothing
    is requested from the Hub at all."""
    import logging

    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import disable_progress_bars

    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per request otherwise
    out = emit or (lambda line: print(line, flush=True))
    repo_id = repo_id_of(uri)
    dest = Path(dest)
    requested = revision or "main"
    marker = read_marker(dest)
    if (
        marker is not None
        and marker.get("repo") == repo_id
        and requested in (marker.get("revision"), marker.get("commit"))
        and marker.get("variant") == variant
        and set(files or ()) <= set(marker.get("files", {}))
        and check_complete(dest) is None
    ):
        out(progress_line("Complete", bytesDone=marker["bytes"], bytesTotal=marker["bytes"],
                          filesDone=len(marker["files"]), filesTotal=len(marker["files"]),
                          commit=marker["commit"], cached=True))  # fmt: skip
        return {**marker, "cached": True}
    if marker is not None:
        marker_path(dest).unlink()  # another revision or variant: not complete any more
    dest.mkdir(parents=True, exist_ok=True)
    disable_progress_bars()  # the JSON lines are the progress; tqdm bars would garble a Job's log
    token = os.environ.get("HF_TOKEN") or None
    t0 = time.monotonic()
    out(progress_line("Resolving", repo=repo_id, revision=requested))
    api = HfApi(token=token)
    remote: dict[str, RemoteFile] = {}
    try:
        commit = api.repo_info(repo_id, revision=requested).sha
        if not commit:
            raise DownloadError(f"{repo_id}@{requested}: the Hub returned no commit")
        listing = {
            f.path: RemoteFile(f.path, int(f.size), f.blob_id, f.lfs.sha256 if f.lfs is not None else None)
            for f in api.list_repo_tree(repo_id, revision=commit, recursive=True)
            if isinstance(f, RepoFile)
        }
        if files is not None:
            absent = [f for f in files if f not in listing]
            if absent:
                raise DownloadError(f"{repo_id}@{requested}: no file {absent[0]} in the repository")
            wanted = list(files)
        else:
            if "model_index.json" not in listing:
                raise DownloadError(f"{repo_id}@{requested}: no model_index.json (not a diffusers pipeline)")
            hf_hub_download(repo_id, "model_index.json", revision=commit, local_dir=dest, token=token)
            model_index = json.loads((dest / "model_index.json").read_text())
            wanted = select_files(listing, model_index, variant)
        remote = {p: listing[p] for p in wanted}
        with _Reporter(dest, remote, out, interval) as reporter:
            snapshot_download(
                repo_id, revision=commit, local_dir=dest, allow_patterns=wanted, token=token,
                max_workers=max_workers,
            )  # fmt: skip
        out(reporter.line("Verifying"))
        problems = verify(dest, remote)
        if problems:
            raise DownloadError(f"verification failed: {'; '.join(problems[:3])}")
    except DownloadError:
        raise
    except Exception as e:  # noqa: BLE001 - every hub/network/disk failure becomes one line
        missing = [p for p, f in remote.items() if not _size_is(dest / p, f.size)]
        where = f"; {len(missing)} file(s) not complete: {', '.join(missing[:3])}" if missing else ""
        raise DownloadError(f"{repo_id}@{requested}: {_one_line(e)}{where}") from e
    total = sum(f.size for f in remote.values())
    record = {
        "repo": repo_id,
        "revision": requested,
        "commit": commit,
        "variant": variant,
        "bytes": total,
        "files": {p: f.size for p, f in remote.items()},
        "seconds": round(time.monotonic() - t0, 3),
        "completedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_atomic(marker_path(dest), json.dumps(record, indent=1, sort_keys=True) + "\n")
    out(progress_line("Complete", bytesDone=total, bytesTotal=total, filesDone=len(remote),
                      filesTotal=len(remote), commit=commit, seconds=record["seconds"], cached=False))  # fmt: skip
    return {**record, "cached": False}


def run(args: Any) -> int:
    """The CLI entry (`diffusion-runtime download`): exit 0 when DEST is complete, 1 when not."""
    lines: list[str] = []

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    try:
        records = [download(args.model, args.dest, args.revision, args.variant, args.progress_interval, emit)]
        for uri, revision, weight, dest in args.adapter or ():  # LoRA adapters: one weight file each
            records.append(download(uri, dest, revision, None, args.progress_interval, emit, files=[weight]))
        if len(records) > 1:  # the last line (the Job's status) sums the model and its adapters
            total, count = sum(r["bytes"] for r in records), sum(len(r["files"]) for r in records)
            emit(progress_line("Complete", bytesDone=total, bytesTotal=total, filesDone=count, filesTotal=count,
                               commit=records[0]["commit"], adapters=len(records) - 1,
                               cached=all(r["cached"] for r in records)))  # fmt: skip
        code = 0
    except DownloadError as e:
        done = last_progress("\n".join(lines)) or {}
        emit(progress_line("Failed", error=str(e), bytesDone=done.get("bytesDone", 0),
                           bytesTotal=done.get("bytesTotal", 0)))  # fmt: skip
        print(f"diffusion-runtime: download failed: {e}", file=sys.stderr)
        code = 1
    if args.termination_log:
        try:
            Path(args.termination_log).write_text(lines[-1] + "\n" if lines else "")
        except OSError as e:
            print(f"diffusion-runtime: cannot write {args.termination_log}: {e}", file=sys.stderr)
    return code
