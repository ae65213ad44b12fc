"""What a diffusers pipeline class makes: images or videos. One table, torch-free: the runtime picks
its call and its API by it (`engine.model.Model.modality`), the config checks read it (warmup frame
counts), the operator sizes the startup probe by it, and the docs quote it.

A pipeline class not listed as a video pipeline is served as an image pipeline (FLUX, Qwen-Image,
SD3, ...): the image API's checks and diffusers' own errors apply to it as before.
"""

from __future__ import annotations

from typing import Literal

Modality = Literal["image", "video"]

# diffusers' AutoencoderKLWan: vae_scale_factor_temporal = 2 ** sum(temperal_downsample) (checked against
# diffusers' defaults by tests/runtime/test_video_units.py)
WAN_FRAME_MULTIPLE = 4
WAN_DEFAULT_FPS = 16  # Wan 2.1's frame rate (diffusers' Wan examples export at fps=16)
# diffusers video pipelines this runtime serves on /v1/videos: class -> its frame multiple (valid
# frame counts are k * multiple + 1: the VAE's temporal compression). The loaded pipeline's own
# factor wins at run time (`Model.frame_multiple`).
VIDEO_PIPELINES: dict[str, int] = {
    "WanPipeline": WAN_FRAME_MULTIPLE,
}


def modality(pipeline_class: str) -> Modality:
    """`video` for a class of VIDEO_PIPELINES, else `image`."""
    return "video" if pipeline_class in VIDEO_PIPELINES else "image"


def video_frame_multiple(pipeline_class: str | None) -> int | None:
    """The frame multiple of a video pipeline class; None for an image pipeline (or none named)."""
    return VIDEO_PIPELINES.get(pipeline_class) if pipeline_class else None


def common_frame_multiple() -> int:
    """The frame multiple where no pipeline is named (a front door whose config leaves the class to
    model_index.json): the one every served video pipeline shares, else 1 (any count passes there and
    the worker's loaded pipeline checks it)."""
    multiples = set(VIDEO_PIPELINES.values())
    return multiples.pop() if len(multiples) == 1 else 1


def frames_for(seconds: float, fps: int, multiple: int) -> int:
    """The frame count of a clip of `seconds` at `fps`: the smallest k * multiple + 1 >= seconds * fps
    (at least one frame)."""
    wanted = max(1, round(seconds * fps))
    k = max(0, -(-(wanted - 1) // multiple))
    return k * multiple + 1
