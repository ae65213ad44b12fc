"""The HTTP layer (OpenAI-style images API), above the engine (`diffusion_runtime.engine`), which
never imports this package.

- `state.py`: `RuntimeState` (config, metrics, the engine once loaded) and its `Phase`.
- `errors.py`: `Rejected` (an answer other than success) and the OpenAI error body; engine refusals
  (`engine.errors`) map to statuses there.
- `protocol.py`: request models (built per config, so /openapi.json states the real limits) and
  response models; every answer is one of them.
- `serving.py`: `ImageServing`, the serving object (`app.state.serving`): request -> typed engine
  parameters -> the one queue -> response model; jobs, results, webhooks, request metrics.
- `routers.py`: the routes; each parses, calls the serving object and answers.
- `app.py`: the FastAPI app (body limits, error handlers, OpenAPI) and the draining uvicorn server.
- `jobs.py`: async jobs and served results, in memory and bounded.

A new endpoint: its request and response models in `protocol.py`; a method of `ImageServing` that
builds the engine's parameters (`engine.params`) and returns the response model; a route in
`routers.py` that calls it. A new kind of pipeline call also needs a method of `engine.interface.Engine`,
implemented by `engine.model.Model` and by `engine.distributed.RankedModel` (one `RankCall` class
that every rank runs).
"""
