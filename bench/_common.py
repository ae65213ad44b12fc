"""What the bench scripts share: a free port, the tiny test model, the tests' cache-dit config, a
`diffusion-runtime serve` process (start, wait for /ready, SIGTERM), JSON over HTTP, `/metrics` as a
dict, and a list of named checks.

The scripts run as `python bench/<script>.py`, so bench/ is on sys.path: `from _common import ...`.
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post_json(url: str, body: dict, timeout: float = 300) -> tuple[int, dict]:
    """POST `body` as JSON: (status, JSON answer), or (status, {"error": the body's first 500 chars})."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode()[:500]}


def scrape_metrics(url: str, skip_labels: tuple[str, ...] = ()) -> dict[str, float]:
    """Every sample of a Prometheus text endpoint as {'name{k=v,...}': value}, labels sorted;
    labels named in `skip_labels` left out of the key."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in skip_labels)
            out[f"{s.name}{{{label}}}" if label else s.name] = s.value
    return out


def tiny_model(folder: Path, variant: str | None = None, quiet: bool = False) -> Path:
    """The random-weight tiny FLUX pipeline written into `folder` by the runtime's own CLI."""
    cmd = [sys.executable, "-m", "diffusion_runtime", "tiny-model", str(folder)]
    subprocess.run(cmd + (["--variant", variant] if variant else []), check=True, capture_output=quiet)
    return folder


def static_cache_dit(quant: str) -> dict:
    """The tests' static cache-dit mask (3 of 8 steps cached) with cache-dit's quantization `quant`
    ('none': none)."""
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures_runtime import STATIC_CACHE_DIT

    cache_dit = copy.deepcopy(STATIC_CACHE_DIT)
    if quant != "none":
        cache_dit["quantize_config"] = {"quant_type": quant}
    return cache_dit


def start_serve(
    config: Path, log: IO[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen:
    """`diffusion-runtime serve --config config`, its output into `log`, unbuffered."""
    return subprocess.Popen(
        [sys.executable, "-m", "diffusion_runtime", "serve", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
    )  # fmt: skip


def wait_ready(url: str, proc: subprocess.Popen, timeout: float, poll: float = 0.5) -> bool:
    """Poll `url`/ready until it answers 200 (True), the process exits or `timeout` passes (False)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                if r.status == 200:
                    return True
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(poll)
    return False


def serve_until_ready(
    work: Path, cfg: dict, env: dict[str, str], name: str
) -> tuple[float, dict[str, float]]:
    """Run `diffusion-runtime serve` on `cfg` (written to work/runtime.yaml; its server.port is polled)
    until /ready answers 200; returns (seconds from process start, /metrics), the process stopped."""
    (work / "runtime.yaml").write_text(yaml.safe_dump(cfg))
    url = f"http://127.0.0.1:{cfg['server']['port']}"
    with open(work / "runtime.log", "w") as log:
        t0 = time.perf_counter()
        proc = start_serve(work / "runtime.yaml", log, dict(env, HF_HUB_OFFLINE="1"))
        try:
            if not wait_ready(url, proc, timeout=float("inf"), poll=0.1):
                raise SystemExit(
                    f"{name}: runtime exited {proc.returncode}:\n{(work / 'runtime.log').read_text()[-3000:]}"
                )
            return time.perf_counter() - t0, scrape_metrics(url + "/metrics")
        finally:
            stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    """SIGTERM, then the exit code; -9 when it had to be killed after `timeout` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return -9


class Checks:
    """Named pass/fail checks, each printed as `[ok] name detail` / `[FAIL] name detail` when made."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, bool, str]] = []

    def __call__(self, name: str, ok: bool, detail: str = "") -> bool:
        self.rows.append((name, ok, detail))
        print(f"[{'ok' if ok else 'FAIL'}] {name} {detail}", flush=True)
        return ok

    @property
    def failed(self) -> list[str]:
        return [n for n, ok, _ in self.rows if not ok]

    def as_json(self) -> list[dict]:
        return [{"name": n, "ok": ok, "detail": d} for n, ok, d in self.rows]


def run_record(script: str, argv: list[str] | None = None, packages: tuple[str, ...] = ()) -> dict:
    """What every result file in bench/results/ starts with: the command that made it, the versions
    of python, torch and `packages`, the machine (CPUs, platform, load average at the start) and the
    date (UTC). bench/README.md ("Result files") has the convention."""
    from importlib import metadata

    argv = sys.argv[1:] if argv is None else argv
    versions = {"python": platform.python_version()}
    for name in ("torch", "diffusers", *packages):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "command": " ".join([".venv/bin/python", f"bench/{script}", *argv]),
        "versions": versions,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def spread(xs: list[float], scale: float = 1.0) -> dict[str, float | int]:
    """Median, p10, p90, min and max of `xs` times `scale` (1000: seconds to ms), and n."""
    ys = sorted(x * scale for x in xs)

    def pct(q: float) -> float:
        return round(ys[min(len(ys) - 1, int(round(q * (len(ys) - 1))))], 4)

    return {"n": len(ys), "median": round(statistics.median(ys), 4), "p10": pct(0.1), "p90": pct(0.9),
            "min": round(ys[0], 4), "max": round(ys[-1], 4)}  # fmt: skip


def write_result(path: str | Path, result: dict) -> None:
    """`result` as indented JSON into `path` (its folder made), and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", flush=True)
