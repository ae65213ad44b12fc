"""One pipeline call: text-to-image on the loaded pipeline, edits on its image-to-image / inpaint
variants, text-to-video on a video pipeline (`VideoParams`), each timed per step, with progress and
cancellation at the step boundary.

Variants come from diffusers' `AutoPipelineForImage2Image.from_pipe` /
`AutoPipelineForInpainting.from_pipe`: the same modules (transformer, VAE, text encoders), no
copies. cache-dit: its hooks live on the shared transformer, but its per-call cache context is
opened by a wrapper on the *loaded* pipeline's class only, so a variant is called inside that same
context (`cache_dit_adapter.call_context`): an edit is cached exactly like a generation, and its
cached/computed steps are read from the loaded pipeline's stats.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from collections.abc import Collection, Sequence
from typing import Any

from diffusion_runtime.engine import cache_dit_adapter
from diffusion_runtime.engine.errors import Cancelled, InvalidInput
from diffusion_runtime.engine.params import (
    EditParams,
    GenerationParams,
    GenerationResult,
    StepCallback,
    VideoParams,
)

EDIT_VARIANTS = {"img2img": "AutoPipelineForImage2Image", "inpaint": "AutoPipelineForInpainting"}


class EditVariants:
    """The loaded pipeline's edit variants, built on first use and kept (one set per loaded pipeline)."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self._pipes: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, kind: str) -> Any:
        """The `img2img` or `inpaint` variant; InvalidInput when diffusers has none for this pipeline."""
        with self._lock:
            if kind in self._pipes:
                return self._pipes[kind]
            import diffusers

            auto = getattr(diffusers, EDIT_VARIANTS[kind])
            try:
                pipe = auto.from_pipe(self.pipe)
            except (ValueError, KeyError, TypeError) as e:
                what = "inpainting (a mask)" if kind == "inpaint" else "image-to-image"
                raise InvalidInput(
                    f"the loaded pipeline {type(self.pipe).__name__} has no {what} variant in diffusers "
                    f"({type(e).__name__}); /v1/images/edits is not available for this model",
                    param="mask" if kind == "inpaint" else "image",
                ) from e
            pipe.set_progress_bar_config(disable=True)
            self._pipes[kind] = pipe
            return pipe


def guidance_kwargs(accepts: Collection[str], params: GenerationParams) -> dict[str, Any]:
    """The optional guidance arguments of a pipeline call: guidance_scale when set; a negative prompt
    (and true CFG, 4.0 unless set) only where the pipeline's __call__ takes them (`accepts`)."""
    kwargs: dict[str, Any] = {}
    if params.guidance_scale is not None:
        kwargs["guidance_scale"] = params.guidance_scale
    if params.negative_prompt and "negative_prompt" in accepts:
        kwargs["negative_prompt"] = params.negative_prompt
        if "true_cfg_scale" in accepts:
            kwargs["true_cfg_scale"] = params.true_cfg_scale if params.true_cfg_scale is not None else 4.0
    return kwargs


def call_kwargs(accepts: Collection[str], params: GenerationParams) -> dict[str, Any]:
    """The pipeline arguments of `params` (text-to-image; an edit adds image, mask and strength; a
    video: frames, float frames in [0, 1] out, and image-to-video its first frame)."""
    import torch

    kwargs: dict[str, Any] = dict(
        prompt=params.prompt, width=params.width, height=params.height, num_inference_steps=params.steps,
    )  # fmt: skip
    if isinstance(params, VideoParams):
        kwargs.update(num_frames=params.frames, num_videos_per_prompt=params.n, output_type="np")
        if params.image is not None:
            kwargs["image"] = params.image
    else:
        kwargs["num_images_per_prompt"] = params.n
    if isinstance(params, EditParams):
        kwargs.update(image=params.image, strength=params.strength)
        if params.mask is not None:
            kwargs["mask_image"] = params.mask
    kwargs.update(guidance_kwargs(accepts, params))
    kwargs["generator"] = torch.Generator("cpu").manual_seed(params.seed)
    return kwargs


def accepted(pipe: Any) -> frozenset[str]:
    """The parameter names of a pipeline's __call__."""
    return frozenset(inspect.signature(pipe.__call__).parameters)


def batch_kwargs(accepts: Collection[str], batch: Sequence[GenerationParams]) -> dict[str, Any]:
    """The pipeline arguments of several text-to-image requests with one `batch_key`, as one call:
    one prompt (and negative prompt) per image, and per image the generator of its request, so each
    request's images are drawn from its own seed exactly as when it runs alone (diffusers draws the
    latents of a generator list image by image)."""
    import torch

    first = batch[0]
    assert all(p.batch_key is not None and p.batch_key == first.batch_key for p in batch), "not one batch"
    prompts: list[str] = []
    negatives: list[str] = []
    generators: list[Any] = []
    for p in batch:
        g = torch.Generator("cpu").manual_seed(p.seed)
        prompts += [p.prompt] * p.n
        negatives += [p.negative_prompt or ""] * p.n
        generators += [g] * p.n
    kwargs: dict[str, Any] = dict(
        prompt=prompts, width=first.width, height=first.height,
        num_inference_steps=first.steps, num_images_per_prompt=1,
    )  # fmt: skip
    kwargs.update(guidance_kwargs(accepts, first))
    if "negative_prompt" in kwargs:
        kwargs["negative_prompt"] = negatives
    kwargs["generator"] = generators
    return kwargs


def timed_call(
    pipe: Any,
    params: GenerationParams,
    device: str,
    cached_pipe: Any = None,
    cancel: threading.Event | None = None,
    on_step: StepCallback | None = None,
    context: contextlib.AbstractContextManager[Any] | None = None,
) -> GenerationResult:
    """One call of `pipe` (the loaded pipeline or a variant sharing its modules) for `params`, with
    per-step timing, progress (`on_step`) and cancellation at the step boundary (`cancel` set:
    Cancelled), inside `context` when given. Images not encoded; cached/computed steps are read from `cached_pipe`'s
    cache-dit stats (the loaded pipeline, when cache-dit is on; else every step computed)."""
    kwargs = call_kwargs(accepted(pipe), params)
    return _run(pipe, kwargs, [params], device, cached_pipe, cancel, on_step, context)[0]


def timed_batch_call(
    pipe: Any,
    batch: Sequence[GenerationParams],
    device: str,
    cached_pipe: Any = None,
    cancel: threading.Event | None = None,
    on_step: StepCallback | None = None,
) -> list[GenerationResult]:
    """Several text-to-image requests with one `batch_key` as one call of the loaded pipeline
    (`batch_kwargs`): one result per request, its images in order, the call's timings and cache
    steps on each. cache-dit opens a fresh cache context per pipeline call, so per batch."""
    return _run(pipe, batch_kwargs(accepted(pipe), batch), batch, device, cached_pipe, cancel, on_step, None)


def _run(
    pipe: Any,
    kwargs: dict[str, Any],
    batch: Sequence[GenerationParams],
    device: str,
    cached_pipe: Any,
    cancel: threading.Event | None,
    on_step: StepCallback | None,
    context: contextlib.AbstractContextManager[Any] | None,
) -> list[GenerationResult]:
    import torch

    accepts = accepted(pipe)
    step_times: list[float] = []
    last = [0.0]

    def _pre_hook(_module: Any, _args: Any, _kwargs: Any = None) -> None:
        if not last[0]:
            last[0] = time.perf_counter()

    def _callback(_pipe: Any, step_index: int, _timestep: Any, cb_kwargs: dict) -> dict:
        now = time.perf_counter()
        if last[0]:
            step_times.append(now - last[0])
        last[0] = 0.0
        if on_step is not None:
            on_step(step_index)
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        return cb_kwargs

    if "callback_on_step_end" in accepts:
        kwargs["callback_on_step_end"] = _callback
    # the T5 tokenizer: FLUX's second one, a video pipeline's only one
    video = isinstance(batch[0], VideoParams)
    t5 = getattr(pipe, "tokenizer", None) if video else getattr(pipe, "tokenizer_2", None)
    max_seq = getattr(t5, "model_max_length", None)
    if "max_sequence_length" in accepts and isinstance(max_seq, int) and max_seq < 512:
        kwargs["max_sequence_length"] = max_seq  # tiny models: a short T5 sequence
    handle = None
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        handle = transformer.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode(), context if context is not None else contextlib.nullcontext():
            out = pipe(**kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
    finally:
        if handle is not None:
            handle.remove()
    elapsed = time.perf_counter() - t0
    first = batch[0]
    cached, computed = (
        cache_dit_adapter.step_counts(cached_pipe) if cached_pipe is not None else (0, first.run_steps)
    )
    images = [video_frames(v) for v in out.frames] if video else list(out.images)
    if len(batch) == 1:
        counts = [len(images)]
    else:
        counts = [p.n for p in batch]
        if sum(counts) != len(images):
            raise RuntimeError(f"a batch of {sum(counts)} images returned {len(images)}")
    results: list[GenerationResult] = []
    start = 0
    for p, count in zip(batch, counts, strict=True):
        results.append(GenerationResult(
            images=images[start : start + count], seed=p.seed, inference_seconds=elapsed,
            step_seconds=step_times, cached_steps=cached, computed_steps=computed,
        ))  # fmt: skip
        start += count
    return results


def video_frames(video: Any) -> Any:
    """One clip of a pipeline's `np` output (frames, height, width, 3), floats in [0, 1], as uint8."""
    import numpy as np

    return (np.clip(np.asarray(video), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
