"""cache-dit speedup on the `small` random-weight FluxPipeline (CPU), through the runtime's loader.

Two worker processes load the model with `diffusion_runtime.engine.model.load_model`: one without
cache-dit (baseline), one with a cache-dit YAML using a static steps_computation_mask
(`steps_mask(..., "fast")`; random weights never hit DBCache's dynamic thresholds). cache-dit
patches the pipeline's class, so the two cannot share a process; the bench asks them in turn for
the same seeded generation (ABAB..., the order swapping every round, one warm run each first) and
prints the medians with their spread, the speedup of the medians, the cached/computed step counts
and how far the cached image drifts from the baseline (mean absolute pixel difference). Writes every
sample with the command, versions, machine and date as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from _common import run_record, spread, write_result

TAG = "@@bench "  # marks the worker's answers among the libraries' own output on stdout


def answer(proc: subprocess.Popen, name: str) -> dict:
    """The worker's next answer; the lines before it (library logs) go to stderr."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(TAG):
            return json.loads(line[len(TAG) :])
        sys.stderr.write(line)
    raise SystemExit(f"{name} worker exited {proc.wait()}")


def worker(a: argparse.Namespace) -> int:
    """Load the model (with `--cache-dit` YAML if given); for every line on stdin run one generation
    and answer one JSON line: inference seconds, step counts, and the image's pixels on the last."""
    import numpy as np
    from diffusion_runtime.contract.config import RuntimeConfig
    from diffusion_runtime.engine.model import load_model
    from diffusion_runtime.engine.params import GenerationParams

    cfg = RuntimeConfig()
    cfg.model.uri, cfg.model.dtype, cfg.device, cfg.cache_dit_config = a.model, "float32", "cpu", a.cache_dit
    model = load_model(cfg, progress=False)
    width, height = (int(v) for v in a.size.lower().split("x"))
    params = GenerationParams(prompt="a photo of a cat", width=width, height=height, steps=a.steps, seed=1)
    print(TAG + json.dumps({"ready": True, "cache_tag": model.cache_tag}), flush=True)
    for line in sys.stdin:
        res = model.generate(params)
        out = {"s": res.inference_seconds, "cached": res.cached_steps, "computed": res.computed_steps}
        if line.strip() == "image":
            out["pixels"] = np.asarray(res.images[0], dtype=np.float32).ravel().tolist()
        print(TAG + json.dumps(out), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--size", default="128x128")
    p.add_argument("--repeats", type=int, default=8, help="measured generations per side")
    p.add_argument("--policy", default="fast", choices=("slow", "medium", "fast", "ultra"))
    p.add_argument("--model", help="small model folder (default: generate one into a temp dir)")
    p.add_argument("--out", help="write the figures and every sample as JSON here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache-dit", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    args = sys.argv[1:] if argv is None else argv
    record = run_record("runtime_cache.py", args, ("cache-dit",))

    import numpy as np
    from diffusion_runtime.tiny import write_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    model_dir = Path(a.model) if a.model else write_tiny_model(tmp / "small", variant="small")
    cd = {
        "cache_config": {
            "Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 8, "residual_diff_threshold": 0.12,
            "steps_computation_mask": a.policy, "steps_computation_policy": "static", "num_inference_steps": a.steps,
        }
    }  # fmt: skip
    (tmp / "cache-dit.yaml").write_text(yaml.safe_dump(cd))
    base_cmd = [sys.executable, __file__, "--worker", "--model", str(model_dir), "--size", a.size,
                "--steps", str(a.steps)]  # fmt: skip
    procs = {
        "baseline": subprocess.Popen(base_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True),
        "cache-dit": subprocess.Popen(base_cmd + ["--cache-dit", str(tmp / "cache-dit.yaml")],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True),
    }  # fmt: skip

    def ask(name: str, what: str = "run") -> dict:
        proc = procs[name]
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(what + "\n")
        proc.stdin.flush()
        return answer(proc, name)

    try:
        tags = {}
        for name, proc in procs.items():
            tags[name] = answer(proc, name)["cache_tag"]
        first = {name: ask(name, "image") for name in procs}  # warm, and the images to compare
        last = dict(first)
        times: dict[str, list[float]] = {name: [] for name in procs}
        for i in range(a.repeats):
            for name in ("baseline", "cache-dit") if i % 2 == 0 else ("cache-dit", "baseline"):
                last[name] = ask(name)
                times[name].append(last[name]["s"])
    finally:
        for proc in procs.values():
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=60)
    base_t, t = statistics.median(times["baseline"]), statistics.median(times["cache-dit"])
    r = last["cache-dit"]
    diff = float(
        np.abs(np.asarray(first["cache-dit"]["pixels"]) - np.asarray(first["baseline"]["pixels"])).mean()
    )
    print(f"small FluxPipeline (4 double + 8 single blocks, hidden 256), {a.size}, {a.steps} steps, CPU, "
          f"two processes in turn (ABAB...), median (min-max) of {a.repeats}")  # fmt: skip
    for name, label in (("baseline", "baseline "), ("cache-dit", "cache-dit")):
        xs = times[name]
        print(f"{label}  {statistics.median(xs):7.3f} s/image ({min(xs):.3f}-{max(xs):.3f})   cached steps "
              f"{last[name]['cached']}, computed {last[name]['computed']}   ({tags[name]})")  # fmt: skip
    print(f"speedup    {base_t / t:.2f}x (medians)   mean |pixel diff| vs baseline {diff:.1f} / 255")
    if a.out:
        write_result(a.out, {
            **record,
            "model": "small FluxPipeline (4 double + 8 single blocks, hidden 256, random weights)",
            "size": a.size, "steps": a.steps, "device": "cpu", "policy": a.policy, "repeats": a.repeats,
            "order": "two worker processes asked in turn, ABAB/BABA, one warm generation each first",
            "baseline_s": spread(times["baseline"]), "cache_dit_s": spread(times["cache-dit"]),
            "speedup_of_medians": round(base_t / t, 4),
            "cached_steps": r["cached"], "computed_steps": r["computed"], "cache_tag": tags["cache-dit"],
            "mean_abs_pixel_diff": round(diff, 3),
            "samples_s": times,
        })  # fmt: skip
    return 0 if r["cached"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
