"""Image-to-video: `input_reference` of POST /v1/videos as the official `openai` client (3.51) sends it,
on a real `diffusion-runtime serve` of the tiny random-weight WanImageToVideoPipeline
(`tiny-model --variant wan-i2v-tiny`, CPU, cache-dit's static mask): create with an image -> poll ->
download an MP4 that PyAV reads back as asked; the image steers the clip; a JSON body's data URL;
every bad reference is a 400 naming input_reference (413 past server.max_upload_bytes); the
OpenAPI document states the field. The text-to-video side (a reference refused by WanPipeline) is in
test_video_api.py."""

from __future__ import annotations

import base64
import io

import av
import httpx
import numpy as np
import openai
import pytest
from fixtures_runtime import STATIC_CACHE_DIT, start_runtime
from PIL import Image

pytestmark = [pytest.mark.runtime, pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")]
FPS = 8
MAX_UPLOAD = 48 << 10  # server.max_upload_bytes: a 64x64 noise PNG (about 12 KiB) fits
LIMITS = {"max_pixels": 64 * 64, "max_steps": 50, "max_frames": 17, "max_video_seconds": 2,
          "max_video_pixels": 64 * 64 * 17, "video_fps": FPS, "max_queue": 8, "max_upload_bytes": MAX_UPLOAD}  # fmt: skip


@pytest.fixture(scope="module")
def i2v_server(tiny_wan_i2v_model_dir, tmp_path_factory):
    rp = start_runtime(
        tiny_wan_i2v_model_dir, tmp_path_factory.mktemp("video-i2v"), cache_dit=STATIC_CACHE_DIT, server=LIMITS,
        warmup={"resolutions": ["64x64"], "frames": 5},
    )  # fmt: skip
    yield rp
    rp.stop()


@pytest.fixture(scope="module")
def client(i2v_server):
    return openai.OpenAI(base_url=i2v_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def image_bytes(seed: int, size: tuple[int, int] = (64, 64), fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def solid(level: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (level, level, level)).save(buf, format="PNG")
    return buf.getvalue()


def decoded(data: bytes) -> tuple[int, int, int, float, np.ndarray]:
    """(frames, width, height, fps, the frames as int arrays) as PyAV reads the MP4 back."""
    with av.open(io.BytesIO(data)) as c:
        rate = float(c.streams.video[0].average_rate or 0)
        frames = [f.to_ndarray(format="rgb24").astype(int) for f in c.decode(video=0)]
    return len(frames), frames[0].shape[1], frames[0].shape[0], rate, np.stack(frames)


def clip(client: openai.OpenAI, reference: bytes, name: str = "ref.png", **kwargs) -> bytes:
    video = client.videos.create(
        prompt="a cat walks on the grass", size="64x64", seconds="1", input_reference=(name, reference, "image/png"),
        extra_body={"seed": 7, "num_inference_steps": 8}, **kwargs,
    )  # fmt: skip
    done = client.videos.poll(video.id, poll_interval_ms=100)
    assert done.status == "completed", done.error
    return client.videos.download_content(video.id).read()


def test_image_to_video_with_the_openai_client(client):
    video = client.videos.create(
        prompt="a cat walks on the grass", size="64x64", seconds="2",  # type: ignore[arg-type]
        input_reference=("cat.png", image_bytes(1), "image/png"),
    )  # fmt: skip
    assert video.status in ("queued", "in_progress") and video.size == "64x64"
    done = client.videos.poll(video.id, poll_interval_ms=100)
    assert done.status == "completed", done.error
    extra = done.model_extra or {}
    assert extra["frames"] == 17 and extra["fps"] == FPS and extra["cached_steps"] > 0
    data = client.videos.download_content(video.id).read()
    assert data[4:8] == b"ftyp" and len(data) == extra["bytes"]
    n, width, height, rate, frames = decoded(data)
    assert (n, width, height, rate) == (17, 64, 64, float(FPS))
    assert frames.std() > 2, "real decoded frames, not a flat fill"


def test_the_reference_steers_the_clip(client):
    """Same prompt and seed: the same image gives the same clip, another image another clip (the
    image reaches the pipeline); a wide JPEG is cropped and resized to the clip's size."""
    black, white = solid(0), solid(255)
    first, again, other = (decoded(clip(client, ref))[4] for ref in (black, black, white))
    assert np.array_equal(first, again)  # one seed, one image: one clip
    # random weights: the first frame's pull is weak, but a clip that ignored it would be identical
    assert np.abs(first - other).max() > 10, "a different first frame changed nothing"
    wide = decoded(clip(client, image_bytes(3, (96, 48), "JPEG"), name="wide.jpg"))
    assert wide[:3] == (9, 64, 64)  # 1 s at 8 fps: 8 -> 9 frames (4k+1)


def test_a_json_body_takes_a_data_url(i2v_server):
    url = i2v_server.url + "/v1/videos"
    data_url = "data:image/png;base64," + base64.b64encode(image_bytes(1)).decode()
    body = {"prompt": "a cat", "size": "64x64", "num_frames": 5, "input_reference": {"image_url": data_url}}
    r = httpx.post(url, json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["frames"] == 5
    for bad, needle in [
        ({"file_id": "file_123"}, "no Files API"),
        ({"image_url": "https://example.com/cat.png"}, "fetches no URLs"),
        ({"image_url": "data:image/png;base64,!!!"}, "malformed"),
        ("cat.png", "image_url"),
    ]:
        r = httpx.post(url, json={**body, "input_reference": bad}, timeout=30)
        assert r.status_code == 400, (bad, r.text)
        err = r.json()["error"]
        assert err["param"] == "input_reference" and needle in err["message"], (bad, err)


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    return buf.getvalue()


def _huge_png() -> bytes:
    """A small file that decodes to more than MAX_UPLOAD_PIXELS (8192 x 8192) pixels."""
    buf = io.BytesIO()
    Image.new("1", (8200, 8200)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("reference", "needle"),
    [
        (b"this is text, not an image", "not a readable PNG, JPEG or WebP image"),
        (image_bytes(1)[:200], "not a readable PNG, JPEG or WebP image"),  # truncated
        (b"", "the upload is empty"),
        (_gif(), "GIF images are not accepted"),
        (_huge_png(), "exceeds 67108864 pixels"),
    ],
    ids=["text", "truncated", "empty", "gif", "too-many-pixels"],
)
def test_a_bad_reference_is_400_naming_input_reference(client, reference, needle):
    assert len(reference) < MAX_UPLOAD
    with pytest.raises(openai.BadRequestError, match=needle) as e:
        client.videos.create(
            prompt="a cat",
            size="64x64",
            seconds="1",
            input_reference=("ref.png", reference, "image/png"),  # type: ignore[arg-type]
        )
    assert e.value.body["param"] == "input_reference"  # type: ignore[index]


def test_a_reference_over_the_upload_limit_is_413_naming_it(i2v_server):
    big = image_bytes(1) + b"\0" * MAX_UPLOAD
    r = httpx.post(
        i2v_server.url + "/v1/videos", data={"prompt": "a cat"},
        files={"input_reference": ("ref.png", big, "image/png")}, timeout=30,
    )  # fmt: skip
    assert r.status_code == 413 and "server.max_upload_bytes" in r.json()["error"]["message"]


def test_an_image_to_video_pipeline_requires_the_reference(client, i2v_server):
    with pytest.raises(openai.BadRequestError, match="input_reference: required.*WanImageToVideoPipeline"):
        client.videos.create(prompt="a cat", size="64x64", seconds="1")  # type: ignore[arg-type]
    r = httpx.post(i2v_server.url + "/v1/videos", json={"prompt": "a cat", "num_frames": 5}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_reference"
    # a text part named input_reference is not an upload
    r = httpx.post(
        i2v_server.url + "/v1/videos", files={"prompt": (None, "a"), "input_reference": (None, "x")}
    )
    assert r.status_code == 400 and "must be a file part" in r.json()["error"]["message"]


def test_openapi_states_input_reference(i2v_server):
    doc = httpx.get(i2v_server.url + "/openapi.json", timeout=30).json()
    body = doc["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
    form = body["multipart/form-data"]["schema"]["properties"]["input_reference"]
    assert (form["type"], form["format"]) == ("string", "binary")
    js = body["application/json"]["schema"]["properties"]["input_reference"]["anyOf"][0]
    assert js["required"] == ["image_url"] and js["properties"]["image_url"]["pattern"].startswith("^data:")
