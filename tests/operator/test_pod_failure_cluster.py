"""A failing pod in status, on the local control plane with fake nodes: the tiny sample's pod (kwok,
fake) is made to crash-loop by patching its status as the kubelet would report a missing model; the CR
says Ready=False with the pod's termination message, and one Warning event says the same however
often the pod restarts. (With real pods: tests/cluster, the lead's CI.)"""

from __future__ import annotations

import json
import time

import pytest
from diffusion_dev import wait_for
from op_helpers import get_json, sample
from test_operator_cluster import apply_doc, conditions, dd, events_for, wait_ready

pytestmark = pytest.mark.cluster

MISSING = "model file:///models/tiny-flux: folder /models/tiny-flux does not exist"


def crash_status(pod: dict, restarts: int, running: bool) -> dict:
    """The pod's status as the kubelet reports a runtime that exits 2 at start (back-off or restarted)."""
    last = {
        "terminated": {
            "exitCode": 2,
            "reason": "Error",
            "message": MISSING,
            "startedAt": "2026-01-02T10:00:00Z",
            "finishedAt": "2026-01-02T10:00:03Z",
            "containerID": "containerd://c1",
        }
    }
    state = (
        {"running": {"startedAt": "2026-01-02T10:01:00Z"}}
        if running
        else {
            "waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}
        }
    )
    status = pod["status"]
    cs = dict(status["containerStatuses"][0])
    cs.update(ready=False, started=running, restartCount=restarts, state=state, lastState=last)
    conds = [
        {**c, "status": "False"} if c.get("type") in ("Ready", "ContainersReady") else c
        for c in status.get("conditions") or []
    ]
    return {"status": {"conditions": conds, "containerStatuses": [cs]}}


def test_a_crash_looping_pod_is_ready_false_with_its_termination_message_and_one_event(
    cluster, namespace, operator
):
    apply_doc(cluster, namespace, sample("tiny-cpu.yaml"))
    wait_ready(cluster, namespace, "tiny")
    pods = get_json(cluster, "pods", "-n", namespace, "-l", "diffusion.dev/deployment=tiny")["items"]
    assert len(pods) == 1
    name = pods[0]["metadata"]["name"]

    def patch(restarts: int, running: bool) -> None:
        pod = get_json(cluster, "pod", name, "-n", namespace)
        cluster.kubectl(
            "patch", "pod", name, "-n", namespace, "--subresource=status", "--type=strategic",
            "-p", json.dumps(crash_status(pod, restarts, running)),
        )  # fmt: skip

    patch(1, running=False)

    def failing():
        cond = conditions(dd(cluster, namespace, "tiny")).get("Ready", {})
        return cond if cond.get("status") == "False" and cond.get("reason") == "CrashLoopBackOff" else None

    cond = wait_for(failing, 30, "Ready=False CrashLoopBackOff")
    assert cond["message"] == f"0/1 pods ready, 1/1 updated: pod {name}: {MISSING} (exit code 2)"
    assert "warming up" not in cond["message"]
    assert conditions(dd(cluster, namespace, "tiny"))["ConfigValid"]["status"] == "True"

    # restarts (running again not ready, back-off, ...) and reconciles (the CR touched): the same cause
    def reconciles() -> float:
        return operator.samples().get(("diffusion_operator_reconciles_total", (("result", "ok"),)), 0.0)

    before = reconciles()
    for restarts, running in ((2, True), (2, False), (3, True), (3, False)):
        patch(restarts, running)
        cluster.kubectl(
            "annotate", "dd", "tiny", "-n", namespace, "--overwrite", f"test/touch={restarts}{running}"
        )
        time.sleep(1.0)
    wait_for(lambda: reconciles() >= before + 3, 15, "reconciles of the touched CR")
    # a restarted operator reads the stored status: it names the cause already, no second event
    operator.stop()
    operator.start()
    patch(4, False)
    time.sleep(3.0)
    assert failing() is not None
    events = [e for e in events_for(cluster, namespace, "tiny") if e["type"] == "Warning"]
    assert [(e["reason"], e["message"], e.get("count", 1)) for e in events] == [
        ("CrashLoopBackOff", f"pod {name}: {MISSING} (exit code 2)", 1)
    ]
    table = cluster.kubectl("get", "dd", "tiny", "-n", namespace).stdout
    assert "CrashLoopBackOff" in table, table
