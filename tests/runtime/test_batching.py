"""Dynamic batching (server.max_batch) on a real `diffusion-runtime serve` with the tiny model and
cache-dit's static mask: batched images equal their unbatched twins, incompatible requests never
share a call, and a withdrawn member does not fail its batch-mates. Batches are observed through
`diffusion_batch_size` (images per pipeline call)."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest
from fixtures_runtime import STATIC_CACHE_DIT, start_runtime
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.runtime
GEN = "/v1/images/generations"
SMALL = {"size": "64x64", "num_inference_steps": 8}
DELAY = 1.0  # long enough for requests sent together to meet on a loaded machine


def scrape(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            if not s.labels or set(s.labels) == {"le"}:
                out[s.name if "le" not in s.labels else f"{s.name}{{le={s.labels['le']}}}"] = s.value
    return out


def batches(url: str) -> tuple[int, int]:
    """(pipeline calls, images) so far, from diffusion_batch_size."""
    m = scrape(url)
    return int(m["diffusion_batch_size_count"]), int(m["diffusion_batch_size_sum"])


def post(url: str, timeout: float = 300, **body: Any) -> httpx.Response:
    body.setdefault("prompt", "a photo of a cat")
    return httpx.post(url + GEN, json=body, timeout=timeout)


def together(url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """Send the requests at once (one thread each) and collect the answers in order."""
    out: list[Any] = [None] * len(bodies)

    def send(i: int) -> None:
        try:
            out[i] = post(url, **bodies[i])
        except httpx.HTTPError as e:
            out[i] = e

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return out


def pixels(b64: str) -> np.ndarray:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def images(r: httpx.Response) -> list[np.ndarray]:
    assert r.status_code == 200, r.text[:300]
    return [pixels(d["b64_json"]) for d in r.json()["data"]]


def assert_close(a: np.ndarray, b: np.ndarray) -> None:
    diff = np.abs(a - b)
    # float32: a batched matmul may round differently; at most one 8-bit step after PNG quantisation
    assert diff.max() <= 1, f"max pixel difference {diff.max()} (mean {diff.mean():.4f})"


@pytest.fixture(scope="module")
def batching_server(tiny_model_dir, tmp_path_factory):
    rp = start_runtime(
        tiny_model_dir, tmp_path_factory.mktemp("batching"), cache_dit=STATIC_CACHE_DIT,
        server={"max_batch": 4, "max_batch_delay_seconds": DELAY, "max_pixels": 256 * 256, "max_queue": 16},
    )  # fmt: skip
    yield rp
    rp.stop()


def test_batched_images_equal_their_unbatched_twins(batching_server):
    url = batching_server.url
    bodies = [dict(SMALL, seed=1), dict(SMALL, seed=2, n=2, prompt="a red house"), dict(SMALL, seed=3)]
    alone = []
    for body in bodies:  # one at a time: each is a call of its own
        calls, imgs = batches(url)
        r = post(url, **body)
        alone.append(images(r))
        assert r.json()["cache"] == {"cached_steps": 3, "computed_steps": 5}  # the static mask
        assert batches(url) == (calls + 1, imgs + body.get("n", 1))
    calls, imgs = batches(url)
    answers = together(url, bodies)
    assert batches(url) == (calls + 1, imgs + 4), "the three requests (4 images) ran as one call"
    for r, want, body in zip(answers, alone, bodies, strict=True):
        got = images(r)
        assert r.json()["seed"] == body["seed"]
        assert r.json()["cache"] == {"cached_steps": 3, "computed_steps": 5}  # a fresh cache context per call
        assert len(got) == len(want) == body.get("n", 1)
        for g, w in zip(got, want, strict=True):
            assert_close(g, w)
    assert np.abs(alone[0][0] - alone[2][0]).max() > 8, "another seed gives another image"
    assert np.abs(alone[1][0] - alone[1][1]).max() > 8, "the two images of n=2 differ"
    assert scrape(url)["diffusion_batch_wait_seconds_count"] >= 4


def test_incompatible_requests_never_share_a_call(batching_server):
    url = batching_server.url
    bodies = [
        dict(SMALL, seed=1),
        dict(SMALL, seed=2, prompt="another prompt"),  # the only compatible pair
        dict(SMALL, seed=1, num_inference_steps=6),
        dict(SMALL, seed=1, size="48x48"),
        dict(SMALL, seed=1, guidance_scale=2.0),
        dict(SMALL, seed=1, negative_prompt="blurry"),
    ]
    calls, imgs = batches(url)
    answers = together(url, bodies)
    for r in answers:
        assert isinstance(r, httpx.Response) and r.status_code == 200, r
    assert batches(url) == (calls + 5, imgs + 6), "five calls: one pair, four alone"
    lone = images(post(url, **bodies[2]))[0]
    assert_close(images(answers[2])[0], lone)


def raw_request(url: str, body: dict[str, Any]) -> socket.socket:
    """A sync generation sent on a plain socket, so the test decides when the client hangs up."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(
        f"POST {GEN} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def test_a_withdrawn_member_does_not_fail_its_batch_mates(batching_server):
    """Three compatible long requests in one call: an async job DELETEd while the call runs and a
    client that hangs up then; the third gets its image, the same as when it runs alone."""
    url = batching_server.url
    long = {"prompt": "a cat", "size": "256x256", "num_inference_steps": 50, "seed": 7}
    calls, imgs = batches(url)
    job = httpx.post(url + GEN, json=long, headers={"Prefer": "respond-async"}, timeout=30)
    assert job.status_code == 202, job.text
    job_url = url + job.headers["Location"]
    sock = raw_request(url, long)
    kept: list[Any] = []
    t = threading.Thread(target=lambda: kept.append(post(url, **long)))
    t.start()
    deadline = time.monotonic() + 120
    status = httpx.get(job_url, timeout=10).json()
    while status["progress"]["step"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
        status = httpx.get(job_url, timeout=10).json()
    assert status["status"] == "running", status
    sock.close()  # the sync client hangs up mid-call
    cancelled = httpx.delete(job_url, timeout=30).json()
    assert cancelled["cancel_requested"] is True
    t.join(timeout=300)
    assert kept and kept[0].status_code == 200, kept
    assert kept[0].json()["timings"]["inference_seconds"] > 0
    assert batches(url) == (calls + 1, imgs + 3), "the three ran as one call"
    final = httpx.get(job_url, timeout=10).json()
    while final["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
        final = httpx.get(job_url, timeout=10).json()
    assert final["status"] == "cancelled", final
    assert final["progress"]["step"] == 50, "the call ran on for its batch-mate"
    alone = images(post(url, **long))[0]
    assert_close(images(kept[0])[0], alone)
