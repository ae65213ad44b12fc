"""Failing pods in status: pod_status reads pods as the kubelet reports them (containerStatuses' state and
lastState), status.py turns the summary into the Ready condition, the reporter posts one Warning event
per distinct cause."""

from __future__ import annotations

import copy

from diffusion_operator import pod_status as ps
from diffusion_operator import status as st
from diffusion_operator.controller.informers import Informers, pod_gate_view
from diffusion_operator.controller.report import Reporter

MISSING = "model file:///models/tiny-flux: folder /models/tiny-flux does not exist"
IMAGE = "ghcr.io/example/diffusion-runtime:nope"


def pod(name="tiny-abc", *, phase="Running", ready=False, cs=None, scheduled=True, deleting=False):
    """A serving pod as the API server stores it (one runtime container, startup probe of 600 s)."""
    meta = {
        "name": name,
        "namespace": "ns",
        "labels": {"diffusion.dev/deployment": "tiny"},
        "annotations": {"diffusion.dev/config-hash": "h1"},
        "resourceVersion": "1",
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-02T10:10:00Z"
    conditions = [
        {"type": "PodScheduled", "status": "True" if scheduled else "False"},
        {"type": "Ready", "status": "True" if ready else "False"},
    ]
    if not scheduled:
        conditions[0].update(
            reason="Unschedulable", message="0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
        )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "containers": [
                {
                    "name": "runtime",
                    "image": IMAGE,
                    "startupProbe": {
                        "httpGet": {"path": "/ready"},
                        "periodSeconds": 10,
                        "failureThreshold": 60,
                    },
                }
            ]
        },
        "status": {
            "phase": phase,
            "conditions": conditions,
            "containerStatuses": [] if cs is None else [cs],
        },
    }


def runtime_cs(state, last=None, restarts=0, ready=False):
    out = {
        "name": "runtime",
        "image": IMAGE,
        "imageID": "",
        "ready": ready,
        "started": False,
        "restartCount": restarts,
        "state": state,
        "lastState": {} if last is None else {"terminated": last},
    }
    return out


def terminated(exit_code=2, reason="Error", message=MISSING, started="2026-01-02T10:00:00Z", finished=None):
    out = {
        "exitCode": exit_code,
        "reason": reason,
        "startedAt": started,
        "finishedAt": finished or "2026-01-02T10:00:03Z",
        "containerID": "containerd://c1",
    }
    if message is not None:
        out["message"] = message
    return out


CRASH_LOOP = pod(
    cs=runtime_cs(
        {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": "back-off 40s restarting failed container=runtime",
            }
        },
        last=terminated(),
        restarts=3,
    )
)


# ---- pure: one pod -> its failure ----------------------------------------------------------------


def test_crash_loop_names_the_termination_message_and_keeps_its_cause_across_restarts():
    f = ps.pod_failure(CRASH_LOOP)
    assert f is not None and f.reason == "CrashLoopBackOff"
    assert f.message == f"{MISSING} (exit code 2)"
    # restarted and running again, not ready yet: still failing, same cause (no new event)
    again = pod(
        cs=runtime_cs({"running": {"startedAt": "2026-01-02T10:01:00Z"}}, last=terminated(), restarts=4)
    )
    g = ps.pod_failure(again)
    assert g == f and ps.pod_state(again) == ps.FAILING
    # the first exit, before any restart
    first = pod(cs=runtime_cs({"terminated": terminated()}))
    h = ps.pod_failure(first)
    assert h is not None and h.reason == "ContainerExited" and h.message == f"{MISSING} (exit code 2)"


def test_a_log_tail_gives_its_last_line_without_the_runtime_prefix():
    tail = "INFO loading\nTraceback ...\ndiffusion-runtime: spec.cache: Fn+Bn too large for 8 blocks\n"
    p = pod(cs=runtime_cs({"terminated": terminated(message=tail)}, restarts=1))
    f = ps.pod_failure(p)
    assert f is not None and f.message == "spec.cache: Fn+Bn too large for 8 blocks (exit code 2)"
    long = pod(cs=runtime_cs({"terminated": terminated(message="x" * 5000)}))
    assert len(ps.pod_failure(long).message) < 400  # type: ignore[union-attr]


def test_out_of_memory():
    p = pod(
        cs=runtime_cs(
            {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}},
            last=terminated(exit_code=137, reason="OOMKilled", message=None),
            restarts=1,
        )
    )
    f = ps.pod_failure(p)
    assert f is not None and f.reason == "OOMKilled" and "out of memory" in f.message and "137" in f.message


def test_startup_budget_exceeded_is_a_kill_after_the_probe_budget():
    killed = terminated(exit_code=137, reason="Error", message=None, finished="2026-01-02T10:10:05Z")
    p = pod(cs=runtime_cs({"waiting": {"reason": "CrashLoopBackOff"}}, last=killed, restarts=1))
    f = ps.pod_failure(p)
    assert f is not None and f.reason == "StartupBudgetExceeded"
    assert "600 s" in f.message and "startupTimeoutSeconds" in f.message
    # the runtime drained on SIGTERM and exited 0 after the budget: the same
    drained = terminated(exit_code=0, reason="Completed", message=None, finished="2026-01-02T10:10:00Z")
    q = pod(cs=runtime_cs({"running": {}}, last=drained, restarts=1))
    assert ps.pod_failure(q).reason == "StartupBudgetExceeded"  # type: ignore[union-attr]
    # a kill well within the budget is an ordinary exit
    early = terminated(exit_code=137, reason="Error", message=None, finished="2026-01-02T10:00:30Z")
    r = pod(cs=runtime_cs({"waiting": {"reason": "CrashLoopBackOff"}}, last=early, restarts=1))
    assert ps.pod_failure(r).reason == "CrashLoopBackOff"  # type: ignore[union-attr]


def test_image_pull_failures_are_one_cause():
    err = pod(
        phase="Pending",
        cs=runtime_cs(
            {"waiting": {"reason": "ErrImagePull", "message": f'failed to pull image "{IMAGE}": not found'}}
        ),
    )
    backoff = pod(
        phase="Pending",
        cs=runtime_cs(
            {"waiting": {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{IMAGE}"'}}
        ),
    )
    a, b = ps.pod_failure(err), ps.pod_failure(backoff)
    assert a is not None and b is not None
    assert a.reason == b.reason == "ImagePullBackOff" and a.cause == b.cause
    assert a.message == f'ErrImagePull: failed to pull image "{IMAGE}": not found'


def test_quality_gate_line_and_other_waiting_reasons():
    gate = "quality gate failed: PSNR 21.40 dB < min 25 (worst of 2 canaries)"
    p = pod(
        cs=runtime_cs(
            {"waiting": {"reason": "CrashLoopBackOff"}}, last=terminated(1, message=gate), restarts=2
        )
    )
    f = ps.pod_failure(p)
    assert f is not None and f.reason == "QualityGateFailed" and f.message == gate
    bad = pod(
        phase="Pending",
        cs=runtime_cs(
            {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "hf" not found'}}
        ),
    )
    assert ps.pod_failure(bad) == ps.Failure(
        "CreateContainerConfigError",
        'CreateContainerConfigError: secret "hf" not found',
        'CreateContainerConfigError: secret "hf" not found',
    )
    evicted = pod(phase="Failed")
    evicted["status"].update(reason="Evicted", message="The node was low on resource: memory.")
    assert ps.pod_failure(evicted).reason == "Evicted"  # type: ignore[union-attr]


def test_states_starting_only_while_running_without_failure():
    running = pod(cs=runtime_cs({"running": {"startedAt": "2026-01-02T10:00:00Z"}}))
    assert ps.pod_failure(running) is None and ps.pod_state(running) == ps.STARTING
    creating = pod(phase="Pending", cs=runtime_cs({"waiting": {"reason": "ContainerCreating"}}))
    assert ps.pod_state(creating) == ps.PENDING
    unscheduled = pod(phase="Pending", scheduled=False)
    assert ps.pod_state(unscheduled) == ps.PENDING
    assert (
        ps.pending_message(unscheduled)
        == "not scheduled: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    )
    ready = pod(ready=True, cs=runtime_cs({"running": {}}, last=terminated(), restarts=1, ready=True))
    assert ps.pod_state(ready) == ps.READY  # restarted once, now ready: no failure
    # a pod being deleted by a rollout exits 143: no failure
    going = pod(deleting=True, cs=runtime_cs({"terminated": terminated(143, message=None)}))
    assert ps.pod_failure(going) is None and ps.pod_state(going) == ps.TERMINATING


# ---- the Ready condition -------------------------------------------------------------------------


def deployment(ready=0, replicas=2):
    return {
        "metadata": {"generation": 1},
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": 1,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": replicas,
            "availableReplicas": ready,
        },
    }


def ready_of(views, dep=None):
    s = st.valid_status({}, 1, 2, dep or deployment(), "a=b", "http://x", "h1", "tag", pods=views)
    return next(c for c in s["conditions"] if c["type"] == "Ready")


def test_ready_condition_names_the_failing_pods_own_words():
    second = copy.deepcopy(CRASH_LOOP)
    second["metadata"]["name"] = "tiny-def"
    c = ready_of([pod_gate_view(second), pod_gate_view(CRASH_LOOP)])
    assert (c["status"], c["reason"]) == ("False", "CrashLoopBackOff")
    assert (
        c["message"]
        == f"0/2 pods ready, 2/2 updated: pod tiny-abc: {MISSING} (exit code 2); 1 more pod failing"
    )


def test_warming_up_only_while_a_pod_runs_not_ready():
    running = pod(cs=runtime_cs({"running": {}}))
    c = ready_of([pod_gate_view(running)])
    assert c["reason"] == "WaitingForReady" and c["message"].endswith("(loading, compiling or warming up)")
    pending = ready_of([pod_gate_view(pod(phase="Pending", scheduled=False))])
    assert "warming up" not in pending["message"] and "Insufficient nvidia.com/gpu" in pending["message"]
    assert ready_of([])["message"].endswith("(waiting for pods)")
    # all ready: a pod that failed before and recovered changes nothing
    ok = ready_of([pod_gate_view(pod(ready=True, cs=runtime_cs({"running": {}}, ready=True)))], deployment(2))
    assert ok["status"] == "True"


# ---- events: one per distinct cause --------------------------------------------------------------


class Client:
    def __init__(self):
        self.events: list[tuple[str, str, str]] = []
        self.patches = 0

    def post_event(self, cr, type_, reason, message):
        self.events.append((type_, reason, message))

    def patch_status(self, namespace, name, status):
        self.patches += 1
        return None


def test_one_warning_event_per_distinct_cause_across_reconciles_and_restarts():
    client = Client()
    reporter = Reporter(lambda: client, lambda _cr: True)  # type: ignore[arg-type,return-value]
    cr = {"metadata": {"namespace": "ns", "name": "tiny", "generation": 1}}
    old: dict = {}
    again = pod(cs=runtime_cs({"running": {}}, last=terminated(), restarts=4))
    for p in (CRASH_LOOP, again, CRASH_LOOP, again):  # back-off, restart, back-off, ...
        views = [pod_gate_view(p)]
        new = st.valid_status(old, 1, 2, deployment(), "a=b", "http://x", "h1", "tag", pods=views)
        reporter.serving(cr, old, new, None, views)
        old = new
    assert client.events == [("Warning", "CrashLoopBackOff", f"pod tiny-abc: {MISSING} (exit code 2)")]
    # a second cause (another pod out of memory): one more event
    oom = pod(
        "tiny-def",
        cs=runtime_cs({"running": {}}, last=terminated(137, reason="OOMKilled", message=None), restarts=1),
    )
    views = [pod_gate_view(CRASH_LOOP), pod_gate_view(oom)]
    reporter.serving(
        cr, old, st.valid_status(old, 1, 2, deployment(), "a=b", "x", "h1", "t", pods=views), None, views
    )
    assert [e[1] for e in client.events] == ["CrashLoopBackOff", "OOMKilled"]
    # a restarted operator (nothing remembered) whose stored status names the cause posts nothing
    fresh = Reporter(lambda: client, lambda _cr: True)  # type: ignore[arg-type,return-value]
    views = [pod_gate_view(CRASH_LOOP)]
    new = st.valid_status(old, 1, 2, deployment(), "a=b", "http://x", "h1", "tag", pods=views)
    fresh.serving(cr, old, new, None, views)
    assert len(client.events) == 2


def test_informer_queues_when_a_pod_starts_failing_or_changes_state():
    inf = Informers(0.25)
    starting = pod(cs=runtime_cs({"running": {}}))
    assert not inf.pod_event("ADDED", starting).gate_changed  # type: ignore[union-attr]
    same = copy.deepcopy(starting)
    same["metadata"]["resourceVersion"] = "2"
    assert not inf.pod_event("MODIFIED", same).gate_changed  # type: ignore[union-attr]
    assert inf.pod_event("MODIFIED", CRASH_LOOP).gate_changed  # type: ignore[union-attr]
    again = pod(cs=runtime_cs({"running": {}}, last=terminated(), restarts=4))
    assert not inf.pod_event("MODIFIED", again).gate_changed  # type: ignore[union-attr]  # same cause
    [view] = inf.pods_of("ns", "tiny")
    assert view["state"] == ps.FAILING and view["problem"]["reason"] == "CrashLoopBackOff"
