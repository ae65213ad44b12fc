"""CI plumbing: `.ci/run` is `make test`, and `make pytest` fails on failures and on no tests (exit 5)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CI_RUN = REPO / ".ci" / "run"


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    make = shutil.which("make")
    assert make, "make is not installed (apt-get install make)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "MAKEFLAGS", "MFLAGS"))}
    return subprocess.run(
        [make, "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=300
    )


def test_ci_run_is_an_executable_strict_bash_script_running_make_test():
    mode = CI_RUN.stat().st_mode
    assert mode & stat.S_IXUSR, ".ci/run must be executable"
    text = CI_RUN.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert [line.strip() for line in text.splitlines() if line.strip().startswith("make ")] == ["make test"]
    for script in (CI_RUN, REPO / "scripts" / "bootstrap.sh", REPO / "tools" / "sync_chart_crds.sh"):
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script


def test_make_test_is_bootstrap_ruff_mypy_then_pytest():
    proc = _make("-n", "test")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines[0] == "scripts/bootstrap.sh"
    assert lines[1] == ".venv/bin/ruff check ."
    mypy = lines[2].split()
    assert mypy[0] == ".venv/bin/mypy", lines[2]
    assert {"operator/diffusion_operator", "runtime/diffusion_runtime"} <= set(mypy[1:]), lines[2]
    assert ".venv/bin/python -m pytest" in lines[3]


def test_make_pytest_passes_when_tests_pass():
    proc = _make("pytest", "PYTEST_ARGS=-q -p no:cacheprovider tests/test_readme.py -k two_commands")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout


def test_make_pytest_fails_when_no_test_is_collected():
    proc = _make("pytest", "PYTEST_ARGS=-q -p no:cacheprovider tests/test_readme.py -k no_such_test_name")
    assert proc.returncode != 0
    assert "no tests were collected (pytest exit 5)" in proc.stderr


def test_make_pytest_fails_when_a_test_fails(tmp_path):
    failing = tmp_path / "test_failing.py"
    failing.write_text("def test_fails():\n    assert 1 + 1 == 3\n")
    proc = _make("pytest", f"PYTEST_ARGS=-q -p no:cacheprovider {failing}")
    assert proc.returncode != 0
    assert "1 failed" in proc.stdout


@pytest.mark.parametrize("target", ["test", "demo"])
def test_both_readme_commands_bootstrap_first(target):
    proc = _make("-n", target)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "scripts/bootstrap.sh"
