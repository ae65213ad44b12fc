"""The restart scenario of issue 22, shared by the cluster test (test_operator_robustness.py) and the
benchmark (bench/operator_restart.py): SIGKILL of the leading operator while 50 CRs are being created,
then either the same instance restarted (same identity: it takes its own Lease back at once) or a
standby already running (another identity: it waits the Lease out) -> every CR Ready.

Times are on the unix clock of this machine (the operator's own `startup_phase` metric is too):
`restart_s` from the new process's start (same identity) or from the moment the standby holds the
Lease (takeover; the Lease wait before that is `lease_wait_s`, from the kill) to the last CR Ready."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from diffusion_dev import on_fake_cpu_node, wait_for
from diffusion_operator.api.group import API_VERSION, KIND
from diffusion_operator.controller.rollback import LAST_GOOD_SUFFIX
from diffusion_operator.kube import Kube
from op_helpers import OperatorProcess, sample

CHILD_KINDS = (
    ("v1", "ConfigMap"),
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("policy/v1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
)
MANAGED_BY = "diffusion-operator"
LAST_GOOD_KEY = "ConfigMap (last good revision)"


def api(kubeconfig: Path) -> Kube:
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    return Kube(configuration)


def conditions(obj: dict) -> dict:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}


def converged(obj: dict) -> bool:
    cond = conditions(obj)
    return (
        (obj.get("status") or {}).get("observedGeneration") == obj["metadata"]["generation"]
        and cond.get("Ready", {}).get("status") == "True"
        and cond.get("Synced", {}).get("status") == "True"
    )


def crs(count: int) -> list[dict]:
    items = []
    for i in range(count):
        doc = on_fake_cpu_node(sample("tiny-cpu.yaml"))  # fake pods (kwok)
        doc["metadata"] = {"name": f"crash-{i}"}
        items.append(doc)
    return items


def phases(proc: OperatorProcess) -> dict[str, float]:
    """The operator's own start-up phase timestamps (unix seconds), from its /metrics."""
    return {
        dict(labels)["phase"]: value
        for (name, labels), value in proc.samples().items()
        if name == "diffusion_operator_startup_phase_timestamp_seconds"
    }


def request_costs(proc: OperatorProcess) -> dict[str, dict]:
    """Requests to the API server by verb: count and mean seconds (the operator's histogram)."""
    samples = proc.samples()
    out: dict[str, dict] = {}
    for (name, labels), value in samples.items():
        verb = dict(labels).get("verb")
        if name == "diffusion_operator_api_request_duration_seconds_count" and value:
            total = samples[("diffusion_operator_api_request_duration_seconds_sum", labels)]
            out[str(verb)] = {"count": int(value), "mean_s": round(total / value, 4)}
    return out


def children_by_owner(kube: Kube, namespace: str, uids: dict[str, str]) -> dict[str, list[str]]:
    """For each child kind, the owning CR's name of every managed child (an owner not in `uids`, or
    not exactly one controller reference, is reported by name). The rollback's record of the last good
    revision (ConfigMap `<name>-last-good`, written once a revision serves) is its own entry."""
    out: dict[str, list[str]] = {}
    for api_version, kind in CHILD_KINDS:
        owners = []
        stores = []
        for child in kube.list(api_version, kind, namespace):
            meta = child["metadata"]
            if (meta.get("labels") or {}).get("app.kubernetes.io/managed-by") != MANAGED_BY:
                continue
            if kind == "ConfigMap" and meta["name"].endswith(LAST_GOOD_SUFFIX):
                refs = [r for r in meta.get("ownerReferences") or [] if r.get("controller")]
                ok = len(refs) == 1 and refs[0]["uid"] in uids
                stores.append(uids[refs[0]["uid"]] if ok else f"orphan:{meta['name']}")
                continue
            refs = [r for r in meta.get("ownerReferences") or [] if r.get("controller")]
            if len(refs) != 1 or refs[0]["uid"] not in uids:
                owners.append(f"orphan:{meta['name']}")
            else:
                owners.append(uids[refs[0]["uid"]])
        out[kind] = sorted(owners)
        if stores:
            out[LAST_GOOD_KEY] = sorted(stores)
    return out


def sigkill_during_creation(
    kubeconfig: Path, namespace: str, workdir: Path, takeover: bool, count: int = 50, timeout: float = 180
) -> dict:
    """Run the scenario once; returns its figures (and the live processes' checks' inputs)."""
    kube = api(kubeconfig)
    path = kube.collection(API_VERSION, KIND, namespace)
    leader = OperatorProcess(kubeconfig, [namespace], workdir / "leader.log", identity="op-a").start()
    standby = None
    if takeover:
        standby = OperatorProcess(kubeconfig, [namespace], workdir / "standby.log", identity="op-b").start()
        assert standby.healthz()["leader"] is False
    items = crs(count)
    pool = ThreadPoolExecutor(4)
    try:
        created = [pool.submit(kube.request, "POST", path, body=doc) for doc in items]
        wait_for(
            lambda: kube.list("apps/v1", "Deployment", namespace),
            60,
            "the operator to start on the new CRs",
            interval=0.01,
        )
        assert leader.proc is not None
        os.killpg(leader.proc.pid, signal.SIGKILL)
        killed_at = time.time()
        leader.proc.wait(timeout=10)
        for future in created:
            future.result()
    finally:
        pool.shutdown()
        leader.stop()
    at_kill = kube.list(API_VERSION, KIND, namespace)
    record: dict = {
        "scenario": "standby takeover" if takeover else "same-identity restart",
        "crs": count,
        "ready_at_kill": sum(1 for o in at_kill if converged(o)),
        "deployments_at_kill": len(kube.list("apps/v1", "Deployment", namespace)),
    }
    if standby is None:
        started_at = time.time()
        new = OperatorProcess(kubeconfig, [namespace], workdir / "restarted.log", identity="op-a").start()
    else:
        new = standby
    try:
        wait_for(lambda: new.healthz()["leader"], timeout, "the new operator to lead", interval=0.05)
        phase = phases(new)
        if standby is not None:
            started_at = phase["leading"]  # the reference point of a takeover: the Lease is held
            record["lease_wait_s"] = round(phase["leading"] - killed_at, 2)

        def all_ready():
            objs = kube.list(API_VERSION, KIND, namespace)
            return objs if len(objs) == count and all(converged(o) for o in objs) else None

        objs = wait_for(all_ready, timeout, f"all {count} CRs Ready", interval=0.1)
        ready_at = time.time()
        phase = phases(new)
        record.update(
            restart_s=round(ready_at - started_at, 2),
            phases_s={k: round(v - started_at, 2) for k, v in sorted(phase.items(), key=lambda kv: kv[1])},
            requests=request_costs(new),
            # the new operator's own CPU seconds (the standby's include its wait)
            operator_cpu_s=round(new.samples().get(("process_cpu_seconds_total", ()), -1.0), 2),
        )
        uids = {o["metadata"]["uid"]: o["metadata"]["name"] for o in objs}
        record["children"] = children_by_owner(kube, namespace, uids)
        record["names"] = sorted(uids.values())
        for plural, prefix in (("replicasets", "/apis/apps/v1"), ("pods", "/api/v1")):
            listed = kube.request("GET", f"{prefix}/namespaces/{namespace}/{plural}") or {}
            record[plural] = len(listed.get("items") or [])
        new.assert_alive()
        record["log"] = new.log()
    finally:
        new.stop()
    return record
