"""/v1/videos through the front door and the shared queue, as real processes: a real redis-server, two
`diffusion-runtime front-door` replicas (one whose config names the pipeline class, one that leaves it
to model_index.json) and one runtime worker serving the tiny random-weight WanPipeline (CPU).

Proves: the official `openai` client creates a clip on one front door and polls, lists and downloads it
on the other (PyAV reads back the frames and size asked for); the clip ran once (the worker's own
counter); the front door refuses bad input with the runtime's own 400s before enqueuing; a running clip
deleted through the front door stops and frees the worker; the clips kept in Redis are bounded by
`server.video_store_max_bytes` (tests/runtime/test_queue_store.py); the webhook of a finished clip
carries its video object.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import openai
import pytest
from diffusion_runtime.contract.config import QUEUE_URL_ENV
from diffusion_runtime.contract.queue import QUEUE_EXECUTIONS_METRIC
from fixtures_queue import RedisServer
from fixtures_runtime import RuntimeProcess, start_runtime, webhook_receiver
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.runtime, pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")]
FPS = 8
LIMITS = {
    "max_pixels": 128 * 128, "max_steps": 1000, "max_frames": 33, "max_video_seconds": 4,
    "max_video_pixels": 128 * 128 * 25, "video_fps": FPS, "webhook_allow": ["127.0.0.1/32"],
    "request_timeout_seconds": 120,
}  # fmt: skip


def _start(
    model: Path, folder: Path, redis: RedisServer, command: str, pipeline: str | None
) -> RuntimeProcess:
    m: dict[str, Any] = {"uri": str(model), "dtype": "float32"}
    if pipeline:
        m["pipeline"] = pipeline
    return start_runtime(
        model, folder, server=LIMITS, warmup={"frames": 9}, queue={"name": "test/wan", "claim_idle_seconds": 3},
        extra_env={QUEUE_URL_ENV: redis.url}, wait=False, command=command, model=m,
    )  # fmt: skip


@pytest.fixture(scope="module")
def stack(tiny_wan_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("queue-videos")
    yield from _running(base, [
        (tiny_wan_model_dir, "worker", "serve", None),
        (tiny_wan_model_dir, "fd-named", "front-door", "WanPipeline"),
        (tiny_wan_model_dir, "fd-unnamed", "front-door", None),
    ])  # fmt: skip


def _running(base: Path, specs: list[tuple[Path, str, str, str | None]]) -> Iterator[list[RuntimeProcess]]:
    """A redis-server and processes (model, folder, command, pipeline) on it, ready; stopped after,
    and none of them logged a traceback."""
    redis = RedisServer(base / "redis").start()
    procs = [
        _start(model, base / folder, redis, command, pipeline) for model, folder, command, pipeline in specs
    ]
    try:
        for p in procs:
            p.wait_ready()
        yield procs
    finally:
        for p in procs:
            p.stop(timeout=30)
        redis.stop()
    for p in procs:
        assert "Traceback" not in p.log(), p.log_tail(60)


def client(fd: RuntimeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=fd.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def executions(worker: RuntimeProcess, result: str) -> float:
    assert worker.metrics_url
    for fam in text_string_to_metric_families(httpx.get(worker.metrics_url, timeout=10).text):
        for s in fam.samples:
            if s.name == QUEUE_EXECUTIONS_METRIC + "_total" and s.labels.get("result") == result:
                return s.value
    return 0.0


def read_mp4(data: bytes) -> tuple[str, int, int, int]:
    with av.open(io.BytesIO(data)) as c:
        frames = list(c.decode(video=0))
        return c.streams.video[0].codec_context.name, len(frames), frames[0].width, frames[0].height


def poll(c: openai.OpenAI, video_id: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while (v := c.videos.retrieve(video_id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, v
        time.sleep(0.1)
    return v


def test_a_clip_created_on_one_front_door_is_polled_listed_and_downloaded_on_the_other(stack):
    worker, named, unnamed = stack
    before = executions(worker, "succeeded")
    a, b = client(named), client(unnamed)
    created = a.videos.create(prompt="a red ball", size="64x64", seconds="1", extra_body={"seed": 3})  # type: ignore[arg-type]
    assert created.id.startswith("video_") and created.status in ("queued", "in_progress")
    assert (created.model_extra or {})["frames"] == 9  # 1 s at 8 fps -> 8 -> 9 (Wan renders 4k+1)
    done = poll(b, created.id)
    assert done.status == "completed" and done.progress == 100, done
    extra = done.model_extra or {}
    assert extra["seed"] == 3 and extra["step"] == extra["num_inference_steps"] and extra["bytes"] > 0
    assert done.expires_at and done.completed_at and done.expires_at > done.completed_at
    mp4 = b.videos.download_content(created.id).read()
    assert len(mp4) == extra["bytes"]
    assert read_mp4(mp4) == ("h264", 9, 64, 64)
    assert a.videos.download_content(created.id).read() == mp4  # either replica serves the content
    thumb = httpx.get(
        f"{named.url}/v1/videos/{created.id}/content", params={"variant": "thumbnail"}, timeout=10
    )
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
    part = httpx.get(
        f"{unnamed.url}/v1/videos/{created.id}/content", headers={"Range": "bytes=0-99"}, timeout=10
    )
    assert part.status_code == 206 and part.content == mp4[:100]
    for c in (a, b):
        assert created.id in [v.id for v in c.videos.list(order="desc").data]
    assert executions(worker, "succeeded") == before + 1  # ran once, on the one worker
    # an image job's id is not a clip, and a clip is not an image job
    assert httpx.get(f"{named.url}/v1/images/jobs/{created.id}", timeout=10).status_code == 404


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"size": "64x64", "num_frames": 10}, "num_frames: 10 is not a frame count WanPipeline renders"),
        ({"size": "64x64", "seconds": "8"}, "seconds"),
        ({"size": "128x128", "num_frames": 33}, "server.max_video_pixels"),
        ({"size": "65x64"}, "size"),
    ],
)
def test_the_front_door_refuses_bad_input_with_the_runtimes_400_before_enqueuing(stack, fields, needle):
    _, named, _ = stack
    r = httpx.post(named.url + "/v1/videos", json={"prompt": "x", **fields}, timeout=10)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_a_front_door_that_knows_its_pipeline_makes_videos_refuses_image_requests(stack):
    _, named, _ = stack
    body = {"prompt": "x", "size": "64x64"}
    r = httpx.post(
        named.url + "/v1/images/generations", json=body, headers={"Prefer": "respond-async"}, timeout=10
    )
    assert (
        r.status_code == 400
        and "WanPipeline makes videos; use POST /v1/videos" in r.json()["error"]["message"]
    )


def test_a_front_door_without_the_pipeline_named_checks_frame_counts_by_the_video_pipelines_rule(stack):
    _, _, unnamed = stack
    r = httpx.post(
        unnamed.url + "/v1/videos", json={"prompt": "x", "size": "64x64", "num_frames": 10}, timeout=10
    )
    assert r.status_code == 400 and "k*4+1" in r.json()["error"]["message"], r.text


def test_deleting_a_running_clip_through_the_front_door_stops_it_and_frees_the_worker(stack):
    worker, named, unnamed = stack
    cancelled = executions(worker, "cancelled")
    body = {"prompt": "slow", "size": "128x128", "num_frames": 25, "num_inference_steps": 1000}
    r = httpx.post(named.url + "/v1/videos", json=body, timeout=30)
    assert r.status_code == 200, r.text
    vid = r.json()["id"]
    c = client(unnamed)
    deadline = time.monotonic() + 60
    while (v := c.videos.retrieve(vid)).status != "in_progress" or (v.model_extra or {})["step"] < 2:
        assert time.monotonic() < deadline, v
        time.sleep(0.1)
    t0 = time.monotonic()
    assert c.videos.delete(vid).deleted
    assert time.monotonic() - t0 < 10
    with pytest.raises(openai.NotFoundError):
        c.videos.retrieve(vid)
    assert vid not in [x.id for x in c.videos.list().data]
    nxt = poll(c, c.videos.create(prompt="next", size="64x64", seconds="1").id, timeout=60)  # type: ignore[arg-type]
    assert nxt.status == "completed"
    assert executions(worker, "cancelled") == cancelled + 1  # stopped at a step, nothing stored
    assert "video " + vid + ":" not in worker.log()  # never encoded


def test_the_webhook_of_a_queued_clip_carries_its_video_object(stack):
    _, named, _ = stack
    with webhook_receiver() as (url, got, arrived):
        video = client(named).videos.create(
            prompt="a hook", size="64x64", seconds="1",  # type: ignore[arg-type]
            extra_body={"webhook": url},
        )  # fmt: skip
        assert arrived.wait(60)
        assert got[0]["id"] == video.id and got[0]["status"] == "completed" and got[0]["frames"] == 9
        assert got[0]["object"] == "video" and got[0]["bytes"] > 0


@pytest.fixture(scope="module")
def i2v_stack(tiny_wan_i2v_model_dir, tmp_path_factory):
    """Redis, one tiny image-to-video worker and a front door whose config names no pipeline class."""
    base = tmp_path_factory.mktemp("queue-i2v")
    yield from _running(base, [
        (tiny_wan_i2v_model_dir, "worker", "serve", None), (tiny_wan_i2v_model_dir, "fd", "front-door", None),
    ])  # fmt: skip


def _reference() -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(5)
    buf = io.BytesIO()  # wider than the clip: the front door crops and resizes it
    Image.fromarray(rng.integers(0, 256, size=(48, 96, 3), dtype=np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def test_image_to_video_through_the_queue_renders_the_clip_the_pod_renders_directly(i2v_stack):
    import numpy as np

    worker, fd = i2v_stack

    def frames(c: openai.OpenAI) -> np.ndarray:
        video = c.videos.create(
            prompt="a cat walks", size="64x64", seconds="1", input_reference=("ref.png", _reference(), "image/png"),  # type: ignore[arg-type]
            extra_body={"seed": 7},
        )  # fmt: skip
        assert poll(c, video.id).status == "completed"
        with av.open(io.BytesIO(c.videos.download_content(video.id).read())) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(int)

    queued, direct = frames(client(fd)), frames(client(worker))
    assert queued.shape == (9, 64, 64, 3)
    # the fitted first frame crossed the queue as PNG (lossless): the same clip as the pod's own API
    assert np.array_equal(queued, direct)


def test_a_front_door_that_does_not_know_its_pipeline_lets_the_worker_refuse_a_missing_reference(i2v_stack):
    _, fd = i2v_stack
    c = client(fd)
    video = c.videos.create(prompt="no first frame", size="64x64", seconds="1")  # type: ignore[arg-type]
    done = poll(c, video.id)
    assert done.status == "failed" and done.error is not None
    assert done.error.code == "invalid_request" and "input_reference: required" in done.error.message, (
        done.error
    )
