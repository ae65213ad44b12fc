"""SIGKILL of the operator at the moments that hold state between reconciles, on the local control plane
(kwok nodes): during a rollout, during a model download, during a pending quality gate. Each time the
restarted operator converges from what the cluster holds (the CR's status, the children, the last good
revision's ConfigMap): no orphan (every object of the CR is owned by it), no duplicate child, one
ReplicaSet serving, no repeated event."""

from __future__ import annotations

import json
import uuid

import pytest
from diffusion_dev import wait_for
from op_helpers import get_json, sample
from test_model_cache import cached_doc
from test_operator_cluster import apply_doc, conditions, dd, events_for, wait_ready
from test_rollback_cluster import HOLD, gate_failure

pytestmark = pytest.mark.cluster

KINDS = ("configmaps", "deployments", "services", "poddisruptionbudgets", "jobs", "persistentvolumeclaims")


def sigkill(operator) -> None:
    assert operator.proc is not None
    operator.proc.kill()  # SIGKILL: no shutdown code runs
    operator.proc.wait(timeout=10)


def owned(cluster, namespace: str, kind: str) -> list[dict]:
    items = get_json(cluster, kind, "-n", namespace)["items"]
    return [i for i in items if (i["metadata"].get("labels") or {}).get("diffusion.dev/deployment") == "tiny"]


def assert_converged(cluster, namespace: str, replicas: int = 1) -> dict:
    """Every object of the CR owned by it, one of each child, one ReplicaSet with pods, `replicas` pods of it."""
    obj = dd(cluster, namespace, "tiny")
    uid = obj["metadata"]["uid"]
    names: dict[str, list[str]] = {}
    for kind in (*KINDS, "replicasets", "pods"):
        items = owned(cluster, namespace, kind)
        for item in items:
            refs = item["metadata"].get("ownerReferences") or []
            assert refs, f"orphan {kind} {item['metadata']['name']}"
            if kind not in ("replicasets", "pods"):
                assert [r["uid"] for r in refs] == [uid], (kind, item["metadata"]["name"], refs)
        names[kind] = sorted(i["metadata"]["name"] for i in items)
    assert names["configmaps"] == ["tiny-config", "tiny-last-good"], names
    assert names["deployments"] == names["services"] == names["poddisruptionbudgets"] == ["tiny"], names
    serving = [rs for rs in owned(cluster, namespace, "replicasets") if rs["spec"].get("replicas")]
    assert len(serving) == 1, [rs["metadata"]["name"] for rs in serving]
    live = [p for p in owned(cluster, namespace, "pods") if not p["metadata"].get("deletionTimestamp")]
    pods = [p for p in live if "pod-template-hash" in p["metadata"]["labels"]]
    # the rest: the download Job's one pod (a second would be a second download)
    others = [p["metadata"]["labels"].get("job-name") for p in live if p not in pods]
    assert sorted(others) == names["jobs"], (others, names["jobs"])
    assert len(pods) == replicas and all(
        p["metadata"]["labels"]["pod-template-hash"] == serving[0]["metadata"]["labels"]["pod-template-hash"]
        for p in pods
    ), [p["metadata"]["name"] for p in pods]
    config = get_json(cluster, "deployment", "tiny", "-n", namespace)["spec"]["template"]["metadata"]
    assert obj["status"]["configHash"] == config["annotations"]["diffusion.dev/config-hash"]
    return names


def serve(cluster, namespace: str, doc: dict) -> None:
    apply_doc(cluster, namespace, doc)
    wait_ready(cluster, namespace, "tiny")
    wait_for(
        lambda: get_json(cluster, "configmap", "tiny-last-good", "-n", namespace),
        30,
        "the last good revision",
    )


def test_sigkill_during_a_rollout_converges_to_the_new_revision(cluster, namespace, operator):
    doc = sample("tiny-cpu.yaml")
    serve(cluster, namespace, doc)
    before = get_json(cluster, "deployment", "tiny", "-n", namespace)
    old_hash = before["spec"]["template"]["metadata"]["annotations"]["diffusion.dev/config-hash"]

    doc["spec"]["cacheDit"]["cache_config"]["residual_diff_threshold"] = 0.2
    apply_doc(cluster, namespace, doc)

    def rolling():
        dep = get_json(cluster, "deployment", "tiny", "-n", namespace)
        new = dep["spec"]["template"]["metadata"]["annotations"]["diffusion.dev/config-hash"]
        return dep if new != old_hash else None

    wait_for(rolling, 30, "the operator to apply the new revision")
    sigkill(operator)  # the Deployment controller goes on; the CR's status still says generation 1
    operator.start()
    obj = wait_ready(cluster, namespace, "tiny")
    assert obj["metadata"]["generation"] == 2 and obj["status"]["configHash"] != old_hash
    assert_converged(cluster, namespace)
    # the new revision served, so it is the last good one now
    wait_for(
        lambda: (
            get_json(cluster, "configmap", "tiny-last-good", "-n", namespace)["data"]["generation"] == "2"
        ),
        30,
        "generation 2 kept as the last good revision",
    )
    assert "RolledBack" not in conditions(obj)


def test_sigkill_during_a_pending_quality_gate_rolls_back_once_after_the_restart(
    cluster, namespace, operator
):
    doc = sample("tiny-cpu.yaml")
    doc["spec"]["qualityGate"] = {"prompts": ["a cat"], "seeds": [0], "minPSNR": 45.0}
    serve(cluster, namespace, doc)
    good_hash = dd(cluster, namespace, "tiny")["status"]["configHash"]

    doc["spec"]["cacheDit"]["cache_config"]["steps_computation_mask"] = [1, 0, 0, 0, 0, 0, 0, 1]
    doc["spec"]["template"]["nodeSelector"] = HOLD  # its pod stays unbound: the gate is pending
    apply_doc(cluster, namespace, doc)

    def pending():
        cond = conditions(dd(cluster, namespace, "tiny")).get("QualityGate", {})
        return cond if cond.get("status") == "Unknown" else None

    wait_for(pending, 30, "QualityGate Unknown (pods of the new configuration loading)")
    sigkill(operator)

    def new_pods():
        return [
            p
            for p in owned(cluster, namespace, "pods")
            if (p["spec"].get("nodeSelector") or {}).get("diffusion.dev/test-no-such-node")
        ]

    pods = wait_for(new_pods, 30, "the new configuration's pod (the Deployment controller creates it)")
    assert len(pods) == 1
    # the gate fails while no operator runs
    cluster.kubectl(
        "patch", "pod", pods[0]["metadata"]["name"], "-n", namespace, "--subresource=status",
        "--type=strategic", "-p", json.dumps(gate_failure(pods[0])),
    )  # fmt: skip
    operator.start()
    wait_for(
        lambda: conditions(dd(cluster, namespace, "tiny")).get("RolledBack", {}).get("status") == "True",
        30,
        "RolledBack after the restart",
    )
    obj = wait_ready(cluster, namespace, "tiny")
    assert obj["status"]["configHash"] == good_hash
    assert_converged(cluster, namespace)
    # one more restart: the rollback is held, nothing is posted twice
    sigkill(operator)
    operator.start()
    wait_ready(cluster, namespace, "tiny")
    events = [e for e in events_for(cluster, namespace, "tiny") if e["reason"] == "RolledBack"]
    assert [e.get("count", 1) for e in events] == [1], events
    assert (
        get_json(cluster, "deployment", "tiny", "-n", namespace)["spec"]["template"]["metadata"][
            "annotations"
        ]["diffusion.dev/config-hash"]
        == good_hash
    )


def test_sigkill_during_a_model_download_converges_with_one_job_and_one_claim(cluster, namespace, operator):
    storage_class = f"manual-{uuid.uuid4().hex[:6]}"  # only our PersistentVolume serves it
    doc = cached_doc(storageClassName=storage_class, accessMode="ReadWriteMany")
    doc["metadata"] = {"name": "tiny"}
    cluster.kubectl("create", "secret", "generic", "hf", "-n", namespace, "--from-literal=token=hf_fake")
    apply_doc(cluster, namespace, doc)

    def downloading():
        cache = (dd(cluster, namespace, "tiny").get("status") or {}).get("modelCache") or {}
        return cache if cache.get("jobName") and cache.get("phase") in ("Pending", "Downloading") else None

    cache = wait_for(downloading, 60, "the model cache's download under way")
    sigkill(operator)
    # the claim binds and the download Job completes while no operator runs
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
        wait_for(
            lambda: (get_json(cluster, "job", cache["jobName"], "-n", namespace).get("status") or {}).get(
                "succeeded"
            ),
            60,
            "the download Job to complete",
        )
        operator.start()
        obj = wait_ready(cluster, namespace, "tiny", timeout=120)
        assert obj["status"]["modelCache"]["phase"] == "Ready"
        names = assert_converged(cluster, namespace)
        assert names["jobs"] == [cache["jobName"]] and names["persistentvolumeclaims"] == ["tiny-model-cache"]
        assert get_json(cluster, "deployment", "tiny", "-n", namespace)["spec"]["replicas"] == 1
    finally:
        cluster.kubectl("delete", "dd", "tiny", "-n", namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "pv", pv["metadata"]["name"], "--wait=false", check=False)
