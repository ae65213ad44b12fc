"""What the quality gate costs at start-up: two real `diffusion-runtime serve` processes, gate off and on.

Both serve the same model and cache-dit config (a static computation mask, so the optimized pipeline
really differs from the plain one); the second adds `quality_gate` (its default canaries: 2 prompts x
1 seed at the warmup size and steps). Printed per process: seconds from start to `/ready`, warmup
seconds, and the gate's own seconds and figures from `/metrics`; the cost is the difference in the
same run.

    .venv/bin/python bench/quality_gate.py [--variant small] [--size 128x128] [--steps 28]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml
from _common import free_port, serve_until_ready, tiny_model


def start_to_ready(model: Path, work: Path, a: argparse.Namespace, gate: bool) -> dict:
    work.mkdir(parents=True)
    port = free_port()
    width, _, _ = a.size.partition("x")
    cache = {
        "cache_config": {
            "Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 4,
            "residual_diff_threshold": 0.12, "steps_computation_mask": "fast",
            "steps_computation_policy": "static", "num_inference_steps": a.steps,
        }
    }  # fmt: skip
    (work / "cache-dit.yaml").write_text(yaml.safe_dump(cache))
    cfg: dict = {
        "model": {"uri": str(model), "dtype": "float32"},
        "device": "cpu",
        "cache_dit_config": "cache-dit.yaml",
        "warmup": {"resolutions": [a.size], "steps": a.steps},
        "server": {"host": "127.0.0.1", "port": port, "metrics_port": 0},
    }
    if gate:
        cfg["quality_gate"] = {"min_psnr": 0, "min_ssim": -1}  # measure the cost, never fail
    ready, m = serve_until_ready(work, cfg, {}, "gate on" if gate else "gate off")
    row = {
        "gate": gate,
        "ready_s": ready,
        "load_s": m.get("diffusion_model_load_seconds", 0.0),
        "warmup_s": m.get("diffusion_warmup_seconds", 0.0),
        "gate_s": m.get("diffusion_quality_gate_seconds", 0.0),
        "psnr": m.get("diffusion_quality_gate_psnr_decibels"),
        "ssim": m.get("diffusion_quality_gate_ssim"),
    }
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="small", choices=("tiny", "small"))
    p.add_argument("--size", default="128x128")
    p.add_argument("--steps", type=int, default=28)
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="gate-bench-"))
    try:
        model = tiny_model(tmp / "model", a.variant, quiet=True)
        off = start_to_ready(model, tmp / "off", a, gate=False)
        on = start_to_ready(model, tmp / "on", a, gate=True)
        print()
        print(
            "| quality gate | start to Ready | load | warmup | gate (both renderings + compare) | PSNR / SSIM |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        for r in (off, on):
            figures = f"{r['psnr']:.1f} dB / {r['ssim']:.4f}" if r["gate"] else "-"
            print(
                f"| {'on' if r['gate'] else 'off'} | {r['ready_s']:.1f} s | {r['load_s']:.1f} s | "
                f"{r['warmup_s']:.1f} s | {r['gate_s']:.1f} s | {figures} |"
            )
        print(
            f"\ncost: +{on['ready_s'] - off['ready_s']:.1f} s to Ready ({on['ready_s'] / off['ready_s']:.2f}x), the "
            f"gate's own {on['gate_s']:.1f} s = {on['gate_s'] / max(on['warmup_s'], 1e-9):.2f}x the warmup; "
            f"{a.variant} test model on CPU, {a.size} x {a.steps} steps, 2 canaries, load average "
            f"{os.getloadavg()[0]:.1f}"
        )
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
