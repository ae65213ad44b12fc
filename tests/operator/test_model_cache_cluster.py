"""spec.model.cache on the real control plane (kube-apiserver, controller manager with the PV binder and
the Job controller, scheduler, kwok nodes), the operator running with a token bound to exactly its
RBAC rules (rbac.py).

What kwok can show: the claim and the download Job are created, the claim binds to a PersistentVolume,
the scheduler waits for that before placing the Job's pod, the Job controller's real status drives
status.modelCache (Pending while the claim is unbound, Ready once the Job completed), the serving
Deployment stays at 0 replicas until then, and its pods mount the claim read-only with the Hub offline.
kwok completes every Job pod without running it, so bytes and failures of a real download are shown by
tests/runtime/test_model_download.py (real client, local Hub) and tests/operator/test_model_cache.py.
"""

from __future__ import annotations

import json
import uuid

import pytest
from diffusion_dev import wait_for
from diffusion_operator.builders.modelcache import MODEL_CACHE_MOUNT
from op_helpers import OperatorProcess, get_json, restricted_kubeconfig
from test_model_cache import cached_doc
from test_operator_cluster import apply_doc, conditions, dd, wait_ready

pytestmark = pytest.mark.cluster


def _cache(cluster, namespace: str, name: str) -> dict:
    return (dd(cluster, namespace, name).get("status") or {}).get("modelCache") or {}


@pytest.fixture
def least_privilege_operator(cluster, namespace, crd, tmp_path):
    """The operator with a ServiceAccount token bound to exactly rbac.NAMESPACED_RULES."""
    kubeconfig = restricted_kubeconfig(cluster, namespace, tmp_path)
    proc = OperatorProcess(kubeconfig, [namespace], tmp_path / "operator.log").start()
    yield proc
    proc.assert_alive()
    proc.stop()
    log = proc.log()
    assert "HTTP 403" not in log and "Forbidden" not in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


def test_download_job_gates_the_deployment_until_the_claim_binds_and_the_job_completes(
    cluster, namespace, least_privilege_operator
):
    storage_class = f"manual-{uuid.uuid4().hex[:6]}"  # only our PersistentVolume serves it
    doc = cached_doc(storageClassName=storage_class, accessMode="ReadWriteMany")
    doc["metadata"] = {"name": "tiny"}
    cluster.kubectl(
        "create", "secret", "generic", "hf", "-n", namespace, "--from-literal=token=hf_fake"
    )  # fmt: skip
    apply_doc(cluster, namespace, doc)

    # no volume for the claim yet: Pending, and no serving pod
    pending = wait_for(
        lambda: (
            (c := _cache(cluster, namespace, "tiny")).get("phase") == "Pending"
            and "is Pending" in c.get("message", "")
            and c
        ),
        60,
        "modelCache Pending on the unbound claim",
    )
    job_name = pending["jobName"]
    job = get_json(cluster, "job", job_name, "-n", namespace)
    assert job is not None and (job.get("status") or {}).get("succeeded") is None
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:3] == ["download", "--model", "hf://tiny-org/flux-tiny"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in container[
        "env"
    ]
    dep = get_json(cluster, "deployment", "tiny", "-n", namespace)
    assert dep["spec"]["replicas"] == 0
    ready = conditions(dd(cluster, namespace, "tiny"))["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "WaitingForModelCache")
    pods = get_json(cluster, "pods", "-n", namespace, "-l", "app.kubernetes.io/name=diffusion-runtime")[
        "items"
    ]
    assert pods == []

    # a volume appears: the claim binds, the Job's pod runs (kwok completes it), the cache is Ready
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"cache-{namespace}"[:63]},
        "spec": {
            "capacity": {"storage": "10Gi"},
            "accessModes": ["ReadWriteMany"],
            "storageClassName": storage_class,
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": f"/tmp/{namespace}"},
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(pv))
    try:
        wait_ready(cluster, namespace, "tiny", replicas=1, timeout=120)
        cache = _cache(cluster, namespace, "tiny")
        assert cache["phase"] == "Ready" and cache["jobName"] == job_name
        job = get_json(cluster, "job", job_name, "-n", namespace)
        assert job["status"].get("succeeded") == 1
        pvc = get_json(cluster, "pvc", "tiny-model-cache", "-n", namespace)
        assert pvc["status"]["phase"] == "Bound"
        dep = get_json(cluster, "deployment", "tiny", "-n", namespace)
        assert dep["spec"]["replicas"] == 1
        pod_spec = dep["spec"]["template"]["spec"]
        runtime = pod_spec["containers"][0]
        assert {"name": "HF_HUB_OFFLINE", "value": "1"} in runtime["env"]
        assert {"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT, "readOnly": True} in runtime[
            "volumeMounts"
        ]
        events = get_json(cluster, "events", "-n", namespace, "--field-selector", "involvedObject.name=tiny")
        reasons = [e["reason"] for e in events["items"]]
        assert "ModelCached" in reasons, reasons

        # more replicas: the same claim, no second download Job
        cluster.kubectl("scale", "dd/tiny", "-n", namespace, "--replicas", "3")
        wait_ready(cluster, namespace, "tiny", replicas=3, timeout=120)
        jobs = get_json(cluster, "jobs", "-n", namespace)["items"]
        assert [j["metadata"]["name"] for j in jobs] == [job_name]
        download_pods = get_json(cluster, "pods", "-n", namespace, "-l", f"job-name={job_name}")["items"]
        assert len(download_pods) == 1
    finally:
        cluster.kubectl("delete", "dd", "tiny", "-n", namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "pv", pv["metadata"]["name"], "--wait=false", check=False)
