"""Limits of the runtime, in one place: the runtime's config validation and request checks, the
cache-dit facts' rules, the operator's CR model and so the generated CRD all read them from here.
Torch-free."""

from __future__ import annotations

MAX_N_LIMIT = 64  # images per request (server.max_n)
MAX_BATCH_LIMIT = 64  # images per pipeline call (server.max_batch)
MAX_STEPS_LIMIT = (
    1000  # num_inference_steps (server.max_steps, warmup.steps, cache_config.num_inference_steps)
)
MIN_PIXELS = 256  # server.max_pixels floor
MIN_UPLOAD_BYTES = 1024  # server.max_upload_bytes floor
MAX_JOBS_LIMIT = 100000  # server.max_jobs
MIN_STORE_BYTES = 1 << 20  # server.store_max_bytes floor (one MiB: a few images)
SIZE_MULTIPLE = 16  # width and height of warmup resolutions (the VAE and patching need it)
# the canonical WIDTHxHEIGHT form (CR warmup resolutions, the API's `size`); config.parse_size also
# takes spaces and an upper-case X from the command line
SIZE_PATTERN = r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$"
QUALITY_GATE_MAX_CANARIES = 16  # quality_gate prompts x seeds (each rendered twice during warmup)
# video (/v1/videos): hard ceilings of the server.* video settings
MAX_FRAMES_LIMIT = 1025  # frames of one clip (server.max_frames); Wan 2.x renders 81
MAX_VIDEO_SECONDS_LIMIT = 120  # the `seconds` of one clip (server.max_video_seconds)
MAX_FPS_LIMIT = 60  # frames per second of the MP4 (server.video_fps, the request's `fps`)
