"""Queue overhead: front door + Redis + runtime worker vs the runtime's direct HTTP API (CPU, tiny model).

Starts a real redis-server (own folder, loopback, append-only fsync always: the production setting),
one `diffusion-runtime serve` with a queue: section (it pulls from the queue AND serves its direct
API: the same process, scheduler and pipeline for both paths) and one `diffusion-runtime front-door`.
Each round sends the same sync generation (prompt, size, steps, seed) both ways, the order
alternating (AB, BA, ...), and records the paired difference (through the queue minus direct).
Prints medians with their spread (p10-p90) and writes the figures as JSON (--out).
Target (issue 20): the front door + queue adds at most 5 ms at p50.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TARGET_MS = 5.0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def spread(xs: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in xs]
    return {
        "p50_ms": round(pct(ms, 0.5), 3), "p10_ms": round(pct(ms, 0.1), 3), "p90_ms": round(pct(ms, 0.9), 3),
        "mean_ms": round(statistics.mean(ms), 3),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", default="64x64")
    p.add_argument("--model", help="tiny model folder (default: generate one into a temp dir)")
    p.add_argument("--out", help="write the figures as JSON here")
    a = p.parse_args(argv)

    import httpx
    from fixtures_queue import RedisServer
    from fixtures_runtime import start_runtime

    from diffusion_runtime.contract.config import QUEUE_URL_ENV
    from diffusion_runtime.tiny import write_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    model_dir = Path(a.model) if a.model else write_tiny_model(tmp / "tiny")
    redis = RedisServer(tmp / "redis").start()
    env = {QUEUE_URL_ENV: redis.url}
    queue = {"name": "bench/tiny"}
    warm = {"resolutions": [a.size], "steps": a.steps}
    procs = []
    try:
        rt = start_runtime(model_dir, tmp / "runtime", warmup=warm, queue=queue, extra_env=env)
        procs.append(rt)
        fd = start_runtime(model_dir, tmp / "front-door", warmup=warm, queue=queue, extra_env=env, command="front-door")
        procs.append(fd)
        body = {"prompt": "a photo of a cat", "size": a.size, "num_inference_steps": a.steps, "seed": 1}
        direct, queued, paired = [], [], []
        with httpx.Client(timeout=60) as client:

            def call(url: str) -> float:
                t0 = time.perf_counter()
                r = client.post(url + "/v1/images/generations", json=body)
                dt = time.perf_counter() - t0
                assert r.status_code == 200, r.text
                return dt

            for i in range(a.rounds + a.warmup):
                if i % 2 == 0:
                    d, q = call(rt.url), call(fd.url)
                else:
                    q, d = call(fd.url), call(rt.url)
                if i >= a.warmup:
                    direct.append(d)
                    queued.append(q)
                    paired.append(q - d)
    finally:
        for proc in procs:
            proc.stop(timeout=30)
        redis.stop()
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    result = {
        "what": "sync POST /v1/images/generations, front door + Redis + worker vs the same worker's direct API",
        "model": "tiny FluxPipeline (random weights)", "size": a.size, "steps": a.steps, "device": "cpu",
        "rounds": a.rounds, "order": "alternating AB/BA", "redis": redis_version,
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(), "loadavg": load},
        "direct": spread(direct), "queue": spread(queued), "overhead_paired": spread(paired),
        "target_p50_ms": TARGET_MS, "target_met": pct(paired, 0.5) * 1000 <= TARGET_MS,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    print(f"tiny FluxPipeline {a.size}, {a.steps} steps, CPU, {a.rounds} rounds, alternating order")
    for name in ("direct", "queue", "overhead_paired"):
        s = result[name]
        print(f"{name:16s} p50 {s['p50_ms']:8.2f} ms   p10 {s['p10_ms']:8.2f}   p90 {s['p90_ms']:8.2f}   mean {s['mean_ms']:8.2f}")
    ok = "met" if result["target_met"] else "NOT met"
    print(f"target: queue - direct <= {TARGET_MS:g} ms at p50: {ok} ({result['overhead_paired']['p50_ms']:.2f} ms)")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
