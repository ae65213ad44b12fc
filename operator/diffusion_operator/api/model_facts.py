"""Known facts about named models and GPU products, used by the semantic checks (`diffusion_operator.validation`).

cache-dit asserts `Fn_compute_blocks <= len(blocks)` and `Bn_compute_blocks <= len(blocks)` for each
cached block list of the transformer at load time (an assertion in the pod). The block lists of known
models, as cache-dit's adapters see them (FLUX.1: 19 + 38 joined into one list of 57), come from the
generated cache-dit facts (`diffusion_runtime.contract.cache_dit_facts.MODEL_BLOCK_LISTS`); this module adds the
operator's own facts (pipeline class, startup budget) and GPU compute capabilities. Unknown models are
not checked (the runtime reports it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from diffusion_runtime.contract.cache_dit_facts import MODEL_BLOCK_LISTS


@dataclass(frozen=True)
class ModelFacts:
    name: str
    pipeline: str
    startup_seconds: int  # rough download + load budget on one GPU

    @property
    def block_lists(self) -> tuple[int, ...]:
        """The block lists cache-dit caches (FLUX.1: one joined list of 19 double + 38 single blocks)."""
        return MODEL_BLOCK_LISTS[self.name]

    @property
    def max_cache_blocks(self) -> int:
        """The largest Fn_compute_blocks (and, separately, Bn_compute_blocks) cache-dit accepts."""
        return min(self.block_lists)


# keyed by the lower-cased repository name (the part after the org in hf://org/name)
KNOWN_MODELS: dict[str, ModelFacts] = {
    facts.name.lower(): facts
    for facts in (
        ModelFacts("FLUX.1-dev", "FluxPipeline", 900),
        ModelFacts("FLUX.1-schnell", "FluxPipeline", 900),
        ModelFacts("FLUX.1-Kontext-dev", "FluxKontextPipeline", 900),
        ModelFacts("Qwen-Image", "QwenImagePipeline", 1200),
        ModelFacts("Qwen-Image-Edit", "QwenImageEditPipeline", 1200),
        ModelFacts("stable-diffusion-3-medium-diffusers", "StableDiffusion3Pipeline", 600),
        ModelFacts("stable-diffusion-3.5-medium", "StableDiffusion3Pipeline", 600),
        ModelFacts("stable-diffusion-3.5-large", "StableDiffusion3Pipeline", 900),
        ModelFacts("stable-diffusion-3.5-large-turbo", "StableDiffusion3Pipeline", 900),
        ModelFacts("Wan2.1-T2V-1.3B-Diffusers", "WanPipeline", 600),
        ModelFacts("Wan2.1-T2V-14B-Diffusers", "WanPipeline", 1500),
        ModelFacts("Wan2.1-I2V-14B-480P-Diffusers", "WanImageToVideoPipeline", 1500),
        ModelFacts("HunyuanVideo", "HunyuanVideoPipeline", 1500),
        ModelFacts("tiny-flux", "FluxPipeline", 600),  # the runtime's tiny test model (samples/tiny-cpu.yaml)
        ModelFacts("CogVideoX-5b", "CogVideoXPipeline", 900),
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
