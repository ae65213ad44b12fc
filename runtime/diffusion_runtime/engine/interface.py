"""The one engine interface: what the HTTP layer, the warmup and the quality gate call.

Implemented by `engine.model.Model` (one process) and `engine.distributed.RankedModel` (rank 0 of
a parallel replica: every pipeline call runs on every rank). Pipeline calls run in the scheduler's
one pipeline thread; `prepare_edit` runs before queueing, so an unsupported edit is refused at once.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

from diffusion_runtime.contract.pipelines import Modality
from diffusion_runtime.engine.params import EditParams, GenerationParams, GenerationResult, StepCallback


class Engine(Protocol):
    @property
    def pipeline_name(self) -> str: ...

    @property
    def device(self) -> str: ...

    @property
    def cache_tag(self) -> str: ...

    @property
    def quant_type(self) -> str: ...

    @property
    def modality(self) -> Modality:
        """`image` or `video` (contract.pipelines): which API serves this pipeline."""
        ...

    @property
    def frame_multiple(self) -> int:
        """A video pipeline's valid frame counts are k * this + 1."""
        ...

    @property
    def size_multiple(self) -> int:
        """Generated sizes are multiples of this (the VAE's scale factor x 2)."""
        ...

    def generate(
        self,
        params: GenerationParams,
        cancel: threading.Event | None = None,
        on_step: StepCallback | None = None,
    ) -> GenerationResult:
        """One text-to-image call (a video pipeline: text-to-video, `VideoParams`); `cancel` set: stops
        at the next step (Cancelled)."""
        ...

    def generate_batch(
        self,
        batch: Sequence[GenerationParams],
        cancel: threading.Event | None = None,
        on_step: StepCallback | None = None,
    ) -> list[GenerationResult]:
        """Text-to-image requests with one `batch_key` as one pipeline call: one result per request,
        each from its own seed; `cancel` set: the whole call stops (Cancelled)."""
        ...

    def prepare_edit(self, kind: str) -> None:
        """Build the `img2img` / `inpaint` variant now; InvalidInput when the pipeline has none."""
        ...

    def edit(
        self,
        params: EditParams,
        cancel: threading.Event | None = None,
        on_step: StepCallback | None = None,
    ) -> GenerationResult:
        """One image-to-image (with a mask: inpaint) call on the loaded pipeline's variant."""
        ...

    def warmup(self) -> float:
        """The configured warmup generations; returns their seconds."""
        ...
