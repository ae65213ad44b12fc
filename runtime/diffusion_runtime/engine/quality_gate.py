"""Quality gate: canary images from the plain and the optimized pipeline, compared before Ready.

Step caching and quantization trade quality for speed. With `quality_gate` in runtime.yaml, the
runtime renders each canary (prompt x seed, at the gate's size and steps) twice: with the plain
pipeline right after `from_pretrained` (before cache-dit, quantization and compile touch it: the
reference), and with the optimized pipeline after warmup. It compares each pair with PSNR and SSIM
(torchmetrics, computed on the 8-bit RGB images scaled to [0, 1]) and keeps the worst figure of
each. Both must meet the thresholds or the pod never turns Ready: it exits with one line carrying
the figures and the thresholds (also written as the container's termination message).

With dynamic batching on (`server.max_batch` > 1) the optimized canaries are also rendered in
batches (`Engine.generate_batch`, canaries grouped by their batch key, at most `max_batch` per call)
and each batched image is compared with its unbatched optimized twin against the same thresholds;
the worst figures include them. With a static cache mask they are equal to float rounding; a
dynamic cache policy decides cached steps for the whole batch, which this catches if it degrades.

With LoRA adapters declared (`adapters`), each adapter adds one canary: the first prompt and seed
with that adapter at its declared scale, rendered plain (adapters are loaded before the reference)
and optimized. With random-weight test models the figures show the mechanism, not real image quality. How the
failed gate's line starts, which the operator reads, is the contract's: `contract.lines.GATE_FAILED`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from diffusion_runtime.contract.config import QualityGateConfig, RuntimeConfig, parse_size
from diffusion_runtime.engine.params import GenerationParams, GenerationResult

log = logging.getLogger("diffusion_runtime")
Generate = Callable[[GenerationParams], GenerationResult]  # Engine.generate
GenerateBatch = Callable[[Sequence[GenerationParams]], list[GenerationResult]]  # Engine.generate_batch


@dataclass(frozen=True)
class Canary:
    prompt: str
    seed: int
    adapters: tuple[tuple[str, float], ...] = ()  # a LoRA adapter's canary: ((name, scale),)


@dataclass
class GatePlan:
    """What the gate renders: the canaries, their size and steps."""

    canaries: tuple[Canary, ...]
    width: int
    height: int
    steps: int
    min_psnr: float
    min_ssim: float

    @classmethod
    def from_config(cls, config: RuntimeConfig) -> GatePlan | None:
        g: QualityGateConfig | None = config.quality_gate
        if g is None:
            return None
        size = g.size or (config.warmup.resolutions[0] if config.warmup.resolutions else "1024x1024")
        width, height = parse_size(size)
        return cls(
            # every prompt x seed on the base model; each declared adapter at its scale: the first one
            canaries=tuple(Canary(p, s) for p in g.prompts for s in g.seeds)
            + tuple(Canary(g.prompts[0], g.seeds[0], ((a.name, a.scale),)) for a in config.adapters),
            width=width,
            height=height,
            steps=g.steps or config.warmup.steps,
            min_psnr=float(g.min_psnr),
            min_ssim=float(g.min_ssim),
        )


@dataclass
class GateResult:
    psnr: float  # worst canary, dB (inf: identical images)
    ssim: float  # worst canary
    per_canary: list[tuple[Canary, float, float]] = field(default_factory=list)
    min_psnr: float = 0.0
    min_ssim: float = 0.0
    reference_seconds: float = 0.0
    optimized_seconds: float = 0.0
    batched: GateResult | None = None  # batched vs unbatched optimized canaries (server.max_batch > 1)

    @property
    def passed(self) -> bool:
        return self.psnr >= self.min_psnr and self.ssim >= self.min_ssim

    @property
    def seconds(self) -> float:
        """What the gate added to start-up: both renderings and the comparison."""
        return self.reference_seconds + self.optimized_seconds

    def summary(self) -> str:
        def mark(ok: bool) -> str:
            return ">=" if ok else "<"

        return (
            f"PSNR {self.psnr:.2f} dB {mark(self.psnr >= self.min_psnr)} min {self.min_psnr:g}, "
            f"SSIM {self.ssim:.4f} {mark(self.ssim >= self.min_ssim)} min {self.min_ssim:g} "
            f"(worst of {len(self.per_canary)} canaries, optimized vs plain pipeline"
            + (", and batched vs unbatched" if self.batched is not None else "")
            + ")"
        )


def canary_params(plan: GatePlan) -> list[GenerationParams]:
    return [
        GenerationParams(
            prompt=c.prompt, width=plan.width, height=plan.height, steps=plan.steps, seed=c.seed,
            adapters=c.adapters,
        )
        for c in plan.canaries
    ]  # fmt: skip


def render(generate: Generate, plan: GatePlan) -> list[Any]:
    """The canaries' images (PIL) through `generate` (the plain model's, or the engine's)."""
    return [generate(params).images[0] for params in canary_params(plan)]


def render_batched(generate_batch: GenerateBatch, plan: GatePlan, max_batch: int) -> list[Any]:
    """The canaries' images rendered in batches: grouped by batch key, at most `max_batch` a call."""
    params = canary_params(plan)
    groups: dict[Any, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.batch_key, []).append(i)
    images: list[Any] = [None] * len(params)
    for indices in groups.values():
        for start in range(0, len(indices), max_batch):
            chunk = indices[start : start + max_batch]
            for i, result in zip(chunk, generate_batch([params[i] for i in chunk]), strict=True):
                images[i] = result.images[0]
    return images


def _tensor(image: Any) -> Any:
    import numpy as np
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def compare(plan: GatePlan, reference: list[Any], optimized: list[Any]) -> GateResult:
    """PSNR and SSIM of each canary pair; the result keeps the worst of each."""
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    per: list[tuple[Canary, float, float]] = []
    for canary, ref, out in zip(plan.canaries, reference, optimized, strict=True):
        a, b = _tensor(out), _tensor(ref)
        psnr = float(peak_signal_noise_ratio(a, b, data_range=1.0))
        ssim_value = structural_similarity_index_measure(a, b, data_range=1.0)
        assert not isinstance(ssim_value, tuple)  # a tuple only with return_full_image
        ssim = float(ssim_value)
        per.append((canary, psnr, ssim))
    return GateResult(
        psnr=min(p for _, p, _ in per),
        ssim=min(s for _, _, s in per),
        per_canary=per,
        min_psnr=plan.min_psnr,
        min_ssim=plan.min_ssim,
    )


class QualityGate:
    """Holds the reference images between load (plain pipeline) and the end of warmup."""

    def __init__(self, plan: GatePlan):
        self.plan = plan
        self.reference: list[Any] | None = None
        self.reference_seconds = 0.0

    def render_reference(self, generate: Generate) -> None:
        t0 = time.perf_counter()
        log.info(
            "quality gate: rendering %d canaries with the plain pipeline (%dx%d, %d steps)",
            len(self.plan.canaries), self.plan.width, self.plan.height, self.plan.steps,
        )  # fmt: skip
        self.reference = render(generate, self.plan)
        self.reference_seconds = time.perf_counter() - t0

    def check(
        self, generate: Generate, generate_batch: GenerateBatch | None = None, max_batch: int = 1
    ) -> GateResult:
        """The optimized canaries against the plain ones; with `generate_batch` and `max_batch` > 1
        also the batched optimized canaries against the unbatched ones."""
        if self.reference is None:
            raise RuntimeError("quality gate: no reference images (render_reference was not called)")
        t0 = time.perf_counter()
        optimized = render(generate, self.plan)
        result = compare(self.plan, self.reference, optimized)
        if generate_batch is not None and max_batch > 1 and len(self.plan.canaries) > 1:
            batched = compare(self.plan, optimized, render_batched(generate_batch, self.plan, max_batch))
            result.batched = batched
            result.psnr, result.ssim = min(result.psnr, batched.psnr), min(result.ssim, batched.ssim)
            log.info(
                "quality gate: batched (max_batch %d) vs unbatched canaries: worst PSNR %.2f dB, SSIM %.4f",
                max_batch, batched.psnr, batched.ssim,
            )  # fmt: skip
        result.reference_seconds = self.reference_seconds
        result.optimized_seconds = time.perf_counter() - t0
        for canary, psnr, ssim in result.per_canary:
            log.info(
                "quality gate: %r seed %d%s: PSNR %.2f dB, SSIM %.4f", canary.prompt, canary.seed,
                "".join(f", adapter {n} x{w:g}" for n, w in canary.adapters), psnr, ssim,
            )  # fmt: skip
        log.log(
            logging.INFO if result.passed else logging.ERROR,
            "quality gate %s: %s; cost %.2fs",
            "passed" if result.passed else "FAILED",
            result.summary(),
            result.seconds,
        )
        return result
