"""spec.model.cache with real pods on the real node: the download Job runs the runtime image's
`diffusion-runtime download` against a local Hub (tests/hub_server.py, listening on the node's bridge
address, the only place pods can reach), the serving pods start on the complete cache only.

Must-show of issue 11: a cached tiny model scaled from 1 to 3 replicas downloads each file once (the
Hub's access log) and replicas 2 and 3 turn Ready after the Hub is stopped; with `compile: true` and a
compile cache claim, the first pod compiles (a cold start) and replicas 2 and 3 restore its artifacts (warm
starts), which status.startup shows from the pods' own start lines; a download dropped halfway more often
than one pod retries is retried by the Job's next pod, status shows the failure while it lasts, and the
pods start only on the complete cache.

Needs the real node (DIFFUSION_DEV_REAL_NODE=1; skipped, like the other real-pod tests, when it is off).
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
import yaml
from diffusion_dev import wait_for
from diffusion_dev.install import install_operator, load_images, restricted
from diffusion_dev.real_node import NODE_IP, NODE_NAME
from diffusion_dev.workloads import MODEL_FOLDER, tiny_model_root
from diffusion_runtime.engine.compile_cache import SUFFIX
from hub_server import HubServer

pytestmark = pytest.mark.cluster

REPO_ID = "tiny-org/flux-tiny"
TOKEN = "hf_real_node_test"
OPERATOR_NS = "diffusion-system"
SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "samples", "tiny-cpu.yaml")
TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def operator_release(cluster):
    if cluster.node is None:
        from fixtures_cluster import REAL_NODE_OFF, switched_off

        switched_off(REAL_NODE_OFF)
    built = load_images(cluster.node)
    release = f"dmc-{uuid.uuid4().hex[:5]}"
    install_operator(cluster, OPERATOR_NS, release)
    yield built
    from diffusion_dev.install import helm

    helm(cluster, "uninstall", release, "--namespace", OPERATOR_NS, "--wait")


def _json(cluster, *args):
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def _cache_volume(namespace: str, storage_class: str, host_path: str, prefix: str = "cache") -> dict:
    """A `local` PersistentVolume on the real node, writable by the pods' user (uid 1000)."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"{prefix}-{namespace}"[:63]},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": storage_class,
            "local": {"path": host_path},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE_NAME]}]}]}},
        },
    }  # fmt: skip


def _doc(hub_url: str, storage_class: str, replicas: int = 1) -> dict:
    with open(SAMPLE) as f:
        doc = yaml.safe_load(f)
    doc["metadata"] = {"name": "cached"}
    doc["spec"]["replicas"] = replicas
    doc["spec"]["model"].update(
        uri=f"hf://{REPO_ID}",
        tokenSecretRef={"name": "hf", "key": "token"},
        cache={"size": "1Gi", "storageClassName": storage_class, "accessMode": "ReadWriteOnce"},
    )
    doc["spec"]["template"]["env"] = [{"name": "HF_ENDPOINT", "value": hub_url}]
    return doc


def _dd(cluster, ns: str) -> dict:
    return _json(cluster, "get", "dd", "cached", "-n", ns)


def _serving_pods(cluster, ns: str) -> list[dict]:
    pods = _json(cluster, "get", "pods", "-n", ns, "-l", "app.kubernetes.io/instance=cached")["items"]
    return [p for p in pods if p["metadata"]["labels"].get("app.kubernetes.io/name") == "diffusion-runtime"]


def _ready(cluster, ns: str, replicas: int):
    dd = _dd(cluster, ns)
    conds = {c["type"]: c for c in dd.get("status", {}).get("conditions", [])}
    ok = conds.get("Ready", {}).get("status") == "True" and dd["status"].get("readyReplicas") == replicas
    return dd if ok else None


def _diagnose(cluster, ns: str) -> str:
    ops = cluster.kubectl("logs", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/name=diffusion-operator",
                          "--tail", "40", check=False).stdout  # fmt: skip
    return (
        json.dumps(_dd(cluster, ns).get("status"), indent=1)
        + cluster.kubectl("describe", "pods", "-n", ns, check=False).stdout[-4000:]
        + "\n--- operator ---\n"
        + ops
    )


def _wait_startup(cluster, ns: str, kind: str) -> dict:
    try:
        return wait_for(lambda: _startup(cluster, ns, kind), 180, f"status.startup.{kind}", interval=2)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{_diagnose(cluster, ns)}") from None


@pytest.fixture
def cache_ns(cluster, namespace, operator_release, tmp_path_factory):
    restricted(cluster, namespace)
    cluster.kubectl("create", "secret", "generic", "hf", "-n", namespace, f"--from-literal=token={TOKEN}")
    host = tmp_path_factory.mktemp("model-cache")
    host.chmod(0o777)
    storage_class = f"cache-{uuid.uuid4().hex[:6]}"
    pv = _cache_volume(namespace, storage_class, str(host))
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pv))
    yield namespace, storage_class
    cluster.kubectl("delete", "dd", "--all", "-n", namespace, "--wait=false", check=False)
    cluster.kubectl("delete", "pv", pv["metadata"]["name"], "--wait=false", check=False)


@pytest.fixture
def compile_claim(cluster, cache_ns, tmp_path_factory):
    """The user's own claim for spec.compileCache: a second `local` volume on the real node."""
    ns, _ = cache_ns
    host = tmp_path_factory.mktemp("compile-cache")
    host.chmod(0o777)
    storage_class = f"compile-{uuid.uuid4().hex[:6]}"
    pv = _cache_volume(ns, storage_class, str(host), prefix="compile")
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "compile-cache", "namespace": ns},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": storage_class,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [pv, claim]})
    )
    yield claim["metadata"]["name"], host
    cluster.kubectl("delete", "pvc", "compile-cache", "-n", ns, "--wait=false", check=False)
    cluster.kubectl("delete", "pv", pv["metadata"]["name"], "--wait=false", check=False)


def _startup(cluster, ns: str, *kinds: str):
    startup = (_dd(cluster, ns).get("status") or {}).get("startup") or {}
    return startup if all(k in startup for k in kinds) else None


# the session's cluster and images may start in this test's time, then a cold CPU compile in a pod
@pytest.mark.timeout(1800)
def test_scaled_from_one_to_three_each_file_is_downloaded_once_and_new_replicas_start_without_the_hub(
    cluster, node, cache_ns, compile_claim
):
    ns, storage_class = cache_ns
    claim, compile_host = compile_claim
    hub = HubServer(tiny_model_root() / MODEL_FOLDER, REPO_ID, token=TOKEN, host=NODE_IP).start()
    doc = _doc(hub.url, storage_class)
    doc["spec"].update(compile=True, compileCache={"claimName": claim})
    try:
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
        try:
            dd = wait_for(lambda: _ready(cluster, ns, 1), 900, "dd/cached Ready with 1 replica", interval=3)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{_diagnose(cluster, ns)}") from None
        cache = dd["status"]["modelCache"]
        assert cache["phase"] == "Ready" and cache["commit"] == hub.hub.commit
        assert cache["bytesDone"] == cache["bytesTotal"] > 0
        gets = [a.path.split(f"/resolve/{hub.hub.commit}/", 1)[1] for a in hub.hub.file_gets()]
        assert sorted(gets) == sorted(set(gets)), gets  # each file once
        assert "model_index.json" in gets and TRANSFORMER in gets
    finally:
        hub.stop()
    requests = len(hub.hub.access_log)
    first_pod = _serving_pods(cluster, ns)[0]["metadata"]["name"]
    # the first pod compiled with an empty compile cache: a cold start, read from its log once it is Ready
    startup = _wait_startup(cluster, ns, "lastCold")
    cold = startup["lastCold"]
    assert cold["pod"] == first_pod and (cold["compileCache"], cold["model"], cold["compile"]) == (
        "miss", "local", True,
    ), cold  # fmt: skip
    assert 0 < cold["compileSeconds"] < cold["warmupSeconds"] < cold["seconds"], cold
    assert "lastWarm" not in startup
    assert len(list(compile_host.glob(f"*{SUFFIX}"))) == 1  # its artifacts, saved for the next pods

    cluster.kubectl("scale", "dd/cached", "-n", ns, "--replicas", "3")
    try:
        wait_for(lambda: _ready(cluster, ns, 3), 900, "dd/cached Ready with 3 replicas", interval=3)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{_diagnose(cluster, ns)}") from None
    assert len(hub.hub.access_log) == requests
    serving = _serving_pods(cluster, ns)
    assert len(serving) == 3 and all(p["status"]["phase"] == "Running" for p in serving)
    # replicas 2 and 3 restored the first one's compile artifacts: warm starts; the cold one stays
    startup = _wait_startup(cluster, ns, "lastWarm")
    warm = startup["lastWarm"]
    later = {p["metadata"]["name"] for p in serving} - {first_pod}
    assert warm["pod"] in later and (warm["compileCache"], warm["model"]) == ("hit", "local"), warm
    assert 0 < warm["seconds"] and warm["compileSeconds"] < cold["compileSeconds"], (warm, cold)
    assert startup["lastCold"] == cold
    wide = cluster.kubectl("get", "dd", "cached", "-n", ns, "-o", "wide").stdout.splitlines()
    # kubectl aligns the columns under their headers; MESSAGE (free text) follows WARM
    header, row = wide[0], wide[1]
    names = header.split()
    assert names[-3:] == ["COLD", "WARM", "MESSAGE"], wide
    at = [(header + " ").index(f" {name} ") + 1 for name in ("COLD", "WARM", "MESSAGE")]
    shown = [row[at[0] : at[1]].strip(), row[at[1] : at[2]].strip()]
    assert [float(v) for v in shown] == [cold["seconds"], warm["seconds"]], wide
    print("\n".join(["", *wide, f"cold {cold}", f"warm {warm}"]))  # the figures, for the record (-s)
    for pod in serving:
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["HF_HUB_OFFLINE"] == "1"
    jobs = _json(cluster, "get", "jobs", "-n", ns)["items"]
    assert len(jobs) == 1 and jobs[0]["status"].get("succeeded") == 1


def test_a_download_dropped_halfway_is_retried_by_the_job_and_pods_start_only_when_complete(
    cluster, node, cache_ns
):
    ns, storage_class = cache_ns
    hub = HubServer(tiny_model_root() / MODEL_FOLDER, REPO_ID, token=TOKEN, host=NODE_IP)
    size = hub.hub.files[TRANSFORMER].size
    hub.fail_file(TRANSFORMER, size // 2, times=6)  # one pod's client retries 1 + 5 times: the pod fails
    hub.start()
    try:
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(_doc(hub.url, storage_class)))

        def failure_shown():
            cache = (_dd(cluster, ns).get("status") or {}).get("modelCache") or {}
            return cache if cache.get("failedAttempts") and "failed" in cache.get("message", "") else None

        shown = wait_for(failure_shown, 600, "status.modelCache showing the failed attempt", interval=2)
        assert shown["phase"] in ("Pending", "Downloading"), shown
        dep = _json(cluster, "get", "deployment", "cached", "-n", ns)
        assert dep["spec"]["replicas"] == 0  # no serving pod on a partial cache
        try:
            dd = wait_for(lambda: _ready(cluster, ns, 1), 900, "dd/cached Ready", interval=3)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{_diagnose(cluster, ns)}") from None
        assert dd["status"]["modelCache"]["phase"] == "Ready"
        assert dd["status"]["modelCache"]["failedAttempts"] >= 1
        gets = hub.hub.file_gets(TRANSFORMER)
        assert len(gets) == 7 and gets[-1].body_bytes == size  # six dropped halfway, then whole
        reasons = [e["reason"] for e in _json(cluster, "get", "events", "-n", ns)["items"]]
        assert "ModelDownloadRetry" in reasons and "ModelCached" in reasons, reasons
    finally:
        hub.stop()
