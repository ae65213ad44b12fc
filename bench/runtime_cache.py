"""cache-dit speedup on the `small` random-weight FluxPipeline (CPU), through the runtime's loader.

Loads the model twice with `diffusion_runtime.engine.model.load_model`: once without cache-dit (baseline),
once with a cache-dit YAML using a static steps_computation_mask (`steps_mask(..., "fast")`;
random weights never hit DBCache's dynamic thresholds). Times the same seeded generations and
prints seconds per image, the speedup, the cached/computed step counts from cache_dit.summary,
and how far the cached image drifts from the baseline (mean absolute pixel difference).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import yaml


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--size", default="128x128")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--policy", default="fast", choices=("slow", "medium", "fast", "ultra"))
    p.add_argument("--model", help="small model folder (default: generate one into a temp dir)")
    a = p.parse_args(argv)

    import numpy as np
    from diffusion_runtime.contract.config import RuntimeConfig
    from diffusion_runtime.engine.model import load_model
    from diffusion_runtime.engine.params import GenerationParams
    from diffusion_runtime.tiny import write_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    model_dir = Path(a.model) if a.model else write_tiny_model(tmp / "small", variant="small")
    width, height = (int(v) for v in a.size.lower().split("x"))
    cd = {
        "cache_config": {
            "Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 8, "residual_diff_threshold": 0.12,
            "steps_computation_mask": a.policy, "steps_computation_policy": "static", "num_inference_steps": a.steps,
        }
    }  # fmt: skip
    (tmp / "cache-dit.yaml").write_text(yaml.safe_dump(cd))
    results = {}
    for name, cache_path in (("baseline", None), ("cache-dit", str(tmp / "cache-dit.yaml"))):
        cfg = RuntimeConfig()
        cfg.model.uri, cfg.model.dtype, cfg.device, cfg.cache_dit_config = (
            str(model_dir),
            "float32",
            "cpu",
            cache_path,
        )
        model = load_model(cfg, progress=False)
        params = GenerationParams(
            prompt="a photo of a cat", width=width, height=height, steps=a.steps, seed=1
        )
        model.generate(params)  # warm
        times, res = [], None
        for _ in range(a.repeats):
            res = model.generate(params)
            times.append(res.inference_seconds)
        results[name] = (min(times), res, model.cache_tag)
        del model
    base_t, base_r, _ = results["baseline"]
    t, r, tag = results["cache-dit"]
    diff = np.abs(
        np.asarray(r.images[0], dtype=np.float32) - np.asarray(base_r.images[0], dtype=np.float32)
    ).mean()
    print(
        f"small FluxPipeline (4 double + 8 single blocks, hidden 256), {a.size}, {a.steps} steps, CPU, best of {a.repeats}"
    )
    print(f"baseline   {base_t:7.3f} s/image   computed steps {base_r.computed_steps}")
    print(
        f"cache-dit  {t:7.3f} s/image   cached steps {r.cached_steps}, computed {r.computed_steps}   ({tag})"
    )
    print(f"speedup    {base_t / t:.2f}x   mean |pixel diff| vs baseline {diff:.1f} / 255")
    return 0 if r.cached_steps > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
