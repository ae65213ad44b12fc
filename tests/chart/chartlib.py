"""Helpers shared by the chart tests (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "diffusion-operator"

# An HTTP 403 as the operator's log shows one: its own client's ApiError ("HTTP 403: ... is forbidden:
# ..."), kopf's APIForbiddenError (its retry lines carry the Status: 'code': 403, reason Forbidden) or
# its "Not enough permissions" warning. Not a bare "403": a log timestamp's milliseconds
# ("08:20:31,403") are one.
_HTTP_403 = re.compile(
    r"\bHTTP 403\b|APIForbiddenError|\bcode\W{1,3}403\b|\bForbidden\b|\bis forbidden\b|Not enough permissions"
)


def forbidden_lines(log: str) -> list[str]:
    """The lines of an operator log that report a request refused with HTTP 403 (Forbidden)."""
    return [line for line in log.splitlines() if _HTTP_403.search(line)]


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
