"""The shared work queue under load and faults, on real pods (real node, in-cluster operator, the chart's
queue server): three runtime pods, the front door's two pods, Redis.

1. 200 requests from 8 clients through the front door's Service, half async (polled through the
   Service, each job also read from both front-door pods): every one answered with its image, none 429,
   and the runtime pods' own counters say 200 executions, none discarded (run twice) or failed.
2. `kill -9` of a runtime pod's server process while every pod is mid-job: every job completes (its
   entry is redelivered after `claimIdleSeconds`; the front door counts the redelivery).
3. 30 jobs queued, then the CR scaled 3 -> 1: all 30 complete.
4. The queue server killed (`kill -9` of redis-server in its pod; the kubelet restarts it in the same
   pod, with its append-only file): the front door answers 503 with Retry-After at once (never hangs),
   and once Redis is back every job accepted before the kill completes.
5. The queue server's pod deleted: the StatefulSet makes a new pod (a new pod address; the same claim
   and the same Service ClusterIP, which the URL Secret names, `diffusion_dev.install.install_with_queue`): 503
   with Retry-After while it is away, and every job accepted before the deletion completes.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml
from diffusion_dev import wait_for
from diffusion_dev.loadgen import DEFAULT_BODY, post
from diffusion_runtime.contract.queue import (
    QUEUE_EXECUTIONS_METRIC,
    QUEUE_REDELIVERIES_METRIC,
)
from prometheus_client.parser import text_string_to_metric_families
from test_cluster_queue_realpods import (  # noqa: F401  (queue_release is a fixture)
    _front_door_pods,
    _get,
    _image,
    _ready,
    _runtime_pods,
    queue_release,
)
from test_cluster_realpods import OPERATOR_NS, _diagnose, _json, _sample

pytestmark = pytest.mark.cluster

REQUEST_TIMEOUT = 300
CLIENTS = 8
REQUESTS = 200
CLAIM_IDLE = 6  # seconds: a killed pod's job is redelivered this long after its last renewal
SLOW = {**DEFAULT_BODY, "size": "512x512"}  # seconds per job on the tiny model (the mask fixes the steps)


def _port(pod: dict, name: str) -> int:
    for c in pod["spec"]["containers"]:
        for p in c.get("ports", []):
            if p.get("name") == name:
                return p["containerPort"]
    raise AssertionError(f"pod {pod['metadata']['name']} has no port named {name}")


def _metrics(pod: dict) -> dict[tuple[str, tuple], float]:
    url = f"http://{pod['status']['podIP']}:{_port(pod, 'metrics')}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _executions(pods: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for pod in pods:
        for (name, labels), value in _metrics(pod).items():
            if name == f"{QUEUE_EXECUTIONS_METRIC}_total":
                result = dict(labels)["result"]
                out[result] = out.get(result, 0) + value
    return out


def _wait_job(base: str, job_id: str, timeout: float = REQUEST_TIMEOUT) -> dict:
    def done():
        job = _get(f"{base}/v1/images/jobs/{job_id}")
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, timeout, f"job {job_id}", interval=1, retry_on=(OSError, urllib.error.URLError))


def _container_pid(cluster, pod: dict, container: str) -> int:
    """The host pid of a container's main process (the real node's containerd, through crictl)."""
    ids = cluster.node.crictl(
        "ps", "-q", "--state", "running", "--pod", _pod_sandbox(cluster, pod), "--name", container
    ).stdout.split()
    assert len(ids) == 1, (pod["metadata"]["name"], container, ids)
    info = json.loads(cluster.node.crictl("inspect", ids[0]).stdout)
    return int(info["info"]["pid"])


def _pod_sandbox(cluster, pod: dict) -> str:
    ids = cluster.node.crictl(
        "pods", "-q", "--state", "ready", "--name", pod["metadata"]["name"],
        "--namespace", pod["metadata"]["namespace"],
    ).stdout.split()  # fmt: skip
    assert len(ids) == 1, (pod["metadata"]["name"], ids)
    return ids[0]


def _restarts(pod: dict) -> int:
    return sum(c.get("restartCount", 0) for c in pod["status"].get("containerStatuses", []))


# the shared real node's wait, images, 3 cold starts, 200 requests and four faults
@pytest.mark.timeout(3000)
def test_load_and_faults_through_the_front_door_lose_nothing_and_run_nothing_twice(
    cluster,
    node,
    queue_release,  # noqa: F811  (the fixture imported above)
):
    ns = queue_release["namespace"]
    doc = _sample()
    name = doc["metadata"]["name"]
    doc["spec"]["replicas"] = 3
    doc["spec"]["server"]["requestTimeoutSeconds"] = REQUEST_TIMEOUT
    doc["spec"]["queue"] = {"claimIdleSeconds": CLAIM_IDLE}
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
    try:
        wait_for(
            lambda: (
                len([p for p in _runtime_pods(cluster, ns, name) if _ready(p)]) == 3
                and len([p for p in _front_door_pods(cluster, ns, name) if _ready(p)]) == 2
            ),
            900,
            "3 runtime pods and the front door's 2 pods Ready",
            interval=3,
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{_diagnose(cluster, ns)}") from None
    base = cluster.service_url(ns, f"{name}-frontdoor", ready=2)
    url = f"{base}/v1/images/generations"
    doors = [f"http://{p['status']['podIP']}:8000" for p in _front_door_pods(cluster, ns, name)]
    runtime = _runtime_pods(cluster, ns, name)

    # 1. 200 requests, 8 clients, half async
    def one(i: int) -> tuple[str, int, object]:
        body = {**DEFAULT_BODY, "seed": i, "response_format": "b64_json"}
        if i % 2:
            code, job = _async(url, body)
            if code != 202:
                return "async", code, job
            final = _wait_job(base, job["id"])
            seen = [_get(f"{door}/v1/images/jobs/{job['id']}")["status"] for door in doors]
            return "async", 200 if final["status"] == "succeeded" else 500, (final, seen)
        code, _, raw = post(url, body, REQUEST_TIMEOUT + 30)
        return "sync", code, _image(raw) if code == 200 else raw[:300]

    t = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(one, range(REQUESTS)))
    elapsed = time.monotonic() - t
    bad = [(i, r) for i, r in enumerate(results) if r[1] != 200]
    assert not bad, (bad[:5], _diagnose(cluster, ns))
    assert all(r[2] == ("PNG", (64, 64)) for r in results if r[0] == "sync")
    assert all(r[2][1] == ["succeeded", "succeeded"] for r in results if r[0] == "async")  # both doors
    counts = _executions(runtime)
    print(f"{REQUESTS} requests from {CLIENTS} clients in {elapsed:.0f}s; executions {counts}")
    assert counts.get("succeeded") == REQUESTS, counts
    assert counts.get("discarded", 0) == 0 and counts.get("failed", 0) == 0, counts

    # 2. kill -9 of one runtime pod's server while every pod is mid-job: every job still completes
    door_pod = _front_door_pods(cluster, ns, name)[0]
    redelivered0 = _metrics(door_pod).get((f"{QUEUE_REDELIVERIES_METRIC}_total", ()), 0.0)
    jobs = [_async(url, {**SLOW, "seed": s, "response_format": "b64_json"})[1]["id"] for s in range(6)]

    def running() -> bool:
        states = [_get(f"{base}/v1/images/jobs/{j}")["status"] for j in jobs]
        return states.count("running") >= 3

    wait_for(running, 120, "three slow jobs running (one per pod)", interval=0.5)
    victim = runtime[0]
    os.kill(_container_pid(cluster, victim, victim["spec"]["containers"][0]["name"]), signal.SIGKILL)
    finals = [_wait_job(base, j) for j in jobs]
    assert [f["status"] for f in finals] == ["succeeded"] * 6, finals
    redelivered = wait_for(
        lambda: (
            _metrics(door_pod).get((f"{QUEUE_REDELIVERIES_METRIC}_total", ()), 0.0) > redelivered0
            and _metrics(door_pod)[(f"{QUEUE_REDELIVERIES_METRIC}_total", ())]
        ),
        60,
        "the front door counts the redelivery",
    )
    print(f"kill -9: 6/6 jobs succeeded, redeliveries {redelivered0:.0f} -> {redelivered:.0f}")

    # 3. 30 jobs queued, then 3 -> 1 replica: all 30 complete
    wait_for(
        lambda: len([p for p in _runtime_pods(cluster, ns, name) if _ready(p)]) == 3,
        300,
        "3 pods Ready again",
    )
    queued = [
        _async(url, {**DEFAULT_BODY, "seed": 1000 + s, "response_format": "b64_json"}) for s in range(30)
    ]
    assert all(code == 202 for code, _ in queued), queued
    cluster.kubectl("patch", "dd", name, "-n", ns, "--type", "merge", "-p", '{"spec":{"replicas":1}}')
    finals = [_wait_job(base, job["id"]) for _, job in queued]
    assert [f["status"] for f in finals] == ["succeeded"] * 30, [f["status"] for f in finals]
    wait_for(lambda: len(_runtime_pods(cluster, ns, name, terminating=True)) == 1, 300, "scaled to 1 pod")
    print("scale 3 -> 1 with 30 jobs queued: 30/30 succeeded")

    # 4. the queue server killed: 503 + Retry-After at once; after it is back nothing accepted is lost
    accepted = [
        _async(url, {**DEFAULT_BODY, "seed": 2000 + s, "response_format": "b64_json"}) for s in range(5)
    ]
    assert all(code == 202 for code, _ in accepted), accepted
    redis = _json(cluster, "get", "pods", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/name=diffusion-queue")[
        "items"
    ][0]
    restarts = _restarts(redis)
    os.kill(_container_pid(cluster, redis, redis["spec"]["containers"][0]["name"]), signal.SIGKILL)
    _answers_while_away(url, "queue server killed")
    wait_for(
        lambda: (
            _restarts(_json(cluster, "get", "pod", redis["metadata"]["name"], "-n", OPERATOR_NS)) > restarts
        ),
        120,
        "the queue server restarted in its pod",
    )
    finals = [_wait_job(base, job["id"]) for _, job in accepted]
    assert [f["status"] for f in finals] == ["succeeded"] * 5, finals
    code, _, raw = post(url, {**DEFAULT_BODY, "response_format": "b64_json"}, REQUEST_TIMEOUT + 30)
    assert code == 200 and _image(raw) == ("PNG", (64, 64)), (code, raw[:300])

    # 5. the queue server's pod deleted: a new pod behind the same ClusterIP; nothing accepted is lost
    accepted = [
        _async(url, {**DEFAULT_BODY, "seed": 3000 + s, "response_format": "b64_json"}) for s in range(5)
    ]
    assert all(code == 202 for code, _ in accepted), accepted
    old = _json(cluster, "get", "pod", redis["metadata"]["name"], "-n", OPERATOR_NS)
    # --wait: the StatefulSet makes the new pod once the old one is gone (its server stopped)
    cluster.kubectl("delete", "pod", old["metadata"]["name"], "-n", OPERATOR_NS, "--wait=true", timeout=120)
    _answers_while_away(url, "queue server's pod deleted")

    def replaced() -> dict | None:
        pod = _json(cluster, "get", "pods", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/name=diffusion-queue")
        new = [p for p in pod["items"] if p["metadata"]["uid"] != old["metadata"]["uid"] and _ready(p)]
        return new[0] if new else None

    new = wait_for(replaced, 180, "a new queue server pod Ready", interval=1)
    print(f"queue server pod replaced: {old['status']['podIP']} -> {new['status']['podIP']}")
    finals = [_wait_job(base, job["id"]) for _, job in accepted]
    assert [f["status"] for f in finals] == ["succeeded"] * 5, finals
    t = time.monotonic()
    for door in doors:  # each front door reconnects (its /ready: the queue server answers)
        try:
            wait_for(lambda d=door: _ready_answer(d)[0] == 200, 60, f"{door}/ready", interval=0.5)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}: {_ready_answer(door)}\n{_diagnose(cluster, ns)}") from None
    print(f"both front doors ready {time.monotonic() - t:.1f}s after the jobs completed")
    code, _, raw = post(url, {**DEFAULT_BODY, "response_format": "b64_json"}, REQUEST_TIMEOUT + 30)
    assert code == 200 and _image(raw) == ("PNG", (64, 64)), (code, raw[:300])


def _ready_answer(base: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"{base}/ready", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, repr(exc)


def _answers_while_away(url: str, what: str) -> None:
    """A sync request while the queue server is away: 503 with Retry-After within 10 s (never held
    without a server), or, when the server came back first, served."""
    t = time.monotonic()
    code, headers, raw = post(url, {**DEFAULT_BODY, "response_format": "b64_json"}, REQUEST_TIMEOUT + 30)
    answered = time.monotonic() - t
    if code != 503:  # the server can be back before the request: then it must have served
        assert code == 200, (code, raw[:300])
    else:
        assert headers.get("Retry-After"), dict(headers)
        assert answered < 10, f"the front door took {answered:.1f}s to answer while the queue server was down"
    print(f"{what}: answered {code} in {answered:.2f}s (Retry-After {headers.get('Retry-After')})")


def _async(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Prefer": "respond-async"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read()[:300].decode(errors="replace")}
