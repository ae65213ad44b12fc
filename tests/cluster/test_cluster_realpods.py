"""The README's real-cluster quickstart on the real node, pods and all.

The operator runs in the cluster from the chart (its own image, its own ServiceAccount, a
namespace enforcing PodSecurity `restricted`); `samples/tiny-cpu.yaml` is applied with kubectl
unchanged; its runtime pod runs the runtime image built from the Dockerfile here, loads the tiny
model from the CR's `pvc://` source and serves through its Service.

Network rule: requests go to Service and pod addresses of this cluster (local bridge) or to
127.0.0.1 (port-forward); pods have no route off the machine.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from diffusion_dev import wait_for
from diffusion_dev.install import default_image_names, install_operator, load_images, restricted
from diffusion_dev.loadgen import DEFAULT_BODY, ClosedLoopLoad, post
from diffusion_dev.real_node import NODE_NAME
from diffusion_dev.workloads import model_volume, tiny_model_root, with_model_on_volume
from fixtures_cluster import REAL_NODE_OFF, switched_off
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "samples" / "tiny-cpu.yaml"
OPERATOR_NS = "diffusion-system"


@pytest.fixture(scope="module")
def operator_release(cluster):
    """The chart installed once for this module: images loaded, operator Ready in the cluster."""
    if cluster.node is None:
        switched_off(REAL_NODE_OFF)
    t = time.monotonic()
    built = load_images(cluster.node)
    print(f"images: { {k: (v.ref, v.built_seconds, v.imported_seconds, v.size_bytes) for k, v in built.items()} }"
          f" in {time.monotonic() - t:.0f}s")  # fmt: skip
    release = f"dop-{uuid.uuid4().hex[:5]}"
    from diffusion_dev.install import helm

    try:
        install_operator(cluster, OPERATOR_NS, release)
        yield {"release": release, "namespace": OPERATOR_NS, "images": built}
    finally:
        # also when the install failed (e.g. --wait timed out): a second operator left running in the
        # shared cluster would reconcile every later test's CRs too
        helm(cluster, "uninstall", release, "--namespace", OPERATOR_NS, "--wait", "--ignore-not-found")


@pytest.fixture
def workload_ns(cluster, namespace, operator_release):
    restricted(cluster, namespace)
    objects = model_volume(namespace, tiny_model_root())
    cluster.apply(objects)
    yield namespace
    cluster.kubectl("delete", "dd", "--all", "-n", namespace, "--wait=false", check=False)
    cluster.kubectl("delete", "pv", objects[0]["metadata"]["name"], "--wait=false", check=False)


def _sample() -> dict:
    """samples/tiny-cpu.yaml with its model on the tiny-model volume (the CR's pvc:// source)."""
    return with_model_on_volume(yaml.safe_load(SAMPLE.read_text()))


def _apply(cluster, ns, doc) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))


def _json(cluster, *args):
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def _dd_ready(cluster, ns, name):
    dd = _json(cluster, "get", "dd", name, "-n", ns)
    conds = {c["type"]: c for c in dd.get("status", {}).get("conditions", [])}
    return dd if conds.get("Ready", {}).get("status") == "True" else None


def _pods(cluster, ns, name):
    return _json(cluster, "get", "pods", "-n", ns, "-l", f"app.kubernetes.io/instance={name}")["items"]


def _time(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _post(url: str, timeout: float = 120) -> tuple[int, dict, bytes]:
    """One generation request (the tiny model's size and steps); status 0 when the request was lost."""
    return post(url, {**DEFAULT_BODY, "response_format": "b64_json"}, timeout)


def _diagnose(cluster, ns) -> str:
    out = cluster.kubectl("describe", "pods", "-n", ns, check=False).stdout[-4000:]
    ops = cluster.kubectl("logs", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/name=diffusion-operator",
                          "--tail", "40", check=False).stdout  # fmt: skip
    return out + "\n--- operator ---\n" + ops


def test_tiny_sample_runs_as_a_real_pod_reconciled_by_the_in_cluster_operator(cluster, node, workload_ns,
                                                                               operator_release):  # fmt: skip
    ns = workload_ns
    names = default_image_names()
    # the operator pods (the chart's two replicas: a leader and a standby): in the cluster, on the real
    # node, with the chart's ServiceAccount
    ops = _json(cluster, "get", "pods", "-n", OPERATOR_NS, "-l",
                f"app.kubernetes.io/instance={operator_release['release']},"
                "app.kubernetes.io/name=diffusion-operator")["items"]  # fmt: skip
    assert len(ops) == 2, [o["metadata"]["name"] for o in ops]
    op_image = json.loads(node.crictl("inspecti", operator_release["images"]["operator"].ref).stdout)[
        "status"
    ]
    for op in ops:
        assert (
            op["spec"]["nodeName"] == NODE_NAME and op["spec"]["containers"][0]["image"] == names["operator"]
        )
        assert op["spec"]["serviceAccountName"] == f"{operator_release['release']}-diffusion-operator"
        assert op["status"]["containerStatuses"][0]["imageID"] in (op_image["id"], *op_image["repoDigests"])

    _apply(cluster, ns, _sample())
    name = _sample()["metadata"]["name"]
    try:
        dd = wait_for(lambda: _dd_ready(cluster, ns, name), 600, f"dd/{name} Ready", interval=2)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{_diagnose(cluster, ns)}") from None
    (pod,) = _pods(cluster, ns, name)
    assert pod["spec"]["nodeName"] == NODE_NAME
    status = pod["status"]["containerStatuses"][0]
    assert status["ready"] and status["started"] and status["image"] == names["runtime"]
    rt_image = json.loads(node.crictl("inspecti", operator_release["images"]["runtime"].ref).stdout)["status"]
    assert status["imageID"] in (rt_image["id"], *rt_image["repoDigests"]), (status["imageID"], rt_image)
    # the model came through the CR's pvc:// source
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "tiny-model"

    base = cluster.service_url(ns, name)
    metrics = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    warmup = float(
        re.search(r"^diffusion_warmup_seconds(?:\{[^}]*\})? ([0-9.e+-]+)$", metrics, re.M).group(1)
    )
    # startup probe: the container counted as started only once warmup was over
    ready_at = next(c["lastTransitionTime"] for c in pod["status"]["conditions"] if c["type"] == "Ready")
    started_at = status["state"]["running"]["startedAt"]
    assert warmup > 0 and _time(ready_at) - _time(started_at) >= warmup - 1.0, (started_at, ready_at, warmup)

    code, _headers, body = _post(f"{base}/v1/images/generations")
    assert code == 200, body[:500]
    png = base64.b64decode(json.loads(body)["data"][0]["b64_json"])
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == (64, 64)
    metrics = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    cached = re.search(r'^diffusion_cache_steps_total\{[^}]*result="cached"[^}]*\} ([0-9.]+)$', metrics, re.M)
    assert cached and float(cached.group(1)) > 0, metrics[-2000:]
    logs = cluster.kubectl("logs", pod["metadata"]["name"], "-n", ns).stdout
    assert "warmup done in" in logs, logs[-2000:]
    print(f"dd {name}: Ready {dd['status'].get('readyReplicas')}/1, warmup {warmup:.1f}s, "
          f"started->ready {_time(ready_at) - _time(started_at):.1f}s")  # fmt: skip


def test_rollout_on_a_cachedit_change_under_load_loses_no_request(
    cluster, node, workload_ns, operator_release
):
    ns = workload_ns
    doc = _sample()
    # one replica: a rollout without loss needs the new pod Ready before the old one goes (on
    # GPUs the default maxSurge 0 saves the extra GPU instead)
    doc["spec"]["rollout"] = {"maxSurge": 1, "maxUnavailable": 0}
    name = doc["metadata"]["name"]
    _apply(cluster, ns, doc)
    wait_for(lambda: _dd_ready(cluster, ns, name), 600, f"dd/{name} Ready", interval=2)
    url = f"{cluster.service_url(ns, name)}/v1/images/generations"
    first = {p["metadata"]["name"] for p in _pods(cluster, ns, name)}

    load = ClosedLoopLoad(url, clients=2, max_retries=20).start()
    changed = copy.deepcopy(doc)
    changed["spec"]["cacheDit"]["cache_config"]["residual_diff_threshold"] = 0.2
    t = time.monotonic()
    _apply(cluster, ns, changed)

    def rolled() -> bool:
        pods = _pods(cluster, ns, name)
        names = {p["metadata"]["name"] for p in pods}
        return bool(names) and not names & first and all(
            p["status"].get("containerStatuses", [{}])[0].get("ready") for p in pods
        ) and _dd_ready(cluster, ns, name) is not None  # fmt: skip

    try:
        wait_for(rolled, 600, "the rollout to finish", interval=2)
        time.sleep(3)  # a few requests against the new pod too
    finally:
        load.stop()
    print(f"rollout {time.monotonic() - t:.0f}s under load: {load.summary()}")
    assert not load.failures, load.failures
    assert load.counts["200"] >= 3
    # never routed to a pod that is not ready or draining: the old pod leaves its Service's endpoints
    # (deletion, then preStop's sleep) before SIGTERM turns its admissions to 503
    assert load.counts["503 retried"] == 0, load.summary()


def test_a_config_the_runtime_refuses_shows_its_reason_as_the_termination_message(cluster, node, workload_ns,
                                                                                  operator_release):  # fmt: skip
    # the operator cannot know what is inside the claim: a path that is not there slips past it
    ns = workload_ns
    doc = _sample()
    doc["metadata"]["name"] = "missing"
    doc["spec"]["model"]["uri"] = "pvc://tiny-model/no-such-model"
    _apply(cluster, ns, doc)

    def terminated():
        for pod in _pods(cluster, ns, "missing"):
            for st in pod["status"].get("containerStatuses", []):
                term = st.get("lastState", {}).get("terminated") or st.get("state", {}).get("terminated")
                if term and term.get("message"):
                    return pod["metadata"]["name"], term
        return None

    pod_name, term = wait_for(terminated, 300, "the runtime container to exit with a message", interval=2)
    message = term["message"].strip()
    assert "no-such-model" in message and len(message.splitlines()) == 1, message
    describe = cluster.kubectl("describe", "pod", pod_name, "-n", ns).stdout
    assert message in describe, describe[-3000:]


def test_a_cpu_replica_with_two_ranks_serves_an_image_through_the_service(cluster, node, workload_ns,
                                                                          operator_release):  # fmt: skip
    """`device: cpu` with Ulysses 2 (the tiny model's 2 heads split over 2 ranks, as in the runtime's
    rank tests): the operator admits it without GPUs, the pod's serve process starts its second rank
    itself (gloo), and the replica serves through its Service."""
    ns = workload_ns
    doc = _sample()
    name = doc["metadata"]["name"] = "tiny-ranks"
    doc["spec"]["cacheDit"]["parallelism_config"] = {"ulysses_size": 2}
    # two ranks, each with the model loaded: twice the sample's requests
    doc["spec"]["template"]["resources"] = {"requests": {"cpu": "200m", "memory": "512Mi"}}
    assert doc["spec"]["device"] == "cpu" and doc["spec"]["gpu"] == {"count": 0}
    _apply(cluster, ns, doc)
    try:
        dd = wait_for(lambda: _dd_ready(cluster, ns, name), 900, f"dd/{name} Ready", interval=2)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{_diagnose(cluster, ns)}") from None
    conds = {c["type"]: c for c in dd["status"]["conditions"]}
    assert conds["ConfigValid"]["status"] == "True", conds["ConfigValid"]

    (pod,) = _pods(cluster, ns, name)
    assert pod["spec"]["nodeName"] == NODE_NAME
    (container,) = pod["spec"]["containers"]
    assert not any("nvidia.com/gpu" in container["resources"].get(k, {}) for k in ("limits", "requests"))
    status = pod["status"]["containerStatuses"][0]
    assert status["ready"] and status["started"] and status["restartCount"] == 0, status

    base = cluster.service_url(ns, name)
    code, _headers, body = _post(f"{base}/v1/images/generations", timeout=300)
    assert code == 200, body[:500]
    png = base64.b64decode(json.loads(body)["data"][0]["b64_json"])
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == (64, 64)
        colors = image.convert("RGB").getcolors(64 * 64) or []
        assert len(colors) > 50, "a decoded image, not a flat fill"

    metrics = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    info = [s.labels for f in text_string_to_metric_families(metrics) for s in f.samples
            if s.name == "diffusion_runtime_info"]  # fmt: skip
    assert len(info) == 1, metrics[-2000:]
    assert info[0]["world_size"] == "2" and info[0]["ulysses_size"] == "2", info
    assert info[0]["ring_size"] == "1" and info[0]["tp_size"] == "1", info
    logs = cluster.kubectl("logs", pod["metadata"]["name"], "-n", ns).stdout
    # rank 0 started rank 1 in the same container, and rank 1 loaded the model on cpu
    assert re.search(r"started rank 1 \(pid \d+\)", logs), logs[-3000:]
    assert "rank 1/2 loaded FluxPipeline on cpu" in logs, logs[-3000:]
    assert "parallel replica: ulysses_size=2 (2 ranks) on cpu" in logs, logs[-3000:]
    print(f"dd {name}: Ready with 2 CPU ranks; image {len(png)} bytes through the Service")
