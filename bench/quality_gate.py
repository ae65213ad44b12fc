"""What the quality gate costs at start-up: two real `diffusion-runtime serve` processes, gate off and on.

Both serve the same model and cache-dit config (a static computation mask, so the optimized pipeline
really differs from the plain one); the second adds `quality_gate` (its default canaries: 2 prompts x
1 seed at the warmup size and steps). Printed per process: seconds from start to `/ready`, warmup
seconds, and the gate's own seconds and figures from `/metrics`; the cost is the difference in the
same run. `--rounds` rounds, gate off and on in turn (the order swapping every round: ABBA...);
medians with their spread, and every sample with the command, versions, machine and date in the
JSON (--out).

    .venv/bin/python bench/quality_gate.py [--variant small] [--size 128x128] [--steps 28] [--rounds 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from _common import free_port, run_record, serve_until_ready, spread, tiny_model, write_result


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
    p.add_argument("--rounds", type=int, default=3, help="gate off + gate on per round, the order swapping")
    p.add_argument("--out", help="write the figures and every sample as JSON here")
    a = p.parse_args(argv)
    record = run_record(
        "quality_gate.py", sys.argv[1:] if argv is None else argv, ("cache-dit", "torchmetrics")
    )
    tmp = Path(tempfile.mkdtemp(prefix="gate-bench-"))
    try:
        model = tiny_model(tmp / "model", a.variant, quiet=True)
        offs: list[dict] = []
        ons: list[dict] = []
        for r in range(a.rounds):
            for gate in (False, True) if r % 2 == 0 else (True, False):
                row = start_to_ready(model, tmp / f"{'on' if gate else 'off'}-{r}", a, gate=gate)
                row["round"] = r
                (ons if gate else offs).append(row)
        off = min(offs, key=lambda x: abs(x["ready_s"] - statistics.median(y["ready_s"] for y in offs)))
        on = min(ons, key=lambda x: abs(x["ready_s"] - statistics.median(y["ready_s"] for y in ons)))
        print()
        print(
            "| quality gate | start to Ready | load | warmup | gate (both renderings + compare) | PSNR / SSIM |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        for shown in (off, on):
            figures = f"{shown['psnr']:.1f} dB / {shown['ssim']:.4f}" if shown["gate"] else "-"
            print(
                f"| {'on' if shown['gate'] else 'off'} | {shown['ready_s']:.1f} s | {shown['load_s']:.1f} s | "
                f"{shown['warmup_s']:.1f} s | {shown['gate_s']:.1f} s | {figures} |"
            )
        print(
            f"\ncost: +{on['ready_s'] - off['ready_s']:.1f} s to Ready ({on['ready_s'] / off['ready_s']:.2f}x), the "
            f"gate's own {on['gate_s']:.1f} s = {on['gate_s'] / max(on['warmup_s'], 1e-9):.2f}x the warmup; "
            f"{a.variant} test model on CPU, {a.size} x {a.steps} steps, 2 canaries, load average "
            f"{os.getloadavg()[0]:.1f} (the rounds nearest each median)"
        )
        cost = [n["ready_s"] - f["ready_s"] for n, f in zip(ons, offs, strict=True)]
        print(
            f"cost per round: median +{statistics.median(cost):.1f} s (min {min(cost):.1f}, max {max(cost):.1f})"
        )
        if a.out:
            write_result(a.out, {
                **record,
                "variant": a.variant, "size": a.size, "steps": a.steps, "device": "cpu", "canaries": 2,
                "rounds": a.rounds, "order": "gate off/on in turn, the order swapping every round",
                "gate_off_ready_s": spread([x["ready_s"] for x in offs]),
                "gate_on_ready_s": spread([x["ready_s"] for x in ons]),
                "cost_ready_s_per_round": spread(cost),
                "gate_s": spread([x["gate_s"] for x in ons]),
                "psnr_db": spread([x["psnr"] for x in ons]),
                "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                "samples": {"gate_off": offs, "gate_on": ons},
            })  # fmt: skip
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
