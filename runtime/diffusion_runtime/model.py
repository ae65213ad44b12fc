"""TEMPORARY, issue 19 merge: `cli.py` (moving into the contract package on another branch) still
imports `load_model` / `ModelError` from here and calls `generate(prompt, width, height, steps, seed,
guidance_scale=...)`. The model is `engine.model`; delete this file once cli.py builds a
`GenerationParams` and imports `diffusion_runtime.engine.model`."""

from __future__ import annotations

from typing import Any

from diffusion_runtime.config import RuntimeConfig
from diffusion_runtime.engine import model as _engine_model
from diffusion_runtime.engine.model import ModelError as ModelError
from diffusion_runtime.engine.params import GenerationParams, GenerationResult


class _CliModel:
    def __init__(self, model: _engine_model.Model):
        self.model = model
        self.cache_tag = model.cache_tag

    def generate(
        self, prompt: str, width: int, height: int, steps: int, seed: int, guidance_scale: float | None = None
    ) -> GenerationResult:
        params = GenerationParams(
            prompt=prompt, width=width, height=height, steps=steps, seed=seed, guidance_scale=guidance_scale
        )
        return self.model.generate(params)


def load_model(config: RuntimeConfig, progress: bool = True) -> Any:
    return _CliModel(_engine_model.load_model(config, progress))
