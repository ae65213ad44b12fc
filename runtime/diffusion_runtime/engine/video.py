"""Clips out: frames (uint8, (frames, height, width, 3)) -> H.264 in MP4 with PyAV, and a thumbnail.

PyAV links FFmpeg's libraries into the process (no ffmpeg binary, no pipe): frames go to libx264 as
RGB arrays, are converted to yuv420p (the pixel format every browser's H.264 decoder plays) and
muxed into MP4 with the `moov` atom first (`+faststart`), so a player can start before the last
byte. Called in a worker thread (`asyncio.to_thread`), never on the event loop; PyAV releases the
GIL while FFmpeg encodes.
"""

from __future__ import annotations

import io
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MP4_MEDIA_TYPE = "video/mp4"
THUMBNAIL_MEDIA_TYPE = "image/webp"
CODEC = "libx264"
PIXEL_FORMAT = "yuv420p"  # 4:2:0: what browsers' H.264 decoders play (needs even width and height)


@dataclass(frozen=True)
class EncodedVideo:
    mp4: bytes
    thumbnail: bytes  # the first frame, WebP
    frames: int
    width: int
    height: int
    fps: int
    encode_seconds: float

    @property
    def nbytes(self) -> int:
        return len(self.mp4) + len(self.thumbnail)


def encode_mp4(frames: Any, fps: int, crf: int = 20) -> bytes:
    """uint8 frames (n, height, width, 3) -> MP4 bytes (H.264 yuv420p at `fps`, constant rate factor `crf`)."""
    n, height, width, _ = frames.shape
    # a file, not BytesIO: +faststart rewrites the file to move `moov` first (FFmpeg reopens it by name)
    with tempfile.TemporaryDirectory(prefix="diffusion-video-") as tmp:
        path = Path(tmp) / "clip.mp4"
        _write_mp4(path, frames, fps, crf)
        return path.read_bytes()


def _write_mp4(path: Path, frames: Any, fps: int, crf: int) -> None:
    import av

    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream(CODEC, rate=fps)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height = width, height
        stream.pix_fmt = PIXEL_FORMAT
        stream.options = {"crf": str(crf), "preset": "medium"}
        for i in range(frames.shape[0]):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush
            container.mux(packet)


def thumbnail(frames: Any) -> bytes:
    """The first frame as WebP (OpenAI's `variant=thumbnail`)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frames[0]).save(buf, format="WEBP", quality=90)
    return buf.getvalue()


def encode_video(frames: Any, fps: int, crf: int) -> EncodedVideo:
    t0 = time.perf_counter()
    mp4 = encode_mp4(frames, fps, crf)
    thumb = thumbnail(frames)
    n, height, width, _ = frames.shape
    return EncodedVideo(mp4, thumb, n, width, height, fps, time.perf_counter() - t0)
