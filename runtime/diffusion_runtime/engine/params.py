"""What goes into the engine and what comes out: typed, one place.

`GenerationParams` (text-to-image) and `EditParams` (image-to-image; with a mask, inpainting) are
what `Engine.generate` / `Engine.edit` take; `GenerationResult` is what they return (PIL images),
`EncodedResult` what a queued call hands back (images encoded in the pipeline thread).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

StepCallback = Callable[[int], None]  # called with the 0-based index of each finished step

DEFAULT_STRENGTH = {"img2img": 0.6, "inpaint": 1.0}


def edit_steps(steps: int, strength: float) -> tuple[int, float]:
    """(denoising steps that run, strength used): diffusers runs steps - int(steps * (1 - strength));
    a strength too small for one step is raised to 1/steps, so at least one step runs."""
    strength = max(strength, 1.0 / steps)
    init = min(steps * strength, steps)
    return steps - int(max(steps - init, 0)), strength


@dataclass(frozen=True, kw_only=True)
class GenerationParams:
    """One text-to-image pipeline call."""

    prompt: str
    width: int
    height: int
    steps: int
    seed: int
    n: int = 1
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    # LoRA adapters of this call: ((name, scale), ...), checked against the declared ones
    # (`engine.adapters.requested`); () is the base model
    adapters: tuple[tuple[str, float], ...] = ()

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def run_steps(self) -> int:
        """Denoising steps this call runs (an edit runs fewer than `steps`)."""
        return self.steps

    @property
    def batch_key(self) -> tuple[Any, ...] | None:
        """What must match for requests to share one pipeline call (`server.max_batch`): every
        call-wide argument (size, steps, guidance, whether a negative prompt / true CFG runs, the
        adapters and their scales); prompts, negative prompts, seeds and n are per image. None: this
        call is never batched (edits)."""
        negative = bool(self.negative_prompt)
        return (
            self.width, self.height, self.steps, self.guidance_scale, negative,
            self.true_cfg_scale if negative else None, self.adapters,
        )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class EditParams(GenerationParams):
    """One image-to-image call, or inpainting with `mask` (white = repaint, mode L)."""

    image: Any  # PIL image, RGB
    mask: Any | None = None  # PIL image, mode L
    strength: float  # how much of the image is re-noised; at least one step runs (`edit_steps`)

    @classmethod
    def of(cls, base: GenerationParams, image: Any, mask: Any | None, strength: float | None) -> EditParams:
        """`base` plus the edit inputs; no strength: the kind's default (`DEFAULT_STRENGTH`)."""
        kind = "inpaint" if mask is not None else "img2img"
        wanted = strength if strength is not None else DEFAULT_STRENGTH[kind]
        _, used = edit_steps(base.steps, wanted)
        common = {f.name: getattr(base, f.name) for f in fields(GenerationParams)}
        return cls(**common, image=image, mask=mask, strength=used)

    @property
    def kind(self) -> str:
        """The pipeline variant: `inpaint` with a mask, else `img2img`."""
        return "inpaint" if self.mask is not None else "img2img"

    @property
    def run_steps(self) -> int:
        return edit_steps(self.steps, self.strength)[0]

    @property
    def batch_key(self) -> tuple[Any, ...] | None:
        return None  # an edit runs alone (its image, mask and strength are call-wide)


@dataclass(frozen=True, kw_only=True)
class VideoParams(GenerationParams):
    """One text-to-video call (`Engine.generate` on a video pipeline): `frames` frames (a valid count
    for the pipeline, `Engine.frame_multiple`), played at `fps`; with `image`, image-to-video (the
    clip starts from it; an image-to-video pipeline needs it). The result's `images` holds one uint8
    array (frames, height, width, 3) per clip."""

    frames: int
    fps: int
    image: Any | None = None  # PIL image, RGB, width x height (`engine.imaging.fit_frame`)

    @property
    def batch_key(self) -> tuple[Any, ...] | None:
        return None  # a clip runs alone (`batch_kwargs` builds image calls)


@dataclass(frozen=True)
class OutputFormat:
    """How the images of a call are encoded: png | jpeg | webp; jpeg/webp quality 0-100."""

    format: str = "png"
    compression: int | None = None


@dataclass
class GenerationResult:
    images: list[Any]  # PIL images; a video call: one uint8 array (frames, height, width, 3) per clip
    seed: int
    inference_seconds: float
    step_seconds: list[float]
    cached_steps: int
    computed_steps: int


@dataclass
class EncodedResult:
    """A finished call with its images encoded (`OutputFormat`)."""

    images: list[bytes]
    seed: int
    inference_seconds: float
    step_seconds: list[float]
    cached_steps: int
    computed_steps: int
