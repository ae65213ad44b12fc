"""Helpers shared by the chart tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "diffusion-operator"


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    # HOME-independent: helm must not read or write a user's repositories or cache
    env = dict(
        os.environ,
        HELM_CACHE_HOME="/tmp/helm-test/cache",
        HELM_CONFIG_HOME="/tmp/helm-test/config",
        HELM_DATA_HOME="/tmp/helm-test/data",
    )
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True, env=env, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o.get("kind") == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]
