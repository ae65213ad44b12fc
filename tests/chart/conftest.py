"""Fixtures for the chart tests: the helm and promtool binaries and a `helm template` renderer.

helm comes from the control-plane build (`diffusion-dev build`, or HELM=/path/to/helm);
promtool from scripts/bootstrap.sh (Debian's prometheus package, extracted into the user cache),
PROMTOOL=/path, or PATH. A missing binary fails the tests that need it, loudly: run
scripts/bootstrap.sh.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from chartlib import CHART, run_helm


def _executable(path: str | Path | None) -> Path | None:
    if path and os.access(path, os.X_OK) and Path(path).is_file():
        return Path(path)
    return None


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    found = _executable(os.environ.get("HELM"))
    if found is None:
        from diffusion_dev.build import ensure_binaries

        found = _executable(ensure_binaries(required=("helm",)) / "helm")
    if found is None:
        pytest.fail("helm not found: run scripts/bootstrap.sh (diffusion-dev build) or set HELM")
    return found


@pytest.fixture(scope="session")
def promtool_bin() -> Path:
    from diffusion_dev.build import cache_home

    cache = cache_home()
    for candidate in (os.environ.get("PROMTOOL"), shutil.which("promtool"), cache / "promtool" / "promtool"):
        found = _executable(candidate)
        if found is not None:
            return found
    pytest.fail(
        "promtool not found: run scripts/bootstrap.sh (extracts it from Debian's prometheus) or set PROMTOOL"
    )


Renderer = Callable[..., list[dict]]


@pytest.fixture(scope="session")
def render(helm_bin: Path) -> Renderer:
    """`render(*set_args, namespace=...)` -> the parsed objects `helm template` prints."""

    def _render(*set_args: str, namespace: str = "diffusion-system", release: str = "dop") -> list[dict]:
        args = ["template", release, str(CHART), "--namespace", namespace]
        for s in set_args:
            args += ["--set", s]
        out = run_helm(helm_bin, *args).stdout
        return [doc for doc in yaml.safe_load_all(out) if doc]

    return _render
