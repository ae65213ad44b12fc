"""Known facts about named models and GPU products, used by the semantic checks of `spec.py`.

cache-dit checks `Fn_compute_blocks` and `Bn_compute_blocks` against each cached block list of the
transformer at load time (an assertion in the pod). The operator knows the block lists of common models
and refuses a spec whose Fn + Bn exceeds the smallest list, so the error shows in `status` instead of a
crash loop. Unknown models are not checked (the runtime reports it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFacts:
    name: str
    block_lists: tuple[int, ...]  # transformer block lists cache-dit caches, e.g. FLUX: 19 double + 38 single
    pipeline: str
    startup_seconds: int  # rough download + load budget on one GPU

    @property
    def max_cache_blocks(self) -> int:
        return min(self.block_lists)


# keyed by the lower-cased repository name (the part after the org in hf://org/name)
KNOWN_MODELS: dict[str, ModelFacts] = {
    facts.name.lower(): facts
    for facts in (
        ModelFacts("FLUX.1-dev", (19, 38), "FluxPipeline", 900),
        ModelFacts("FLUX.1-schnell", (19, 38), "FluxPipeline", 900),
        ModelFacts("FLUX.1-Kontext-dev", (19, 38), "FluxKontextPipeline", 900),
        ModelFacts("Qwen-Image", (60,), "QwenImagePipeline", 1200),
        ModelFacts("Qwen-Image-Edit", (60,), "QwenImageEditPipeline", 1200),
        ModelFacts("stable-diffusion-3-medium-diffusers", (24,), "StableDiffusion3Pipeline", 600),
        ModelFacts("stable-diffusion-3.5-medium", (24,), "StableDiffusion3Pipeline", 600),
        ModelFacts("stable-diffusion-3.5-large", (38,), "StableDiffusion3Pipeline", 900),
        ModelFacts("stable-diffusion-3.5-large-turbo", (38,), "StableDiffusion3Pipeline", 900),
        ModelFacts("Wan2.1-T2V-1.3B-Diffusers", (30,), "WanPipeline", 600),
        ModelFacts("Wan2.1-T2V-14B-Diffusers", (40,), "WanPipeline", 1500),
        ModelFacts("HunyuanVideo", (20, 40), "HunyuanVideoPipeline", 1500),
        ModelFacts("CogVideoX-5b", (42,), "CogVideoXPipeline", 900),
    )
}


def model_facts(uri: str) -> ModelFacts | None:
    """Facts for `hf://org/name` (or any URI ending in a known model folder name)."""
    tail = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    return KNOWN_MODELS.get(tail)


# compute capability of GPU products as GPU feature discovery names them (nvidia.com/gpu.product)
_PRODUCT_CAPABILITY: tuple[tuple[str, tuple[int, int]], ...] = (
    (r"B200|B100|GB200", (10, 0)),
    (r"H100|H200|H800|GH200", (9, 0)),
    (r"L40S|L40|L4\b|L4-|RTX-4090|RTX-6000-Ada|RTX-4080", (8, 9)),
    (r"A100|A800|A30\b|A30-", (8, 0)),
    (r"A10\b|A10-|A10G|A40|A6000|RTX-3090|A16|A2\b", (8, 6)),
    (r"T4|RTX-2080", (7, 5)),
    (r"V100", (7, 0)),
)


def product_capability(product: str) -> tuple[int, int] | None:
    for pattern, capability in _PRODUCT_CAPABILITY:
        if re.search(pattern, product, flags=re.IGNORECASE):
            return capability
    return None
