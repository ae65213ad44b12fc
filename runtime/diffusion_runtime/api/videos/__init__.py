"""The OpenAI videos API (`/v1/videos`, docs/video.md) over a video pipeline (contract.pipelines):
request models (`protocol`), the clips kept in memory (`store`), the serving object (`serving`) and
the routes (`router`). Clips run on the image API's one queue (engine.scheduler) and are always
asynchronous: create answers the queued clip, clients poll it, then download its MP4."""
