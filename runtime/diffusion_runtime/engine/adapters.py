"""LoRA adapters per request: every declared adapter loaded once, at start; a call only sets scales.

At load (`Adapters.load`, before cache-dit and torch.compile touch the pipeline) each adapter of
`config.adapters` is loaded with diffusers' `load_lora_weights(..., adapter_name=name)`, then all of
them are made active at once and each LoRA layer's per-adapter scale is turned into a 0-dim tensor
(what peft's compiled hotswap does to its scalings). From then on the set of active adapters and the
code path never change: a call only writes its scales into those tensors in place (`activate`):
requested adapters get `scale x lora_alpha / r`, every other one 0, so its low-rank term adds exact
zeros. Under `compile: true` the compiled graphs see the same modules, the same active adapters and
tensors with the same metadata, so switching adapters causes no recompilation (dynamo guards on a
tensor's dtype/shape/device, not its value). diffusers' own `set_adapters` writes Python floats,
which dynamo specializes on (one graph per scale), and changes the active list (another graph per
combination): tests/runtime/test_adapters.py counts both with torch's own counters.

The cost: each declared adapter's low-rank matmuls run in every call (rank r on a d-wide layer: about
2r/d more FLOPs per adapted projection, e.g. 1% for r=16, d=3072), whether requested or not.

`requested` is torch-free: the one check of a request's adapters against the declared ones
(unknown name -> InvalidInput listing the known ones), used by the HTTP layer before queueing and by
the engine again before a call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from diffusion_runtime.contract.config import AdapterConfig
from diffusion_runtime.engine.errors import InvalidInput

log = logging.getLogger("diffusion_runtime")

# a request's adapters: ((name, scale), ...) in request order; () is the base model
AdapterScales = tuple[tuple[str, float], ...]
BASE = "base"  # the metrics label of a call without adapters


def requested(wanted: Iterable[tuple[str, float | None]], declared: Sequence[AdapterConfig]) -> AdapterScales:
    """A request's (name, scale or None) pairs checked against the declared adapters: unknown or
    repeated names refused (InvalidInput, param `adapters`); a missing scale is the declared default."""
    known = {a.name: a for a in declared}
    out: list[tuple[str, float]] = []
    for name, scale in wanted:
        if name not in known:
            listed = ", ".join(sorted(known)) if known else "none are declared (config adapters)"
            raise InvalidInput(f"adapters: unknown adapter {name!r}; known: {listed}", param="adapters")
        if any(name == seen for seen, _ in out):
            raise InvalidInput(f"adapters: {name!r} is named more than once", param="adapters")
        out.append((name, float(known[name].scale if scale is None else scale)))
    return tuple(out)


def labels(scales: AdapterScales) -> list[str]:
    """The metrics labels of a call: each adapter it uses, or `base`."""
    return [name for name, _ in scales] or [BASE]


def _weight_location(path: str) -> tuple[str, str | None]:
    """(folder, weight file name or None) for diffusers' `load_lora_weights`."""
    p = Path(path)
    return (str(p.parent), p.name) if p.is_file() else (str(p), None)


class Adapters:
    """The declared adapters on one loaded pipeline and the scales they hold now."""

    def __init__(self, declared: Sequence[AdapterConfig]):
        self.declared = list(declared)
        self._layers: list[tuple[Any, str, float]] = []  # (peft LoRA layer, adapter, unit scale)
        self._current: dict[str, float] = {}

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.declared]

    def load(self, pipe: Any) -> None:
        """Load every adapter into `pipe`, all active, their scales tensors at 0 (the base model)."""
        if not self.declared:
            return
        import torch
        from peft.tuners.lora import LoraLayer

        for a in self.declared:
            folder, weight_name = _weight_location(a.path)
            try:
                pipe.load_lora_weights(folder, weight_name=weight_name, adapter_name=a.name)
            except Exception as e:  # noqa: BLE001 - one line naming the adapter
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise InvalidInput(
                    f"adapters: {a.name!r} ({a.path}) cannot be loaded into {type(pipe).__name__} "
                    f"({type(e).__name__}: {first})",
                    param="adapters",
                ) from e
        names = self.names
        pipe.set_adapters(names, adapter_weights=[1.0] * len(names))  # all active; unit scales as floats
        for component in pipe.components.values():
            if not isinstance(component, torch.nn.Module):
                continue
            for module in component.modules():
                if not isinstance(module, LoraLayer):
                    continue
                for name in names:
                    unit = module.scaling.get(name)
                    if unit is None:
                        continue  # this adapter does not touch this layer
                    weight = getattr(module, "weight", None)
                    device = weight.device if isinstance(weight, torch.Tensor) else None
                    module.scaling[name] = torch.zeros((), dtype=torch.float32, device=device)
                    self._layers.append((module, name, float(unit)))
        touched = {name for _, name, _ in self._layers}
        empty = [n for n in names if n not in touched]
        if empty:
            raise InvalidInput(
                f"adapters: {empty[0]!r} adapts no layer of {type(pipe).__name__}", param="adapters"
            )
        self._current = dict.fromkeys(names, 0.0)
        log.info("adapters: loaded %s (%d LoRA layer scales)", ", ".join(names), len(self._layers))

    def activate(self, scales: AdapterScales) -> None:
        """Set the scales of one call: the requested adapters at theirs, every other one at 0. In place
        (same tensors): nothing that torch.compile guards on changes."""
        if not self._layers:
            if scales:
                raise InvalidInput("adapters: none are declared (config adapters)", param="adapters")
            return
        requested(((n, s) for n, s in scales), self.declared)
        wanted = dict.fromkeys(self._current, 0.0) | dict(scales)
        if wanted == self._current:
            return
        for module, name, unit in self._layers:
            if wanted[name] != self._current[name]:
                module.scaling[name].fill_(wanted[name] * unit)
        self._current = wanted
