"""What the server knows about itself: its config, metrics, phase and, once loaded, the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from diffusion_runtime.contract.config import RuntimeConfig
from diffusion_runtime.engine.errors import Unavailable
from diffusion_runtime.engine.interface import Engine
from diffusion_runtime.metrics import RuntimeMetrics


class Phase(enum.StrEnum):
    LOADING = "loading"
    WARMING_UP = "warming up"
    READY = "ready"
    FAILED = "failed"


@dataclass
class RuntimeState:
    config: RuntimeConfig
    metrics: RuntimeMetrics
    engine: Engine | None = None  # once loaded: Model, or RankedModel on a parallel replica
    phase: Phase = Phase.LOADING
    error: str | None = None
    draining: bool = False  # SIGTERM: no new admissions, queued and running requests finish

    @property
    def ready(self) -> bool:
        return self.phase == Phase.READY and not self.draining

    @property
    def status(self) -> str:
        """The phase as /ready reports it: `draining` once SIGTERM arrived."""
        return "draining" if self.draining else str(self.phase)

    def accepting(self) -> None:
        """Raise Unavailable unless the server takes new work (the scheduler's admission check)."""
        if self.draining:
            raise Unavailable("server is shutting down; retry on another replica", retry_after=1)
        if self.phase != Phase.READY:
            raise Unavailable(f"model not ready ({self.phase})", retry_after=5)

    def loaded(self) -> Engine:
        """The engine; only called where the phase says it is there (ready)."""
        assert self.engine is not None, "engine not loaded"
        return self.engine
