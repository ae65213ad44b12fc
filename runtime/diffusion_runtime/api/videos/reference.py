"""`input_reference` of POST /v1/videos: the first frame of an image-to-video clip.

As the official client (openai 3.51) sends it: a file part named `input_reference` in the multipart
form (`client.videos.create(..., input_reference=open("cat.png", "rb"))`), or its
`ImageInputReferenceParam` (`{"image_url": ...}`: as the form field `input_reference[image_url]`, or
the object in a JSON body) with a base64 `data:` URL. The image's bytes are bounded by the body limit
(`server.max_upload_bytes`, 413 naming it); it is decoded like an edit's upload (PNG, JPEG or WebP, at
most `MAX_UPLOAD_PIXELS`) and fitted to the clip's size (`engine.imaging.fit_frame`). Every refusal
is a 400 naming `input_reference`.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from diffusion_runtime.api.errors import Rejected
from diffusion_runtime.contract.pipelines import image_to_video_pipelines, takes_image
from diffusion_runtime.engine.imaging import decode_upload, fit_frame

PARAM = "input_reference"
FORM_URL_FIELD = "input_reference[image_url]"  # the client's multipart form of {"image_url": ...}
DATA_URL_PATTERN = r"^data:image/[a-z0-9.+-]+;base64,"
_DATA_URL = re.compile(DATA_URL_PATTERN + r"(?P<data>.*)$", re.IGNORECASE | re.DOTALL)
_DESCRIPTION = (
    f"image-to-video ({', '.join(image_to_video_pipelines())}): the clip's first frame, PNG, JPEG or "
    "WebP, centre-cropped to the clip's aspect ratio and resized to `size`; required there, refused by "
    "a text-to-video pipeline. The body is bounded by server.max_upload_bytes"
)
FORM_SCHEMA: dict[str, Any] = {
    "type": "string",
    "format": "binary",
    "contentMediaType": "image/png",
    "description": _DESCRIPTION,
}
_IMAGE_URL = {
    "type": "string",
    "pattern": DATA_URL_PATTERN,
    "description": "a base64 data URL (data:image/png;base64,...)",
}
JSON_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {
            "type": "object",
            "properties": {"image_url": _IMAGE_URL},
            "required": ["image_url"],
            "additionalProperties": False,
        },
        {"type": "null"},
    ],
    "default": None,
    "description": _DESCRIPTION + ' (JSON: {"image_url": a base64 data URL}; null: none)',
}


def from_data_url(url: Any) -> bytes:
    """The bytes of a base64 `data:image/...` URL; Rejected (400) for anything else (no fetching)."""
    if not isinstance(url, str):
        raise Rejected(400, f"{PARAM}: image_url must be a string (a base64 data: URL)", param=PARAM)
    m = _DATA_URL.match(url.strip())
    if m is None:
        raise Rejected(
            400,
            f"{PARAM}: image_url must be a base64 data URL (data:image/png;base64,...); this runtime "
            "fetches no URLs and has no Files API: upload the image as a file part instead",
            param=PARAM,
        )
    try:
        return base64.b64decode(m.group("data"), validate=True)
    except (binascii.Error, ValueError) as e:
        raise Rejected(400, f"{PARAM}: image_url's base64 data is malformed ({e})", param=PARAM) from e


def from_json(value: Any) -> bytes | None:
    """The image bytes of a JSON body's `input_reference` (null: none)."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"image_url"}:
        raise Rejected(
            400,
            f'{PARAM}: expected {{"image_url": "data:image/...;base64,..."}} (file_id is not served: '
            "this runtime has no Files API)",
            param=PARAM,
        )
    return from_data_url(value["image_url"])


def first_frame(pipeline: str | None, data: bytes | None, width: int, height: int) -> Any | None:
    """The first frame the served `pipeline` gets from `data` (the reference's bytes, None when not
    sent): a PIL RGB image of width x height for an image-to-video pipeline, None for a text-to-video
    one; Rejected (400 naming input_reference) when the pipeline and the request disagree or the bytes
    are not an image. `pipeline` None (a front door whose config names no class): the image as sent,
    fitted, if any (the worker's loaded pipeline checks the rest: `check_reference`)."""
    if pipeline is not None:
        check_reference(pipeline, data is not None)
    return fit_frame(decode_upload(data, PARAM), width, height) if data is not None else None


def check_reference(pipeline: str, sent: bool) -> None:
    """Rejected (400 naming input_reference) unless a reference is sent exactly when `pipeline` takes one."""
    if not takes_image(pipeline):
        if not sent:
            return
        raise Rejected(
            400,
            f"{PARAM}: the served pipeline {pipeline} is text-to-video; a reference image needs an "
            f"image-to-video pipeline ({', '.join(image_to_video_pipelines())})",
            param=PARAM,
        )
    if not sent:
        raise Rejected(
            400,
            f"{PARAM}: required: the served pipeline {pipeline} is image-to-video; send the first frame "
            "(a PNG, JPEG or WebP file part named input_reference)",
            param=PARAM,
        )
