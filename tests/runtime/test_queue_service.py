"""The front door + Redis + runtime workers as real processes on the tiny model (`diffusion-runtime
front-door` and `diffusion-runtime serve` with a queue: section), against a real redis-server.

Proves: async jobs readable from either front door and run exactly once; the official `openai` client
generates and edits through the front door; cancellation; owners; SIGTERM leaves unstarted work for
others; a SIGKILLed worker's job is redelivered and completes elsewhere (once); max_attempts ends a
job as failed with the reason; scale from zero (a sync request held while no worker exists, the
demand gauge read from Redis); 429 past queue.max_waiting; Redis stopped -> 503 + Retry-After within
a bound, restarted -> nothing acknowledged lost.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures_queue import RedisServer
from fixtures_runtime import RuntimeProcess, start_runtime
from prometheus_client.parser import text_string_to_metric_families

from diffusion_runtime.contract.config import QUEUE_URL_ENV, QueueConfig
from diffusion_runtime.contract.queue import (
    QUEUE_DEMAND_METRIC,
    QUEUE_EXECUTIONS_METRIC,
    QUEUE_JOB_WAIT_METRIC,
    QUEUE_REDELIVERIES_METRIC,
    QUEUE_RUNNING_METRIC,
    QUEUE_WAITING_METRIC,
)

pytestmark = pytest.mark.runtime
ASYNC = {"Prefer": "respond-async"}
LIMITS = {"max_steps": 400, "max_pixels": 128 * 128, "request_timeout_seconds": 120}
SHORT = {"prompt": "a red square", "size": "64x64", "num_inference_steps": 2}
LONG = {"prompt": "a slow blue circle", "size": "128x128", "num_inference_steps": 400}


def queue_cfg(**kw: Any) -> dict[str, Any]:
    return {"name": "test/tiny", "claim_idle_seconds": 3, **kw}


def worker(model: Path, folder: Path, redis: RedisServer, queue: dict[str, Any], wait: bool = True) -> RuntimeProcess:
    return start_runtime(
        model, folder, queue=queue, server=LIMITS, extra_env={QUEUE_URL_ENV: redis.url}, wait=wait
    )


def front_door(model: Path, folder: Path, redis: RedisServer, queue: dict[str, Any], wait: bool = True) -> RuntimeProcess:
    return start_runtime(
        model, folder, queue=queue, server=LIMITS, extra_env={QUEUE_URL_ENV: redis.url}, wait=wait,
        command="front-door",
    )  # fmt: skip


def metric(url: str | None, name: str, **labels: str) -> float | None:
    assert url
    text = httpx.get(url, timeout=10).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def executions(rp: RuntimeProcess, result: str) -> float:
    return metric(rp.metrics_url, QUEUE_EXECUTIONS_METRIC + "_total", result=result) or 0.0


def submit(fd: RuntimeProcess, body: dict[str, Any]) -> str:
    r = httpx.post(fd.url + "/v1/images/generations", json=body, headers=ASYNC, timeout=30)
    assert r.status_code == 202, r.text
    assert r.headers["Location"] == "/v1/images/jobs/" + r.json()["id"]
    return r.json()["id"]


def job(fd: RuntimeProcess, jid: str) -> dict[str, Any]:
    r = httpx.get(f"{fd.url}/v1/images/jobs/{jid}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_job(fd: RuntimeProcess, jid: str, until: Callable[[dict[str, Any]], bool], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        j = job(fd, jid)
        if until(j):
            return j
        assert time.monotonic() < deadline, f"job {jid} never reached the state: {j}"
        time.sleep(0.1)


def final(j: dict[str, Any]) -> bool:
    return j["status"] in ("succeeded", "failed", "cancelled")


def running(j: dict[str, Any]) -> bool:
    return j["status"] == "running" and j["progress"]["step"] >= 1


@dataclass
class Stack:
    redis: RedisServer
    workers: list[RuntimeProcess]
    doors: list[RuntimeProcess]


@pytest.fixture(scope="module")
def stack(tiny_model_dir, tmp_path_factory):
    """Redis, two runtime workers and two front doors sharing one queue."""
    base = tmp_path_factory.mktemp("queue-stack")
    redis = RedisServer(base / "redis").start()
    q = queue_cfg()
    procs = [worker(tiny_model_dir, base / f"w{i}", redis, q, wait=False) for i in (1, 2)]
    procs += [front_door(tiny_model_dir, base / f"fd{i}", redis, q, wait=False) for i in (1, 2)]
    try:
        for p in procs:
            p.wait_ready()
        yield Stack(redis, procs[:2], procs[2:])
    finally:
        for p in procs:
            p.stop(timeout=30)
        redis.stop()
    for p in procs:
        assert "Traceback" not in p.log(), p.log_tail(60)


def test_async_jobs_readable_from_either_front_door_and_run_once(stack):
    fd1, fd2 = stack.doors
    before = sum(executions(w, "succeeded") for w in stack.workers)
    ids = []
    for i in range(8):
        body = {**SHORT, "seed": i, "response_format": "url" if i % 2 else "b64_json"}
        ids.append(submit(stack.doors[i % 2], body))
    for i, jid in enumerate(ids):
        other = stack.doors[(i + 1) % 2]
        j = wait_job(other, jid, final)
        assert j["status"] == "succeeded", j
        assert job(stack.doors[i % 2], jid)["status"] == "succeeded"  # and the one it was sent to
        data = j["result"]["data"][0]
        assert j["result"]["seed"] == i and j["progress"]["step"] == 2
        if i % 2:
            path = data["url"].split("://", 1)[1].split("/", 1)[1]
            for fd in (fd1, fd2):  # any replica serves any result
                r = httpx.get(f"{fd.url}/{path}", timeout=10)
                assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert base64.b64decode(data["b64_json"])[:8] == b"\x89PNG\r\n\x1a\n"
    after = sum(executions(w, "succeeded") for w in stack.workers)
    assert after - before == 8
    assert sum(executions(w, "discarded") for w in stack.workers) == 0
    for fd in (fd1, fd2):  # the same gauges from Redis on every replica
        assert metric(fd.metrics_url, QUEUE_DEMAND_METRIC) == 0
        assert metric(fd.metrics_url, QUEUE_WAITING_METRIC) == 0
        assert metric(fd.metrics_url, QUEUE_RUNNING_METRIC) == 0
        assert metric(fd.metrics_url, QUEUE_REDELIVERIES_METRIC + "_total") == 0
        assert (metric(fd.metrics_url, QUEUE_JOB_WAIT_METRIC + "_count") or 0) >= 4
    assert httpx.get(fd1.url + "/v1/images/jobs/imgjob_nope", timeout=10).status_code == 404


def test_openai_client_generates_and_edits_through_the_front_door(stack):
    from openai import OpenAI
    from PIL import Image

    client = OpenAI(base_url=stack.doors[0].url + "/v1", api_key="unused", max_retries=0)
    res = client.images.generate(
        model="tiny", prompt="a green triangle", size="64x64", n=2, response_format="b64_json",  # type: ignore[arg-type]
        extra_body={"num_inference_steps": 2, "seed": 7},
    )  # fmt: skip
    assert len(res.data) == 2
    img = Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json or "")))
    assert img.size == (64, 64)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    edited = client.images.edit(
        model="tiny", image=("in.png", buf.getvalue(), "image/png"), prompt="make it blue", size="64x64",  # type: ignore[arg-type]
        extra_body={"num_inference_steps": 2},
    )  # fmt: skip
    assert Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json or ""))).size == (64, 64)
    # a refusal is the runtime's own 400, from the same checks
    r = httpx.post(stack.doors[1].url + "/v1/images/generations", json={**SHORT, "size": "65x64"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "size"


def test_cancel_reaches_the_running_worker_and_owners_are_separate(stack):
    fd1, fd2 = stack.doors
    jid = submit(fd1, LONG)
    wait_job(fd2, jid, running)
    r = httpx.delete(f"{fd2.url}/v1/images/jobs/{jid}", timeout=30)
    assert r.status_code == 200, r.text
    j = wait_job(fd1, jid, final, timeout=20)
    assert j["status"] == "cancelled" and j["cancel_requested"] is True
    assert j["progress"]["step"] < LONG["num_inference_steps"]
    assert sum(executions(w, "cancelled") for w in stack.workers) >= 1

    # a job enqueued under another API key's name is unknown to this caller (auth off: no name)
    import asyncio

    from diffusion_runtime.queue.store import QueueStore, new_job_id

    async def enqueue_as_alice() -> str:
        s = QueueStore(QueueConfig(**queue_cfg()), stack.redis.url, 60)
        jid = new_job_id()
        spec = {"endpoint": "generations"}
        await s.enqueue(jid, spec, endpoint="generations", total_steps=1, owner="alice", webhook=None, sync=False)
        await s.cancel(jid, "", '{"message": "x", "type": "t", "param": null, "code": null}')
        await s.close()
        return jid

    alice = asyncio.run(enqueue_as_alice())
    for method in ("GET", "DELETE"):
        r = httpx.request(method, f"{fd1.url}/v1/images/jobs/{alice}", timeout=10)
        assert r.status_code == 404 and r.json()["error"]["param"] == "job_id"


def test_sigterm_leaves_unstarted_work_and_sigkill_redelivers(tiny_model_dir, tmp_path):
    redis = RedisServer(tmp_path / "redis").start()
    q = queue_cfg(max_attempts=3)
    procs: list[RuntimeProcess] = []
    try:
        fd = front_door(tiny_model_dir, tmp_path / "fd", redis, q)
        a = worker(tiny_model_dir, tmp_path / "a", redis, q)
        procs += [fd, a]
        j1 = submit(fd, LONG)
        wait_job(fd, j1, running)
        j2 = submit(fd, LONG)
        j3 = submit(fd, SHORT)
        a.proc.send_signal(signal.SIGTERM)
        assert a.wait_exit(timeout=120) == 0, a.log_tail()
        assert job(fd, j1)["status"] == "succeeded"  # what ran finished
        for jid in (j2, j3):
            assert job(fd, jid)["status"] == "queued", job(fd, jid)  # the rest stayed in the queue
            assert jid not in a.log()
        assert metric(fd.metrics_url, QUEUE_WAITING_METRIC) == 2

        b = worker(tiny_model_dir, tmp_path / "b", redis, q)
        procs.append(b)
        wait_job(fd, j2, running)
        os.kill(b.proc.pid, signal.SIGKILL)  # mid-job
        b.wait_exit(timeout=30)
        assert job(fd, j2)["status"] == "running"
        assert metric(fd.metrics_url, QUEUE_DEMAND_METRIC) == 2  # the dead pod's job still counts

        c = worker(tiny_model_dir, tmp_path / "c", redis, q)
        procs.append(c)
        for jid in (j2, j3):
            j = wait_job(fd, jid, final, timeout=180)
            assert j["status"] == "succeeded", j
        assert executions(c, "succeeded") == 2 and executions(c, "discarded") == 0
        assert metric(fd.metrics_url, QUEUE_REDELIVERIES_METRIC + "_total") == 1
        assert metric(fd.metrics_url, QUEUE_DEMAND_METRIC) == 0
        assert "reclaimed job " + j2 in c.log()
    finally:
        for p in procs:
            p.stop(timeout=30)
        redis.stop()


def test_max_attempts_exceeded_fails_the_job_naming_the_reason(tiny_model_dir, tmp_path):
    """A consumer that started the job and never renewed it is a pod that died (SIGKILL at the
    Redis level); with max_attempts 1 the next start fails the job instead of running it again."""
    import asyncio

    from diffusion_runtime.queue.store import QueueStore

    redis = RedisServer(tmp_path / "redis").start()
    q = queue_cfg(max_attempts=1)
    procs: list[RuntimeProcess] = []
    try:
        fd = front_door(tiny_model_dir, tmp_path / "fd", redis, q)
        procs.append(fd)
        jid = submit(fd, SHORT)

        async def die_holding_it() -> None:
            s = QueueStore(QueueConfig(**q), redis.url, 60)
            entry, got = await s.read("dead-pod.1") or ("", "")
            assert got == jid
            assert (await s.start(entry, got, "dead-pod.1")).outcome == "run"
            await s.close()

        asyncio.run(die_holding_it())
        assert job(fd, jid)["status"] == "running"
        w = worker(tiny_model_dir, tmp_path / "w", redis, q)
        procs.append(w)
        j = wait_job(fd, jid, final, timeout=60)
        assert j["status"] == "failed", j
        msg = j["error"]["message"]
        assert "queue.max_attempts is 1" in msg and "dead-pod.1" in msg, msg
        assert sum(executions(w, r) for r in ("succeeded", "failed", "cancelled")) == 0
        # the worker is fine: the next job runs
        j2 = submit(fd, SHORT)
        assert wait_job(fd, j2, final)["status"] == "succeeded"
    finally:
        for p in procs:
            p.stop(timeout=30)
        redis.stop()


def test_scale_from_zero_and_queue_server_restart(tiny_model_dir, tmp_path):
    redis = RedisServer(tmp_path / "redis").start()
    q = queue_cfg(max_waiting=3)
    procs: list[RuntimeProcess] = []
    try:
        fd = front_door(tiny_model_dir, tmp_path / "fd", redis, q)
        procs.append(fd)
        assert metric(fd.metrics_url, QUEUE_DEMAND_METRIC) == 0
        # no runtime pod: a sync request is held, async ones are accepted up to max_waiting
        sync_result: dict[str, Any] = {}

        def sync_call() -> None:
            t0 = time.monotonic()
            r = httpx.post(fd.url + "/v1/images/generations", json={**SHORT, "seed": 3}, timeout=200)
            sync_result.update(status=r.status_code, body=r.json(), seconds=time.monotonic() - t0)

        t = threading.Thread(target=sync_call)
        t.start()
        deadline = time.monotonic() + 20
        while metric(fd.metrics_url, QUEUE_WAITING_METRIC) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        ids = [submit(fd, {**SHORT, "seed": i}) for i in range(2)]
        assert metric(fd.metrics_url, QUEUE_DEMAND_METRIC) == 3
        r = httpx.post(fd.url + "/v1/images/generations", json=SHORT, headers=ASYNC, timeout=10)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1, r.text
        assert "max_waiting" in r.json()["error"]["message"]
        assert job(fd, ids[0])["queue_position"] == 2

        # the queue server goes away: 503 + Retry-After within a bound, /ready 503; never a hang
        redis.stop()
        for method, path, kw in (
            ("POST", "/v1/images/generations", {"json": SHORT}),
            ("GET", f"/v1/images/jobs/{ids[0]}", {}),
        ):
            t0 = time.monotonic()
            r = httpx.request(method, fd.url + path, timeout=30, **kw)
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1, r.text
            assert time.monotonic() - t0 < 5
        deadline = time.monotonic() + 10
        while httpx.get(fd.url + "/ready", timeout=10).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert t.is_alive()  # the held sync request is still waiting

        # back (same data): every acknowledged job is there, and a worker starting now runs them
        redis.start()
        fd.wait_ready(timeout=30)
        assert [job(fd, jid)["status"] for jid in ids] == ["queued", "queued"]
        w = worker(tiny_model_dir, tmp_path / "w", redis, q)
        procs.append(w)
        t.join(timeout=120)
        assert sync_result.get("status") == 200, sync_result
        assert base64.b64decode(sync_result["body"]["data"][0]["b64_json"])[:4] == b"\x89PNG"
        assert sync_result["body"]["seed"] == 3
        for jid in ids:
            assert wait_job(fd, jid, final)["status"] == "succeeded"
        assert executions(w, "succeeded") == 3
        assert metric(fd.metrics_url, QUEUE_DEMAND_METRIC) == 0
    finally:
        for p in procs:
            p.stop(timeout=30)
        redis.stop()
    assert "Traceback" not in fd.log(), fd.log_tail(60)
