"""What a diffusers pipeline class makes: images or videos. One table, torch-free: the runtime picks
its call and its API by it (`engine.model.Model.modality`), the config checks read it, and the docs
quote it.

A pipeline class not listed as a video pipeline is served as an image pipeline (FLUX, Qwen-Image,
SD3, ...): the image API's checks and diffusers' own errors apply to it as before.
"""

from __future__ import annotations

from typing import Literal

Modality = Literal["image", "video"]

# diffusers video pipelines this runtime serves on /v1/videos: class -> its temporal frame rule
# (valid frame counts are k * FRAME_MULTIPLE + 1: the Wan VAE's temporal compression, 4)
VIDEO_PIPELINES: dict[str, str] = {
    "WanPipeline": "text-to-video",
}
WAN_FRAME_MULTIPLE = (
    4  # diffusers' AutoencoderKLWan: vae_scale_factor_temporal (2 ** sum(temperal_downsample))
)
WAN_DEFAULT_FPS = 16  # Wan 2.1's training frame rate (diffusers' Wan examples export at fps=16)


def modality(pipeline_class: str) -> Modality:
    """`video` for a class of VIDEO_PIPELINES, else `image`."""
    return "video" if pipeline_class in VIDEO_PIPELINES else "image"


def frames_for(seconds: float, fps: int, multiple: int) -> int:
    """The frame count of a clip of `seconds` at `fps`: the smallest k * multiple + 1 >= seconds * fps
    (at least one frame)."""
    wanted = max(1, round(seconds * fps))
    k = max(0, -(-(wanted - 1) // multiple))
    return k * multiple + 1
