"""The HTTP layer (OpenAI-style images API): state and phase, errors, protocol, serving, routers, app.
Above the engine (`diffusion_runtime.engine`), which never imports this package."""
