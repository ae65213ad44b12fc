"""LoRA adapters: the latency of a request that switches adapters vs one that keeps the same adapter.

Loads a tiny-family FluxPipeline (`--variant`, default `small`) through the runtime's own
`load_model` with two LoRAs made here with peft (ranks `--ranks`, non-zero random weights, saved by
diffusers' `save_lora_weights`), and runs, interleaved in one run, requests that keep the previous
request's adapter and requests that switch to the other one (B, B, A, A, B, B, ...: every other
request switches), and the paired difference of each switch request and the keep request after it. Per mode (`eager`, and `compile` with torch.compile): the engine call's latency
(`Model.generate`: setting the scales + the pipeline call) of keep vs switch requests, medians with
p10/p90; the time of the scale switch alone (`Adapters.activate`); torch's own compile counters
(frames compiled, unique graphs) before and after the measured requests; and the base model's
latency with the adapters declared (all active at scale 0) vs a pipeline without adapters, interleaved
(the cost of keeping them loaded). With `--compile`, also what diffusers' own `set_adapters` per
request would cost under compile: the frames it recompiles for a first round of five adapter
combinations, then for ten requests alternating A and B at scales not seen before.

    python bench/lora_switch.py [--requests 40] [--compile] [--out bench/results/lora_switch_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summary(xs: list[float]) -> dict:
    return {
        "n": len(xs),
        "median_ms": round(statistics.median(xs) * 1000, 3),
        "p10_ms": round(pct(xs, 0.1) * 1000, 3),
        "p90_ms": round(pct(xs, 0.9) * 1000, 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="small")
    p.add_argument("--ranks", type=int, nargs=2, default=[16, 64])
    p.add_argument("--requests", type=int, default=40, help="measured requests per mode (half switch)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", default="128x128")
    p.add_argument("--compile", action="store_true", help="also measure under torch.compile")
    p.add_argument("--out", help="write the JSON result here")
    a = p.parse_args(argv)

    import torch
    from diffusion_runtime.contract.config import config_from_dict, parse_size, validate
    from diffusion_runtime.engine.model import load_model
    from diffusion_runtime.engine.params import GenerationParams
    from diffusion_runtime.tiny import write_tiny_lora, write_tiny_model
    from torch._dynamo.utils import counters

    torch.set_num_threads(1)
    width, height = parse_size(a.size)
    tmp = Path(tempfile.mkdtemp(prefix="lora-switch-"))
    model_dir = write_tiny_model(tmp / "model", a.variant)
    paths = {
        "a": write_tiny_lora(model_dir, tmp / "a", seed=1, rank=a.ranks[0], std=0.05),
        "b": write_tiny_lora(model_dir, tmp / "b", seed=2, rank=a.ranks[1], std=0.05),
    }

    def config(adapters: bool, compile_: bool):
        raw = {
            "model": {"uri": str(model_dir), "dtype": "float32"},
            "device": "cpu",
            "compile": compile_,
            "warmup": {"resolutions": [a.size], "steps": a.steps},
        }
        if adapters:
            raw["adapters"] = [{"name": n, "path": str(path)} for n, path in paths.items()]
        return validate(config_from_dict(raw))

    def params(adapters: tuple) -> GenerationParams:
        return GenerationParams(
            prompt="a photo of a cat", width=width, height=height, steps=a.steps, seed=7, adapters=adapters
        )

    def timed(model, adapters: tuple) -> float:
        t0 = time.perf_counter()
        model.generate(params(adapters))
        return time.perf_counter() - t0

    def compile_counts() -> dict:
        return {
            "frames": int(counters["frames"]["ok"]),
            "unique_graphs": int(counters["stats"]["unique_graphs"]),
        }

    A, B = (("a", 1.0),), (("b", 1.0),)
    result: dict = {
        "bench": "lora_switch",
        "device": "cpu",
        "torch_threads": 1,
        "machine": platform.machine(),
        "variant": a.variant,
        "ranks": {"a": a.ranks[0], "b": a.ranks[1]},
        "size": a.size,
        "steps": a.steps,
        "modes": {},
    }
    for mode in ["eager"] + (["compile"] if a.compile else []):
        compile_ = mode == "compile"
        t0 = time.perf_counter()
        model = load_model(config(True, compile_), progress=False)
        plain = load_model(config(False, compile_), progress=False)
        for m in (model, plain):
            m.warmup()
        for ads in (A, B, A):  # first calls with non-zero scales
            timed(model, ads)
        setup = time.perf_counter() - t0
        before = compile_counts()
        keep: list[float] = []
        switch: list[float] = []
        current = A
        for i in range(a.requests):
            if i % 2 == 0:  # every other request switches to the other adapter
                current = B if current == A else A
                switch.append(timed(model, current))
            else:
                keep.append(timed(model, current))
        after = compile_counts()
        activations = []
        for i in range(200):
            t1 = time.perf_counter()
            model.adapters.activate(A if i % 2 else B)
            activations.append(time.perf_counter() - t1)
        base_declared: list[float] = []
        base_plain: list[float] = []
        for _ in range(a.requests // 2):  # interleaved: the same machine state for both
            base_declared.append(timed(model, ()))
            base_plain.append(timed(plain, ()))
        keep_s, switch_s = summary(keep), summary(switch)
        result["modes"][mode] = {
            "setup_seconds": round(setup, 2),
            "keep": keep_s,
            "switch": switch_s,
            "switch_minus_keep_median_ms": round(switch_s["median_ms"] - keep_s["median_ms"], 3),
            # each switch request minus the keep request right after it (same adapter, same moment)
            "paired_switch_minus_keep": summary([s - k for s, k in zip(switch, keep, strict=True)]),
            "activate_switch": summary(activations),
            "base_with_adapters_declared": summary(base_declared),
            "base_without_adapters": summary(base_plain),
            "compile_counters_before": before,
            "compile_counters_after": after,
            "recompiles_during_measured_requests": after["frames"] - before["frames"],
        }
        print(json.dumps({mode: result["modes"][mode]}, indent=1), flush=True)
        del model, plain

    if a.compile:
        # the alternative: diffusers' set_adapters per request (scales as floats, the active list changing)
        from diffusion_runtime.engine.adapters import Adapters

        model = load_model(config(True, True), progress=False)
        model.warmup()
        pipe = model.pipe
        model.adapters = Adapters(())  # the calls below set adapters with diffusers' own API instead

        def set_adapters(ads: tuple) -> None:
            if ads:
                pipe.enable_lora()
                pipe.set_adapters([n for n, _ in ads], adapter_weights=[s for _, s in ads])
            else:
                pipe.disable_lora()

        cycle = [A, B, (), (("a", 0.5), ("b", 0.5)), (("a", 0.3),)]
        warm = compile_counts()
        for ads in cycle:  # one round: every combination once
            set_adapters(ads)
            timed(model, ())
        before = compile_counts()
        for i in range(10):  # the same adapters, a scale not seen before (per-request scales)
            set_adapters(tuple((n, round(0.15 + 0.1 * i, 2)) for n, _ in cycle[i % 2]))
            timed(model, ())
        after = compile_counts()
        result["diffusers_set_adapters_under_compile"] = {
            "cycle": [[list(x) for x in c] for c in cycle],
            "compile_counters_after_warmup": warm,
            "compile_counters_after_one_round": before,
            "compile_counters_after_10_more_requests": after,
            "recompiles_first_round": before["frames"] - warm["frames"],
            "recompiles_next_10_requests_new_scales": after["frames"] - before["frames"],
        }
        print(json.dumps(result["diffusers_set_adapters_under_compile"], indent=1), flush=True)

    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
