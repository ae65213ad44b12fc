"""Automatic rollback on the local control plane with fake nodes (kwok): the tiny sample serves, then a
new revision's pod fails and the operator restores the previous revision's ConfigMap and Deployment,
keeps the CR's spec as written, says RolledBack (condition + one Warning event) with the pod's own words,
and does not retry the failing revision until the spec changes.

kwok turns every bound pod Ready at once, so the new revision also carries a node selector no node has:
its pod stays unbound, and the test writes its status as the kubelet reports the failure (the quality
gate's figures, an image that cannot be pulled). The Deployment controller, the ReplicaSets, the
scheduler and the operator are the real ones. (Real pods: tests/cluster/test_cluster_rollback_realpods.py.)"""

from __future__ import annotations

import json
import time

import pytest
from diffusion_dev import wait_for
from diffusion_runtime.contract.lines import GATE_FAILED
from op_helpers import get_json, sample
from test_operator_cluster import apply_doc, conditions, dd, events_for, wait_ready

pytestmark = pytest.mark.cluster

HOLD = {"diffusion.dev/test-no-such-node": "true"}  # keeps the new revision's pod away from kwok
FIGURES = f"{GATE_FAILED}PSNR 31.20 dB < min 45 (worst of 1 canaries, optimized vs plain pipeline)"
GATE = {"prompts": ["a cat"], "seeds": [0], "minPSNR": 45.0, "steps": 8, "size": "64x64"}


def gate_failure(pod: dict) -> dict:
    """The runtime exited after the gate failed (its line the termination message), in back-off."""
    cs = {
        "name": "runtime",
        "image": pod["spec"]["containers"][0]["image"],
        "imageID": "",
        "ready": False,
        "started": False,
        "restartCount": 1,
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s restarting"}},
        "lastState": {
            "terminated": {
                "exitCode": 3,
                "reason": "Error",
                "message": FIGURES,
                "startedAt": "2026-01-02T10:00:00Z",
                "finishedAt": "2026-01-02T10:00:20Z",
                "containerID": "containerd://c1",
            }
        },
    }
    return {"status": {"phase": "Pending", "containerStatuses": [cs]}}


def image_pull_failure(pod: dict) -> dict:
    image = pod["spec"]["containers"][0]["image"]
    cs = {
        "name": "runtime",
        "image": image,
        "imageID": "",
        "ready": False,
        "started": False,
        "restartCount": 0,
        "state": {
            "waiting": {
                "reason": "ImagePullBackOff",
                "message": f'Back-off pulling image "{image}": not found',
            }
        },
    }
    return {"status": {"phase": "Pending", "containerStatuses": [cs]}}


def pods_of(cluster, namespace: str) -> list[dict]:
    return get_json(cluster, "pods", "-n", namespace, "-l", "diffusion.dev/deployment=tiny")["items"]


def deployment(cluster, namespace: str) -> dict:
    return get_json(cluster, "deployment", "tiny", "-n", namespace)


@pytest.mark.parametrize(
    "change, fail, reason, words",
    [
        (
            lambda s: (
                s.update(qualityGate=GATE)
                or s["cacheDit"]["cache_config"].update(steps_computation_mask=[1, 0, 0, 0, 0, 0, 0, 1])
            ),
            gate_failure,
            "QualityGateFailed",
            "PSNR 31.20 dB < min 45",
        ),
        (
            lambda s: s["template"].update(image="registry.invalid/diffusion/runtime:nope"),
            image_pull_failure,
            "ImagePullBackOff",
            "registry.invalid/diffusion/runtime:nope",
        ),
    ],
    ids=["quality-gate", "image"],
)
def test_a_failing_revision_is_rolled_back_the_spec_kept_and_not_retried(
    cluster, namespace, operator, change, fail, reason, words
):
    doc = sample("tiny-cpu.yaml")
    apply_doc(cluster, namespace, doc)
    wait_ready(cluster, namespace, "tiny")
    good_cm = wait_for(
        lambda: get_json(cluster, "configmap", "tiny-last-good", "-n", namespace),
        30,
        "the last good revision",
    )
    assert good_cm["data"]["generation"] == "1"
    good_config = get_json(cluster, "configmap", "tiny-config", "-n", namespace)["data"]
    good_template = deployment(cluster, namespace)["spec"]["template"]
    good_hash = dd(cluster, namespace, "tiny")["status"]["configHash"]

    # the new revision (as a user would: kubectl apply of the changed spec)
    spec = json.loads(json.dumps(doc["spec"]))
    change(spec)
    spec["template"]["nodeSelector"] = HOLD
    new = {**doc, "spec": spec}
    apply_doc(cluster, namespace, new)
    written = dd(cluster, namespace, "tiny")["spec"]

    def new_pod():
        pods = [p for p in pods_of(cluster, namespace) if (p["spec"].get("nodeSelector") or {}).get(
            "diffusion.dev/test-no-such-node") and not p["metadata"].get("deletionTimestamp")]  # fmt: skip
        return pods[0] if pods else None

    pod = wait_for(new_pod, 30, "the new revision's pod")
    started = time.monotonic()
    cluster.kubectl(
        "patch", "pod", pod["metadata"]["name"], "-n", namespace, "--subresource=status",
        "--type=strategic", "-p", json.dumps(fail(pod)),
    )  # fmt: skip

    def rolled_back():
        cond = conditions(dd(cluster, namespace, "tiny")).get("RolledBack", {})
        return cond if cond.get("status") == "True" else None

    cond = wait_for(rolled_back, 30, "RolledBack=True")
    took = time.monotonic() - started
    assert cond["reason"] == reason and words in cond["message"], cond
    assert f"pod {pod['metadata']['name']}" in cond["message"]
    # the previous revision's configuration is back and serves; the spec is as the user wrote it
    obj = wait_ready(cluster, namespace, "tiny")
    assert obj["spec"] == written
    assert obj["status"]["configHash"] == good_hash
    assert obj["status"]["rollback"]["active"] is True
    assert obj["status"]["rollback"]["failedGeneration"] == obj["metadata"]["generation"] == 2
    assert get_json(cluster, "configmap", "tiny-config", "-n", namespace)["data"] == good_config
    dep = deployment(cluster, namespace)
    assert dep["spec"]["template"] == good_template
    if reason == "QualityGateFailed":
        gate = conditions(obj)["QualityGate"]
        assert gate["status"] == "False" and words in gate["message"]

    # no retry loop: the Deployment stays at the restored template, nothing is written again
    generation = dep["metadata"]["generation"]
    time.sleep(8.0)  # four resyncs of the operator fixture (2 s)
    dep = deployment(cluster, namespace)
    assert dep["metadata"]["generation"] == generation and dep["spec"]["template"] == good_template
    assert all(
        not (p["spec"].get("nodeSelector") or {}).get("diffusion.dev/test-no-such-node")
        for p in pods_of(cluster, namespace)
    )
    events = [e for e in events_for(cluster, namespace, "tiny") if e["reason"] == "RolledBack"]
    assert [(e["type"], e.get("count", 1)) for e in events] == [("Warning", 1)], events
    assert words in events[0]["message"]
    print(f"\n{reason}: RolledBack {took:.1f} s after the pod's failure was reported")

    # the user's next spec is rolled out: RolledBack turns False
    spec["template"].pop("nodeSelector")
    apply_doc(cluster, namespace, {**doc, "spec": spec})
    final = wait_ready(cluster, namespace, "tiny")
    assert final["status"]["configHash"] != good_hash or reason == "ImagePullBackOff"
    cond = conditions(final)["RolledBack"]
    assert (cond["status"], cond["reason"]) == ("False", "SpecChanged")
    assert deployment(cluster, namespace)["spec"]["template"] != good_template
