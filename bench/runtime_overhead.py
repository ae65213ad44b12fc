"""Server overhead: HTTP end to end vs a direct pipeline call, on the tiny model (CPU).

Starts a real `diffusion-runtime serve` on the tiny FluxPipeline (no cache-dit, one torch thread)
and loads the same model in this process with the same settings. Alternates a direct
`Model.generate` call and a POST /v1/images/generations (same prompt, size, steps, seed), and
prints p50/p90 of both and the median of the paired differences (HTTP minus the direct call of
the same round: the overhead the issue's target is about), plus, for diagnosis, client latency
minus the `inference_seconds` the server measured around the pipeline call alone (that span leaves
out work a direct `Model.generate` also does, e.g. image post-processing).
The order alternates each round (direct first, then HTTP first: AB, BA, ...). Prints medians with
their spread and writes every sample with the command, versions, machine and date as JSON (--out).
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

from _common import run_record, spread, write_result  # noqa: E402

TARGET_MS = 2.0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", default="64x64")
    p.add_argument("--model", help="tiny model folder (default: generate one into a temp dir)")
    p.add_argument("--out", help="write the figures and every sample as JSON here")
    a = p.parse_args(argv)
    record = run_record("runtime_overhead.py", sys.argv[1:] if argv is None else argv, ("httpx", "fastapi"))

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

            def call_direct() -> float:
                t0 = time.perf_counter()
                model.generate(params)
                return time.perf_counter() - t0

            def call_http() -> tuple[float, float]:
                t0 = time.perf_counter()
                r = client.post("/v1/images/generations", json=body)
                dt = time.perf_counter() - t0
                assert r.status_code == 200, r.text
                return dt, float(r.json()["timings"]["inference_seconds"])

            for i in range(a.requests + 5):
                if i % 2 == 0:  # AB, BA, ...: neither side always runs on the other's warm caches
                    d = call_direct()
                    h, inference = call_http()
                else:
                    h, inference = call_http()
                    d = call_direct()
                if i >= 5:  # first rounds warm both sides
                    direct.append(d)
                    http.append(h)
                    server_overhead.append(h - inference)
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
    print(f"target HTTP - direct <= 2 ms at p50: {'met' if p50 <= TARGET_MS else 'NOT met'} ({p50:.2f} ms)")
    if a.out:
        write_result(a.out, {
            **record,
            "what": "sync POST /v1/images/generations to a real `diffusion-runtime serve` vs a direct "
                    "Model.generate in the bench process, alternating AB/BA, first 5 rounds dropped",
            "model": "tiny FluxPipeline (random weights)", "size": a.size, "steps": a.steps, "device": "cpu",
            "torch_threads": 1, "rounds": a.requests, "order": "alternating AB/BA",
            "direct_ms": spread(direct, ms), "http_ms": spread(http, ms),
            "http_minus_direct_paired_ms": spread([h - d for h, d in zip(http, direct, strict=True)], ms),
            "http_minus_server_inference_ms": spread(server_overhead, ms),
            "target_p50_ms": TARGET_MS, "target_met": p50 <= TARGET_MS,
            "samples_s": {"direct": direct, "http": http, "http_minus_server_inference": server_overhead},
        })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
