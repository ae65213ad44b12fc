"""The pipeline calls the worker makes: text-to-image, and edits through image-to-image / inpaint
variants of the loaded pipeline.

Variants come from diffusers' `AutoPipelineForImage2Image.from_pipe` /
`AutoPipelineForInpainting.from_pipe`: the same modules (transformer, VAE, text encoders), no
copies. cache-dit: its hooks live on the shared transformer, but its per-call cache context is
opened by a wrapper on the *loaded* pipeline's class only, so a variant is called inside that same
context (`_cache_context`): an edit is cached exactly like a generation, and its cached/computed
steps are read from the loaded pipeline's stats.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any

from diffusion_runtime.images import encode
from diffusion_runtime.scheduler import PipelineCall, Rejected

EDIT_VARIANTS = {"img2img": "AutoPipelineForImage2Image", "inpaint": "AutoPipelineForInpainting"}
DEFAULT_STRENGTH = {"img2img": 0.6, "inpaint": 1.0}


def edit_steps(steps: int, strength: float) -> tuple[int, float]:
    """(denoising steps that run, strength used): diffusers runs steps - int(steps * (1 - strength));
    a strength too small for one step is raised to 1/steps, so at least one step runs."""
    strength = max(strength, 1.0 / steps)
    init = min(steps * strength, steps)
    return steps - int(max(steps - init, 0)), strength


class EditPipelines:
    """The loaded pipeline's edit variants, built on first use and kept."""

    def __init__(self, model: Any):
        self.model = model
        self._pipes: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, kind: str) -> Any:
        with self._lock:
            if kind in self._pipes:
                return self._pipes[kind]
            import diffusers

            auto = getattr(diffusers, EDIT_VARIANTS[kind])
            try:
                pipe = auto.from_pipe(self.model.pipe)
            except (ValueError, KeyError, TypeError) as e:
                what = "inpainting (a mask)" if kind == "inpaint" else "image-to-image"
                raise Rejected(
                    400,
                    f"the loaded pipeline {self.model.pipeline_name} has no {what} variant in diffusers "
                    f"({type(e).__name__}); /v1/images/edits is not available for this model",
                    param="mask" if kind == "inpaint" else "image",
                ) from e
            pipe.set_progress_bar_config(disable=True)
            self._pipes[kind] = pipe
            return pipe


@contextlib.contextmanager
def _cache_context(model: Any) -> Iterator[None]:
    """Open the loaded pipeline's cache-dit context (what its wrapped __call__ does) around a call."""
    if not (model.plan and model.plan.uses_cache_dit):
        yield
        return
    call = type(model.pipe).__call__
    try:
        cv = inspect.getclosurevars(call).nonlocals
        manager, names, kwargs = cv["context_manager"], cv["flatten_contexts"], cv["contexts_kwargs"]
    except (KeyError, TypeError):
        raise Rejected(
            400, f"edits with cache-dit need a per-call cache context; {model.pipeline_name} has none"
        ) from None
    with contextlib.ExitStack() as stack:
        for name, kw in zip(names, kwargs, strict=True):
            stack.enter_context(manager.enter_context(manager.reset_context(name, **kw)))
        yield
        cv["cls"].apply_stats_hooks(cv["block_adapter"])


def _encoded(raw: dict[str, Any], seed: int, output_format: str, compression: int | None) -> dict[str, Any]:
    images = raw.pop("images")
    raw["images"] = [encode(im, output_format, compression) for im in images]
    raw["seed"] = seed
    return raw


def generation_call(model: Any, p: dict[str, Any]) -> PipelineCall:
    """A text-to-image call (Model.generate) that encodes its images in the pipeline thread."""

    def run(cancel: threading.Event, on_step: Callable[[int], None]) -> dict[str, Any]:
        r = model.generate(
            p["prompt"], p["width"], p["height"], p["steps"], p["seed"], n=p["n"],
            guidance_scale=p["guidance_scale"], negative_prompt=p["negative_prompt"],
            true_cfg_scale=p["true_cfg_scale"], cancel=cancel, on_step=on_step,
        )  # fmt: skip
        raw = {
            "images": r.images,
            "inference_seconds": r.inference_seconds,
            "step_seconds": r.step_seconds,
            "cached_steps": r.cached_steps,
            "computed_steps": r.computed_steps,
        }
        return _encoded(raw, r.seed, p["output_format"], p["output_compression"])

    return run


def run_edit(
    model: Any, pipe: Any, p: dict[str, Any], cancel: threading.Event, on_step: Callable[[int], None]
) -> dict[str, Any]:
    """One image-to-image (or, with p['mask'], inpaint) pipeline call; images not encoded yet."""
    import torch

    from diffusion_runtime.model import guidance_kwargs, timed_call

    accepts = set(inspect.signature(pipe.__call__).parameters)
    kwargs: dict[str, Any] = dict(
        prompt=p["prompt"], image=p["image"], strength=p["strength"], width=p["width"],
        height=p["height"], num_inference_steps=p["steps"], num_images_per_prompt=p["n"],
        generator=torch.Generator("cpu").manual_seed(p["seed"]),
    )  # fmt: skip
    if p.get("mask") is not None:
        kwargs["mask_image"] = p["mask"]
    kwargs.update(guidance_kwargs(accepts, p["guidance_scale"], p["negative_prompt"], p["true_cfg_scale"]))
    return timed_call(model, pipe, kwargs, p["run_steps"], accepts, cancel, on_step, _cache_context(model))


def edit_call(model: Any, pipe: Any, p: dict[str, Any]) -> PipelineCall:
    """An image-to-image (or, with p['mask'], inpaint) call on a variant built by EditPipelines.
    On a parallel replica (`model.edit`, diffusion_runtime.distributed) every rank runs it."""

    def run(cancel: threading.Event, on_step: Callable[[int], None]) -> dict[str, Any]:
        if hasattr(model, "edit"):
            raw = model.edit(p, cancel=cancel, on_step=on_step)
        else:
            raw = run_edit(model, pipe, p, cancel, on_step)
        return _encoded(raw, p["seed"], p["output_format"], p["output_compression"])

    return run
