"""The videos API as the official `openai` client (3.51) calls it, on a real `diffusion-runtime serve`
of the tiny random-weight WanPipeline (`tiny-model --variant wan-tiny`, 64x64, a few frames, CPU),
with cache-dit's static mask: create -> poll -> download an MP4 that PyAV reads back as asked, Range
requests, the thumbnail, list, delete (a running clip stops), bad input -> 400 naming the limit, and
the video metrics."""

from __future__ import annotations

import base64
import io
import time

import av
import httpx
import openai
import pytest
from fixtures_runtime import STATIC_CACHE_DIT, start_runtime, webhook_receiver
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.runtime, pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")]
FPS = 8
# 64x64 clips; 2 s at 8 fps = 16 frames -> 17 (Wan renders 4k+1); at most 33 frames, 4 s, and
# 128x128 x 25 frames
LIMITS = {"max_pixels": 128 * 128, "max_steps": 1000, "max_frames": 33, "max_video_seconds": 4,
          "max_video_pixels": 128 * 128 * 25,
          "video_fps": FPS, "max_queue": 8, "webhook_allow": ["127.0.0.1/32"]}  # fmt: skip


@pytest.fixture(scope="module")
def video_server(tiny_wan_model_dir, tmp_path_factory):
    rp = start_runtime(
        tiny_wan_model_dir, tmp_path_factory.mktemp("video-api"), cache_dit=STATIC_CACHE_DIT, server=LIMITS,
        warmup={"frames": 9},
    )  # fmt: skip
    yield rp
    rp.stop()


@pytest.fixture(scope="module")
def client(video_server):
    return openai.OpenAI(base_url=video_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def read_mp4(data: bytes) -> tuple[str, str, int, int, int, float]:
    """(codec, pixel format, decoded frames, width, height, fps) as PyAV reads the MP4 back."""
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        codec, pix_fmt, rate = s.codec_context.name, s.codec_context.pix_fmt, float(s.average_rate or 0)
        frames = list(c.decode(video=0))
        return codec, pix_fmt or "", len(frames), frames[0].width, frames[0].height, rate


def test_create_poll_download_gives_the_mp4_asked_for(client, video_server):
    url = video_server.url
    frames_before = metric(url, "diffusion_video_frames_generated_total")
    cached_before = metric(url, "diffusion_cache_steps_total", result="cached")
    video = client.videos.create(prompt="a cat walking", model="wan-tiny", size="64x64", seconds="2")  # type: ignore[arg-type]
    assert (
        video.object == "video"
        and video.status in ("queued", "in_progress")
        and video.id.startswith("video_")
    )
    assert video.size == "64x64" and video.seconds == "2"
    done = client.videos.poll(video.id, poll_interval_ms=100)
    assert done.status == "completed", done.error
    assert done.progress == 100 and done.completed_at is not None and done.expires_at is not None
    extra = done.model_extra or {}
    assert extra["frames"] == 17 and extra["fps"] == FPS and extra["cached_steps"] > 0
    content = client.videos.download_content(video.id)
    data = content.read()
    assert data[4:8] == b"ftyp" and len(data) == extra["bytes"]
    codec, pix_fmt, n, width, height, rate = read_mp4(data)
    assert (codec, pix_fmt, n, width, height, rate) == ("h264", "yuv420p", 17, 64, 64, float(FPS))
    thumb = client.videos.download_content(video.id, variant="thumbnail").read()
    img = Image.open(io.BytesIO(thumb))
    assert img.format == "WEBP" and img.size == (64, 64)
    # metrics: frames, encode time, bytes; cache-dit's static mask cached steps of the clip
    assert metric(url, "diffusion_video_frames_generated_total") - frames_before == 17
    assert metric(url, "diffusion_video_encode_seconds_count") >= 1
    assert metric(url, "diffusion_video_bytes_total") >= len(data)
    assert metric(url, "diffusion_video_generation_frames_per_second_count") >= 1
    assert metric(url, "diffusion_cache_steps_total", result="cached") > cached_before
    # listed (newest first), then deleted: gone
    listed = client.videos.list(limit=100)
    assert video.id in [v.id for v in listed.data]
    gone = client.videos.delete(video.id)
    assert gone.deleted and gone.id == video.id and gone.object == "video.deleted"
    with pytest.raises(openai.NotFoundError, match="deleted by DELETE"):
        client.videos.retrieve(video.id)


def test_range_requests_answer_206_with_the_right_bytes(client, video_server):
    video = client.videos.create_and_poll(prompt="waves", size="64x64", seconds="1", poll_interval_ms=100)  # type: ignore[arg-type]
    assert video.status == "completed"
    path = f"{video_server.url}/v1/videos/{video.id}/content"
    full = httpx.get(path, timeout=30)
    assert full.status_code == 200 and full.headers["accept-ranges"] == "bytes"
    assert full.headers["content-type"] == "video/mp4"
    data = full.content
    size = len(data)
    cases = {"bytes=0-99": (0, 99), "bytes=100-": (100, size - 1), "bytes=-50": (size - 50, size - 1),
             f"bytes=10-{size + 100}": (10, size - 1)}  # fmt: skip
    for header, (first, last) in cases.items():
        r = httpx.get(path, headers={"Range": header}, timeout=30)
        assert r.status_code == 206, (header, r.text)
        assert r.headers["content-range"] == f"bytes {first}-{last}/{size}"
        assert r.content == data[first : last + 1]
    r = httpx.get(path, headers={"Range": f"bytes={size}-"}, timeout=30)
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{size}"
    for ignored in ("bytes=0-1,5-9", "items=0-9", "nonsense"):  # not one bytes range: the whole body
        r = httpx.get(path, headers={"Range": ignored}, timeout=30)
        assert r.status_code == 200 and r.content == data, ignored
    r = httpx.get(path, params={"variant": "spritesheet"}, timeout=30)
    assert r.status_code == 400 and "variant" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"size": "720x1280"}, "max_pixels"),
        ({"size": "64x60"}, "multiples of 16"),
        ({"seconds": "12"}, "seconds"),
        ({"seconds": "4", "fps": "16"}, "server.max_frames=33"),
        ({"num_frames": "10"}, "k*4+1: 9 or 13"),
        ({"size": "128x128", "num_frames": "29"}, "server.max_video_pixels=409600"),
        ({"seconds": "abc"}, "seconds"),
        ({"prompt": "   "}, "prompt"),
    ],
)
def test_bad_input_is_400_naming_the_limit(video_server, fields, needle):
    form = {"prompt": "a cat", "size": "64x64", **fields}
    r = httpx.post(video_server.url + "/v1/videos", files={k: (None, v) for k, v in form.items()}, timeout=30)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]


def test_the_openai_client_gets_400_for_a_size_over_the_limit(client):
    with pytest.raises(openai.BadRequestError, match="max_pixels"):
        client.videos.create(prompt="a cat", size="1280x720")


def test_input_reference_and_wrong_media_types_are_refused(client, video_server):
    """A text-to-video pipeline refuses a reference image, naming itself and the image-to-video
    pipelines (test_video_i2v.py serves one)."""
    url = video_server.url + "/v1/videos"
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, format="PNG")
    needle = "served pipeline WanPipeline is text-to-video.*needs an image-to-video pipeline.*WanImageToVideoPipeline"
    with pytest.raises(openai.BadRequestError, match=needle) as e:
        client.videos.create(
            prompt="a cat",
            size="64x64",
            seconds="1",
            input_reference=("a.png", png.getvalue(), "image/png"),  # type: ignore[arg-type]
        )
    assert e.value.body["param"] == "input_reference"  # type: ignore[index]
    data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    r = httpx.post(url, json={"prompt": "a cat", "num_frames": 5, "input_reference": {"image_url": data_url}})
    assert r.status_code == 400 and "is text-to-video" in r.json()["error"]["message"]
    r = httpx.post(url, content=b"prompt=a", headers={"content-type": "text/plain"})
    assert r.status_code == 415


def test_json_body_and_the_image_api_refuses_a_video_pipeline(video_server):
    r = httpx.post(video_server.url + "/v1/videos", json={"prompt": "a cat", "size": "64x64", "num_frames": 5},
                   timeout=30)  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["frames"] == 5 and r.json()["seconds"] == "0.625"
    r = httpx.post(video_server.url + "/v1/images/generations", json={"prompt": "a cat"}, timeout=30)
    assert r.status_code == 400 and "/v1/videos" in r.json()["error"]["message"]


def test_delete_while_running_stops_it_and_frees_the_queue(client, video_server):
    # a long clip (the largest volume, many steps) so that it is still running when deleted, and one
    # queued behind it
    body = {"prompt": "slow", "size": "128x128", "num_frames": 25, "num_inference_steps": 1000}
    r = httpx.post(video_server.url + "/v1/videos", json=body, timeout=30)
    assert r.status_code == 200, r.text
    long = r.json()
    queued = client.videos.create(prompt="behind", size="64x64", seconds="1")  # type: ignore[arg-type]
    deadline = time.monotonic() + 60
    while (running := client.videos.retrieve(long["id"])).status != "in_progress" or running.progress < 1:
        assert time.monotonic() < deadline, running
        time.sleep(0.05)
    assert 1 <= running.progress < 100 and (running.model_extra or {})["step"] >= 10
    # the clip behind it waits (position 1: next); a DELETE takes it out of the queue
    behind = client.videos.retrieve(queued.id)
    assert behind.status == "queued" and (behind.model_extra or {})["queue_position"] == 1
    cancelled_before = metric(video_server.url, "diffusion_jobs_total", endpoint="videos", status="cancelled")
    assert client.videos.delete(queued.id).deleted
    t0 = time.monotonic()
    assert client.videos.delete(long["id"]).deleted
    assert time.monotonic() - t0 < 5  # stopped at its next step
    assert (
        metric(video_server.url, "diffusion_jobs_total", endpoint="videos", status="cancelled")
        == cancelled_before + 2
    )
    assert "video " + long["id"] not in video_server.log()  # never finished (nor encoded)
    # the pipeline is free: the next clip completes
    nxt = client.videos.create_and_poll(prompt="next", size="64x64", seconds="1", poll_interval_ms=100)  # type: ignore[arg-type]
    assert nxt.status == "completed"
    with pytest.raises(openai.NotFoundError):
        client.videos.delete(long["id"])


def test_webhook_receives_the_finished_clip(client, video_server):
    with webhook_receiver() as (url, got, arrived):
        video = client.videos.create(
            prompt="a hook", size="64x64", seconds="1",  # type: ignore[arg-type]
            extra_body={"webhook": url},
        )  # fmt: skip
        assert arrived.wait(60)
        assert got[0]["id"] == video.id and got[0]["status"] == "completed" and got[0]["frames"] == 9


def test_an_image_pipeline_refuses_videos_naming_the_video_pipelines(runtime_server):
    """The tiny FLUX server: /v1/videos answers 400 naming its pipeline and the video pipelines."""
    client = openai.OpenAI(base_url=runtime_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="FluxPipeline makes images.*WanPipeline"):
        client.videos.create(prompt="a cat", size="64x64")


def test_ulysses2_renders_the_single_process_clip(client, video_server, tiny_wan_model_dir, tmp_path):
    """A parallel replica (two gloo ranks, cache-dit's Ulysses) runs the video call on every rank and
    gives the single-process server's clip (decoded frames within H.264's rounding)."""
    cd = {**STATIC_CACHE_DIT, "parallelism_config": {"ulysses_size": 2}}
    ranked = start_runtime(
        tiny_wan_model_dir, tmp_path / "u2", cache_dit=cd, server=LIMITS, warmup={"frames": 9}, wait=False
    )
    try:
        ranked.wait_ready(timeout=420)
        body = {"prompt": "a cat", "size": "64x64", "seconds": 1, "seed": 3, "num_inference_steps": 8}
        clips = []
        for url in (video_server.url, ranked.url):
            created = httpx.post(url + "/v1/videos", json=body, timeout=30).json()
            deadline = time.monotonic() + 120
            while (v := httpx.get(f"{url}/v1/videos/{created['id']}", timeout=30).json())[
                "status"
            ] != "completed":
                assert v["status"] != "failed" and time.monotonic() < deadline, v
                time.sleep(0.1)
            clips.append(httpx.get(f"{url}/v1/videos/{created['id']}/content", timeout=30).content)
        assert "rank 1/2 loaded WanPipeline" in ranked.log()
    finally:
        ranked.stop(timeout=30)
    frames = []
    for data in clips:
        with av.open(io.BytesIO(data)) as c:
            frames.append([f.to_ndarray(format="rgb24").astype(int) for f in c.decode(video=0)])
    single, parallel = frames
    assert len(single) == len(parallel) == 9
    assert min(f.std() for f in single) > 2, "real decoded frames, not a flat fill"
    diff = max(abs(a - b).max() for a, b in zip(single, parallel, strict=True))
    assert diff <= 3, f"frames differ by up to {diff} levels"


def test_warmup_frames_off_the_pipelines_rule_stop_the_server_with_one_line(tiny_wan_model_dir, tmp_path):
    """No `model.pipeline`: model_index.json picks WanPipeline, and its frame rule is checked at load."""
    rp = start_runtime(tiny_wan_model_dir, tmp_path / "bad", server=LIMITS, warmup={"frames": 8}, wait=False)
    try:
        assert rp.wait_exit(timeout=120) != 0
    finally:
        rp.stop(timeout=10)
    assert "warmup.frames: 8 is not a frame count WanPipeline renders (k*4+1)" in rp.log(), rp.log_tail()


def test_clips_belong_to_the_key_that_created_them(tiny_wan_model_dir, tmp_path):
    """With API keys (docs/security.md) a clip is the creating key's: another key gets 404 on every
    route and an empty list; no key is 401."""
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "alice").write_text("sk-alice\n")
    (keys / "bob").write_text("sk-bob\n")
    rp = start_runtime(tiny_wan_model_dir, tmp_path / "rt", server={**LIMITS, "auth_keys_dir": str(keys)},
                       warmup={"frames": 9})  # fmt: skip
    try:
        alice = openai.OpenAI(base_url=rp.url + "/v1", api_key="sk-alice", max_retries=0, timeout=60)
        bob = openai.OpenAI(base_url=rp.url + "/v1", api_key="sk-bob", max_retries=0, timeout=60)
        video = alice.videos.create_and_poll(prompt="mine", size="64x64", seconds="1", poll_interval_ms=100)  # type: ignore[arg-type]
        assert video.status == "completed"
        assert alice.videos.download_content(video.id).read()[4:8] == b"ftyp"
        assert [v.id for v in alice.videos.list().data] == [video.id] and bob.videos.list().data == []
        for call in (bob.videos.retrieve, bob.videos.download_content, bob.videos.delete):
            with pytest.raises(openai.NotFoundError, match="not known to this pod"):
                call(video.id)
        assert httpx.get(f"{rp.url}/v1/videos/{video.id}", timeout=10).status_code == 401
        requests = metric(rp.url, "diffusion_requests_total", endpoint="videos", status="200", key="alice")
        assert requests == 1
    finally:
        rp.stop()
