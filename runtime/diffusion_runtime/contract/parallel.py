"""Parallel layouts: which cache-dit `parallelism_config` this runtime runs, on which device.

Torch-free, so the operator asks the same function before it reports a CR valid. The runtime starts
one rank per device itself (`diffusion_runtime.engine.distributed`); the world size is the product of the
parallel sizes. What runs where (cache-dit 1.5.3, checked on CPU with gloo and on CUDA):

- CUDA (NCCL): every layout cache-dit runs: Ulysses, ring, TP and their hybrids; `ulysses_float8`
  with `model.dtype: bfloat16`.
- CPU (gloo): Ulysses and Ulysses x TP (hybrid). Refused with a reason: ring attention (it needs the
  flash-attention kernel and cache-dit's Triton merge, both CUDA-only), TP without Ulysses (cache-dit
  builds its TP mesh on `torch.accelerator.current_accelerator()`, which is CUDA on a CUDA build of
  torch even without a GPU) and `ulysses_float8` (bf16 GPU kernels).
- Never: `use_ray` (the runtime starts its own ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffusion_runtime.contract.cache_dit_facts import PARALLEL_SIZE_KEYS as SIZE_KEYS


@dataclass(frozen=True)
class Layout:
    ulysses_size: int = 1
    ring_size: int = 1
    tp_size: int = 1

    @property
    def world_size(self) -> int:
        return self.ulysses_size * self.ring_size * self.tp_size

    def labels(self) -> dict[str, str]:
        """The info metric's labels: world size and every parallel size."""
        return {"world_size": str(self.world_size), **{k: str(getattr(self, k)) for k in SIZE_KEYS}}

    def describe(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in SIZE_KEYS if getattr(self, k) > 1]
        return f"{' x '.join(parts) or 'one process'} ({self.world_size} rank{'s' * (self.world_size > 1)})"


SINGLE = Layout()


def layout_of(cache_dit: dict[str, Any] | None) -> Layout:
    """The layout of a cache-dit YAML mapping (sizes already checked to be integers >= 1)."""
    pc = (cache_dit or {}).get("parallelism_config")
    if not isinstance(pc, dict):
        return SINGLE
    sizes = {}
    for k in SIZE_KEYS:
        v = pc.get(k)
        sizes[k] = v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else 1
    return Layout(**sizes)


def layout_refusal(
    parallelism_config: dict[str, Any], device_type: str, dtype: str | None = None
) -> tuple[str, str] | None:
    """None when this runtime runs the layout on `device_type` ('cpu' | 'cuda'); else (the key to
    blame, why not in one line). `dtype` is model.dtype when known (ulysses_float8 needs bfloat16)."""
    pc = parallelism_config
    layout = layout_of({"parallelism_config": pc})
    if pc.get("use_ray"):
        return "use_ray", "the runtime starts one rank per device itself; remove use_ray"
    if pc.get("ulysses_float8"):
        if device_type != "cuda":
            return (
                "ulysses_float8",
                f"needs bfloat16 CUDA GPUs (float8 all-to-all kernels), not {device_type}",
            )
        if dtype is not None and dtype != "bfloat16":
            return "ulysses_float8", f"needs model.dtype bfloat16, got {dtype}"
    if device_type == "cuda":
        return None
    if layout.ring_size > 1:
        return "ring_size", (
            f"ring attention (ring_size={layout.ring_size}) needs CUDA kernels (flash attention, cache-dit's "
            f"Triton merge); on {device_type} use ulysses_size (and tp_size with it)"
        )
    if layout.tp_size > 1 and layout.ulysses_size == 1:
        return "tp_size", (
            f"tensor parallelism alone (tp_size={layout.tp_size}): cache-dit builds its mesh on the CUDA "
            f"accelerator; on {device_type} combine it with ulysses_size (hybrid) or run on GPUs"
        )
    return None


def heads_refusal(cache_dit: dict[str, Any] | None, transformer: str, heads: Any) -> str | None:
    """cache-dit splits attention heads over ulysses_size x tp_size ranks (unless ulysses_anything);
    otherwise it fails only at the first generation, with an assertion about padding heads."""
    pc = (cache_dit or {}).get("parallelism_config")
    if not isinstance(pc, dict) or pc.get("ulysses_anything") or not isinstance(heads, int):
        return None
    layout = layout_of(cache_dit)
    split = layout.ulysses_size * layout.tp_size
    if split > 1 and heads % split:
        return (
            f"cache-dit config: parallelism_config: {transformer} has {heads} attention heads, "
            f"not divisible by ulysses_size x tp_size = {split} (or set ulysses_anything: true)"
        )
    return None


def local_transformer_config(uri: str) -> dict[str, Any] | None:
    """The transformer's config.json of a model in a local folder (None for hub ids or other layouts):
    lets the layout be checked against the model before any rank starts."""
    import json
    from pathlib import Path

    folder = uri[len("file://") :] if uri.startswith("file://") else uri
    path = Path(folder).expanduser() / "transformer" / "config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None
