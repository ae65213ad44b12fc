"""The shared work queue on real pods (real node, in-cluster operator from the chart):

the chart's queue server (Debian's redis-server, the Dockerfile's `queue` image) on a claim, a
DiffusionDeployment with spec.queue and `autoscaling.minReplicas: 0`: the runtime pod, the two
front-door pods and the Redis pod run; requests go through the front door's Service (status.endpoint):
a sync one gets its image, an async one is read back from both front-door pods. Then, idle, the HPA
(Object metric diffusion_queue_demand from the front door, through Prometheus and prometheus-adapter)
scales the runtime pods to zero (status: ScaledToZero); a sync request then waits in the queue, its
demand wakes the deployment, and it gets its image.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
import yaml
from diffusion_dev import images, wait_for
from diffusion_dev.install import (
    helm,
    install_with_queue,
    load_images,
    queue_claim,
    restricted,
)
from diffusion_dev.loadgen import DEFAULT_BODY, post
from diffusion_dev.workloads import (
    model_volume,
    tiny_model_root,
)
from fixtures_cluster import REAL_NODE_OFF, switched_off
from PIL import Image
from test_cluster_realpods import OPERATOR_NS, _diagnose, _json, _sample

pytestmark = pytest.mark.cluster

REQUEST_TIMEOUT = 300  # seconds a sync request is held (server.requestTimeoutSeconds): a cold start fits
SCALE_DOWN_WINDOW = 10


def _front_door_pods(cluster, ns: str, name: str) -> list[dict]:
    sel = f"app.kubernetes.io/name=diffusion-frontdoor,app.kubernetes.io/instance={name}"
    return _json(cluster, "get", "pods", "-n", ns, "-l", sel)["items"]


def _runtime_pods(cluster, ns: str, name: str, terminating: bool = False) -> list[dict]:
    sel = f"app.kubernetes.io/name=diffusion-runtime,app.kubernetes.io/instance={name}"
    return [p for p in _json(cluster, "get", "pods", "-n", ns, "-l", sel)["items"]
            if terminating or not p["metadata"].get("deletionTimestamp")]  # fmt: skip


def _front_door_ready(cluster, ns: str, name: str, timeout: float = 300) -> None:
    """Both front-door pods Ready (an AssertionError with the namespace's pods and the operator's log
    after `timeout`)."""
    try:
        wait_for(
            lambda: len([p for p in _front_door_pods(cluster, ns, name) if _ready(p)]) == 2,
            timeout,
            "the front door's 2 pods Ready",
            interval=2,
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{_diagnose(cluster, ns)}") from None


def _ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def _image(body: bytes) -> tuple[str, tuple[int, int]]:
    png = base64.b64decode(json.loads(body)["data"][0]["b64_json"])
    with Image.open(io.BytesIO(png)) as image:
        return image.format, image.size


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def _submit_async(url: str) -> tuple[int, dict]:
    body = json.dumps({**DEFAULT_BODY, "response_format": "b64_json"}).encode()
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", "Prefer": "respond-async"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, json.loads(resp.read())


@contextlib.contextmanager
def queue_chart(cluster, namespace: str, *extra_sets: str) -> Iterator[dict]:
    """The chart with its queue server (and `extra_sets`), its URL Secret in the workload namespace, the
    operator Ready; uninstalled after."""
    if cluster.node is None:
        switched_off(REAL_NODE_OFF)
    restricted(cluster, namespace)
    model = model_volume(namespace, tiny_model_root())
    release = f"dq-{uuid.uuid4().hex[:5]}"
    cluster.apply(model)
    t = time.monotonic()
    load_images(cluster.node, images.TARGETS)  # operator, runtime and queue images (cached by content)
    print(f"images ready in {time.monotonic() - t:.0f}s")
    volumes = [model[0]]
    try:
        volumes.append(install_with_queue(cluster, OPERATOR_NS, release, [namespace], *extra_sets))
        yield {"release": release, "namespace": namespace}
    finally:
        cluster.kubectl("delete", "dd", "--all", "-n", namespace, "--wait=true", "--timeout=60s", check=False)
        helm(cluster, "uninstall", release, "--namespace", OPERATOR_NS, "--wait", "--ignore-not-found")
        cluster.kubectl("delete", "pvc", queue_claim(release), "-n", OPERATOR_NS, "--wait=false", check=False)
        for pv in volumes:
            cluster.kubectl("delete", "pv", pv["metadata"]["name"], "--wait=false", check=False)


@pytest.fixture
def queue_release(cluster, namespace):
    """The chart with its queue server (`queue_chart`)."""
    with queue_chart(cluster, namespace) as release:
        yield release


# the wait for the shared real node, images, a cold start and a scale-down window
@pytest.mark.timeout(2700)
def test_requests_through_the_front_door_and_a_sync_request_wakes_a_deployment_scaled_to_zero(
    cluster, node, queue_release
):
    mon = cluster.monitoring
    if mon is None:
        switched_off("the metrics pipeline is off (DIFFUSION_DEV_METRICS=0): the HPA has no signal")
    ns = queue_release["namespace"]
    doc = _sample()
    name = doc["metadata"]["name"]
    doc["spec"].pop("replicas")
    doc["spec"]["server"]["requestTimeoutSeconds"] = REQUEST_TIMEOUT
    doc["spec"]["queue"] = {}  # the chart's Secret (diffusion-queue) by default
    doc["spec"]["autoscaling"] = {
        "minReplicas": 0,
        "maxReplicas": 2,
        "targetDemand": 1,
        "behavior": {
            "scaleDown": {
                "stabilizationWindowSeconds": SCALE_DOWN_WINDOW,
                "policies": [{"type": "Percent", "value": 100, "periodSeconds": 5}],
            }
        },
    }
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
    # the Redis pod (chart) and the front door's 2 pods Ready. The runtime pods come and go with the
    # demand from here on: the HPA may take the first one away before it is even Ready (demand 0)
    sts = f"{queue_release['release']}-diffusion-operator-queue"
    _front_door_ready(cluster, ns, name)
    redis = _json(cluster, "get", "pods", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/name=diffusion-queue")[
        "items"
    ]
    assert [p["metadata"]["name"] for p in redis] == [f"{sts}-0"] and _ready(redis[0])
    dd = _json(cluster, "get", "dd", name, "-n", ns)
    assert dd["status"]["endpoint"] == f"http://{name}-frontdoor.{ns}.svc:8000"
    base = cluster.service_url(ns, f"{name}-frontdoor", ready=2)

    # a sync request through the front door's Service: held until a runtime pod has run it
    t = time.monotonic()
    code, _, body = post(
        f"{base}/v1/images/generations", {**DEFAULT_BODY, "response_format": "b64_json"}, REQUEST_TIMEOUT + 30
    )
    assert code == 200, (code, body[:500], _diagnose(cluster, ns))
    print(f"first request: {time.monotonic() - t:.1f}s")
    assert _image(body) == ("PNG", (64, 64))
    # an async one, read back from each front-door pod (any replica answers for any job)
    code, job = _submit_async(f"{base}/v1/images/generations")
    assert code == 202, job
    pods = [p["status"]["podIP"] for p in _front_door_pods(cluster, ns, name)]
    done = wait_for(
        lambda: (
            (j := _get(f"http://{pods[0]}:8000/v1/images/jobs/{job['id']}"))["status"] == "succeeded" and j
        ),
        REQUEST_TIMEOUT,
        "the async job",
        interval=1,
    )
    again = _get(f"http://{pods[1]}:8000/v1/images/jobs/{job['id']}")
    assert again["status"] == "succeeded" and again.get("result") == done.get("result")

    # idle: the HPA reads demand 0 and scales the runtime pods to zero; the status says so
    t0 = time.monotonic()
    try:
        # gone entirely: a terminating pod still pulls work during its preStop sleep
        wait_for(
            lambda: not _runtime_pods(cluster, ns, name, terminating=True),
            300,
            "the runtime pods scaled to zero",
            interval=2,
        )
    except TimeoutError as exc:
        hpa = cluster.kubectl("describe", "hpa", name, "-n", ns, check=False).stdout
        raise AssertionError(f"{exc}\n{hpa}\n{mon.diagnose()}") from None
    print(f"scaled to zero {time.monotonic() - t0:.0f}s after the last request")

    # scaledToZero, and the demand the operator reads where the HPA does (custom metrics API, its RBAC)
    def queue_status() -> dict | None:
        st = _json(cluster, "get", "dd", name, "-n", ns)["status"]
        q = st.get("queue", {})
        return st if q.get("scaledToZero") and q.get("demand") == 0 else None

    status = wait_for(queue_status, 60, "status.queue: scaledToZero, demand 0", interval=1)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "ScaledToZero"), status
    assert status["queue"]["frontDoor"] == "2/2", status

    # a sync request at zero pods: held by the front door, its demand wakes the deployment
    t1 = time.monotonic()
    code, _, body = post(
        f"{base}/v1/images/generations", {**DEFAULT_BODY, "response_format": "b64_json"}, REQUEST_TIMEOUT + 30
    )
    waited = time.monotonic() - t1
    assert code == 200, (code, body[:500])
    assert _image(body) == ("PNG", (64, 64))
    woke = _runtime_pods(cluster, ns, name)
    assert woke, "a runtime pod served it"
    print(f"request-to-image from zero runtime pods: {waited:.1f}s (pod {woke[0]['metadata']['name']})")
