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
from prometheus_client.parser import text_string_to_metric_families

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


# a video server (the tiny Wan, docs/video.md): clips within 32x32 pixels, 1 s, at most 17 frames
VIDEO_LIMITS = {"max_video_seconds": 1, "max_frames": 17, "max_video_pixels": 32 * 32 * 17, "video_fps": 8}
VIDEO_OPERATIONS = 5  # tagged `videos`: fuzzed on the video server only (an image server answers 400)
TOTAL_OPERATIONS = 15


@pytest.mark.parametrize(("auth", "video"), [(False, None), (True, None), (False, "tiny_wan_model_dir"),
                                             (False, "tiny_wan_i2v_model_dir")],
                         ids=["no-keys", "api-keys", "video", "video-i2v"])  # fmt: skip
def test_schemathesis_finds_nothing(tiny_model_dir, request, tmp_path, auth, video):
    """With API keys (docs/security.md) the fuzzer sends one, and its `ignored_auth` check also sends
    each operation without it, expecting the 401 the document declares. The image servers are fuzzed
    on every operation but the videos API; the video servers (the tiny Wan text-to-video and
    image-to-video: `video` names the model's fixture) on the videos API, input_reference included."""
    server, headers = dict(FUZZ_LIMITS, **(VIDEO_LIMITS if video else {})), []
    if auth:
        (tmp_path / "keys").mkdir()
        (tmp_path / "keys" / "fuzz").write_text("sk-fuzz-key")
        server["auth_keys_dir"] = str(tmp_path / "keys")
        headers = ["--header", "Authorization: Bearer sk-fuzz-key"]
    warmup: dict = {"resolutions": ["32x32"], "steps": 2, **({"frames": 5} if video else {})}
    rp = start_runtime(
        request.getfixturevalue(video) if video else tiny_model_dir,
        tmp_path / "fuzz",
        server=server,
        warmup=warmup,
    )
    tags = ["--include-tag", "videos"] if video else ["--exclude-tag", "videos"]
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
            "--suppress-health-check", "all", "--seed", "1", *headers, *tags,
        ]  # fmt: skip
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-8000:]
        selected = VIDEO_OPERATIONS if video else TOTAL_OPERATIONS - VIDEO_OPERATIONS
        assert f"{selected} selected / {TOTAL_OPERATIONS} total" in out, out[-3000:]  # every operation
        m = re.search(r"(\d+) generated, (\d+) passed", out)
        assert m and int(m.group(1)) == int(m.group(2)) > (50 if video else 200), out[-3000:]
        assert httpx.get(rp.url + "/ready", timeout=10).status_code == 200
        if auth:  # the fuzzer's requests carried the key, and its ignored_auth probes were refused
            counted = {
                (s.labels["key"], s.labels["status"]): s.value
                for f in text_string_to_metric_families(httpx.get(rp.url + "/metrics", timeout=10).text)
                for s in f.samples
                if s.name == "diffusion_requests_total"
            }
            assert counted.get(("fuzz", "200"), 0) > 0 and counted.get(("", "401"), 0) > 0, counted
    finally:
        rp.stop()
    assert "Traceback" not in rp.log(), rp.log_tail(60)
