"""GPU cold start of the FLUX.1-dev-shaped transformer with and without the compile-artifact cache.

Two fresh processes run the same variant (default `float8_compile`: cache-dit's float8_per_row plus
regional torch.compile, as `bench/gpu_flux.py` builds it) with the runtime's own
`diffusion_runtime.engine.compile_cache.CompileCache` on a shared folder; each process has its own empty
local inductor folder (as each pod has its own /tmp). The first finds nothing, compiles during its
first generation and publishes; the second restores the artifacts before its first generation.
Printed per process: build, restore, first generation (incl. compile), compile seconds (dynamo's
timer) and a steady generation; the figure is first-generation seconds, first process over second.

Then, in the same run, `bench/gpu_flux.py` measures eager bf16 against the same variant (steady
s/image; its process reuses the second process's local folder, so its compile is short and its
timing, taken after warmup, is unaffected).

    python bench/gpu_cold_start.py [--variant float8_compile] [--size 1024] [--steps 28] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def child(a: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    import torch

    sys.path.insert(0, str(HERE))
    import gpu_flux
    from diffusion_runtime.engine.compile_cache import (
        CompileCache,
        cache_key,
        compile_seconds,
        hardware,
        library_versions,
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = gpu_flux.SMALL if a.small else gpu_flux.FLUX_DEV
    facts = {
        "bench": "gpu_cold_start",
        "transformer": cfg,
        "variant": a.variant,
        "size": a.size,
        "steps": a.steps,
        "text_len": a.text_len,
        "dtype": str(dtype),
        "versions": library_versions(),
        "hardware": hardware(device),
    }
    cache = CompileCache(root=Path(a.shared), key=cache_key(facts), facts=facts, local=Path(a.local))
    row: dict = {"process": a.name}
    t0 = time.perf_counter()
    model = gpu_flux.build_transformer(cfg, device, dtype, seed=0)
    model = gpu_flux.apply_variant(model, a.variant, a.steps)
    row["build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    row["cache"] = cache.restore()
    row["restore_s"] = time.perf_counter() - t0
    inputs = gpu_flux.make_inputs(cfg, a.size, a.text_len, device, dtype)
    t0 = time.perf_counter()
    gpu_flux.denoise(model, inputs, a.steps, device)
    row["first_generation_s"] = time.perf_counter() - t0
    row["compile_s"] = compile_seconds()
    t0 = time.perf_counter()
    gpu_flux.denoise(model, inputs, a.steps, device)
    row["steady_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    row["published"] = cache.publish()
    row["publish_s"] = time.perf_counter() - t0
    row["artifact_mib"] = cache.path.stat().st_size / 2**20 if cache.path.exists() else 0.0
    row["process_to_first_image_s"] = time.perf_counter() - t_start - row["steady_s"] - row["publish_s"]
    print("ROW " + json.dumps(row), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="float8_compile")
    p.add_argument("--small", action="store_true", help="tiny shape (CPU smoke test)")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--text-len", type=int, default=None)
    p.add_argument("--out", default=os.environ.get("OUT"))
    p.add_argument("--no-flux-table", action="store_true", help="skip the gpu_flux.py eager-vs-variant table")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--shared", help=argparse.SUPPRESS)
    p.add_argument("--local", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.size = a.size or (64 if a.small else 1024)
    a.text_len = a.text_len or (32 if a.small else 512)
    if a.child:
        return child(a)

    work = Path(tempfile.mkdtemp(prefix="gpu-cold-start-"))
    shared = work / "shared"
    common = [
        "--variant",
        a.variant,
        "--size",
        str(a.size),
        "--steps",
        str(a.steps),
        "--text-len",
        str(a.text_len),
    ]
    if a.small:
        common.append("--small")
    rows = []
    for name in ("first", "second"):
        log(f"--- {name} process")
        cmd = [sys.executable, __file__, "--child", "--name", name, "--shared", str(shared),
               "--local", str(work / f"inductor-{name}"), *common]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("ROW ")), None)
        if res.returncode != 0 or line is None:
            print(res.stdout[-4000:], res.stderr[-4000:], sep="\n")
            log(f"{name} process failed ({res.returncode})")
            return 1
        rows.append(json.loads(line[4:]))
        log(json.dumps(rows[-1]))
    first, second = rows
    lines = [
        f"Cold start, FLUX.1-dev-shaped transformer, variant {a.variant}, {a.size}x{a.size}, {a.steps} steps",
        "",
        "| process | compile cache | build | restore | first generation | compile (dynamo) | steady generation | artifact |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['process']} | {r['cache']}{' + saved' if r['published'] else ''} | {r['build_s']:.1f} s "
            f"| {r['restore_s']:.2f} s | {r['first_generation_s']:.1f} s | {r['compile_s']:.1f} s "
            f"| {r['steady_s']:.2f} s | {r['artifact_mib']:.1f} MiB |"
        )
    lines.append("")
    lines.append(
        f"first generation: {first['first_generation_s']:.1f} s -> {second['first_generation_s']:.1f} s "
        f"({first['first_generation_s'] / second['first_generation_s']:.2f}x); process start to first image: "
        f"{first['process_to_first_image_s']:.1f} s -> {second['process_to_first_image_s']:.1f} s"
    )
    text = "\n".join(lines)
    print(text, flush=True)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_cold_start.md").write_text(text + "\n")
        (out / "gpu_cold_start.json").write_text(json.dumps(rows, indent=1))
    if a.no_flux_table:
        return 0
    log(f"--- gpu_flux.py eager vs {a.variant} (same run)")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(work / "inductor-second"))
    flux = [sys.executable, str(HERE / "gpu_flux.py"), "--variants", f"eager,{a.variant}", *common[2:]]
    if a.out:
        flux += ["--out", a.out]
    return subprocess.run(flux, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
