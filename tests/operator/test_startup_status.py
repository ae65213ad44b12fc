"""status.startup: the newest cold and warm start, from the start line each runtime prints before it turns
ready (pure functions, then the reconciler against the in-memory API server; the real-pod cluster test
in tests/cluster/test_cluster_modelcache_realpods.py does it with real pods and real logs)."""

from __future__ import annotations

import copy

from diffusion_operator import status as st
from diffusion_operator.api.status_types import StartupStatus
from diffusion_operator.builders.deployment import RUNTIME_CONTAINER
from diffusion_operator.controller.informers import pod_gate_view
from diffusion_operator.controller.startup import START_LOG_BYTES, ready_container
from diffusion_operator.kube import ApiError
from diffusion_runtime.startup import ready_line
from test_reconciler import NS, cr, cr_doc, roll_out, setup


def record(start: str = "cold", at: str = "2026-01-02T10:00:00Z", seconds: float = 48.5, **over) -> dict:
    out = {
        "start": start,
        "seconds": seconds,
        "at": at,
        "model": "local",
        "compile": True,
        "compileCache": "miss" if start == "cold" else "hit",
        "downloadSeconds": 0.0,
        "loadSeconds": 2.5,
        "warmupSeconds": 37.9,
        "compileSeconds": 36.7,
    }
    out.update(over)
    return out


def pod(name: str, ready: bool = True, container_id: str = "containerd://c1", owner: str = "tiny") -> dict:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"diffusion.dev/deployment": owner}},
        "status": {
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [
                {
                    "name": RUNTIME_CONTAINER,
                    "ready": ready,
                    "containerID": container_id,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": "2026-01-02T09:59:00Z"}},
                }
            ],
        },
    }


# ---- pure functions ----------------------------------------------------------------------------


def test_the_newest_start_of_each_kind_wins_whatever_the_order():
    a = st.add_start(None, "p1", record("cold", "2026-01-02T10:00:00Z", 60.0))
    assert a == {"lastCold": st.start_entry("p1", record("cold", "2026-01-02T10:00:00Z", 60.0))}
    assert "start" not in a["lastCold"] and a["lastCold"]["pod"] == "p1"
    b = st.add_start(a, "p2", record("warm", "2026-01-02T10:05:00Z", 12.0))
    c = st.add_start(b, "p3", record("cold", "2026-01-02T09:00:00Z", 90.0))  # older: ignored
    assert c is not None
    assert (c["lastCold"]["pod"], c["lastWarm"]["pod"]) == ("p1", "p2")
    d = st.add_start(c, "p4", record("warm", "2026-01-02T11:00:00Z", 11.0))
    assert d is not None and d["lastWarm"]["seconds"] == 11.0 and d["lastCold"] == c["lastCold"]
    # same instant: decided by pod name, so two operators (or two orders) agree
    x = st.add_start(
        st.add_start(None, "q1", record(at="2026-01-02T12:00:00Z")), "q2", record(at="2026-01-02T12:00:00Z")
    )
    y = st.add_start(
        st.add_start(None, "q2", record(at="2026-01-02T12:00:00Z")), "q1", record(at="2026-01-02T12:00:00Z")
    )
    assert x == y and x is not None and x["lastCold"]["pod"] == "q2"


def test_merge_keeps_what_status_had_and_has_nothing_without_starts():
    old = {"lastCold": st.start_entry("p1", record())}
    assert st.merge_startup(old, None) == old
    assert st.merge_startup(None, old) == old
    assert st.merge_startup(None, None) is None
    assert st.merge_startup({}, {}) is None
    StartupStatus.model_validate(old)  # the CRD's schema (strict: every field, the right types)


def test_only_a_ready_runtime_container_is_read():
    assert ready_container(pod("p")) == "containerd://c1"
    assert ready_container(pod("p", ready=False)) is None
    unready_pod = pod("p")
    unready_pod["status"]["conditions"][0]["status"] = "False"  # the container is, the pod is not (yet)
    assert ready_container(unready_pod) is None
    no_id = pod("p", container_id="")
    assert ready_container(no_id) == "0@2026-01-02T09:59:00Z"
    assert ready_container({"metadata": {"name": "p"}}) is None
    assert pod_gate_view(pod("p"))["ready"] == "containerd://c1"


# ---- the reconciler ----------------------------------------------------------------------------


def started_cr():
    kube, rec = setup()
    kube.create(cr_doc())
    rec.drain()
    roll_out(kube)
    rec.drain()
    return kube, rec


def test_ready_pods_start_lines_become_status_startup_read_once_per_container():
    kube, rec = started_cr()
    assert "startup" not in cr(kube)["status"]
    cold, warm = record("cold", "2026-01-02T10:00:00Z", 48.5), record("warm", "2026-01-02T10:03:00Z", 12.6)
    kube.logs[(NS, "tiny-a")] = f"INFO loading\n{ready_line(cold)}\nINFO POST /v1/images/generations 200\n"
    kube.logs[(NS, "tiny-b")] = f"INFO loading\n{ready_line(warm)}\n"

    rec.on_pod_event("ADDED", pod("tiny-a", ready=False))  # not Ready yet: its log is not read
    assert rec.drain() == 0 and kube.reads[("LOG", "Pod")] == 0
    rec.on_pod_event("MODIFIED", pod("tiny-a"))
    assert rec.drain() == 1
    status = cr(kube)["status"]
    assert status["startup"] == {
        "lastCold": {"pod": "tiny-a", **{k: v for k, v in cold.items() if k != "start"}}
    }
    StartupStatus.model_validate(status["startup"])

    rec.on_pod_event("ADDED", pod("tiny-b", container_id="containerd://c2"))
    assert rec.drain() == 1
    startup = cr(kube)["status"]["startup"]
    assert startup["lastCold"]["pod"] == "tiny-a" and startup["lastWarm"]["pod"] == "tiny-b"
    assert startup["lastWarm"]["seconds"] == 12.6 and startup["lastWarm"]["compileCache"] == "hit"
    assert kube.reads[("LOG", "Pod")] == 2

    # the same Ready container again (any status update of the pod): no read, no reconcile
    writes = kube.total_writes()
    rec.on_pod_event("MODIFIED", pod("tiny-a"))
    rec.on_pod_event("MODIFIED", pod("tiny-b", container_id="containerd://c2"))
    assert rec.drain() == 0 and kube.reads[("LOG", "Pod")] == 2 and kube.total_writes() == writes

    # the pods go (scale down, rollout): status keeps the figures; an idle resync writes nothing
    rec.on_pod_event("DELETED", pod("tiny-a"))
    rec.on_pod_event("DELETED", pod("tiny-b"))
    rec.resync(None)
    rec.drain()
    assert cr(kube)["status"]["startup"] == startup and kube.total_writes() == writes


def test_a_restarted_container_is_read_again_and_a_newer_start_replaces_the_old():
    kube, rec = started_cr()
    kube.logs[(NS, "tiny-a")] = ready_line(record("cold", "2026-01-02T10:00:00Z", 48.5))
    rec.on_pod_event("ADDED", pod("tiny-a"))
    rec.drain()
    # the container restarted (liveness): its new log, a new container id
    kube.logs[(NS, "tiny-a")] = ready_line(record("cold", "2026-01-02T11:00:00Z", 51.0))
    rec.on_pod_event("MODIFIED", pod("tiny-a", ready=False, container_id="containerd://c9"))
    rec.on_pod_event("MODIFIED", pod("tiny-a", container_id="containerd://c9"))
    rec.drain()
    assert cr(kube)["status"]["startup"]["lastCold"]["seconds"] == 51.0
    assert kube.reads[("LOG", "Pod")] == 2


def test_a_restarted_operator_rebuilds_the_same_status_and_writes_nothing():
    kube, rec = started_cr()
    kube.logs[(NS, "tiny-a")] = ready_line(record("cold", "2026-01-02T10:00:00Z"))
    kube.logs[(NS, "tiny-b")] = ready_line(record("warm", "2026-01-02T10:03:00Z", 12.6))
    rec.on_pod_event("ADDED", pod("tiny-a"))
    rec.on_pod_event("ADDED", pod("tiny-b", container_id="containerd://c2"))
    rec.drain()
    startup = copy.deepcopy(cr(kube)["status"]["startup"])
    writes = kube.total_writes()

    from diffusion_operator.controller import Reconciler

    again = Reconciler(kube, child_delay=0.05)
    again.resync(None)  # the list at start, then the pods' ADDED events
    again.on_pod_event("ADDED", pod("tiny-a"))
    again.on_pod_event("ADDED", pod("tiny-b", container_id="containerd://c2"))
    again.drain()
    assert cr(kube)["status"]["startup"] == startup
    assert kube.total_writes() == writes


def test_pods_without_a_start_line_or_with_an_unreadable_log_add_nothing():
    kube, rec = started_cr()
    kube.logs[(NS, "fake-node-pod")] = "some other program's log\n"  # (or a node that serves no logs: None)
    rec.on_pod_event("ADDED", pod("fake-node-pod"))
    kube.refusals[("LOG", "Pod")] = ApiError(403, '{"reason": "Forbidden", "message": "no"}', "GET", "log")
    rec.on_pod_event("ADDED", pod("forbidden", container_id="containerd://c3"))
    assert rec.drain() == 0
    assert "startup" not in cr(kube)["status"]


def test_the_start_line_is_read_from_the_head_of_the_log():
    kube, rec = started_cr()
    line = ready_line(record())
    # a busy pod: the line is followed by far more request logging than a tail would hold
    kube.logs[(NS, "busy")] = "INFO loading\n" + line + "\n" + "INFO POST 200\n" * (START_LOG_BYTES // 8)
    rec.on_pod_event("ADDED", pod("busy"))
    rec.drain()
    assert cr(kube)["status"]["startup"]["lastCold"]["pod"] == "busy"


def test_a_start_older_than_the_cr_belongs_to_an_earlier_cr_of_that_name():
    kube, rec = started_cr()
    assert cr(kube)["metadata"]["creationTimestamp"] == "2026-01-01T00:00:00Z"  # the fake's clock
    kube.logs[(NS, "old")] = ready_line(record(at="2025-12-31T23:00:00Z"))
    rec.on_pod_event("ADDED", pod("old"))
    rec.drain()
    assert "startup" not in cr(kube)["status"]


def test_starts_of_another_crs_pods_stay_there():
    kube, rec = setup()
    kube.create(cr_doc("tiny"))
    kube.create(cr_doc("other"))
    rec.drain()
    kube.logs[(NS, "other-a")] = ready_line(record())
    rec.on_pod_event("ADDED", pod("other-a", owner="other"))
    rec.drain()
    assert cr(kube, "other")["status"]["startup"]["lastCold"]["pod"] == "other-a"
    assert "startup" not in cr(kube, "tiny")["status"]
