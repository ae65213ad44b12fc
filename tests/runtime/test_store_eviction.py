"""Job-store and url-result eviction over HTTP, on real `diffusion-runtime serve` processes (tiny model):
by count (`server.max_jobs`; url results `max_jobs * max_n` images), by age (`server.job_ttl_seconds`)
and by bytes (`server.store_max_bytes`). An evicted job or image answers 404 naming the rule that
evicted it; the jobs and images kept still answer 200.
"""

from __future__ import annotations

import base64
import time

import httpx
import pytest
from fixtures_runtime import start_runtime

pytestmark = pytest.mark.runtime
GEN = "/v1/images/generations"
JOBS = "/v1/images/jobs"
ASYNC = {"Prefer": "respond-async"}
MIB = 1 << 20
BASE = {"max_pixels": 256 * 256, "max_n": 4, "max_steps": 50, "max_queue": 8}
SMALL = {"size": "64x64", "num_inference_steps": 2}
# 256x256 images of random weights hardly compress: ~250 KB of base64 each, 4 per request
BIG = {"size": "256x256", "num_inference_steps": 2, "n": 4}


# the age server runs with API keys: an eviction's reason is told to the creating key only
KEYS = {"team-a": "sk-team-a-0123456789abcdef", "team-b": "sk-team-b-fedcba9876543210"}
A, B = ({"Authorization": f"Bearer {KEYS[k]}"} for k in ("team-a", "team-b"))


def _server(tiny_model_dir, tmp_path_factory, name: str, **server):
    rp = start_runtime(tiny_model_dir, tmp_path_factory.mktemp(name), server={**BASE, **server})
    return rp


@pytest.fixture(scope="module")
def by_count(tiny_model_dir, tmp_path_factory):
    rp = _server(tiny_model_dir, tmp_path_factory, "evict-count", max_jobs=2)
    yield rp
    rp.stop()


@pytest.fixture(scope="module")
def by_age(tiny_model_dir, tmp_path_factory):
    keys = tmp_path_factory.mktemp("evict-age-keys")
    for name, key in KEYS.items():
        (keys / name).write_text(key + "\n")
    rp = _server(tiny_model_dir, tmp_path_factory, "evict-age", job_ttl_seconds=5, auth_keys_dir=str(keys))
    yield rp
    rp.stop()


@pytest.fixture(scope="module")
def by_bytes(tiny_model_dir, tmp_path_factory):
    rp = _server(tiny_model_dir, tmp_path_factory, "evict-bytes", max_jobs=1000, store_max_bytes=MIB)
    yield rp
    rp.stop()


def _finished_job(url: str, body: dict, timeout: float = 120, key: dict | None = None) -> dict:
    """Submit an async job and poll it until it is finished; its final JobStatus."""
    key = key or {}
    r = httpx.post(url + GEN, json={"prompt": "a cat", **body}, headers={**ASYNC, **key}, timeout=10)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    deadline = time.monotonic() + timeout
    while True:
        st = httpx.get(f"{url}{JOBS}/{job_id}", headers=key, timeout=10)
        assert st.status_code == 200, st.text
        if st.json()["status"] in ("succeeded", "failed", "cancelled"):
            assert st.json()["status"] == "succeeded", st.text
            return st.json()
        assert time.monotonic() < deadline, f"job {job_id} not finished: {st.text}"
        time.sleep(0.05)


def _job_bytes(job: dict) -> int:
    return sum(len(d["b64_json"]) for d in job["result"]["data"])


def _url_results(url: str, body: dict, key: dict | None = None) -> list[str]:
    r = httpx.post(
        url + GEN, json={"prompt": "a dog", "response_format": "url", **body}, headers=key or {}, timeout=120
    )
    assert r.status_code == 200, r.text
    return [d["url"] for d in r.json()["data"]]


def _gone(url: str, needle: str, key: dict | None = None) -> str:
    """GET `url` answers 404 whose OpenAI-shaped error names `needle`; the message."""
    r = httpx.get(url, headers=key or {}, timeout=10)
    assert r.status_code == 404, (url, r.status_code, r.text[:200])
    message = r.json()["error"]["message"]
    assert "evicted" in message and needle in message, message
    return message


def _kept(url: str, key: dict | None = None) -> httpx.Response:
    r = httpx.get(url, headers=key or {}, timeout=10)
    assert r.status_code == 200, (url, r.text[:200])
    return r


def test_jobs_beyond_max_jobs_are_404_naming_server_max_jobs(by_count):
    url = by_count.url
    jobs = [_finished_job(url, SMALL)["id"] for _ in range(3)]
    message = _gone(f"{url}{JOBS}/{jobs[0]}", "server.max_jobs")
    assert "2 more recent jobs" in message
    for job_id in jobs[1:]:
        assert _kept(f"{url}{JOBS}/{job_id}").json()["status"] == "succeeded"
    # DELETE of an evicted job answers the same
    d = httpx.delete(f"{url}{JOBS}/{jobs[0]}", timeout=10)
    assert d.status_code == 404 and "server.max_jobs" in d.json()["error"]["message"]


def test_url_results_beyond_max_jobs_times_max_n_are_404(by_count):
    url = by_count.url  # max_jobs 2 x max_n 4: 8 images kept
    first = _url_results(url, {**SMALL, "n": 4})
    second = _url_results(url, {**SMALL, "n": 4})
    third = _url_results(url, {**SMALL, "n": 1})
    message = _gone(first[0], "server.max_jobs * server.max_n")
    assert "8 more recent images" in message
    for u in [*first[1:], *second, *third]:
        assert _kept(u).content.startswith(b"\x89PNG")


def test_jobs_and_url_results_older_than_job_ttl_are_404_to_their_key_only(by_age):
    url = by_age.url  # job_ttl_seconds 5, API keys on
    job = _finished_job(url, SMALL, key=A)
    image = _url_results(url, SMALL, key=A)[0]
    assert _kept(f"{url}{JOBS}/{job['id']}", A).json()["status"] == "succeeded"
    assert _kept(image, A).content.startswith(b"\x89PNG")
    time.sleep(5.5)
    assert "finished more than 5s ago (server.job_ttl_seconds)" in _gone(
        f"{url}{JOBS}/{job['id']}", "server.job_ttl_seconds", A
    )
    assert "more than 5s ago" in _gone(image, "server.job_ttl_seconds", A)
    # another key learns nothing about it: the 404 of an id never submitted
    for target in (f"{url}{JOBS}/{job['id']}", image):
        other = httpx.get(target, headers=B, timeout=10)
        assert other.status_code == 404 and "evicted" not in other.text, other.text
        assert "not known to this pod" in other.json()["error"]["message"]
    # a job finished since is kept: the rule is the age, not a reset of the store
    fresh = _finished_job(url, SMALL, key=A)
    assert _kept(f"{url}{JOBS}/{fresh['id']}", A).json()["result"] is not None


def test_jobs_beyond_store_max_bytes_are_404_oldest_first(by_bytes):
    url = by_bytes.url  # store_max_bytes 1 MiB, max_jobs 1000: only the bytes evict
    jobs: list[dict] = []
    while sum(_job_bytes(j) for j in jobs) <= MIB:
        assert len(jobs) < 20, "the images never added up to 1 MiB"
        jobs.append(_finished_job(url, BIG))
    sizes = [_job_bytes(j) for j in jobs]
    # the oldest go until the rest fit: the newest job always fits (each is < 1 MiB)
    assert sizes[-1] < MIB, sizes
    kept_from = next(i for i in range(len(jobs)) if sum(sizes[i:]) <= MIB)
    assert kept_from >= 1
    for job in jobs[:kept_from]:
        _gone(f"{url}{JOBS}/{job['id']}", "server.store_max_bytes")
    for job in jobs[kept_from:]:
        got = _kept(f"{url}{JOBS}/{job['id']}").json()
        assert base64.b64decode(got["result"]["data"][0]["b64_json"]).startswith(b"\x89PNG")


def test_url_results_beyond_store_max_bytes_are_404_oldest_first(by_bytes):
    url = by_bytes.url
    urls: list[str] = []
    sizes: list[int] = []
    while sum(sizes) <= MIB:
        assert len(urls) < 40, "the images never added up to 1 MiB"
        # one image per request, read at once: its size is known before the next one can evict it
        (u,) = _url_results(url, {**BIG, "n": 1})
        urls.append(u)
        sizes.append(len(_kept(u).content))
    kept_from = next(i for i in range(len(urls)) if sum(sizes[i:]) <= MIB)
    assert kept_from >= 1
    for u in urls[:kept_from]:
        _gone(u, "server.store_max_bytes")
    for u in urls[kept_from:]:
        assert _kept(u).content.startswith(b"\x89PNG")
