"""FLUX.1-dev-shaped transformer, random weights: what compile, float8 and cache-dit buy per image.

The transformer has FLUX.1-dev's real config (19 double + 38 single blocks, hidden 3072, 24 heads,
T5 dim 4096, pooled 768, guidance embeds); text encoders and VAE are left out (they run once per
image and are the same in every variant). One image = 28 denoising steps at 1024x1024 (4096 image
tokens + 512 text tokens), a flow-matching Euler loop like FluxPipeline's.

Variants (each on a fresh transformer with the same seeded weights):
  eager       bf16 eager                               (the baseline)
  compile     + torch.compile (regional: the repeated blocks, as diffusers' compile_repeated_blocks)
  float8      + float8_per_row through cache-dit's quantize_config (torchao)
  cache       + cache-dit DBCache with a static steps_computation_mask (cache_dit.steps_mask "fast")
  all         cache + float8 + compile
  float8_compile  float8 + compile, no cache-dit
  cache_compile  cache + compile, no float8 (optional; runs on CPU too)
Prints a table of seconds per image and the speedup against the eager baseline measured in the same
run; a variant that fails prints its error in its row and the run goes on. `--small` runs a tiny
shape (CPU smoke test). The table is also written to $OUT (or --out) as gpu_flux.md and .json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip
SMALL = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32,
    num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
    axes_dims_rope=(8, 12, 12),
)  # fmt: skip
VARIANTS = ("eager", "compile", "float8", "cache", "all", "cache_compile", "float8_compile")
DEFAULT_VARIANTS = ("eager", "compile", "float8", "cache", "all")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_transformer(cfg: dict, device: str, dtype, seed: int):
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in bf16 on the GPU: 24 GB, not 48 GB of fp32 first
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(prev)
    with torch.no_grad():  # diffusers zero-inits the adaLN/out projections; random everywhere instead
        for p in model.parameters():
            if p.dim() >= 1 and not torch.count_nonzero(p):
                p.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def make_inputs(cfg: dict, size: int, text_len: int, device: str, dtype, seed: int = 0):
    import torch
    from diffusers import FluxPipeline

    g = torch.Generator("cpu").manual_seed(seed)
    latent = 2 * (size // 16)  # vae_scale_factor 8, 2x2 packing
    n_img = (latent // 2) ** 2
    x = torch.randn(1, n_img, cfg["in_channels"], generator=g).to(device, dtype)
    txt = torch.randn(1, text_len, cfg["joint_attention_dim"], generator=g).to(device, dtype)
    pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=g).to(device, dtype)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, latent // 2, latent // 2, device, dtype)
    txt_ids = torch.zeros(text_len, 3, device=device, dtype=dtype)
    return x, txt, pooled, img_ids, txt_ids


def denoise(model, inputs, steps: int, device: str):
    """One image: `steps` transformer calls with a flow-matching Euler update (like FluxPipeline)."""
    import torch

    x, txt, pooled, img_ids, txt_ids = inputs
    sigmas = torch.linspace(1.0, 1.0 / steps, steps).tolist() + [0.0]
    guidance = torch.full((1,), 3.5, device=device, dtype=torch.float32)
    with torch.inference_mode():
        for i in range(steps):
            t = torch.full((1,), sigmas[i], device=device, dtype=x.dtype)
            v = model(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
                      img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]  # fmt: skip
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    if device == "cuda":
        torch.cuda.synchronize()
    return x


def apply_variant(model, name: str, steps: int):
    import cache_dit
    from cache_dit import DBCacheConfig, QuantizeConfig

    use_cache = name in ("cache", "all", "cache_compile")
    use_fp8 = name in ("float8", "all", "float8_compile")
    use_compile = name in ("compile", "all", "cache_compile", "float8_compile")
    kwargs = {}
    if use_cache:
        mask = cache_dit.steps_mask(total_steps=steps, mask_policy="fast")
        kwargs["cache_config"] = DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=8, residual_diff_threshold=0.12,
            steps_computation_mask=mask, steps_computation_policy="static", num_inference_steps=steps,
        )  # fmt: skip
    if kwargs:
        cache_dit.enable_cache(model, **kwargs)
    if use_fp8:
        # cache-dit's own quantize (what enable_cache(quantize_config=...) calls per transformer); called
        # apart because enable_cache on a bare transformer with cache_config AND quantize_config fails
        # in cache-dit 1.5.3 (AttributeError in BlockAdapter.normalize).
        qc = QuantizeConfig(quant_type="float8_per_row", exclude_layers=["embedder", "embed"])
        model = cache_dit.quantize(model, quantize_config=qc)
    if use_compile:
        model.compile_repeated_blocks(fullgraph=False)
    return model


def cached_steps(model) -> tuple[int, int] | None:
    import cache_dit

    stats = [s for s in cache_dit.summary(model, logging=False) if s.cache_options]
    if not stats:
        return None
    return int(stats[0].accumulated_cached_steps), int(stats[0].accumulated_executed_steps)


def run_variant(name: str, a, cfg: dict, device: str, dtype, inputs) -> dict:
    import torch

    row: dict = {"variant": name}
    model = None
    try:
        t0 = time.perf_counter()
        model = build_transformer(cfg, device, dtype, seed=0)
        row["build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = apply_variant(model, name, a.steps)
        row["apply_s"] = time.perf_counter() - t0
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(a.warmup):
            denoise(model, inputs, a.steps, device)
        row["warmup_s"] = time.perf_counter() - t0
        log(
            f"{name}: built {row['build_s']:.1f}s, applied {row['apply_s']:.1f}s, warmup (incl. compile) {row['warmup_s']:.1f}s"
        )
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            denoise(model, inputs, a.steps, device)
            times.append(time.perf_counter() - t0)
        row["times_s"] = times
        row["s_per_image"] = min(times)
        row["mean_s"] = sum(times) / len(times)
        cs = cached_steps(model)
        if cs is not None:
            row["cached_steps"], row["executed_steps"] = cs
        if device == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        log(
            f"{name}: {row['s_per_image']:.3f} s/image (runs {', '.join(f'{t:.3f}' for t in times)}), cached {row.get('cached_steps', 0)}"
        )
    except Exception as e:  # noqa: BLE001 - the row records it, the run goes on
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        log(f"{name}: FAILED {row['error']}")
        traceback.print_exc(limit=4)
    finally:
        del model
        gc.collect()
        import torch._dynamo

        torch._dynamo.reset()
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def table(rows: list[dict], header: str) -> str:
    base = next((r for r in rows if r["variant"] == "eager" and "s_per_image" in r), None)
    lines = [header, "", "| variant | s/image (min) | mean | speedup vs eager | cached/steps | peak GiB | note |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | - | - | - | - | - | {r['error']} |")
            continue
        speed = f"{base['s_per_image'] / r['s_per_image']:.2f}x" if base else "n/a"
        cached = f"{r['cached_steps']}/{r['executed_steps']}" if "cached_steps" in r else "0"
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        lines.append(
            f"| {r['variant']} | {r['s_per_image']:.3f} | {r['mean_s']:.3f} | {speed} | {cached} | {peak} | warmup {r['warmup_s']:.0f}s |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny shape (CPU smoke test)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024; --small: 64)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--text-len", type=int, default=None, help="T5 tokens (default 512; --small: 32)")
    p.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {', '.join(VARIANTS)}"
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=os.environ.get("OUT"))
    a = p.parse_args(argv)

    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = SMALL if a.small else FLUX_DEV
    size = a.size or (64 if a.small else 1024)
    text_len = a.text_len or (32 if a.small else 512)
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        print(f"gpu_flux: unknown variant(s) {bad}; choose from {VARIANTS}", file=sys.stderr)
        return 2
    import cache_dit
    import diffusers
    import torchao

    gpu = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    header = (
        f"FLUX.1-dev-shaped transformer ({'small shape' if a.small else '19 double + 38 single blocks, hidden 3072'}), "
        f"random weights, {size}x{size}, {a.steps} steps, {str(dtype).replace('torch.', '')} on {gpu}; "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, cache-dit {cache_dit.__version__}, "
        f"torchao {torchao.__version__}; best of {a.repeats} after {a.warmup} warmup"
    )
    log(header)
    inputs = make_inputs(cfg, size, text_len, device, dtype)
    rows = []
    for name in names:
        log(f"--- {name}")
        rows.append(run_variant(name, a, cfg, device, dtype, inputs))
        text = table(rows, header)
        print(text, flush=True)
        if a.out:  # after every variant: a run cut short still leaves its table
            out = Path(a.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "gpu_flux.md").write_text(text + "\n")
            (out / "gpu_flux.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    return 0 if any("s_per_image" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
