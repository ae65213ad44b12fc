"""Build the control plane binaries from the Go module proxy into a per-user cache.

The Go tools modules live in `dev/tools/<name>/` (one module per upstream project, so each keeps
the dependency versions it was released with):

- `k8s`: requires `k8s.io/kubernetes` and replaces every staging module `k8s.io/<name>` with
  `k8s.io/<name> v0.Y.Z`. That replace list is generated from k8s.io/kubernetes's own go.mod
  (`go mod download -json`, then `go mod edit -json`) by `sync_k8s_replaces`; the build checks
  that the committed list still matches and refuses to build if it does not.
- `etcd`: a wrapper main calling `etcdmain.Main(os.Args)`.
- `kwok`, `helm`, `containerd`, `crictl`: `tool` directives pinning the upstream commands.
- `pause`: the pod sandbox binary of the real node (a few lines of Go, built static).
- `prometheus`, `prometheus-adapter`: the metrics pipeline of the local cluster (`metrics.py`):
  Prometheus v3 built with `-tags remove_all_sd,enable_kubernetes_sd` (Kubernetes discovery only)
  and without `builtinassets` (no web UI, so no npm), and prometheus-adapter v0.12.0.

Each module builds into `$XDG_CACHE_HOME/diffusion-operator/bin/modules/<name>-<version>-<hash>/`
(hash of that module's go.mod, go.sum and .go files), so changing one module rebuilds only it; the
set the cluster uses is `bin/<key>/` (hard links to the module outputs plus a manifest), where the
key names every pinned version plus a hash of all modules. A second run builds nothing. The
environment variables `DIFFUSION_OPERATOR_ASSETS` (then `KUBEBUILDER_ASSETS`) point at prebuilt
binaries instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ASSETS_ENV = ("DIFFUSION_OPERATOR_ASSETS", "KUBEBUILDER_ASSETS")
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
# the real node: kubelet and kube-proxy (same Kubernetes module), containerd, crictl, the pause binary
NODE = ("kubelet", "kube-proxy", "containerd", "containerd-shim-runc-v2", "ctr", "crictl", "pause")
# the metrics pipeline: Prometheus scraping the runtime pods, prometheus-adapter serving the HPA
METRICS = ("prometheus", "prometheus-adapter")
ALL_BINARIES = (*CONTROL_PLANE, "helm", *NODE, *METRICS)
MANIFEST = "manifest.json"

Progress = Callable[[str], None]


class BuildError(RuntimeError):
    """A binary could not be built or found; the message says which and why."""


@dataclass(frozen=True)
class ToolModule:
    name: str  # folder under dev/tools
    upstream: str  # the module whose version is pinned ("" for a module of our own)
    packages: tuple[str, ...]  # what `go build` builds
    binaries: tuple[str, ...]  # what lands in the bin dir
    cgo: bool = True  # False: CGO_ENABLED=0, a static binary (containerd's own release builds do so)
    tags: tuple[str, ...] = ()  # go build -tags


MODULES = (
    ToolModule(
        "k8s",
        "k8s.io/kubernetes",
        (
            "k8s.io/kubernetes/cmd/kube-apiserver",
            "k8s.io/kubernetes/cmd/kube-controller-manager",
            "k8s.io/kubernetes/cmd/kube-scheduler",
            "k8s.io/kubernetes/cmd/kubelet",
            "k8s.io/kubernetes/cmd/kube-proxy",
        ),
        ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy"),
    ),
    ToolModule("etcd", "go.etcd.io/etcd/server/v3", (".",), ("etcd",)),
    ToolModule("kwok", "sigs.k8s.io/kwok", ("sigs.k8s.io/kwok/cmd/kwok",), ("kwok",)),
    ToolModule("helm", "helm.sh/helm/v3", ("helm.sh/helm/v3/cmd/helm",), ("helm",)),
    ToolModule(
        "containerd",
        "github.com/containerd/containerd/v2",
        tuple(
            f"github.com/containerd/containerd/v2/cmd/{c}"
            for c in ("containerd", "containerd-shim-runc-v2", "ctr")
        ),
        ("containerd", "containerd-shim-runc-v2", "ctr"),
        cgo=False,
    ),
    ToolModule(
        "crictl", "sigs.k8s.io/cri-tools", ("sigs.k8s.io/cri-tools/cmd/crictl",), ("crictl",), cgo=False
    ),
    ToolModule("pause", "", (".",), ("pause",), cgo=False),
    ToolModule(
        "prometheus",
        "github.com/prometheus/prometheus",
        ("github.com/prometheus/prometheus/cmd/prometheus",),
        ("prometheus",),
        cgo=False,
        tags=("remove_all_sd", "enable_kubernetes_sd"),
    ),
    ToolModule(
        "prometheus-adapter",
        "sigs.k8s.io/prometheus-adapter",
        ("sigs.k8s.io/prometheus-adapter/cmd/adapter",),
        ("prometheus-adapter",),
        cgo=False,
    ),
)
VERSIONED = tuple(m.name for m in MODULES if m.upstream)


def repo_root() -> Path:
    # dev/diffusion_dev/build.py -> repo root
    return Path(__file__).resolve().parents[2]


def tools_dir() -> Path:
    override = os.environ.get("DIFFUSION_OPERATOR_TOOLS")
    path = Path(override) if override else repo_root() / "dev" / "tools"
    if not (path / "k8s" / "go.mod").is_file():
        raise BuildError(
            f"Go tools modules not found at {path} (expected k8s/go.mod); run from a source checkout "
            "or set DIFFUSION_OPERATOR_ASSETS to prebuilt binaries"
        )
    return path


CACHE_ENV = "DIFFUSION_OPERATOR_CACHE"


def cache_home() -> Path:
    """The project's cache folder: `$DIFFUSION_OPERATOR_CACHE`, else `$XDG_CACHE_HOME/diffusion-operator`.

    Only the project's own state lives here (binaries, images, node, models); the Go, pip and Go
    module caches keep their own locations, so pointing this at an empty folder replays a fresh
    machine's bootstrap without re-downloading or recompiling the world.
    """
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "diffusion-operator"


# ---------------------------------------------------------------- go.mod parsing (pure) ------


def required_version(gomod_json: dict, module: str) -> str:
    """The version `module` is required at in a `go mod edit -json` document."""
    for req in gomod_json.get("Require") or []:
        if req["Path"] == module:
            return req["Version"]
    raise BuildError(f"go.mod does not require {module}")


def staging_version(kube_version: str) -> str:
    """k8s.io/kubernetes v1.Y.Z publishes its staging modules as v0.Y.Z."""
    m = re.fullmatch(r"v1\.(\d+)\.(\d+)(-[0-9A-Za-z.-]+)?", kube_version)
    if not m:
        raise BuildError(f"not a Kubernetes release version: {kube_version!r}")
    return f"v0.{m.group(1)}.{m.group(2)}{m.group(3) or ''}"


def generated_replaces(kubernetes_gomod_json: dict, kube_version: str) -> dict[str, str]:
    """Replace directives for the wrapper module, from k8s.io/kubernetes's own go.mod.

    Every `k8s.io/<name> => ./staging/src/k8s.io/<name>` becomes `k8s.io/<name> => k8s.io/<name>
    v0.Y.Z`; a replace that already points at a module version is kept as it is.
    """
    out: dict[str, str] = {}
    version = staging_version(kube_version)
    for rep in kubernetes_gomod_json.get("Replace") or []:
        old, new = rep["Old"]["Path"], rep["New"]
        if new["Path"].startswith("./staging/src/"):
            if new["Path"] != "./staging/src/" + old:
                raise BuildError(f"unexpected staging replace {old} => {new['Path']}")
            out[old] = f"{old}@{version}"
        elif new.get("Version"):
            out[old] = f"{new['Path']}@{new['Version']}"
        else:
            raise BuildError(f"k8s.io/kubernetes has a local replace this tool cannot mirror: {old}")
    if "k8s.io/api" not in out:
        raise BuildError("k8s.io/kubernetes go.mod has no staging replaces: format changed?")
    return out


def current_replaces(gomod_json: dict) -> dict[str, str]:
    out = {}
    for rep in gomod_json.get("Replace") or []:
        new = rep["New"]
        out[rep["Old"]["Path"]] = f"{new['Path']}@{new.get('Version', '')}"
    return out


def ldflags(module: ToolModule, version: str, release_time: str) -> str:
    flags = ["-s", "-w"]
    if module.name == "k8s":
        m = re.fullmatch(r"v(\d+)\.(\d+)\..*", version)
        assert m, version
        for pkg in ("k8s.io/client-go/pkg/version", "k8s.io/component-base/version"):
            flags += [
                f"-X {pkg}.gitVersion={version}",
                f"-X {pkg}.gitMajor={m.group(1)}",
                f"-X {pkg}.gitMinor={m.group(2)}",
                f"-X {pkg}.gitTreeState=clean",
                f"-X {pkg}.buildDate={release_time}",
            ]
    elif module.name == "helm":
        flags.append(f"-X helm.sh/helm/v3/internal/version.version={version}")
    elif module.name == "containerd":
        flags.append(f"-X github.com/containerd/containerd/v2/version.Version={version}")
    elif module.name == "crictl":
        flags.append(f"-X sigs.k8s.io/cri-tools/pkg/version.Version={version}")
    elif module.name == "prometheus":
        # module v0.3YY.Z is Prometheus v3.YY.Z
        m = re.fullmatch(r"v0\.3(\d\d)\.(\d+)", version)
        release = f"3.{int(m.group(1))}.{m.group(2)}" if m else version.lstrip("v")
        flags.append(f"-X github.com/prometheus/common/version.Version={release}")
        flags.append("-X github.com/prometheus/common/version.Branch=release")
    return " ".join(flags)


# ---------------------------------------------------------------- go invocations -------------


def _go() -> str:
    go = shutil.which("go")
    if not go:
        raise BuildError("the Go toolchain (`go`) is not on PATH: install Go >= 1.26 to build the binaries")
    return go


def _go_json(args: list[str], cwd: Path | None = None) -> dict:
    proc = subprocess.run([_go(), *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"`go {' '.join(args)}` failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def read_gomod(module_dir: Path) -> dict:
    return _go_json(["mod", "edit", "-json"], cwd=module_dir)


def upstream_gomod(module: str, version: str) -> tuple[dict, dict]:
    """(`go mod download -json` info, `go mod edit -json` of its go.mod) for module@version."""
    info = _go_json(["mod", "download", "-json", f"{module}@{version}"])
    if info.get("Error"):
        raise BuildError(f"go mod download {module}@{version}: {info['Error']}")
    return info, _go_json(["mod", "edit", "-json", info["GoMod"]])


def sync_k8s_replaces(module_dir: Path, write: bool) -> tuple[str, dict[str, str]]:
    """Compare (or, with write, rewrite) the k8s wrapper's replace list with the generated one.

    Returns (kubernetes version, generated replaces). Raises if they differ and write is False.
    """
    mod = read_gomod(module_dir)
    version = required_version(mod, "k8s.io/kubernetes")
    _, upstream = upstream_gomod("k8s.io/kubernetes", version)
    want = generated_replaces(upstream, version)
    have = current_replaces(mod)
    if have == want:
        return version, want
    if not write:
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        changed = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        raise BuildError(
            f"{module_dir / 'go.mod'}: replace list differs from k8s.io/kubernetes@{version}'s go.mod "
            f"(missing {missing}, extra {extra}, changed {changed}); "
            "run `diffusion-dev build --sync-modules`"
        )
    args = [f"-dropreplace={old}" for old in have]
    args += [f"-replace={old}={new}" for old, new in sorted(want.items())]
    subprocess.run([_go(), "mod", "edit", *args], cwd=module_dir, check=True)
    subprocess.run([_go(), "mod", "tidy"], cwd=module_dir, check=True)
    return version, want


# ---------------------------------------------------------------- cache key / lookup ----------


def module_versions(tools: Path) -> dict[str, str]:
    out = {}
    for module in MODULES:
        if not module.upstream:
            continue
        text = (tools / module.name / "go.mod").read_text()
        m = re.search(rf"^\s*(?:require\s+)?{re.escape(module.upstream)}\s+(v\S+)", text, re.M)
        if not m:
            raise BuildError(f"{tools / module.name / 'go.mod'} does not require {module.upstream}")
        out[module.name] = m.group(1)
    return out


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".mod", ".sum", ".go"):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:10]


def cache_key(tools: Path) -> str:
    """Pinned versions plus a hash of the tools modules; finding cached binaries needs no Go."""
    versions = module_versions(tools)
    parts = [f"{name}-{versions[name]}" for name in ("k8s", "etcd", "kwok", "helm", "containerd")]
    return "_".join(parts) + "_" + _tree_hash(tools)


def module_key(tools: Path, module: ToolModule) -> str:
    """`<name>-<version>-<hash of the module's folder>`: the per-module build output folder."""
    version = module_versions(tools).get(module.name, "local")
    return f"{module.name}-{version}-{_tree_hash(tools / module.name)}"


def go_version() -> str:
    return subprocess.run(
        [_go(), "env", "GOVERSION"], capture_output=True, text=True, check=True
    ).stdout.strip()


def assets_override(required: Iterable[str] = CONTROL_PLANE) -> Path | None:
    """Prebuilt binaries named by the environment, or None.

    DIFFUSION_OPERATOR_ASSETS must hold every required binary (else a clear error).
    KUBEBUILDER_ASSETS is used when it holds them all; envtest's usual assets (etcd,
    kube-apiserver, kubectl only) are not enough, and then the cache/build is used instead.
    """
    required = tuple(required)
    for var in ASSETS_ENV:
        value = os.environ.get(var)
        if value:
            path = Path(value).expanduser()
            missing = [b for b in required if not os.access(path / b, os.X_OK)]
            if not missing:
                return path
            if var == "DIFFUSION_OPERATOR_ASSETS":
                raise BuildError(f"{var}={path} lacks executable(s) {', '.join(missing)}")
            print(f"[build] ignoring {var}={path}: it lacks {', '.join(missing)}", file=sys.stderr)
    return None


def bin_root() -> Path:
    return cache_home() / "bin"


def cached_bin_dir() -> Path:
    return bin_root() / cache_key(tools_dir())


def is_complete(bin_dir: Path) -> bool:
    return (bin_dir / MANIFEST).is_file() and all(os.access(bin_dir / b, os.X_OK) for b in ALL_BINARIES)


# ---------------------------------------------------------------- build ----------------------


def _stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _build_one(module: ToolModule, tools: Path, progress: Progress) -> float:
    """Build one module into its own cached folder (if not there yet); returns seconds spent."""
    out = bin_root() / "modules" / module_key(tools, module)
    if all(os.access(out / b, os.X_OK) for b in module.binaries):
        return 0.0
    module_dir = tools / module.name
    if module.upstream:
        version = required_version(read_gomod(module_dir), module.upstream)
        info, _ = upstream_gomod(module.upstream, version)
        release_time = json.loads(Path(info["Info"]).read_text()).get("Time", "1970-01-01T00:00:00Z")
    else:
        version, release_time = "local", "1970-01-01T00:00:00Z"
    staging = out.with_name(out.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    cmd = [_go(), "build", "-trimpath", "-ldflags", ldflags(module, version, release_time)]
    if module.tags:
        cmd += ["-tags", ",".join(module.tags)]
    cmd.append("-o")
    if len(module.packages) == 1 and len(module.binaries) == 1:  # one command, named as we want it
        cmd += [str(staging / module.binaries[0]), module.packages[0]]
    else:
        cmd += [str(staging) + os.sep, *module.packages]
    env = dict(os.environ)
    if not module.cgo:
        env["CGO_ENABLED"] = "0"
    log = staging.with_name(staging.name + ".log")
    start = time.monotonic()
    progress(f"[build] {module.name} {version}: {', '.join(module.binaries)} ...")
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(30):
            progress(f"[build] {module.name}: still compiling, {time.monotonic() - start:.0f}s elapsed")

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        with open(log, "w") as fh:
            rc = subprocess.run(cmd, cwd=module_dir, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    finally:
        done.set()
    elapsed = time.monotonic() - start
    if rc != 0:
        tail = log.read_text()[-4000:]
        raise BuildError(
            f"go build of {module.name} ({', '.join(module.binaries)}) failed (rc={rc}):\n{tail}\n"
            f"(full log: {log})"
        )
    log.unlink()
    (staging / "build_seconds").write_text(f"{elapsed:.1f}\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    progress(f"[build] {module.name}: done in {elapsed:.0f}s")
    return elapsed


def build(progress: Progress = _stderr_progress, jobs: int = 2) -> tuple[Path, dict]:
    """Build every binary into the cache (if not there yet). Returns (bin dir, manifest)."""
    tools = tools_dir()
    bin_dir = bin_root() / cache_key(tools)
    if is_complete(bin_dir):
        return bin_dir, json.loads((bin_dir / MANIFEST).read_text())
    bin_dir.parent.mkdir(parents=True, exist_ok=True)
    # one build at a time: a second process (another pytest session) waits, then reuses it
    with open(bin_root() / ".build.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("[build] another process is building the binaries; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if is_complete(bin_dir):
            return bin_dir, json.loads((bin_dir / MANIFEST).read_text())
        return _build_locked(tools, bin_dir, progress, jobs)


def _build_locked(tools: Path, bin_dir: Path, progress: Progress, jobs: int) -> tuple[Path, dict]:
    sync_k8s_replaces(tools / "k8s", write=False)
    start = time.monotonic()
    progress(f"[build] binaries for {bin_dir} (modules not cached yet are built; cold builds take a while)")
    timings: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {m.name: pool.submit(_build_one, m, tools, progress) for m in MODULES}
        errors = []
        for name, fut in futures.items():
            try:
                timings[name] = round(fut.result(), 1)
            except BuildError as exc:
                errors.append(str(exc))
    if errors:
        raise BuildError("\n\n".join(errors))
    staging = bin_dir.with_name(bin_dir.name + f".partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    module_seconds = {}
    for module in MODULES:
        out = bin_root() / "modules" / module_key(tools, module)
        for name in module.binaries:
            os.link(out / name, staging / name)
        with contextlib.suppress(OSError, ValueError):
            module_seconds[module.name] = float((out / "build_seconds").read_text())
    total = round(time.monotonic() - start, 1)
    manifest = {
        "versions": module_versions(tools),
        "go": go_version(),
        "build_seconds": total,
        "module_seconds": module_seconds,  # when each module was built cold (cached since)
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if bin_dir.exists():
        shutil.rmtree(bin_dir)
    staging.rename(bin_dir)
    progress(f"[build] all binaries ready in {total:.0f}s")
    return bin_dir, manifest


def ensure_binaries(progress: Progress = _stderr_progress, required: Iterable[str] = CONTROL_PLANE) -> Path:
    """The directory holding the control plane binaries: prebuilt (env), cached, or built now."""
    override = assets_override(required)
    if override is not None:
        return override
    bin_dir, _ = build(progress)
    return bin_dir


def binary_version(path: Path) -> str:
    """First line of `<binary> --version` (or `version` for kwok/helm), for reports."""
    args = ["version", "--short"] if path.name == "helm" else ["--version"]
    proc = subprocess.run([str(path), *args], capture_output=True, text=True, timeout=30)
    return (proc.stdout or proc.stderr).strip().splitlines()[0] if (proc.stdout or proc.stderr) else ""
