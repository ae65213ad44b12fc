"""Throughput with dynamic batching (server.max_batch) on vs off (CPU, tiny model, issue 24).

Starts two `diffusion-runtime serve` processes on the same tiny FluxPipeline with the tests' static
cache-dit mask: `off` (server.max_batch 1, one request per pipeline call) and `on` (server.max_batch 8,
server.max_batch_delay_seconds 0.02). Each round runs every concurrency level (1, 4, 8 closed-loop
clients, each sending --requests sync generations back to back, distinct seeds) on both servers, the
order alternating (off/on, on/off, ...) so load on the machine hits both alike. Per cell: images/s of
each round (median with min/max over the rounds) and the client latency of every request (p50/p99
pooled over the rounds). The ratio is the median of the per-round on/off ratios. A check first: each
image of one batch of 4 on `on` equals the image of its seed on `off` (max pixel difference <= 1).
Target (issue 24): batching on gives >= 1.5x the images/s of off at concurrency 8.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TARGET_RATIO = 1.5
CONCURRENCY = (1, 4, 8)
MAX_BATCH = 8
DELAY = 0.02


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_clients(url: str, body: dict[str, Any], clients: int, per_client: int, seed0: int) -> dict[str, Any]:
    """`clients` threads, each sending `per_client` requests back to back: (images/s, latencies)."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(timeout=300) as http:
            for i in range(per_client):
                t0 = time.perf_counter()
                r = http.post(
                    url + "/v1/images/generations", json=dict(body, seed=seed0 + c * per_client + i)
                )
                dt = time.perf_counter() - t0
                with lock:
                    (latencies.append(dt) if r.status_code == 200 else errors.append(r.text[:200]))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"requests failed: {errors[:3]}")
    return {"images_per_s": len(latencies) / wall, "wall_s": wall, "latencies_s": latencies}


def pixels(b64: str) -> Any:
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def twins(on: str, off: str, body: dict[str, Any]) -> dict[str, Any]:
    """One batch of 4 seeds on `on` against each seed alone on `off`: the largest pixel difference."""
    import httpx
    from _common import scrape_metrics

    seeds = [101, 102, 103, 104]
    alone = [httpx.post(off + "/v1/images/generations", json=dict(body, seed=s), timeout=300) for s in seeds]
    before = scrape_metrics(on + "/metrics")
    got: dict[int, Any] = {}

    def send(s: int) -> None:
        got[s] = httpx.post(on + "/v1/images/generations", json=dict(body, seed=s), timeout=300)

    threads = [threading.Thread(target=send, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = scrape_metrics(on + "/metrics")
    diffs = [
        int(abs(pixels(got[s].json()["data"][0]["b64_json"]) - pixels(a.json()["data"][0]["b64_json"])).max())
        for s, a in zip(seeds, alone, strict=True)
    ]
    calls = after["diffusion_batch_size_count"] - before["diffusion_batch_size_count"]
    return {"seeds": seeds, "max_pixel_diff": diffs, "pipeline_calls_on": int(calls), "ok": max(diffs) <= 1}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=4, help="requests per client per cell")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", default="64x64")
    p.add_argument("--model", help="tiny model folder (default: generate one into a temp dir)")
    p.add_argument("--out", help="write the figures as JSON here")
    a = p.parse_args(argv)

    import cache_dit
    import diffusers
    import torch
    from _common import scrape_metrics
    from diffusion_runtime.tiny import write_tiny_model
    from fixtures_runtime import STATIC_CACHE_DIT, start_runtime

    tmp = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    model_dir = Path(a.model) if a.model else write_tiny_model(tmp / "tiny")
    warm = {"resolutions": [a.size], "steps": a.steps}
    common = {"max_queue": 64, "max_pixels": 512 * 512}
    modes = {"off": {"max_batch": 1}, "on": {"max_batch": MAX_BATCH, "max_batch_delay_seconds": DELAY}}
    body = {"prompt": "a photo of a cat", "size": a.size, "num_inference_steps": a.steps}
    samples: dict[str, dict[int, list[dict[str, Any]]]] = {m: {c: [] for c in CONCURRENCY} for m in modes}
    servers: dict[str, Any] = {}
    try:
        for mode, server in modes.items():
            servers[mode] = start_runtime(
                model_dir, tmp / mode, cache_dit=STATIC_CACHE_DIT, warmup=warm, server={**common, **server}
            )
        urls = {m: s.url for m, s in servers.items()}
        twin = twins(urls["on"], urls["off"], body)
        print(f"batched vs unbatched twins: max pixel diff {twin['max_pixel_diff']}, "
              f"{twin['pipeline_calls_on']} call(s) on `on`")  # fmt: skip
        for mode in modes:  # one untimed cell each: first-call costs out of the figures
            run_clients(urls[mode], body, 2, 1, 0)
        seed0 = 1000
        for r in range(a.rounds):
            order = list(modes) if r % 2 == 0 else list(reversed(modes))
            for c in CONCURRENCY:
                for mode in order:
                    s = run_clients(urls[mode], body, c, a.requests, seed0)
                    seed0 += c * a.requests
                    samples[mode][c].append(s)
                    print(f"round {r + 1} c={c} {mode:3s} {s['images_per_s']:7.2f} images/s", flush=True)
        metrics_on = scrape_metrics(urls["on"] + "/metrics")
    finally:
        for s in servers.values():
            s.stop(timeout=30)
    cells: dict[str, Any] = {}
    for c in CONCURRENCY:
        row: dict[str, Any] = {}
        for mode in modes:
            ips = [s["images_per_s"] for s in samples[mode][c]]
            lat = [x for s in samples[mode][c] for x in s["latencies_s"]]
            row[mode] = {
                "images_per_s_median": round(statistics.median(ips), 2),
                "images_per_s_min": round(min(ips), 2), "images_per_s_max": round(max(ips), 2),
                "latency_p50_ms": round(pct(lat, 0.5) * 1000, 1), "latency_p99_ms": round(pct(lat, 0.99) * 1000, 1),
                "images_per_s_rounds": [round(x, 3) for x in ips], "requests": len(lat),
            }  # fmt: skip
        ratios = [
            on["images_per_s"] / off["images_per_s"]
            for on, off in zip(samples["on"][c], samples["off"][c], strict=True)
        ]
        row["ratio_on_off_median"] = round(statistics.median(ratios), 2)
        row["ratio_on_off_min"] = round(min(ratios), 2)
        row["ratio_on_off_max"] = round(max(ratios), 2)
        cells[str(c)] = row
    calls = metrics_on.get("diffusion_batch_size_count", 0.0)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    result = {
        "what": "sync POST /v1/images/generations, closed-loop clients, server.max_batch 8 (delay 0.02 s) vs 1",
        "command": "python bench/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": "tiny FluxPipeline (random weights), static cache-dit mask", "size": a.size, "steps": a.steps,
        "device": "cpu", "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1 (fixtures_runtime default)"),
        "rounds": a.rounds, "requests_per_client": a.requests, "order": "alternating off/on, on/off per round",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "cache_dit": getattr(cache_dit, "__version__", "?"), "python": platform.python_version()},
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": load, "niceness": os.nice(0),
                    "note": "shared 2-core machine, loaded by other work during the run"},
        "twins": twin, "concurrency": cells,
        "on_mean_images_per_call": round(metrics_on.get("diffusion_batch_size_sum", 0.0) / calls, 2) if calls else None,
        "target_ratio_at_8": TARGET_RATIO, "target_met": cells["8"]["ratio_on_off_median"] >= TARGET_RATIO,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    print(f"tiny FluxPipeline {a.size}, {a.steps} steps, CPU, {a.rounds} rounds, alternating order")
    for c in CONCURRENCY:
        row = cells[str(c)]
        for mode in modes:
            x = row[mode]
            print(f"c={c} {mode:3s} {x['images_per_s_median']:7.2f} images/s "
                  f"[{x['images_per_s_min']:.2f}-{x['images_per_s_max']:.2f}]  "
                  f"p50 {x['latency_p50_ms']:7.1f} ms  p99 {x['latency_p99_ms']:7.1f} ms")  # fmt: skip
        print(
            f"c={c} on/off x{row['ratio_on_off_median']:.2f} [{row['ratio_on_off_min']:.2f}-{row['ratio_on_off_max']:.2f}]"
        )
    print(
        f"target: on/off >= {TARGET_RATIO:g}x at concurrency 8: {'met' if result['target_met'] else 'NOT met'}"
    )
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if twin["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
