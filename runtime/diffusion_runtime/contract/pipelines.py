"""What a diffusers pipeline class makes: images or videos. One table, torch-free: the runtime picks
its call and its API by it (`engine.model.Model.modality`), the config checks read it (warmup frame
counts), the operator sizes the startup probe by it, and the docs quote it.

A pipeline class not listed as a video pipeline is served as an image pipeline (FLUX, Qwen-Image,
SD3, ...): the image API's checks and diffusers' own errors apply to it as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Modality = Literal["image", "video"]

# diffusers' AutoencoderKLWan: vae_scale_factor_temporal = 2 ** sum(temperal_downsample) (checked against
# diffusers' defaults by tests/runtime/test_video_units.py)
WAN_FRAME_MULTIPLE = 4
WAN_DEFAULT_FPS = 16  # Wan 2.1's frame rate (diffusers' Wan examples export at fps=16)


@dataclass(frozen=True)
class VideoPipeline:
    """What the runtime knows of a video pipeline class."""

    frame_multiple: int  # valid frame counts are k * multiple + 1: the VAE's temporal compression
    image_input: bool = False  # image-to-video: the call takes `image=` (POST /v1/videos' input_reference)


# diffusers video pipelines this runtime serves on /v1/videos. The loaded pipeline's own frame factor
# wins at run time (`Model.frame_multiple`).
VIDEO_PIPELINES: dict[str, VideoPipeline] = {
    "WanPipeline": VideoPipeline(WAN_FRAME_MULTIPLE),
    # Wan 2.1 I2V (a CLIP vision encoder) and Wan 2.2 I2V A14B (two transformers, no image encoder):
    # the same VAE, so the same frame rule
    "WanImageToVideoPipeline": VideoPipeline(WAN_FRAME_MULTIPLE, image_input=True),
}


def modality(pipeline_class: str) -> Modality:
    """`video` for a class of VIDEO_PIPELINES, else `image`."""
    return "video" if pipeline_class in VIDEO_PIPELINES else "image"


def video_frame_multiple(pipeline_class: str | None) -> int | None:
    """The frame multiple of a video pipeline class; None for an image pipeline (or none named)."""
    video = VIDEO_PIPELINES.get(pipeline_class) if pipeline_class else None
    return video.frame_multiple if video else None


def takes_image(pipeline_class: str) -> bool:
    """Whether a pipeline class is an image-to-video one (its call needs a first frame)."""
    video = VIDEO_PIPELINES.get(pipeline_class)
    return bool(video and video.image_input)


def image_to_video_pipelines() -> list[str]:
    """The image-to-video classes of VIDEO_PIPELINES (named in the API's errors)."""
    return [name for name, video in VIDEO_PIPELINES.items() if video.image_input]


def common_frame_multiple() -> int:
    """The frame multiple where no pipeline is named (a front door whose config leaves the class to
    model_index.json): the one every served video pipeline shares, else 1 (any count passes there and
    the worker's loaded pipeline checks it)."""
    multiples = {video.frame_multiple for video in VIDEO_PIPELINES.values()}
    return multiples.pop() if len(multiples) == 1 else 1


def frames_for(seconds: float, fps: int, multiple: int) -> int:
    """The frame count of a clip of `seconds` at `fps`: the smallest k * multiple + 1 >= seconds * fps
    (at least one frame)."""
    wanted = max(1, round(seconds * fps))
    k = max(0, -(-(wanted - 1) // multiple))
    return k * multiple + 1
