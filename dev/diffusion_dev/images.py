"""Images from the repository's Dockerfile, built with buildah and imported into the real node.

No image registry is reachable here, so:
- the base image is a Debian bookworm root filesystem made with `mmdebstrap --variant=minbase`
  (plus python3, python3-venv, ca-certificates, passwd), committed into buildah's storage once;
- `buildah bud --isolation chroot --layers` builds a Dockerfile target on it, with the build
  argument `PYTHON_IMAGE` pointing at that base (real users keep the Dockerfile's public default);
- every image is tagged with a hash of what goes into it (Dockerfile, .dockerignore, the files the
  Dockerfile copies, target, build arguments, base), so an unchanged image is neither rebuilt nor
  re-imported;
- it is exported as a docker-archive and imported into containerd's `k8s.io` namespace, where the
  kubelet finds it (pods use `imagePullPolicy: IfNotPresent` or `Never`).

buildah's storage and its cache mounts (pip's wheel cache for the `RUN --mount=type=cache` in the
Dockerfile) live in the user cache (`~/.cache/diffusion-operator/buildah`); the pip cache mount is
the host's pip cache when it exists, so the runtime image does not download torch again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import hosttools
from .build import cache_home, repo_root
from .real_node import NodeClient

TARGETS = ("operator", "runtime", "queue")  # queue: Debian's redis-server (the chart's queue.enabled)
SERVING_TARGETS = ("operator", "runtime")  # what the chart's defaults run (no queue server)
REGISTRY = "localhost/diffusion-dev"
DEBIAN_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")
PIP_CACHE_ID = "pip"  # the Dockerfile's `--mount=type=cache,id=pip`

Progress = Callable[[str], None]


class ImageError(RuntimeError):
    """An image could not be built or imported; the message names the step and its output."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def buildah_home() -> Path:
    return cache_home() / "buildah"


def buildah_tmp() -> Path:
    """buildah's TMPDIR (and the parent of every temporary folder here), created on first use."""
    tmp = buildah_home() / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def _buildah_env() -> dict[str, str]:
    env = dict(os.environ)
    # buildah keeps `RUN --mount=type=cache` folders in $TMPDIR/buildah-cache-<uid>/<id>
    env["TMPDIR"] = str(buildah_tmp())
    env.setdefault("BUILDAH_ISOLATION", "chroot")
    return env


def _seed_pip_cache() -> None:
    """Make the Dockerfile's pip cache mount the host's pip cache (when the host has one).

    buildah keeps `RUN --mount=type=cache` folders in `$TMPDIR/buildah-cache/<id>` (Debian
    bookworm's 1.28) or `$TMPDIR/buildah-cache-<uid>/<id>` (later releases): both are seeded.
    """
    host = Path(os.environ.get("PIP_CACHE_DIR") or Path.home() / ".cache" / "pip")
    host.mkdir(parents=True, exist_ok=True)
    for parent in ("buildah-cache", f"buildah-cache-{os.getuid()}"):
        cache_parent = buildah_tmp() / parent
        cache_parent.mkdir(parents=True, exist_ok=True)
        mount = cache_parent / PIP_CACHE_ID
        if not (mount.exists() or mount.is_symlink()):
            mount.symlink_to(host)


def host_pip_volumes(work: Path) -> list[str]:
    """`--volume` arguments that give the build's RUN steps the host's pip settings (not the image).

    Behind a TLS-inspecting proxy the host trusts an extra CA (PIP_CERT / REQUESTS_CA_BUNDLE /
    SSL_CERT_FILE) and may use another index (PIP_INDEX_URL): a pip.conf with those, plus the CA
    bundle, are mounted into each RUN step only; nothing of it is committed into a layer.
    """
    lines = ["[global]"]
    volumes: list[str] = []
    cert = next(
        (os.environ[v] for v in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE") if os.environ.get(v)), ""
    )
    if cert and Path(cert).is_file():
        volumes += ["--volume", f"{Path(cert).resolve()}:/etc/diffusion-dev/host-ca.crt:ro"]
        lines.append("cert = /etc/diffusion-dev/host-ca.crt")
    for key in ("INDEX_URL", "EXTRA_INDEX_URL", "TRUSTED_HOST", "DEFAULT_TIMEOUT"):
        if os.environ.get(f"PIP_{key}"):
            lines.append(f"{key.lower().replace('_', '-')} = {os.environ[f'PIP_{key}']}")
    if len(lines) == 1:
        return []
    conf = work / "pip.conf"
    conf.write_text("\n".join(lines) + "\n")
    return [*volumes, "--volume", f"{conf}:/etc/pip.conf:ro"]


def buildah(*args: str, timeout: float = 3600, log: Path | None = None) -> subprocess.CompletedProcess:
    try:
        exe = hosttools.path_of("buildah")
    except hosttools.ToolMissing as exc:
        raise ImageError(str(exc)) from None
    home = buildah_home()
    cmd = [exe, "--root", str(home / "storage"), "--runroot", str(home / "run"), "--storage-driver", "overlay",
           *args]  # fmt: skip
    if log is not None:
        with open(log, "a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                                  env=_buildah_env())  # fmt: skip
        if proc.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            raise ImageError(f"buildah {args[0]} failed (rc={proc.returncode}):\n{tail}\n(full log: {log})")
        return proc
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_buildah_env())
    if proc.returncode != 0:
        raise ImageError(f"buildah {' '.join(args[:2])} failed: {proc.stderr.strip()[-3000:]}")
    return proc


def image_exists(ref: str) -> bool:
    exe = shutil.which("buildah")
    if not exe:
        return False
    home = buildah_home()
    proc = subprocess.run(
        [exe, "--root", str(home / "storage"), "--runroot", str(home / "run"), "--storage-driver", "overlay",
         "inspect", "--type", "image", ref],
        capture_output=True, text=True, env=_buildah_env(),
    )  # fmt: skip
    return proc.returncode == 0


# ---------------------------------------------------------------- content hash (pure) --------


def dockerignore_patterns(root: Path) -> list[str]:
    path = root / ".dockerignore"
    if not path.is_file():
        return []
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics: patterns anchored at the context root, `**` any depth, a
    pattern that matches a folder matches everything in it, the last matching pattern wins."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex((pattern[1:] if negate else pattern).strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            verdict = not negate
    return verdict


def context_files(root: Path) -> list[str]:
    """Files buildah sends as the build context (relative paths, sorted)."""
    patterns = dockerignore_patterns(root)
    out = []
    for dirpath, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirs[:] = sorted(d for d in dirs if d not in (".git", ".venv"))
        for name in files:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if not ignored(rel, patterns):
                out.append(rel)
    return sorted(out)


def content_tag(root: Path, target: str, build_args: dict[str, str]) -> str:
    h = hashlib.sha256()
    for rel in ("Dockerfile", ".dockerignore", *context_files(root)):
        path = root / rel
        if path.is_file():
            h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(json.dumps({"target": target, "args": build_args}, sort_keys=True).encode())
    return h.hexdigest()[:12]


# ---------------------------------------------------------------- base image -----------------


def base_ref() -> str:
    recipe = json.dumps({"suite": DEBIAN_SUITE, "variant": "minbase", "include": BASE_PACKAGES})
    return f"{REGISTRY}/debian-python:{DEBIAN_SUITE}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"


def ensure_base(progress: Progress = _stderr) -> tuple[str, float]:
    """The local Debian base image (built once with mmdebstrap). Returns (ref, seconds spent)."""
    ref = base_ref()
    if image_exists(ref):
        return ref, 0.0
    try:
        hosttools.require("images")
    except hosttools.ToolMissing as exc:
        raise ImageError(str(exc)) from None
    t = time.monotonic()
    progress(
        f"[images] base {ref}: mmdebstrap --variant=minbase {DEBIAN_SUITE} (+ {', '.join(BASE_PACKAGES)})"
    )
    with tempfile.TemporaryDirectory(dir=buildah_tmp()) as tmp:
        tar = Path(tmp) / "rootfs.tar"
        proc = subprocess.run(
            ["mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "--quiet",
             "--aptopt=Acquire::Retries \"3\"", DEBIAN_SUITE, str(tar)],
            capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        if proc.returncode != 0:
            raise ImageError(f"mmdebstrap failed: {proc.stderr.strip()[-3000:]}")
        ctr = buildah("from", "scratch").stdout.strip()
        try:
            buildah("add", ctr, str(tar), "/")
            buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "--env", "LANG=C.UTF-8", "--cmd", "python3", "--os", "linux", "--arch", "amd64", ctr)  # fmt: skip
            buildah("commit", "--rm", ctr, ref)
        except ImageError:
            buildah("rm", ctr, timeout=120)
            raise
    elapsed = time.monotonic() - t
    progress(f"[images] base built in {elapsed:.0f}s")
    return ref, elapsed


# ---------------------------------------------------------------- targets --------------------


@dataclass
class Image:
    target: str
    ref: str
    built_seconds: float = 0.0  # 0: cached
    imported_seconds: float = 0.0  # 0: already in the node
    size_bytes: int = 0


def image_size(ref: str) -> int:
    """The image's size as buildah reports it (uncompressed layers; decimal units)."""
    for item in json.loads(buildah("images", "--json").stdout or "[]"):
        if ref in (item.get("names") or []):
            number, _, unit = str(item.get("size", "0 B")).partition(" ")
            scale = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}.get(unit, 1)
            return int(float(number) * scale)
    return 0


def build(target: str, progress: Progress = _stderr, root: Path | None = None) -> Image:
    """Build `target` from the Dockerfile (if no image with its content hash exists yet)."""
    if target not in TARGETS:
        raise ImageError(f"unknown image target {target!r}: choose from {', '.join(TARGETS)}")
    root = root or repo_root()
    base, _ = ensure_base(progress)
    args = {"PYTHON_IMAGE": base}
    ref = f"{REGISTRY}/{target}:{content_tag(root, target, args)}"
    if image_exists(ref):
        return Image(target, ref, size_bytes=image_size(ref))
    _seed_pip_cache()
    logs = buildah_home() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{target}.log"
    log.write_text("")
    t = time.monotonic()
    progress(f"[images] {target}: buildah bud --target {target} (log {log})")
    build_args = [a for k, v in args.items() for a in ("--build-arg", f"{k}={v}")]
    volumes = host_pip_volumes(buildah_home())
    try:
        buildah("bud", "--isolation", "chroot", "--layers", "--force-rm", "--pull=false", "--network", "host",
                *volumes, "-f", str(root / "Dockerfile"), "--target", target, *build_args, "-t", ref, str(root),
                log=log, timeout=5400)  # fmt: skip
    except ImageError:
        buildah("rm", "--all", timeout=300)  # a failed step can leave its working container mounted
        raise
    prune(target, keep=ref)
    elapsed = time.monotonic() - t
    size = image_size(ref)
    progress(f"[images] {target}: built {ref} in {elapsed:.0f}s ({size / 1e9:.2f} GB)")
    return Image(target, ref, built_seconds=round(elapsed, 1), size_bytes=size)


def prune(target: str, keep: str) -> None:
    """Drop older builds of `target` from buildah's storage (each runtime build is ~6 GB)."""
    stale = [
        name
        for item in json.loads(buildah("images", "--json").stdout or "[]")
        for name in item.get("names") or []
        if name.startswith(f"{REGISTRY}/{target}:") and name != keep
    ]
    if stale:
        buildah("rmi", *stale, timeout=600)
    buildah("rmi", "--prune", timeout=600)


def import_into(
    node: NodeClient, image: Image, progress: Progress = _stderr, aliases: tuple[str, ...] = ()
) -> Image:
    """Export `image` from buildah and import it into the node's containerd (if not there yet).

    Older builds of the target (other tags of its repository, and `aliases`: the names pods pull,
    which point at an older build until retagged) are dropped first, by name (`ctr images rm`, not
    CRI's remove-by-id: a rebuild whose layers all came from buildah's cache, as the queue image when
    only Python changed, has the old build's id), and synchronously: containerd frees an old runtime
    image's ~13 GB (content + unpacked snapshot) before the new one is written, not after."""
    if image.ref in node.images():
        return image
    repo = image.ref.rsplit(":", 1)[0] + ":"
    present = node.images()
    stale = [name for name in present if (name.startswith(repo) and name != image.ref) or name in aliases]
    if stale:
        node.ctr("images", "rm", "--sync", *stale, check=False)
    t = time.monotonic()
    with tempfile.TemporaryDirectory(dir=buildah_tmp()) as tmp:
        archive = Path(tmp) / "image.tar"
        buildah("push", "--quiet", image.ref, f"docker-archive:{archive}:{image.ref}", timeout=3600)
        node.import_archive(archive)
    image.imported_seconds = round(time.monotonic() - t, 1)
    progress(f"[images] {image.target}: imported into the node in {image.imported_seconds:.0f}s")
    return image


def ensure(
    targets: tuple[str, ...] = TARGETS,
    node: NodeClient | None = None,
    progress: Progress = _stderr,
    aliases: dict[str, str] | None = None,
) -> dict[str, Image]:
    """Build (cached by content hash) and, with a node, import every target (`aliases`: target ->
    the name its pods pull, dropped with the older build it points at; see `import_into`)."""
    out = {}
    for target in targets:
        image = build(target, progress)
        if node is not None:
            alias = (aliases or {}).get(target)
            import_into(node, image, progress, aliases=(alias,) if alias else ())
        out[target] = image
    return out
