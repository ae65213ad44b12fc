"""Whole FLUX.1-dev-shaped pipeline, end to end as the seed measures it: what compile, float8 and cache-dit buy.

Every component at FLUX.1-dev's real shape with random weights created on the device from configs
(no download): T5-XXL encoder (24 layers, d_model 4096, gated-GELU), CLIP-L text encoder, the FLUX
transformer (19 double + 38 single blocks, hidden 3072), the FLUX VAE (16 latent channels), the
flow-matching scheduler. One image = `FluxPipeline(prompt, 1024x1024, 28 steps, guidance 3.5)`: text
encoding, the 28 denoising steps and the VAE decode, as in the seed's FLUX.1-dev figures (H200:
3.73 s eager -> 2.77 s with float8).

Each variant is applied exactly as the runtime applies it (`engine.model.optimize_pipeline`: the
cache-dit YAML through `plan_cache_dit` / `apply_plan`, then regional `torch.compile`):

  eager          bf16, nothing else (the baseline; measured first and again last: the drift is shown)
  compile        compile: true
  float8         quantize: float8_per_row (samples/flux-dev.yaml's quantize section)
  cache_static   cache-dit DBCache F1B0 with a static mask (cache_dit.steps_mask "fast": the same steps
                 skipped whatever the content)
  cache_dynamic  samples/flux-dev.yaml's cacheDit (residual threshold 0.12 + TaylorSeer): what is
                 skipped depends on the content; with random weights few steps pass the threshold
  all            cache_dynamic + float8 + compile (samples/flux-dev.yaml as written)

A variant runs in its own process (cache-dit patches the pipeline's class), after warmup: the median
of `--runs` timed calls (min, max and every sample kept), peak GPU memory, cached steps; images/s at
each of `--batches` for `--batch-variants`. Ratios are against the eager baseline of the same run.
A variant that fails records its error and the run goes on.

    python bench/gpu_pipeline.py [--variants ...] [--runs 5] [--out DIR]           # a GPU
    python bench/gpu_pipeline.py --small --device cpu --size 64 --steps 8 --runs 2  # CPU (tests)

`--small` builds the tests' tiny random FluxPipeline (`diffusion_runtime.tiny`) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml
from gpu_flux import FLUX_DEV

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "flux-dev.yaml"
VARIANTS = ("eager", "compile", "float8", "cache_static", "cache_dynamic", "all")
SEED_FIGURES = {"eager_s": 3.73, "float8_s": 2.77, "source": "the seed's FLUX.1-dev 1024x1024 28 steps, H200"}

T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new", is_gated_act=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)  # fmt: skip
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
)  # fmt: skip
FLUX_TRANSFORMER = FLUX_DEV  # one definition of FLUX.1-dev's transformer config: bench/gpu_flux.py
FLUX_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
    scaling_factor=0.3611, shift_factor=0.1159,
)  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the variants (runtime settings)


def variant_settings(name: str, steps: int) -> tuple[dict, bool]:
    """(the cache-dit YAML mapping the operator would render, compile) of a variant."""
    import cache_dit

    spec = yaml.safe_load(SAMPLE.read_text())["spec"]
    float8 = {"quantize_config": dict(spec["quantize"])}
    dynamic = {"cache_config": {**spec["cacheDit"]["cache_config"], "num_inference_steps": steps}}
    static = {
        "cache_config": {
            "Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 8, "residual_diff_threshold": 0.12,
            "steps_computation_mask": [int(x) for x in cache_dit.steps_mask(total_steps=steps, mask_policy="fast")],
            "steps_computation_policy": "static", "num_inference_steps": steps,
        }
    }  # fmt: skip
    return {
        "eager": ({}, False),
        "compile": ({}, True),
        "float8": (float8, False),
        "cache_static": (static, False),
        "cache_dynamic": (dynamic, False),
        "all": ({**dynamic, **float8}, bool(spec.get("compile"))),
    }[name]


# ------------------------------------------------------------------ the pipeline


def build_pipeline(small: bool, device: str, dtype, seed: int = 0):
    import torch

    if small:
        from diffusion_runtime.tiny import build_tiny_pipeline

        return build_tiny_pipeline("tiny", seed).to(device, dtype)
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusion_runtime.tiny import _clip_vocab, _t5_vocab
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5Tokenizer,
    )

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 on the device: no fp32 copy of 17B parameters first
    try:
        with torch.device(device):
            torch.manual_seed(seed)
            transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER)
            vae = AutoencoderKL(**FLUX_VAE)
            text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L))
            text_encoder_2 = T5EncoderModel(T5Config(**T5_XXL))
    finally:
        torch.set_default_dtype(prev)
    with torch.no_grad():  # diffusers zero-inits the adaLN/out projections: random everywhere instead
        for p in transformer.parameters():
            if p.dim() >= 1 and not torch.count_nonzero(p):
                p.normal_(0.0, 0.02)
    # the tests' offline tokenizers (their ids fit the real vocabularies); T5 reads 512 tokens as FLUX.1-dev
    clip_vocab, merges = _clip_vocab()
    tokenizer = CLIPTokenizer(vocab=clip_vocab, merges=merges)
    tokenizer.model_max_length = 77
    tokenizer_2 = T5Tokenizer(vocab=_t5_vocab(), extra_ids=0)
    tokenizer_2.model_max_length = 512
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
        base_shift=0.5, max_shift=1.15,
    )  # fmt: skip
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    ).to(device)  # fmt: skip


def cached_steps(pipe) -> int:
    import cache_dit

    try:
        stats = [s for s in cache_dit.summary(pipe, logging=False) if s.cache_options]
    except Exception:  # noqa: BLE001 - no cache-dit on this pipeline
        return 0
    return int(stats[0].accumulated_cached_steps) if stats else 0


def worker(a: argparse.Namespace) -> dict:
    import torch
    from diffusion_runtime.engine.model import optimize_pipeline
    from diffusion_runtime.engine.optimize import plan_cache_dit

    device = a.device
    dtype = torch.float32 if a.small and device == "cpu" else torch.bfloat16
    t = time.perf_counter()
    pipe = build_pipeline(a.small, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    built = time.perf_counter() - t
    raw, compile_ = variant_settings(a.worker, a.steps)
    capability = torch.cuda.get_device_capability() if device == "cuda" else None
    plan = plan_cache_dit(raw, device, capability) if raw else None
    optimize_pipeline(pipe, plan, raw.get("quantize_config") if plan else None, compile_)

    def call(batch: int, seed: int) -> float:
        gens = [torch.Generator(device).manual_seed(seed + i) for i in range(batch)]
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe(prompt=["a photo of a cat"] * batch, height=a.size, width=a.size, num_inference_steps=a.steps,
             guidance_scale=3.5, generator=gens, output_type="pil")  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    t = time.perf_counter()
    for i in range(a.warmup + (2 if compile_ else 0)):  # compile: the first calls build the graphs
        call(1, 100 + i)
    warm = time.perf_counter() - t
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    samples = [call(1, 1000 + i) for i in range(a.runs)]
    cached = cached_steps(pipe)  # of the last call: cache-dit starts a fresh context on every call
    row = {
        "variant": a.worker, "cache_dit": raw, "compile": compile_, "build_s": round(built, 1),
        "warmup_s": round(warm, 1), "samples_s": [round(x, 4) for x in samples],
        "s_per_image": round(statistics.median(samples), 4), "min_s": round(min(samples), 4),
        "max_s": round(max(samples), 4), "cached_steps_per_image": cached, "steps": a.steps,
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None,
        "throughput": {},
    }  # fmt: skip
    if a.worker in a.batch_variants.split(","):
        for b in (int(x) for x in a.batches.split(",")):
            times = [call(b, 2000 + 10 * i) for i in range(max(2, a.runs // 2))]
            row["throughput"][str(b)] = {"images_per_s": round(b / statistics.median(times), 3),
                                         "samples_s": [round(x, 4) for x in times]}  # fmt: skip
    return row


# ------------------------------------------------------------------ the driver


def run_one(a: argparse.Namespace, variant: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, "--worker", variant, "--row-out", str(out), "--device", a.device,
               "--size", str(a.size), "--steps", str(a.steps), "--runs", str(a.runs), "--warmup", str(a.warmup),
               "--batches", a.batches, "--batch-variants", a.batch_variants, *(["--small"] if a.small else [])]  # fmt: skip
        log(f"{variant}: {' '.join(cmd[2:])}")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
        if proc.returncode != 0 or not out.is_file():
            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
            log(f"{variant}: FAILED ({err})")
            return {"variant": variant, "error": err, "stderr_tail": proc.stderr[-3000:]}
        row = json.loads(out.read_text())
        log(f"{variant}: {row['s_per_image']} s/image (min {row['min_s']}, max {row['max_s']}), "
            f"cached {row['cached_steps_per_image']}/{a.steps}")  # fmt: skip
        return row


def table(rows: list[dict], base: float | None) -> str:
    lines = ["| variant | s/image (median) | min - max | vs eager | cached steps | peak GiB | images/s by batch |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:120]} | | | | | |")
            continue
        ratio = f"{base / r['s_per_image']:.2f}x" if base else ""
        tput = ", ".join(f"{b}: {v['images_per_s']}" for b, v in r["throughput"].items())
        lines.append(f"| {r['variant']} | {r['s_per_image']} | {r['min_s']} - {r['max_s']} | {ratio} | "
                     f"{r['cached_steps_per_image']}/{r['steps']} | {r['peak_gib'] or ''} | {tput} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batches", default="1,2,4")
    ap.add_argument("--batch-variants", default="eager,all")
    ap.add_argument("--small", action="store_true", help="the tests' tiny FluxPipeline (CPU)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per variant process")
    ap.add_argument("--out", type=Path, help="write gpu_pipeline[_small].json and .md there")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        a.row_out.write_text(json.dumps(worker(a)))
        return 0
    wanted = [v for v in a.variants.split(",") if v]
    unknown = sorted(set(wanted) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    order = ["eager", *[v for v in wanted if v != "eager"]]
    rows = [run_one(a, v) for v in order]
    rows.append({**run_one(a, "eager"), "variant": "eager (again, last)"})
    eager = [r["s_per_image"] for r in (rows[0], rows[-1]) if "error" not in r]
    base = statistics.mean(eager) if eager else None
    import torch

    report = {
        "what": "whole FluxPipeline, FLUX.1-dev shapes, random weights" if not a.small else "tiny FluxPipeline",
        "command": " ".join(["bench/gpu_pipeline.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "size": a.size, "steps": a.steps, "runs": a.runs, "device": a.device,
        "gpu": torch.cuda.get_device_name() if a.device == "cuda" and torch.cuda.is_available() else None,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     **{m: __import__(m).__version__ for m in ("diffusers", "transformers", "cache_dit", "torchao")}},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "eager_baseline_s": base, "eager_drift": round(eager[-1] / eager[0], 3) if len(eager) == 2 else None,
        "seed_figures": SEED_FIGURES, "rows": rows,
    }  # fmt: skip
    md = table(rows, base)
    print(md)
    print(f"eager baseline {base} s/image (first/last drift x{report['eager_drift']}); "
          f"the seed: {SEED_FIGURES['eager_s']} s eager, {SEED_FIGURES['float8_s']} s float8 ({SEED_FIGURES['source']})")  # fmt: skip
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        stem = "gpu_pipeline_small" if a.small else "gpu_pipeline"
        (a.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
        (a.out / f"{stem}.md").write_text(md + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
