"""Start-up features on CUDA through the real server: compile-artifact cache and quality gate.

Two `diffusion-runtime serve` processes in turn on the tiny FLUX pipeline with cache-dit (static
mask), float8_per_row quantization, `compile: true`, one shared `compile_cache_dir` (each process with
its own empty inductor folder) and a quality gate: the first process misses and saves, the second
restores; both must pass the gate and give the same image for the same seed. Prints one line per
check and `N passed, N failed`; exits non-zero if any check fails.

    python bench/gpu_startup_smoke.py --out DIR
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from pathlib import Path

import yaml
from _common import (
    Checks,
    free_port,
    post_json,
    scrape_metrics,
    start_serve,
    static_cache_dit,
    stop,
    tiny_model,
    wait_ready,
)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")) / "gpu-startup")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quant", default="float8_per_row", help="quant_type, or 'none'")
    ap.add_argument("--size", default="256x256")
    ap.add_argument("--min-psnr", type=float, default=20.0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    check = Checks()
    rows: list[dict] = []

    model = tiny_model(args.out / "tiny-flux")
    (args.out / "cache-dit.yaml").write_text(yaml.safe_dump(static_cache_dit(args.quant)))
    shared = args.out / "compile-cache"
    images = []
    for name in ("first", "second"):
        port = free_port()
        runtime = {
            "model": {"uri": str(model), "dtype": args.dtype},
            "cache_dit_config": "cache-dit.yaml",
            "compile": True,
            "compile_cache_dir": str(shared),
            "device": args.device,
            "warmup": {"resolutions": [args.size], "steps": 8},
            "quality_gate": {
                "prompts": ["a photo of a cat", "a red car"],
                "seeds": [0],
                "min_psnr": args.min_psnr,
                "min_ssim": 0.5,
            },
            "server": {"host": "127.0.0.1", "port": port, "metrics_port": 0, "max_pixels": 512 * 512},
        }
        (args.out / f"runtime-{name}.yaml").write_text(yaml.safe_dump(runtime))
        log = open(args.out / f"{name}.log", "w")  # noqa: SIM115
        env = {"TORCHINDUCTOR_CACHE_DIR": str(args.out / f"inductor-{name}"), "HF_HUB_OFFLINE": "1"}
        t0 = time.monotonic()
        proc = start_serve(args.out / f"runtime-{name}.yaml", log, env, cwd=args.out)
        url = f"http://127.0.0.1:{port}"
        ready = time.monotonic() - t0 if wait_ready(url, proc, timeout=600) else None
        check(
            f"{name}: ready",
            ready is not None,
            f"in {ready:.1f}s" if ready else (args.out / f"{name}.log").read_text()[-1500:],
        )
        if ready is None:
            proc.kill()
            break
        m = scrape_metrics(url + "/metrics", skip_labels=("le",))
        result = (
            "hit"
            if m.get("diffusion_compile_cache_lookups_total{result=hit}")
            else "miss"
            if m.get("diffusion_compile_cache_lookups_total{result=miss}")
            else "?"
        )
        check(f"{name}: compile cache {result}", result == ("miss" if name == "first" else "hit"))
        saves = m.get("diffusion_compile_cache_saves_total", -1)
        check(f"{name}: saves", saves == (1 if name == "first" else 0), f"{saves}")
        gate = m.get("diffusion_quality_gate{diffusion_quality_gate=passed}")
        check(
            f"{name}: quality gate passed",
            gate == 1,
            f"PSNR {m.get('diffusion_quality_gate_psnr_decibels')} SSIM {m.get('diffusion_quality_gate_ssim')}",
        )
        code, body = post_json(
            url + "/v1/images/generations",
            {"prompt": "a lighthouse", "size": args.size, "seed": 7, "num_inference_steps": 8},
        )
        check(f"{name}: generation", code == 200, str(code))
        if code == 200:
            images.append(base64.b64decode(body["data"][0]["b64_json"]))
        rows.append({"process": name, "ready_s": ready, "compile_s": m.get("diffusion_compile_seconds"),
                     "warmup_s": m.get("diffusion_warmup_seconds"), "load_s": m.get("diffusion_model_load_seconds"),
                     "gate_s": m.get("diffusion_quality_gate_seconds"), "psnr": m.get("diffusion_quality_gate_psnr_decibels"),
                     "ssim": m.get("diffusion_quality_gate_ssim"), "cache": result})  # fmt: skip
        check(f"{name}: SIGTERM exit 0", stop(proc, timeout=60) == 0)
        log.close()
    if len(images) == 2:
        check("same image from both processes (seed 7)", images[0] == images[1])
    summary = {"rows": rows, "checks": check.as_json()}
    (args.out / "gpu_startup_smoke.json").write_text(json.dumps(summary, indent=1))
    for r in rows:
        print(json.dumps(r))
    failed = len(check.failed)
    print(f"{len(check.rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
