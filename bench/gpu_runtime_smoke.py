"""The runtime's own GPU path, end to end: a real `diffusion-runtime serve` process on CUDA.

Generates the tiny FLUX pipeline, serves it with cache-dit (static mask) and cache-dit's float8
quantization, waits for /ready (load + quantize + warmup), sends generations over HTTP, scrapes
/metrics (GPU memory gauges, cache steps, the info metric), then SIGTERMs and checks exit 0.
Prints one line per check and a JSON summary; exits non-zero if any check fails.

    python bench/gpu_runtime_smoke.py --out DIR                   # on a GPU (float8_per_row)
    python bench/gpu_runtime_smoke.py --out DIR --device cpu --quant none   # smoke-test the script
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from _common import Checks, free_port, post_json, start_serve, static_cache_dit, stop, tiny_model, wait_ready
from prometheus_client.parser import text_string_to_metric_families


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("out/gpu-smoke"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quant", default="float8_per_row", help="quant_type, or 'none'")
    ap.add_argument("--size", default="256x256")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    check = Checks()

    model = args.out / "tiny-flux"
    t = time.monotonic()
    tiny_model(model)
    print(f"tiny model written in {time.monotonic() - t:.1f}s", flush=True)

    # the tests' static mask: 3 of 8 steps cached
    (args.out / "cache-dit.yaml").write_text(yaml.safe_dump(static_cache_dit(args.quant)))
    port = free_port()
    runtime = {
        "model": {"uri": str(model), "dtype": args.dtype},
        "cache_dit_config": "cache-dit.yaml",
        "compile": False,
        "device": args.device,
        "warmup": {"resolutions": [args.size], "steps": 8},
        "server": {"host": "127.0.0.1", "port": port, "metrics_port": 0, "max_queue": 4},
    }
    (args.out / "runtime.yaml").write_text(yaml.safe_dump(runtime))
    log = (args.out / "runtime.log").open("w")
    proc = start_serve(args.out / "runtime.yaml", log)
    base = f"http://127.0.0.1:{port}"
    t = time.monotonic()
    ready = wait_ready(base, proc, timeout=300)
    check("ready after load + quantize + warmup", ready, f"{time.monotonic() - t:.1f}s")
    summary: dict = {"device": args.device, "quant": args.quant, "ready_s": round(time.monotonic() - t, 2)}
    if ready:
        w, h = (int(v) for v in args.size.split("x"))
        body = {"prompt": "a red fox in snow", "size": args.size, "seed": 3, "num_inference_steps": 8}
        images, latencies = [], []
        for _ in range(3):
            t0 = time.monotonic()
            status, result = post_json(f"{base}/v1/images/generations", body)
            latencies.append(time.monotonic() - t0)
            check(
                "POST /v1/images/generations -> 200",
                status == 200,
                str(result)[:200] if status != 200 else "",
            )
            if status == 200:
                images.append(base64.b64decode(result["data"][0]["b64_json"]))
        if images:
            (args.out / "image.png").write_bytes(images[0])
            check("PNG", images[0][:8] == b"\x89PNG\r\n\x1a\n")
            check("same seed, same bytes", len(set(images)) == 1, f"{len(set(images))} distinct")
        summary["latency_s"] = [round(x, 4) for x in latencies]
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
            text = r.read().decode()
        (args.out / "metrics.txt").write_text(text)
        samples = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

        def value(name: str, **labels: str) -> float:
            return sum(
                v
                for (n, lab), v in samples.items()
                if n == name and all((k, x) in lab for k, x in labels.items())
            )

        cached = value("diffusion_cache_steps_total", result="cached")
        check(
            "cached steps > 0",
            cached > 0,
            f"cached={cached} computed={value('diffusion_cache_steps_total', result='computed')}",
        )
        for g in (
            "diffusion_gpu_memory_peak_bytes",
            "diffusion_gpu_memory_allocated_bytes",
            "diffusion_gpu_memory_reserved_bytes",
        ):
            check(f"{g} > 0", value(g) > 0, f"{value(g) / 2**20:.1f} MiB")
        info = [dict(lab) for (n, lab) in samples if n == "diffusion_runtime_info"]
        check(
            "info metric names device and quant",
            bool(info) and args.device in info[0].get("device", ""),
            str(info),
        )
        summary.update(
            cached_steps=cached,
            gpu_peak_mib=round(value("diffusion_gpu_memory_peak_bytes") / 2**20, 1),
            info=info,
        )
    rc = stop(proc, timeout=60)
    check("SIGTERM -> exit 0", rc == 0, f"rc={rc}")
    summary["checks"] = check.as_json()
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "checks"}))
    failed = check.failed
    if failed:
        print("runtime log tail:\n" + (args.out / "runtime.log").read_text()[-3000:])
    print(f"{len(check.rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
