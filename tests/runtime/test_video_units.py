"""Video pieces without a server: frame counts, byte ranges, the clip store's bounds, the config's
video limits, the encoder (PyAV reads back what it wrote) and the tiny Wan with cache-dit."""

from __future__ import annotations

import asyncio
import io
import time

import av
import numpy as np
import pytest
from diffusion_runtime.api.errors import Rejected
from diffusion_runtime.api.videos.serving import byte_range
from diffusion_runtime.api.videos.store import VideoJob, VideoStore
from diffusion_runtime.contract.config import config_errors, config_from_dict
from diffusion_runtime.contract.pipelines import frames_for, modality
from diffusion_runtime.engine.params import VideoParams
from diffusion_runtime.engine.scheduler import Work
from diffusion_runtime.engine.video import EncodedVideo, encode_video


def test_frames_for_rounds_up_to_the_pipelines_frame_rule():
    assert frames_for(5, 16, 4) == 81  # Wan 2.1's own clip: 5 s at 16 fps
    assert frames_for(4, 16, 4) == 65
    assert frames_for(2, 8, 4) == 17  # 16 frames -> 4k+1
    assert frames_for(1, 1, 4) == 1
    assert all((frames_for(s, f, 4) - 1) % 4 == 0 for s in range(1, 13) for f in range(1, 61))
    assert all(frames_for(s, f, 4) >= s * f for s in range(1, 13) for f in range(1, 61))


def test_modality_is_one_table():
    assert modality("WanPipeline") == "video"
    assert modality("FluxPipeline") == "image"


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("bytes=0-9", (0, 9)), ("bytes=90-", (90, 99)), ("bytes=-10", (90, 99)),
     ("bytes=-500", (0, 99)), ("bytes=95-200", (95, 99)), ("bytes=0-1,4-5", None), ("items=0-1", None),
     ("bytes=-", None)],
)  # fmt: skip
def test_byte_range(header, expected):
    assert byte_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=100-120", "bytes=5-1", "bytes=-0"])
def test_unsatisfiable_range_is_416(header):
    with pytest.raises(Rejected) as e:
        byte_range(header, 100)
    assert e.value.status == 416


def _job(loop: asyncio.AbstractEventLoop, nbytes: int, finished_ago: float = 0.0) -> VideoJob:
    params = VideoParams(prompt="p", width=16, height=16, steps=1, seed=0, frames=1, fps=1)
    job = VideoJob(work=Work("videos", lambda c, s: None, 1, loop.create_future()), params=params, model="m",  # type: ignore[arg-type, return-value]
                   seconds="1")  # fmt: skip
    job.finish(video=EncodedVideo(b"x" * nbytes, b"", 1, 16, 16, 1, 0.0))
    job.finished_at = time.time() - finished_ago
    return job


def test_store_bounds_clips_by_bytes_count_and_ttl_and_remembers_why():
    loop = asyncio.new_event_loop()
    try:
        store = VideoStore(max_finished=3, ttl_seconds=60, max_bytes=250)
        old, mid, new = _job(loop, 100, 3), _job(loop, 100, 2), _job(loop, 100, 1)
        for j in (old, mid, new):
            store.add(j)
        store.prune()
        assert store.get(old.id) is None and store.get(mid.id) and store.get(new.id)
        assert "server.video_store_max_bytes" in store.unknown_reason(old.id)
        expired = _job(loop, 10, 120)
        store.add(expired)
        assert store.get(expired.id) is None and "server.job_ttl_seconds" in store.unknown_reason(expired.id)
        store.remove(mid, "deleted by DELETE /v1/videos/{id}")
        assert "DELETE" in store.unknown_reason(mid.id) and "never created" in store.unknown_reason("video_x")
        assert store.get(new.id, owner="someone-else") is None  # owned by None (auth off)
        huge = _job(loop, 10_000)
        store.add(huge)
        store.prune()
        assert store.get(huge.id) is not None  # the newest finished clip stays whatever its size
    finally:
        loop.close()


def test_config_bounds_the_video_settings():
    cfg = config_from_dict({"model": {"uri": "/m"}, "warmup": {"frames": 65}, "server": {"max_frames": 33}})
    assert [e.path for e in config_errors(cfg)] == ["warmup.frames"]
    cfg = config_from_dict({"model": {"uri": "/m"}, "server": {"video_fps": 61, "max_frames": 5000}})
    assert {e.path for e in config_errors(cfg)} == {"server.video_fps", "server.max_frames"}


def test_encoder_writes_h264_yuv420p_mp4_with_moov_first():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(13, 48, 80, 3), dtype=np.uint8)
    video = encode_video(frames, fps=12, crf=23)
    assert video.mp4[4:8] == b"ftyp" and video.mp4.index(b"moov") < video.mp4.index(b"mdat")  # faststart
    with av.open(io.BytesIO(video.mp4)) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.codec_context.pix_fmt, float(s.average_rate)) == (
            "h264",
            "yuv420p",
            12.0,
        )
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(decoded) == 13 and decoded[0].shape == (48, 80, 3)
    smooth = np.repeat(np.linspace(0, 255, 80, dtype=np.uint8)[None, :, None], 48, 0).repeat(3, 2)
    flat = encode_video(np.stack([smooth] * 5), fps=8, crf=18)
    with av.open(io.BytesIO(flat.mp4)) as c:
        back = next(iter(c.decode(video=0))).to_ndarray(format="rgb24")
    assert np.abs(back.astype(int) - smooth.astype(int)).mean() < 4  # lossy, but close


def _cached_tiny_model(variant: str):
    """A tiny random-weight Wan pipeline (`variant` of tiny-model) with cache-dit's static mask, as a
    runtime Model on CPU."""
    from diffusion_runtime.contract.config import RuntimeConfig
    from diffusion_runtime.engine import cache_dit_adapter
    from diffusion_runtime.engine.model import Model
    from diffusion_runtime.engine.optimize import apply_plan, check_against_pipeline, plan_cache_dit
    from diffusion_runtime.tiny import build_tiny_pipeline
    from fixtures_runtime import STATIC_CACHE_DIT

    pipe = build_tiny_pipeline(variant)
    pipe.set_progress_bar_config(disable=True)
    plan = plan_cache_dit(STATIC_CACHE_DIT, "cpu")
    check_against_pipeline(plan, pipe)
    apply_plan(pipe, plan, None)
    assert cache_dit_adapter.is_supported(pipe)
    model = Model(pipe, RuntimeConfig(), "cpu", plan, 0.0, None)  # type: ignore[arg-type]
    assert model.modality == "video" and model.frame_multiple == 4
    return model


def test_tiny_wan_pipeline_with_cache_dit_caches_steps():
    model = _cached_tiny_model("wan-tiny")
    params = VideoParams(prompt="a cat", width=32, height=32, steps=8, seed=1, frames=5, fps=8)
    result = model.generate(params)
    clip = result.images[0]
    assert clip.shape == (5, 32, 32, 3) and clip.dtype == np.uint8
    assert result.cached_steps == 3 and result.computed_steps == 5  # the static mask 11101001
    assert len(result.step_seconds) == 8


def test_the_frame_rule_is_diffusers_own():
    """contract.pipelines' Wan frame multiple and the size multiple are diffusers' Wan defaults."""
    import inspect

    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from diffusion_runtime.contract.limits import SIZE_MULTIPLE
    from diffusion_runtime.contract.pipelines import VIDEO_PIPELINES, WAN_FRAME_MULTIPLE

    down = inspect.signature(AutoencoderKLWan.__init__).parameters["temperal_downsample"].default
    patch = inspect.signature(WanTransformer3DModel.__init__).parameters["patch_size"].default
    assert 2 ** sum(down) == WAN_FRAME_MULTIPLE == VIDEO_PIPELINES["WanPipeline"].frame_multiple
    assert VIDEO_PIPELINES["WanImageToVideoPipeline"].frame_multiple == WAN_FRAME_MULTIPLE
    assert 2 ** len(down) * patch[1] == SIZE_MULTIPLE  # spatial VAE factor x patch


def test_warmup_frames_follow_the_named_video_pipelines_rule():
    def errors(pipeline: str | None, frames: int) -> list[str]:
        model = {"uri": "/m", **({"pipeline": pipeline} if pipeline else {})}
        return [
            str(e) for e in config_errors(config_from_dict({"model": model, "warmup": {"frames": frames}}))
        ]

    assert errors("WanPipeline", 81) == [] and errors("WanPipeline", 9) == []
    assert errors("WanPipeline", 80) == ["warmup.frames: 80 is not a frame count WanPipeline renders (k*4+1)"]
    assert errors("FluxPipeline", 80) == [] and errors(None, 80) == []  # images: frames unused


def test_a_quality_gate_on_a_named_video_pipeline_is_unsupported():
    cfg = config_from_dict({"model": {"uri": "/m", "pipeline": "WanPipeline"}, "quality_gate": {}})
    assert [(e.path, e.reason) for e in config_errors(cfg)] == [("quality_gate", "Unsupported")]


# ---------------------------------------------------------------- image-to-video (input_reference)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_fit_frame_crops_to_the_clips_aspect_then_resizes():
    from diffusion_runtime.engine.imaging import fit_frame
    from PIL import Image

    wide = Image.new("RGB", (96, 32), (0, 0, 255))  # blue sides, a red centre square
    wide.paste((255, 0, 0), (32, 0, 64, 32))
    square = np.asarray(fit_frame(wide, 16, 16)).astype(int)
    assert square.shape == (16, 16, 3)
    assert (square[..., 0] > 200).all() and (square[..., 2] < 60).all(), "the sides were not cropped"
    tall = Image.new("L", (20, 60), 0)  # a grey image: converted to RGB; the middle third kept
    tall.paste(255, (0, 20, 20, 40))
    frame = fit_frame(tall, 32, 32)
    assert frame.mode == "RGB" and frame.size == (32, 32) and np.asarray(frame).min() > 200
    same = fit_frame(Image.new("RGB", (64, 32), (9, 9, 9)), 32, 16)  # same aspect: only resized
    assert same.size == (32, 16) and np.asarray(same).max() == 9


def test_warmup_frame_is_a_fixed_gradient_of_the_size():
    from diffusion_runtime.engine.imaging import warmup_frame

    a, b = warmup_frame(48, 32), warmup_frame(48, 32)
    assert a.size == (48, 32) and a.mode == "RGB" and a == b
    px = np.asarray(a)
    assert px[0, 0].tolist() == [0, 0, 0] and px[-1, -1].tolist() == [255, 255, 255]


def test_a_data_url_reference_is_decoded_and_anything_else_is_400():
    import base64

    from diffusion_runtime.api.videos import reference

    data = b"\x89PNG not really"
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert reference.from_data_url(url) == data
    assert reference.from_json({"image_url": url}) == data and reference.from_json(None) is None
    for bad, needle in [
        ("https://example.com/a.png", "fetches no URLs"),
        ("data:text/plain;base64,aGk=", "base64 data URL"),
        ("data:image/png;base64,a$b=", "malformed"),
        (7, "must be a string"),
    ]:
        with pytest.raises(Rejected, match=needle) as e:
            reference.from_data_url(bad)
        assert (e.value.status, e.value.param) == (400, "input_reference")
    for bad in ({"file_id": "file_1"}, {"image_url": url, "file_id": "f"}, url, [url]):
        with pytest.raises(Rejected, match="no Files API") as e:
            reference.from_json(bad)
        assert e.value.param == "input_reference"


def test_first_frame_follows_the_served_pipeline():
    from diffusion_runtime.api.videos.reference import first_frame
    from diffusion_runtime.engine.errors import InvalidInput
    from PIL import Image

    png = _png(Image.new("RGB", (40, 30), (10, 200, 30)))
    assert first_frame("WanPipeline", None, 32, 32) is None
    with pytest.raises(Rejected, match="WanPipeline is text-to-video.*WanImageToVideoPipeline") as e:
        first_frame("WanPipeline", png, 32, 32)
    assert (e.value.status, e.value.param) == (400, "input_reference")
    with pytest.raises(Rejected, match="required.*WanImageToVideoPipeline is image-to-video"):
        first_frame("WanImageToVideoPipeline", None, 32, 32)
    frame = first_frame("WanImageToVideoPipeline", png, 48, 32)
    assert frame.size == (48, 32) and frame.mode == "RGB"
    assert np.abs(np.asarray(frame).astype(int) - [10, 200, 30]).max() <= 2
    for bad, needle in [(b"hello, not an image", "not a readable"), (b"", "empty")]:
        with pytest.raises(InvalidInput, match=needle) as ie:
            first_frame("WanImageToVideoPipeline", bad, 32, 32)
        assert ie.value.param == "input_reference"


def test_video_params_carry_the_image_into_the_pipeline_call():
    from diffusion_runtime.engine.imaging import warmup_frame
    from diffusion_runtime.engine.pipelines import call_kwargs

    image = warmup_frame(32, 32)
    base = dict(prompt="p", width=32, height=32, steps=2, seed=1, frames=5, fps=8)
    with_image = VideoParams(**base, image=image)  # type: ignore[arg-type]
    assert with_image == VideoParams(**base, image=warmup_frame(32, 32))  # type: ignore[arg-type]
    assert with_image != VideoParams(**base, image=warmup_frame(32, 16))  # type: ignore[arg-type]
    assert call_kwargs({"image"}, with_image)["image"] is image
    assert "image" not in call_kwargs({"image"}, VideoParams(**base))  # type: ignore[arg-type]


def test_tiny_wan_i2v_pipeline_with_cache_dit_renders_from_the_image():
    from diffusion_runtime.engine.imaging import warmup_frame
    from PIL import Image

    model = _cached_tiny_model("wan-i2v-tiny")
    assert type(model.pipe).__name__ == "WanImageToVideoPipeline" and model.pipe.image_encoder is not None
    base = dict(prompt="a cat", width=32, height=32, steps=8, seed=1, frames=5, fps=8)
    result = model.generate(VideoParams(**base, image=warmup_frame(32, 32)))  # type: ignore[arg-type]
    clip = result.images[0]
    assert clip.shape == (5, 32, 32, 3) and clip.dtype == np.uint8
    assert result.cached_steps == 3 and result.computed_steps == 5  # the static mask 11101001
    black = model.generate(VideoParams(**base, image=Image.new("RGB", (32, 32))))  # type: ignore[arg-type]
    assert np.abs(black.images[0].astype(int) - clip.astype(int)).max() > 0  # the image is an input
