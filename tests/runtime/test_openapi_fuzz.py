"""schemathesis against the runtime's own /openapi.json, every operation, every phase.

Proves: no 5xx, no schema-valid request refused, no status code or body the document does not
declare, no schema-violating request accepted (checks as configured in `schemathesis.toml`, each
exception with its reason). The server runs with tiny limits (sizes within 32x32 pixels, at most 3
steps, n <= 2), so every schema-valid generation costs milliseconds on the tiny model; the
generated sizes and uploads come from `schemathesis_hooks.py`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from fixtures_runtime import free_port, start_runtime

pytestmark = pytest.mark.runtime
HERE = Path(__file__).parent
FUZZ_LIMITS = {
    "max_pixels": 32 * 32,
    "max_steps": 3,
    "max_n": 2,
    "max_queue": 8,
    "request_timeout_seconds": 60,
    "webhook_allow": ["127.0.0.1/32"],  # the hooks' webhook-url format: loopback, nothing listening
    "webhook_attempts": 1,
}
MAX_EXAMPLES = 15  # per operation and phase; ~600 requests in about a minute on two shared cores


def test_schemathesis_finds_nothing(tiny_model_dir, tmp_path):
    rp = start_runtime(
        tiny_model_dir, tmp_path / "fuzz", server=FUZZ_LIMITS, warmup={"resolutions": ["32x32"], "steps": 2}
    )
    try:
        env = dict(
            os.environ,
            FUZZ_MAX_PIXELS=str(FUZZ_LIMITS["max_pixels"]),
            FUZZ_WEBHOOK_PORT=str(free_port()),
            SCHEMATHESIS_HOOKS="schemathesis_hooks",
            PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            NO_COLOR="1",
        )
        cmd = [
            str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(HERE / "schemathesis.toml"),
            "run", rp.url + "/openapi.json", "--max-examples", str(MAX_EXAMPLES), "--workers", "1",
            "--suppress-health-check", "all", "--seed", "1",
        ]  # fmt: skip
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-8000:]
        assert "10 selected / 10 total" in out, out[-3000:]  # every operation of the document
        m = re.search(r"(\d+) generated, (\d+) passed", out)
        assert m and int(m.group(1)) == int(m.group(2)) > 200, out[-3000:]
        assert httpx.get(rp.url + "/ready", timeout=10).status_code == 200
    finally:
        rp.stop()
    assert "Traceback" not in rp.log(), rp.log_tail(60)
