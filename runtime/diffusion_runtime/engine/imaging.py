"""PIL images in and out: encoding results (png | jpeg | webp) and checking uploads."""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

from diffusion_runtime.contract.limits import SIZE_MULTIPLE
from diffusion_runtime.engine.errors import InvalidInput
from diffusion_runtime.engine.params import EncodedResult, GenerationResult, OutputFormat

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
UPLOAD_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}  # PIL format name -> ours
MAX_UPLOAD_PIXELS = 8192 * 8192  # decoded size bound: no decompression bombs
DEFAULT_COMPRESSION = 100


def encode(image: Any, fmt: str, compression: int | None = None) -> bytes:
    """PIL image -> bytes. jpeg/webp: `compression` is the quality (OpenAI's output_compression)."""
    buf = io.BytesIO()
    quality = DEFAULT_COMPRESSION if compression is None else compression
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=1)  # fast zlib level: latency over bytes
    elif fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=max(1, min(quality, 95)))
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=quality, lossless=quality >= 100, method=4)
    else:  # the request models only allow the three
        raise ValueError(f"output_format {fmt!r}")
    return buf.getvalue()


def encode_result(result: GenerationResult, output: OutputFormat) -> EncodedResult:
    """A finished call with its images encoded (in the pipeline thread: off the event loop)."""
    return EncodedResult(
        images=[encode(im, output.format, output.compression) for im in result.images],
        seed=result.seed,
        inference_seconds=result.inference_seconds,
        step_seconds=result.step_seconds,
        cached_steps=result.cached_steps,
        computed_steps=result.computed_steps,
    )


def decode_upload(data: bytes, param: str) -> Any:
    """Uploaded bytes -> a loaded PIL image, or InvalidInput naming the field and the reason."""
    from PIL import Image

    if not data:
        raise InvalidInput(f"{param}: the upload is empty", param=param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or ""
            if fmt not in UPLOAD_FORMATS:
                raise InvalidInput(
                    f"{param}: {fmt or 'unknown'} images are not accepted; send PNG, JPEG or WebP",
                    param=param,
                )  # fmt: skip
            if img.width * img.height > MAX_UPLOAD_PIXELS:
                raise InvalidInput(
                    f"{param}: {img.width}x{img.height} exceeds {MAX_UPLOAD_PIXELS} pixels", param=param
                )
            img.load()
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidInput(f"{param}: image too large to decode ({e})", param=param) from e
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        raise InvalidInput(
            f"{param}: not a readable PNG, JPEG or WebP image ({type(e).__name__})", param=param
        ) from e
    return img


def fit_size(width: int, height: int, max_pixels: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """An image's size as a generation size: scaled down to max_pixels, snapped down to `multiple`."""
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        width, height = int(width * scale), int(height * scale)
    w = max(multiple, width // multiple * multiple)
    h = max(multiple, height // multiple * multiple)
    while w * h > max_pixels and (w > multiple or h > multiple):
        if w >= h:
            w -= multiple
        else:
            h -= multiple
    return w, h


def fit_frame(image: Any, width: int, height: int) -> Any:
    """An image as a clip's first frame of width x height (RGB): centre-cropped to the clip's aspect
    ratio, then resized (Lanczos), so it is neither stretched nor padded."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    if w * height > h * width:  # wider than the clip: crop the sides
        crop_w = max(1, round(h * width / height))
        box = ((w - crop_w) // 2, 0, (w - crop_w) // 2 + crop_w, h)
    else:  # taller (or the same aspect): crop top and bottom
        crop_h = max(1, round(w * height / width))
        box = (0, (h - crop_h) // 2, w, (h - crop_h) // 2 + crop_h)
    return image.resize((width, height), Image.Resampling.LANCZOS, box=box)


def warmup_frame(width: int, height: int) -> Any:
    """A first frame for an image-to-video warmup clip: a fixed colour gradient (deterministic)."""
    import numpy as np
    from PIL import Image

    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    rgb = np.stack([x, y, (x + y) / 2], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def mask_from_upload(mask: Any) -> Any:
    """OpenAI masks mark the area to edit with alpha 0; diffusers wants white = repaint (mode L).

    A mask with an alpha channel is read the OpenAI way; one without, the diffusers way (grayscale).
    """
    if mask.mode in ("RGBA", "LA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a == 0 else 0)
    return mask.convert("L")
