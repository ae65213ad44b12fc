"""schemathesis hooks for the runtime's /openapi.json (loaded through SCHEMATHESIS_HOOKS).

The schema names two constraints JSON Schema cannot express, and this module teaches the fuzzer
to generate them, as schemathesis documents for custom formats:
- `format: image-size`: WIDTHxHEIGHT, multiples of `x-multiple-of` within `x-max-pixels`, taken
  from the environment (FUZZ_MAX_PIXELS, FUZZ_SIZE_MULTIPLE) the test sets from the same config;
- `format: binary` uploads (`contentMediaType: image/png`): real small PNG, JPEG and WebP images;
- `format: webhook-url`: URLs the server's `webhook_allow` admits: loopback, on a port where nothing
  listens (FUZZ_WEBHOOK_PORT), so deliveries fail there and nothing leaves the machine.
"""

from __future__ import annotations

import io
import os

import schemathesis
from hypothesis import strategies as st
from PIL import Image


def _sizes() -> list[str]:
    max_pixels = int(os.environ["FUZZ_MAX_PIXELS"])
    multiple = int(os.environ.get("FUZZ_SIZE_MULTIPLE", "16"))
    side = range(multiple, max_pixels // multiple + 1, multiple)
    return [f"{w}x{h}" for w in side for h in side if w * h <= max_pixels]


def _image(fmt: str, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size)
    img.putdata(
        [((x * 7) % 256, (y * 5) % 256, (x + y) % 256) for y in range(size[1]) for x in range(size[0])]
    )
    img.save(buf, format=fmt)
    return buf.getvalue()


schemathesis.openapi.format("image-size", st.sampled_from(_sizes()))
schemathesis.openapi.format(
    "binary", st.sampled_from([_image("PNG", (32, 32)), _image("JPEG", (32, 32)), _image("WEBP", (32, 32))])
)
schemathesis.openapi.format(
    "webhook-url",
    st.sampled_from(
        [f"http://127.0.0.1:{os.environ['FUZZ_WEBHOOK_PORT']}{path}" for path in ("/", "/hook", "/a?b=c")]
    ),
)
