"""Fixtures for the runtime: the tiny model on disk and real `diffusion-runtime serve` processes.

- `tiny_model_dir` (session): `diffusion-runtime tiny-model DIR` run once; a real diffusers folder.
- `tiny_wan_model_dir` (session): the same for the tiny WanPipeline (`--variant wan-tiny`, videos).
- `tiny_wan_i2v_model_dir` (session): the tiny WanImageToVideoPipeline (`--variant wan-i2v-tiny`).
- `start_runtime(...)` / `RuntimeProcess`: start a server subprocess on free ports from a runtime.yaml
  written here, wait for /ready (or for the exit), stop it with SIGTERM.
- `runtime_server` (session): one ready server on the tiny model with a static cache-dit mask and a
  metrics listener, for anyone who needs to scrape live metric names (`.url`, `.metrics_url`).
- `runtime_server_factory` (function): start more servers with other settings; all are stopped after.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

__all__ = [
    "RuntimeProcess",
    "free_port",
    "start_runtime",
    "tiny_model_dir",
    "tiny_wan_model_dir",
    "tiny_wan_i2v_model_dir",
    "runtime_server",
    "runtime_server_factory",
    "STATIC_CACHE_DIT",
    "webhook_receiver",
]

# DBCache with a static computation mask: cache-dit's "fast" policy cut to 8 steps
# (mask 11101001: 5 computed, 3 cached). Random weights never hit DBCache's dynamic thresholds.
STATIC_CACHE_DIT: dict[str, Any] = {
    "cache_config": {
        "Fn_compute_blocks": 1,
        "Bn_compute_blocks": 0,
        "max_warmup_steps": 2,
        "residual_diff_threshold": 0.12,
        "steps_computation_mask": "fast",
        "steps_computation_policy": "static",
        "num_inference_steps": 8,
    }
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def webhook_receiver() -> Iterator[tuple[str, list[dict], threading.Event]]:
    """A loopback HTTP server taking webhook POSTs: (its URL, the JSON bodies received, set at the
    first one); answers 204."""
    got: list[dict] = []
    arrived = threading.Event()

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()
            arrived.set()

        def log_message(self, *args):
            pass

    port = free_port()
    srv = http.server.HTTPServer(("127.0.0.1", port), Hook)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{port}/hook", got, arrived
    finally:
        srv.shutdown()


@dataclass
class RuntimeProcess:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    workdir: Path
    log_path: Path
    config_path: Path
    _log: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str | None:
        return f"http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port else None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def wait_ready(self, timeout: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"runtime exited with {self.proc.returncode} before ready:\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"runtime not ready after {timeout}s:\n{self.log_tail()}")

    def wait_exit(self, timeout: float = 120.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self._log:
                self._log.close()

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log:
            self._log.close()
        return self.proc.returncode


def start_runtime(
    model_dir: str | Path,
    workdir: str | Path,
    cache_dit: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    warmup: dict[str, Any] | None = None,
    extra_args: list[str] | None = None,
    wait: bool = True,
    metrics_port: bool = True,
    extra_env: dict[str, str] | None = None,
    command: str = "serve",
    **top: Any,
) -> RuntimeProcess:
    """Write runtime.yaml (+ cache-dit.yaml) into `workdir` and start `diffusion-runtime serve`
    (or `command`: `front-door` reads the same runtime.yaml)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    mport = free_port() if metrics_port else 0
    cfg: dict[str, Any] = {
        "model": {"uri": str(model_dir), "dtype": "float32"},
        "device": "cpu",
        "compile": False,
        "warmup": {"resolutions": ["64x64"], "steps": 8, "prompt": "a photo of a cat"},
        "server": {"host": "127.0.0.1", "port": port, "metrics_port": mport, "max_queue": 8,
                   "request_timeout_seconds": 120, "max_pixels": 128 * 128, "max_steps": 50, "max_n": 4},
    }  # fmt: skip
    cfg["warmup"].update(warmup or {})
    cfg["server"].update(server or {})
    cfg.update(top)
    if cache_dit is not None:
        (workdir / "cache-dit.yaml").write_text(yaml.safe_dump(cache_dit))
        cfg["cache_dit_config"] = "cache-dit.yaml"
    config_path = workdir / "runtime.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    log_path = workdir / "runtime.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed by stop()/wait_exit()
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra_env or {})  # e.g. a test Hub: HF_ENDPOINT, HF_HUB_OFFLINE=0
    env.setdefault("OMP_NUM_THREADS", "1")  # shared 2-core machines: one pipeline thread per server
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffusion_runtime", command, "--config", str(config_path), *(extra_args or [])],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(workdir),
    )  # fmt: skip
    rp = RuntimeProcess(proc, port, mport, workdir, log_path, config_path, log)
    if wait:
        try:
            rp.wait_ready()
        except Exception:
            rp.stop(timeout=10)
            raise
    return rp


def make_tiny_model(folder: Path, variant: str) -> Path:
    """A tiny random-weight pipeline (`variant` of the CLI's tiny-model) written by the real CLI."""
    res = subprocess.run(
        [sys.executable, "-m", "diffusion_runtime", "tiny-model", str(folder), "--variant", variant],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, f"tiny-model --variant {variant} failed:\n{res.stdout}\n{res.stderr}"
    assert (folder / "model_index.json").is_file()
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny random-weight FluxPipeline, generated once per session by the real CLI."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model") / "flux-tiny", "tiny")


@pytest.fixture(scope="session")
def tiny_wan_model_dir(tmp_path_factory) -> Path:
    """The tiny random-weight WanPipeline (text-to-video), generated once per session by the real CLI."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-wan") / "wan-tiny", "wan-tiny")


@pytest.fixture(scope="session")
def tiny_wan_i2v_model_dir(tmp_path_factory) -> Path:
    """The tiny random-weight WanImageToVideoPipeline (image-to-video), generated once per session."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-wan-i2v") / "wan-i2v-tiny", "wan-i2v-tiny")


@pytest.fixture(scope="session")
def runtime_server(tiny_model_dir, tmp_path_factory):
    """A ready runtime on the tiny model (static cache-dit mask, metrics listener on)."""
    rp = start_runtime(tiny_model_dir, tmp_path_factory.mktemp("runtime-server"), cache_dit=STATIC_CACHE_DIT)
    yield rp
    rp.stop()


@pytest.fixture
def runtime_server_factory(tiny_model_dir, tmp_path):
    started: list[RuntimeProcess] = []

    def factory(name: str = "rt", **kwargs: Any) -> RuntimeProcess:
        rp = start_runtime(tiny_model_dir, tmp_path / name, **kwargs)
        started.append(rp)
        return rp

    yield factory
    for rp in started:
        rp.stop(timeout=30)
