"""`diffusion-runtime` command line: serve, generate, download, tiny-model. A flag overrides the config file."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

from diffusion_runtime.contract.config import (
    DEVICES,
    DTYPES,
    OVERRIDES,
    ConfigError,
    RuntimeConfig,
    apply_overrides,
    load_config_file,
    parse_size,
    setting_field,
    validate,
)
from diffusion_runtime.tiny import VARIANTS


def _add_override_flags(p: argparse.ArgumentParser) -> None:
    """One flag per `OVERRIDES` entry, its type, choices and help taken from the setting's field."""
    for dest, path in OVERRIDES.items():
        field = setting_field(path)
        flag = "--" + dest.replace("_", "-")
        kind = next((a for a in (field.annotation, *get_args(field.annotation)) if a is not type(None)), str)
        help = f"{field.description} ({path})"
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif get_origin(kind) is Literal:
            p.add_argument(flag, choices=get_args(kind), help=help)
        elif get_origin(kind) is list:
            p.add_argument(flag, action="append", help=f"{help}; repeatable")
        else:
            p.add_argument(flag, type=kind if kind in (int, float) else str, help=help)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="diffusion-runtime", description="Serve a diffusers pipeline with cache-dit."
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the HTTP server (OpenAI images API, /health, /ready, /metrics)")
    s.add_argument("--config", help="runtime.yaml (docs/contracts.md)")
    _add_override_flags(s)

    f = sub.add_parser(
        "front-door",
        help="serve the images API in front of the shared queue (the runtime.yaml's queue: section; "
        "DIFFUSION_QUEUE_URL); no model, no GPU",
    )
    f.add_argument("--config", required=True, help="runtime.yaml with a queue: section (docs/queue.md)")

    g = sub.add_parser("generate", help="generate one image to a PNG file")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--size", default="64x64", help="WxH (default 64x64, the tiny model's size)")
    g.add_argument("--steps", type=int, default=8)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--guidance-scale", type=float)
    g.add_argument("--cache-dit-config")
    g.add_argument("--device", choices=DEVICES, default="auto")
    g.add_argument("--dtype", choices=DTYPES, default="float32")
    g.add_argument("--output", required=True, help="FILE.png")

    d = sub.add_parser(
        "download",
        help="fill a model cache folder from the Hugging Face Hub (the pipeline's files only; "
        "progress as JSON lines; a completion marker only when whole and verified)",
    )
    d.add_argument("--model", required=True, help="hf://org/name or org/name")
    d.add_argument("--revision", help="branch, tag or commit (default main); resolved to one commit")
    d.add_argument("--dest", required=True, help="the cache folder (the model's files land here)")
    d.add_argument("--variant", help="weight variant (fp16, ...); default: the plain weights")
    d.add_argument(
        "--adapter",
        nargs=4,
        action="append",
        metavar=("URI", "REVISION", "WEIGHT_NAME", "DEST"),
        help="also fetch a LoRA adapter's weight file (hf://org/name at REVISION) into DEST, verified, "
        "with its own completion marker; repeatable",
    )
    d.add_argument("--progress-interval", type=float, default=2.0, help="seconds between progress lines")
    d.add_argument("--termination-log", help="also write the last progress line here (/dev/termination-log)")

    t = sub.add_parser(
        "tiny-model",
        help="write a random-weight tiny pipeline (FluxPipeline; wan-tiny: WanPipeline; wan-i2v-tiny: "
        "WanImageToVideoPipeline) into DIR",
    )
    t.add_argument("dir")
    t.add_argument("--variant", choices=VARIANTS, default="tiny")
    t.add_argument("--seed", type=int, default=0)
    return p


def _serve(a: argparse.Namespace, argv: list[str]) -> int:
    from diffusion_runtime.engine.distributed import run_worker, worker_rank
    from diffusion_runtime.serve import device_warmup_defaults, run_server

    cfg = load_config_file(a.config) if a.config else RuntimeConfig()
    source = "the config" if a.config else "the flags"
    if not a.config and a.warmup_steps is None and a.warmup_size is None:
        source = device_warmup_defaults(cfg, a.device or cfg.device)
    apply_overrides(cfg, **{dest: getattr(a, dest) for dest in OVERRIDES})
    if worker_rank() is not None:  # a rank that rank 0 started: same command line, no HTTP
        return run_worker(cfg)
    return run_server(cfg, argv, warmup_source=source)


def _generate(a: argparse.Namespace) -> int:
    from diffusion_runtime.engine.model import load_model
    from diffusion_runtime.engine.params import GenerationParams

    width, height = parse_size(a.size)
    cfg = RuntimeConfig()
    apply_overrides(
        cfg, model=a.model, cache_dit_config=a.cache_dit_config, device=a.device, dtype=a.dtype,
        warmup_steps=a.steps, warmup_size=[a.size],
    )  # fmt: skip
    if width < 16 or height < 16 or width % 16 or height % 16:
        raise ConfigError(f"--size {a.size}: width and height must be positive multiples of 16")
    validate(cfg)
    if a.cache_dit_config:
        from diffusion_runtime.contract.parallel import layout_of
        from diffusion_runtime.engine.optimize import read_cache_dit_yaml

        layout = layout_of(read_cache_dit_yaml(a.cache_dit_config))
        if layout.world_size > 1:
            raise ConfigError(
                f"parallelism_config: {layout.describe()}; `generate` runs one process, "
                "`diffusion-runtime serve` starts the ranks"
            )
    model = load_model(cfg)
    result = model.generate(
        GenerationParams(
            prompt=a.prompt,
            width=width,
            height=height,
            steps=a.steps,
            seed=a.seed,
            guidance_scale=a.guidance_scale,
        )
    )
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.images[0].save(out, format="PNG")
    print(
        f"wrote {out} ({width}x{height}, {a.steps} steps, seed {a.seed}) in {result.inference_seconds:.2f}s; "
        f"cached steps {result.cached_steps}, computed {result.computed_steps}; cache {model.cache_tag}"
    )
    return 0


def _tiny(a: argparse.Namespace) -> int:
    from diffusion_runtime.tiny import write_tiny_model

    folder = write_tiny_model(a.dir, a.variant, a.seed)
    pipeline = json.loads((folder / "model_index.json").read_text())["_class_name"]
    print(f"wrote the {a.variant} {pipeline} to {folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from diffusion_runtime.engine.model import ModelError

    try:
        if args.command == "serve":
            return _serve(args, argv)
        if args.command == "front-door":
            from diffusion_runtime.queue.frontdoor import run_front_door

            return run_front_door(load_config_file(args.config))
        if args.command == "generate":
            return _generate(args)
        if args.command == "download":
            from diffusion_runtime.download import run

            return run(args)
        return _tiny(args)
    except (ConfigError, ModelError, ValueError) as e:
        print(f"diffusion-runtime: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
