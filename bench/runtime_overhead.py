"""Server overhead: HTTP end to end vs a direct pipeline call, on the tiny model (CPU).

Starts a real `diffusion-runtime serve` on the tiny FluxPipeline (no cache-dit, one torch thread)
and loads the same model in this process with the same settings. Alternates a direct
`Model.generate` call and a POST /v1/images/generations (same prompt, size, steps, seed), and
prints p50/p90 of both and the median of the paired differences (HTTP minus the direct call of
the same round: the overhead the issue's target is about), plus, for diagnosis, client latency
minus the `inference_seconds` the server measured around the pipeline call alone (that span leaves
out work a direct `Model.generate` also does, e.g. image post-processing).
Target: HTTP - direct <= 2 ms at p50.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", default="64x64")
    p.add_argument("--model", help="tiny model folder (default: generate one into a temp dir)")
    a = p.parse_args(argv)

    import httpx
    import torch
    from diffusion_runtime.contract.config import RuntimeConfig
    from diffusion_runtime.engine.model import load_model
    from diffusion_runtime.engine.params import GenerationParams
    from diffusion_runtime.tiny import write_tiny_model
    from fixtures_runtime import start_runtime

    torch.set_num_threads(1)  # the server runs with OMP_NUM_THREADS=1 (see fixtures_runtime)
    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    model_dir = Path(a.model) if a.model else write_tiny_model(tmp / "tiny")
    width, height = (int(v) for v in a.size.lower().split("x"))
    rp = start_runtime(model_dir, tmp / "server", warmup={"resolutions": [a.size], "steps": a.steps})
    try:
        cfg = RuntimeConfig()
        cfg.model.uri, cfg.model.dtype, cfg.device = str(model_dir), "float32", "cpu"
        model = load_model(cfg, progress=False)
        body = {"prompt": "a photo of a cat", "size": a.size, "num_inference_steps": a.steps, "seed": 1}
        params = GenerationParams(prompt=body["prompt"], width=width, height=height, steps=a.steps, seed=1)
        direct, http, server_overhead = [], [], []
        with httpx.Client(base_url=rp.url, timeout=60) as client:
            for i in range(a.requests + 5):
                t0 = time.perf_counter()
                model.generate(params)
                d = time.perf_counter() - t0
                t0 = time.perf_counter()
                r = client.post("/v1/images/generations", json=body)
                h = time.perf_counter() - t0
                assert r.status_code == 200, r.text
                if i >= 5:  # first rounds warm both sides
                    direct.append(d)
                    http.append(h)
                    server_overhead.append(h - r.json()["timings"]["inference_seconds"])
    finally:
        rp.stop()
    ms = 1000.0
    d50, h50, o50 = pct(direct, 0.5) * ms, pct(http, 0.5) * ms, pct(server_overhead, 0.5) * ms
    print(f"tiny FluxPipeline {a.size}, {a.steps} steps, CPU, {a.requests} requests each, alternating")
    print(f"direct pipeline call   p50 {d50:8.2f} ms   p90 {pct(direct, 0.9) * ms:8.2f} ms")
    print(f"HTTP end to end        p50 {h50:8.2f} ms   p90 {pct(http, 0.9) * ms:8.2f} ms")
    paired = sorted((h - d) * ms for h, d in zip(http, direct, strict=True))
    p50 = pct(paired, 0.5)
    print(
        f"HTTP - direct, paired     p50 {p50:8.2f} ms   p90 {pct(paired, 0.9):8.2f} ms   ratio {h50 / d50:.3f}x"
    )
    print(f"server overhead per request (latency - server inference_seconds): p50 {o50:.2f} ms, "
          f"p90 {pct(server_overhead, 0.9) * ms:.2f} ms, mean {statistics.mean(server_overhead) * ms:.2f} ms")  # fmt: skip
    print(f"target HTTP - direct <= 2 ms at p50: {'met' if p50 <= 2.0 else 'NOT met'} ({p50:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
