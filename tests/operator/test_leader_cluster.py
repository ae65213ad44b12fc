"""Leader election against the real API server (kube-apiserver; kwok fake pods).

1. The election itself (leader.py, in-process, short timings): one leader among two candidates, a
   conflicting write refused by the API server's resourceVersion check, a clean release handed over at
   the standby's next retry, and a leader cut off from the API server fenced (no writes) before the
   standby may take over.
2. Two `diffusion-operator run` processes on one namespace: exactly one reconciles (the Lease holder;
   the CR's status field manager names it; the standby sends no write and reports leader 0 in /metrics
   and /healthz); SIGKILL of the leader -> the standby takes over within the lease duration (measured)
   and reconciles a change; a lease taken away makes the leader exit.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from diffusion_dev import on_fake_cpu_node, wait_for
from diffusion_operator.kube import ApiError, Kube, NotLeader, status_manager
from diffusion_operator.leader import LeaderElector, LeaseConfig, micro_time
from diffusion_operator.runner import DEFAULT_LEASE_NAME, EXIT_LEASE_LOST
from op_helpers import OperatorProcess, get_json, sample

pytestmark = pytest.mark.cluster


RESULTS = "leader_election_kwok.json"  # under $DIFFUSION_RESULTS_DIR (bench/results/ for the docs' figures)


def record(key: str, values: dict) -> None:
    """Add this run's figures to $DIFFUSION_RESULTS_DIR/RESULTS when the variable is set."""
    folder = os.environ.get("DIFFUSION_RESULTS_DIR")
    if not folder:
        return
    path = Path(folder) / RESULTS
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = {**values, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    data["source"] = "tests/operator/test_leader_cluster.py on the local control plane (kwok nodes)"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def api(cluster) -> Kube:
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=configuration)
    return Kube(configuration)


def lease(cluster, namespace: str, name: str = DEFAULT_LEASE_NAME) -> dict:
    return get_json(cluster, "lease", name, "-n", namespace) or {}


def holder(cluster, namespace: str, name: str = DEFAULT_LEASE_NAME) -> str:
    return (lease(cluster, namespace, name).get("spec") or {}).get("holderIdentity") or ""


# ---- 1. the election, in process ------------------------------------------------------------------

FAST = {"lease_duration": 3.0, "renew_deadline": 2.0, "retry_period": 0.25}


def test_one_leader_among_two_candidates_and_a_clean_handover(cluster, namespace):
    kube = api(cluster)
    a = LeaderElector(kube, LeaseConfig(namespace, "election", "cand-a", **FAST))
    b = LeaderElector(kube, LeaseConfig(namespace, "election", "cand-b", **FAST))
    threads = [a.start(), b.start()]
    try:
        wait_for(lambda: a.is_leader() or b.is_leader(), 10, "a leader")
        leader, standby = (a, b) if a.is_leader() else (b, a)
        # sampled for 2 lease durations: never two leaders, always the holder the Lease names
        deadline = time.monotonic() + 2 * FAST["lease_duration"]
        while time.monotonic() < deadline:
            assert leader.is_leader() and not standby.is_leader()
            time.sleep(0.1)
        assert holder(cluster, namespace, "election") == leader.config.identity
        transitions = lease(cluster, namespace, "election")["spec"]["leaseTransitions"]

        leader.stop()  # a clean stop releases: the standby takes over at its next retry
        released = time.monotonic()
        wait_for(standby.is_leader, 5, "the standby to lead after the release")
        handover = time.monotonic() - released
        assert handover < FAST["lease_duration"], handover  # did not wait for the lease to expire
        spec = lease(cluster, namespace, "election")["spec"]
        assert spec["holderIdentity"] == standby.config.identity
        assert spec["leaseTransitions"] == transitions + 1
        print(f"\nclean handover after a release: {handover:.2f} s")
        record("clean_release", {"handover_s": round(handover, 2), "timings_s": FAST})
    finally:
        a.stop()
        b.stop()
        for t in threads:
            t.join(timeout=10)


def test_conflicting_write_is_refused_by_resource_version(cluster, namespace):
    kube = api(cluster)
    a = LeaderElector(kube, LeaseConfig(namespace, "race", "cand-a", **FAST))
    assert a.try_acquire_or_renew() and a.is_leader()
    stale = kube.request("GET", a.path)  # what a second candidate read before a's next renew
    assert a.try_acquire_or_renew()  # a renews: a new resourceVersion

    class Stale:  # b reads the stale record (as if its GET came before a's renew), then writes
        def request(self, method, path, **kwargs):
            return json.loads(json.dumps(stale)) if method == "GET" else kube.request(method, path, **kwargs)

    # b's clock says the stale record is older than the lease duration: b tries to take it over
    now = [0.0]
    b = LeaderElector(Stale(), LeaseConfig(namespace, "race", "cand-b", **FAST), clock=lambda: now[0])
    assert not b.try_acquire_or_renew()  # first sight of the record: not expired yet
    now[0] += FAST["lease_duration"] + 1
    assert not b.try_acquire_or_renew()  # the PUT carried the stale resourceVersion: 409, lost
    assert not b.is_leader()
    assert holder(cluster, namespace, "race") == "cand-a"


def test_leader_cut_off_is_fenced_before_the_standby_takes_over(cluster, namespace):
    kube = api(cluster)
    cut = threading.Event()

    class Flaky:  # the leader's connection to the API server, cut on demand
        def request(self, method, path, **kwargs):
            if cut.is_set():
                raise ApiError(503, "connection to the API server failed: cut by the test", method, path)
            return kube.request(method, path, **kwargs)

    a = LeaderElector(Flaky(), LeaseConfig(namespace, "fence", "cand-a", **FAST))
    b = LeaderElector(kube, LeaseConfig(namespace, "fence", "cand-b", **FAST))
    fenced_at: list[float] = []
    a.on_stopped = lambda: fenced_at.append(time.monotonic())
    ta = a.start()
    wait_for(a.is_leader, 10, "a to lead")
    tb = b.start()
    try:
        time.sleep(1)
        assert a.is_leader() and not b.is_leader()
        cut.set()
        cut_at = time.monotonic()
        # the write fence: a refuses to write once it could not renew for renew_deadline
        wait_for(lambda: not a.is_leader(), 10, "a to stop leading")
        fenced = time.monotonic() - cut_at
        wait_for(b.is_leader, 15, "b to take over")
        took_over = time.monotonic() - cut_at
        guarded = Kube(kube.configuration, write_guard=a.is_leader)
        with pytest.raises(NotLeader):  # what a's operator would send is refused before it leaves
            guarded.request("POST", "/api/v1/namespaces/x/configmaps", body={})
        assert fenced <= FAST["renew_deadline"] + FAST["retry_period"] + 0.5, fenced
        assert took_over >= fenced, (fenced, took_over)  # never two writers
        # b waited for the lease to expire on its own clock (the record stopped changing at a's last renew)
        assert took_over >= FAST["lease_duration"] - FAST["retry_period"] - 0.5, took_over
        assert took_over <= FAST["lease_duration"] + 2 * FAST["retry_period"] + 1.0, took_over
        assert fenced_at, "a's on_stopped (the runner exits there) was not called"
        print(f"\nleader cut off: fenced after {fenced:.2f} s, standby led after {took_over:.2f} s")
        record(
            "leader_cut_off",
            {"fenced_s": round(fenced, 2), "standby_led_s": round(took_over, 2), "timings_s": FAST},
        )
    finally:
        a.stop()
        b.stop()
        ta.join(timeout=10)
        tb.join(timeout=10)


# ---- 2. two operator processes --------------------------------------------------------------------


def _samples(proc: OperatorProcess, name: str) -> float:
    return sum(v for (n, _), v in proc.samples().items() if n == name)


def _status_managers(obj: dict) -> set[str]:
    return {
        m["manager"] for m in obj["metadata"].get("managedFields", []) if m.get("subresource") == "status"
    }


def _cr(name: str) -> dict:
    doc = on_fake_cpu_node(sample("tiny-cpu.yaml"))
    doc["metadata"] = {"name": name}
    return doc


def test_two_operators_one_reconciles_and_the_standby_takes_over_a_sigkill(
    cluster, crd, namespace, tmp_path, record_property
):
    a = OperatorProcess(cluster.kubeconfig, [namespace], tmp_path / "op-a.log", identity="op-a").start()
    wait_for(lambda: holder(cluster, namespace) == "op-a", 30, "op-a to lead")
    b = OperatorProcess(cluster.kubeconfig, [namespace], tmp_path / "op-b.log", identity="op-b").start()
    try:
        assert a.healthz()["leader"] is True and b.healthz()["leader"] is False
        assert b.healthz()["holder"] == "op-a"
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(_cr("ha")))

        def ready(generation: int | None = None):
            obj = get_json(cluster, "dd", "ha", "-n", namespace, "--show-managed-fields") or {}
            st = obj.get("status") or {}
            conds = {c["type"]: c for c in st.get("conditions", [])}
            gen = obj.get("metadata", {}).get("generation")
            if conds.get("Ready", {}).get("status") == "True" and st.get("observedGeneration") == gen:
                return obj if generation is None or gen == generation else None
            return None

        obj = wait_for(ready, 90, "dd/ha Ready")
        # exactly one reconciled: the leader's status writes only; the standby sent no write at all
        assert _status_managers(obj) == {status_manager("op-a")}, obj["metadata"]["managedFields"]
        assert a.writes() > 0
        assert b.writes() == 0
        assert _samples(a, "diffusion_operator_leader") == 1 and _samples(b, "diffusion_operator_leader") == 0
        assert _samples(b, "diffusion_operator_reconciles_total") == 0

        # SIGKILL the leader: no release; the standby waits out the lease on its own clock
        assert a.proc is not None
        killed = time.monotonic()
        os.killpg(a.proc.pid, signal.SIGKILL)
        a.proc.wait(timeout=10)
        wait_for(lambda: holder(cluster, namespace) == "op-b", 40, "op-b to take the lease", interval=0.1)
        takeover = time.monotonic() - killed
        # a change made right away is reconciled by the new leader
        cluster.kubectl("patch", "dd", "ha", "-n", namespace, "--type=merge", "-p", '{"spec":{"replicas":2}}')
        generation = get_json(cluster, "dd", "ha", "-n", namespace)["metadata"]["generation"]
        obj = wait_for(lambda: ready(generation), 60, "the change reconciled by op-b", interval=0.1)
        reconciled = time.monotonic() - killed
        assert status_manager("op-b") in _status_managers(obj)
        assert b.healthz()["leader"] is True and _samples(b, "diffusion_operator_leader") == 1
        assert b.writes() > 0
        duration = 15.0  # the runner's default lease duration (client-go's), used by both processes
        assert takeover <= duration + 2 * 2.0 + 2.0, takeover  # lease duration + retry periods + polling
        record_property("takeover_s", round(takeover, 2))
        record_property("change_reconciled_after_kill_s", round(reconciled, 2))
        record(
            "sigkill_two_processes",
            {
                "takeover_s": round(takeover, 2),
                "change_reconciled_after_kill_s": round(reconciled, 2),
                "timings_s": {"lease_duration": 15.0, "renew_deadline": 10.0, "retry_period": 2.0},
            },
        )
        print(
            f"\nSIGKILL of the leader: op-b held the lease {takeover:.1f} s later (lease duration 15 s, "
            f"retry 2 s); the change made then was reconciled {reconciled:.1f} s after the kill"
        )

        # a lease taken away: the leader exits at once (writes fenced), to restart as a standby
        current = lease(cluster, namespace)
        current["spec"].update(holderIdentity="intruder", renewTime=micro_time(), leaseDurationSeconds=60)
        cluster.kubectl("replace", "-f", "-", input=json.dumps(current))
        assert b.proc is not None
        code = b.proc.wait(timeout=20)
        assert code == EXIT_LEASE_LOST, b.log()[-2000:]
        assert "leader lease lost" in b.log()
    finally:
        a.stop()
        b.stop()
    for proc in (a, b):
        log = proc.log()
        assert "Traceback" not in log and "crashed" not in log, log[-3000:]


def test_a_restarted_instance_with_its_identity_takes_its_lease_back_at_once(
    cluster, crd, namespace, tmp_path
):
    """A container restarted by the kubelet keeps its pod name (the identity): after a SIGKILL it leads
    again at once instead of waiting out the lease duration (its former self is certainly gone)."""
    first = OperatorProcess(cluster.kubeconfig, [namespace], tmp_path / "first.log", identity="pod-x").start()
    wait_for(lambda: holder(cluster, namespace) == "pod-x", 30, "pod-x to lead")
    assert first.proc is not None
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(timeout=10)
    restarted_at = time.monotonic()
    again = OperatorProcess(cluster.kubeconfig, [namespace], tmp_path / "again.log", identity="pod-x").start()
    try:
        wait_for(lambda: again.healthz()["leader"], 30, "pod-x to lead again", interval=0.1)
        took = time.monotonic() - restarted_at
        assert took < 15.0, took  # well within the (default 15 s) lease duration: not waited out
        print(f"\nrestart with the same identity: leading {took:.1f} s after the process start")
    finally:
        again.stop()
