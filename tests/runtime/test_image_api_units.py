"""Pure parts of the image API: stores and their bounds, edit step arithmetic, sizes, masks, codecs."""

from __future__ import annotations

import asyncio
import io
import time

import pytest
from diffusion_runtime.api.jobs import Evicted, Job, JobStore, ResultStore
from diffusion_runtime.api.protocol import CacheSteps, ImageData, ImagesResponse, Timings, prefers_async
from diffusion_runtime.engine.errors import InvalidInput
from diffusion_runtime.engine.imaging import decode_upload, encode, fit_size, mask_from_upload
from diffusion_runtime.engine.params import EncodedResult, edit_steps
from diffusion_runtime.engine.scheduler import Work
from PIL import Image


def _response(b64: str) -> ImagesResponse:
    return ImagesResponse(
        created=0, data=[ImageData(b64_json=b64, url=None)], output_format="png", size="16x16", seed=0,
        num_inference_steps=1, timings=Timings(queue_wait_seconds=0, inference_seconds=0, total_seconds=0),
        cache=CacheSteps(cached_steps=0, computed_steps=1),
    )  # fmt: skip


def _job(result_bytes: int = 0) -> Job:
    loop = asyncio.new_event_loop()
    try:

        def run(cancel, on_step) -> EncodedResult:
            return EncodedResult([], 0, 0.0, [], 0, 1)

        work = Work(endpoint="generations", run=run, total_steps=1, future=loop.create_future())
    finally:
        loop.close()
    job = Job(endpoint="generations", work=work)
    job.finish("succeeded", result=_response("x" * result_bytes))
    return job


def test_job_store_bounds_count_age_and_bytes():
    store = JobStore(max_finished=3, ttl_seconds=60, max_bytes=1000)
    jobs = [_job(10) for _ in range(5)]
    for j in jobs:
        store.add(j)
    assert [store.get(j.id) is not None for j in jobs] == [False, False, True, True, True]
    big = _job(900)
    store.add(big)
    store.add(_job(200))  # 900 + 200 + 10 > 1000: the oldest go first, big included
    assert store.get(big.id) is None
    old = _job(1)
    old.finished_at = time.time() - 61
    store.add(old)
    assert store.get(old.id) is None
    assert "not known to this pod" in store.unknown_reason("x")
    assert "server.max_jobs" in store.unknown_reason(jobs[0].id)
    assert "server.store_max_bytes" in store.unknown_reason(big.id)
    assert "server.job_ttl_seconds" in store.unknown_reason(old.id)


def test_the_newest_finished_job_stays_even_beyond_the_byte_budget():
    store = JobStore(max_finished=3, ttl_seconds=60, max_bytes=100)
    small, huge = _job(10), _job(500)
    store.add(small)
    store.add(huge)
    assert store.get(huge.id) is huge  # alone over the budget, but the newest: readable
    assert store.get(small.id) is None and "server.store_max_bytes" in store.unknown_reason(small.id)
    newer = _job(10)
    store.add(newer)
    assert store.get(huge.id) is None and store.get(newer.id) is newer


def test_unfinished_jobs_are_never_pruned():
    store = JobStore(max_finished=1, ttl_seconds=0.001, max_bytes=1)
    job = _job()
    job.final = None  # still queued
    store.add(job)
    for _ in range(3):
        store.add(_job(5))
    assert store.get(job.id) is job


def test_result_store_bounds_items_and_bytes():
    store = ResultStore(max_items=3, ttl_seconds=60, max_bytes=100)
    ids = [store.put(b"x" * 10, "png") for _ in range(4)]
    assert [store.get(i) is not None for i in ids] == [False, True, True, True]
    big = store.put(b"y" * 95, "webp")
    assert store.get(big) == (b"y" * 95, "webp") and store.nbytes <= 100
    assert all(store.get(i) is None for i in ids)
    assert "server.max_jobs * server.max_n" in store.unknown_reason(ids[0])
    assert "server.store_max_bytes" in store.unknown_reason(ids[2])


def test_an_eviction_is_told_only_to_the_owner_key():
    jobs = JobStore(max_finished=1, ttl_seconds=60, max_bytes=1000)
    mine = _job()
    mine.owner = "key-a"
    jobs.add(mine)
    jobs.add(_job())  # finished later: `mine` is beyond max_jobs
    assert jobs.get(mine.id, "key-a") is None
    assert "evicted" in jobs.unknown_reason(mine.id, "key-a")
    for other in ("key-b", None):  # another key learns nothing: the 404 of a job never submitted
        assert "evicted" not in jobs.unknown_reason(mine.id, other)
        assert "not known to this pod" in jobs.unknown_reason(mine.id, other)
    results = ResultStore(max_items=1, ttl_seconds=60, max_bytes=100)
    rid = results.put(b"x", "png", owner="key-a")
    results.put(b"y", "png", owner="key-b")
    assert "server.max_jobs * server.max_n" in results.unknown_reason(rid, "key-a")
    assert "evicted" not in results.unknown_reason(rid, "key-b")


def test_evicted_reasons_are_bounded():
    evicted = Evicted(limit=2)
    for key in "abc":
        evicted.add(key, f"why {key}")
    assert evicted.get("a") is None and evicted.get("c") == "why c"


@pytest.mark.parametrize(
    "steps, strength, runs",
    [(8, 1.0, 8), (8, 0.6, 5), (4, 0.6, 3), (10, 0.05, 1), (1, 0.01, 1), (28, 0.5, 14)],
)
def test_edit_steps_match_diffusers_and_run_at_least_one(steps, strength, runs):
    assert edit_steps(steps, strength)[0] == runs


def test_fit_size_snaps_and_bounds():
    assert fit_size(64, 64, 4096) == (64, 64)
    assert fit_size(1000, 700, 1 << 20) == (992, 688)
    w, h = fit_size(4000, 3000, 1024 * 1024)
    assert w % 16 == 0 and h % 16 == 0 and w * h <= 1024 * 1024 and w > h
    assert fit_size(5, 3, 4096) == (16, 16)


def test_prefer_header():
    assert prefers_async("respond-async")
    assert prefers_async("return=minimal, Respond-Async; wait=10")
    assert not prefers_async("") and not prefers_async("return=representation")


def test_masks_openai_alpha_and_diffusers_white():
    rgba = Image.new("RGBA", (4, 4), (9, 9, 9, 255))
    rgba.putpixel((1, 1), (9, 9, 9, 0))
    m = mask_from_upload(rgba)
    assert m.mode == "L" and m.getpixel((1, 1)) == 255 and m.getpixel((0, 0)) == 0
    gray = Image.new("L", (4, 4), 0)
    gray.putpixel((2, 2), 255)
    assert mask_from_upload(gray).getpixel((2, 2)) == 255


def test_encode_and_decode_round_trip():
    img = Image.new("RGB", (32, 16), (200, 10, 10))
    for fmt, pil in (("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")):
        data = encode(img, fmt, 80)
        back = decode_upload(data, "image")
        assert back.format == pil and back.size == (32, 16)
    with pytest.raises(InvalidInput, match="image: not a readable"):
        decode_upload(b"GIF89a-not-really", "image")
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="BMP")
    with pytest.raises(InvalidInput, match="BMP images are not accepted"):
        decode_upload(buf.getvalue(), "mask")
