"""schemathesis against the front door's own /openapi.json (same settings and hooks as the runtime's
test_openapi_fuzz.py), with one runtime worker behind the queue: no 5xx, no undeclared status or body,
no schema-valid request refused, no invalid one accepted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from diffusion_runtime.contract.config import QUEUE_URL_ENV
from fixtures_queue import RedisServer
from fixtures_runtime import free_port, start_runtime
from test_openapi_fuzz import FUZZ_LIMITS

pytestmark = pytest.mark.runtime
HERE = Path(__file__).parent
MAX_EXAMPLES = 10


def test_schemathesis_finds_nothing_on_the_front_door(tiny_model_dir, tmp_path):
    redis = RedisServer(tmp_path / "redis").start()
    env = {QUEUE_URL_ENV: redis.url}
    queue = {"name": "fuzz/tiny", "claim_idle_seconds": 3}
    warm = {"resolutions": ["32x32"], "steps": 2}
    procs = []
    try:
        procs.append(start_runtime(tiny_model_dir, tmp_path / "w", server=FUZZ_LIMITS, warmup=warm, queue=queue,
                                   extra_env=env))  # fmt: skip
        fd = start_runtime(tiny_model_dir, tmp_path / "fd", server=FUZZ_LIMITS, warmup=warm, queue=queue,
                           extra_env=env, command="front-door")  # fmt: skip
        procs.append(fd)
        run_env = dict(
            os.environ,
            FUZZ_MAX_PIXELS=str(FUZZ_LIMITS["max_pixels"]),
            FUZZ_WEBHOOK_PORT=str(free_port()),
            SCHEMATHESIS_HOOKS="schemathesis_hooks",
            PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            NO_COLOR="1",
        )
        cmd = [
            str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(HERE / "schemathesis.toml"),
            "run", fd.url + "/openapi.json", "--max-examples", str(MAX_EXAMPLES), "--workers", "1",
            "--suppress-health-check", "all", "--seed", "1",
        ]  # fmt: skip
        res = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-8000:]
        # the image API's 10 operations and the videos API's 5 (the front door serves both)
        assert "15 selected / 15 total" in out, out[-3000:]
        m = re.search(r"(\d+) generated, (\d+) passed", out)
        assert m and int(m.group(1)) == int(m.group(2)) > 150, out[-3000:]
        assert httpx.get(fd.url + "/ready", timeout=10).status_code == 200
    finally:
        for p in procs:
            p.stop(timeout=30)
        redis.stop()
    for p in procs:
        assert "Traceback" not in p.log(), p.log_tail(60)
