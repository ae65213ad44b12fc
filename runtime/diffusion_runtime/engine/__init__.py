"""The engine: loading and optimizing the pipeline and running it. It never imports `api`.

- `interface.py`: `Engine`, the one interface of a loaded model: `model.Model` (one process) and
  `distributed.RankedModel` (rank 0 of a parallel replica) implement it.
- `params.py`: what goes in (`GenerationParams`, `EditParams`) and comes out (`GenerationResult`).
- `errors.py`: the engine's refusals (`InvalidInput`, `Unavailable`, `QueueFull`, `Cancelled`).
- `scheduler.py`: the one FIFO queue in front of the one pipeline thread.
- `model.py` (loading: resolve, device, cache-dit plan, quality gate reference, compile),
  `pipelines.py` (one timed pipeline call; edit variants), `optimize.py` (cache-dit YAML and
  quantization), `cache_dit_adapter.py` (every cache-dit call; the one reach into its internals,
  pinned), `compile_cache.py`, `quality_gate.py`, `imaging.py` (PIL images in and out),
  `distributed.py` (ranks).
"""
