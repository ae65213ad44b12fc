"""Cold start with and without the compile-artifact cache: two real `diffusion-runtime serve` processes.

Both processes serve the same runtime.yaml (`compile: true`, `compile_cache_dir` on a shared folder)
and each gets its own empty local inductor folder, as each pod has its own /tmp. The first process
finds no artifacts, compiles and publishes them; the second restores them. For each: seconds from
process start to `/ready` answering 200, and what `/metrics` says (model load, warmup, compile seconds,
cache lookup result). The ratio first/second is the figure; both run in the same invocation.

    .venv/bin/python bench/cold_start.py [--variant small] [--size 64x64] [--steps 2] [--runs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from _common import free_port, serve_until_ready, tiny_model


def start_to_ready(model: Path, work: Path, shared: Path, a: argparse.Namespace, name: str) -> dict:
    work.mkdir(parents=True)
    port = free_port()
    cfg = {
        "model": {"uri": str(model), "dtype": "float32"},
        "device": "cpu",
        "compile": True,
        "compile_cache_dir": str(shared),
        "warmup": {"resolutions": [a.size], "steps": a.steps},
        "server": {"host": "127.0.0.1", "port": port, "metrics_port": 0},
    }
    env = {"TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}
    ready, m = serve_until_ready(work, cfg, env, name)
    lookup = next(
        (k.split("result=")[1].rstrip("}") for k, v in m.items()
         if k.startswith("diffusion_compile_cache_lookups_total") and v),
        "none",
    )  # fmt: skip
    row = {
        "process": name,
        "ready_s": ready,
        "load_s": m.get("diffusion_model_load_seconds", 0.0),
        "warmup_s": m.get("diffusion_warmup_seconds", 0.0),
        "compile_s": m.get("diffusion_compile_seconds", 0.0),
        "cache": lookup,
        "saved": int(m.get("diffusion_compile_cache_saves_total", 0)),
    }
    print(
        f"{name}: ready in {ready:.1f}s (load {row['load_s']:.1f}s, warmup {row['warmup_s']:.1f}s, "
        f"compile {row['compile_s']:.1f}s, cache {lookup}, saved {row['saved']})",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="small", choices=("tiny", "small"), help="test model size")
    p.add_argument("--size", default="64x64")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--runs", type=int, default=1, help="repeat the cold/warm pair")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="cold-start-"))
    try:
        model = tiny_model(tmp / "model", a.variant, quiet=True)
        rows = []
        for run in range(a.runs):
            shared = tmp / f"shared-{run}"
            first = start_to_ready(model, tmp / f"r{run}-first", shared, a, "first process (empty cache)")
            second = start_to_ready(model, tmp / f"r{run}-second", shared, a, "second process (artifacts)")
            rows.append((first, second))
        print()
        print("| run | first: ready / compile | second: ready / compile | ready ratio | compile ratio |")
        print("| --- | --- | --- | --- | --- |")
        for i, (f, s) in enumerate(rows):
            print(
                f"| {i + 1} | {f['ready_s']:.1f} s / {f['compile_s']:.1f} s ({f['cache']}) "
                f"| {s['ready_s']:.1f} s / {s['compile_s']:.1f} s ({s['cache']}) "
                f"| {f['ready_s'] / s['ready_s']:.2f}x | {f['compile_s'] / max(s['compile_s'], 1e-9):.2f}x |"
            )
        print(
            f"\nmodel: {a.variant} test pipeline on CPU, warmup {a.size} x {a.steps} steps, compile: true; "
            f"torch {__import__('torch').__version__}, {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.1f}"
        )
        if a.json:
            Path(a.json).write_text(json.dumps([{"first": f, "second": s} for f, s in rows], indent=1))
        ok = all(s["cache"] == "hit" and f["saved"] == 1 for f, s in rows)
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
