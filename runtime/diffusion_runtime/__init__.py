"""diffusion-runtime: serves a diffusers pipeline with cache-dit and torchao over an OpenAI-style API."""

__version__ = "0.1.0"
