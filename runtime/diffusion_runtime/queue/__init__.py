"""The shared work queue (Redis Streams): the store (`store`), the runtime's worker loop (`worker`)
and the front door (`frontdoor`). Torch-free: the front door runs without a model. docs/queue.md."""
