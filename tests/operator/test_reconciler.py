"""The reconciler's logic against the in-memory API server (fakekube.py): drift, removals, API errors,
event coalescing, restarts. Runs in seconds; tests/operator/test_operator_cluster.py proves the same
behaviours against the real control plane."""

from __future__ import annotations

import copy
import threading
import time

import pytest
from diffusion_operator.controller import Reconciler
from diffusion_operator.controller.apply import SPEC_HASH_ANNOTATION
from diffusion_operator.controller.workqueue import WorkQueue
from fakekube import FakeKube
from op_helpers import deliver_watch, sample

NS = "ns"
CHILDREN = ("ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy")


def cr_doc(name: str = "tiny", base: str = "tiny-cpu.yaml") -> dict:
    doc = sample(base)
    doc["metadata"] = {"name": name, "namespace": NS}
    return doc


def setup(child_delay: float = 0.05) -> tuple[FakeKube, Reconciler]:
    kube = FakeKube()
    rec = Reconciler(kube, child_delay=child_delay)
    deliver_watch(kube, rec)
    return kube, rec


def deployment(kube: FakeKube, name: str = "tiny") -> dict:
    obj = kube.get("apps/v1", "Deployment", NS, name)
    assert obj is not None
    return obj


def pod_spec(kube: FakeKube, name: str = "tiny") -> dict:
    return deployment(kube, name)["spec"]["template"]["spec"]


def cr(kube: FakeKube, name: str = "tiny") -> dict:
    obj = kube.get("diffusion.dev/v1alpha1", "DiffusionDeployment", NS, name)
    assert obj is not None
    return obj


def conditions(obj: dict) -> dict:
    return {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}


def update_spec(kube: FakeKube, name: str, spec: dict) -> None:
    """kubectl apply of a new spec: the user's manager owns (and replaces) spec."""

    def mutate(obj: dict) -> None:
        obj["spec"] = copy.deepcopy(spec)

    kube.edit("DiffusionDeployment", NS, name, mutate, manager="kubectl")


def roll_out(kube: FakeKube, name: str = "tiny", replicas: int = 1) -> None:
    """What the Deployment controller and kwok write, as separate status updates (a burst of events)."""
    gen = deployment(kube, name)["metadata"]["generation"]
    kube.set_status("Deployment", NS, name, {"observedGeneration": gen, "replicas": replicas})
    kube.set_status(
        "Deployment", NS, name, {"observedGeneration": gen, "replicas": replicas, "updatedReplicas": replicas}
    )
    kube.set_status(
        "Deployment",
        NS,
        name,
        {
            "observedGeneration": gen,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
        },
    )


def test_create_applies_every_child_once_and_the_burst_after_it_runs_one_reconcile():
    kube, rec = setup()
    kube.create(cr_doc())
    assert rec.drain() == 1  # the CR's ADDED event; the echoes of our own applies queue nothing
    assert {k for (verb, k) in kube.writes if verb == "APPLY"} == set(CHILDREN)
    assert (
        kube.total_writes() == len(CHILDREN) + 1
    )  # the applies + 1 status patch, no reads of absent children
    assert kube.reads[("GET", "Deployment")] == 0 and kube.reads[("GET", "DiffusionDeployment")] == 0
    dep = deployment(kube)
    assert dep["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
    assert conditions(cr(kube))["Ready"]["status"] == "False"

    roll_out(kube)  # three status updates in a row
    assert rec.drain() == 1
    obj = cr(kube)
    assert conditions(obj)["Ready"]["status"] == "True", obj["status"]
    assert conditions(obj)["Synced"]["status"] == "True"
    assert rec.reconciles == 2
    # quiet afterwards: nothing queued, and a fresh resync writes nothing
    writes = kube.total_writes()
    rec.resync([NS])
    assert rec.drain() == 1
    assert kube.total_writes() == writes


def test_a_spec_change_runs_one_reconcile_and_the_echoes_of_its_own_updates_queue_nothing():
    """An update of children that exist: the run records the versions it wrote, not the ones it read
    before writing, so the informer events of its own writes are echoes (no second, idle reconcile)."""
    kube, rec = setup()
    kube.create(cr_doc())
    assert rec.drain() == 1
    roll_out(kube)
    assert rec.drain() == 1
    runs = rec.reconciles
    update_spec(kube, "tiny", {**cr(kube)["spec"], "server": {**cr(kube)["spec"]["server"], "maxN": 3}})
    assert rec.drain() == 1  # the CR's own update; the Deployment and ConfigMap it rewrote are echoes
    assert rec.reconciles == runs + 1
    assert any(verb == "APPLY" and k == "Deployment" for verb, k in kube.writes)


def test_a_deployment_that_turns_ready_while_a_reconcile_runs_is_not_skipped_as_an_echo():
    """The Deployment controller writes its status while a reconcile runs (it read the Deployment
    before): that event's queued run must run, not be skipped as the echo of the reconcile's own
    writes, or status says 'waiting for pods' until the next resync (minutes) while the pod serves."""
    kube, rec = setup()
    kube.create(cr_doc())
    assert rec.drain() == 1
    patch_status = kube.patch_status
    raced = []

    def status_write_after_a_rollout(namespace: str, name: str, status: dict) -> dict:
        if not raced:  # the first status write of the run below: the pod turned Ready meanwhile
            raced.append(True)
            roll_out(kube)
        return patch_status(namespace, name, status)

    kube.patch_status = status_write_after_a_rollout  # type: ignore[method-assign]
    update_spec(
        kube, "tiny", {**cr(kube)["spec"], "replicas": 1, "server": {**cr(kube)["spec"]["server"], "maxN": 3}}
    )
    rec.drain()
    assert raced
    obj = cr(kube)
    assert conditions(obj)["Ready"]["status"] == "True", obj["status"]


# (CR spec mutation adding the field, where it shows in the pod spec)
REMOVABLE = {
    "gpu.product": (
        lambda s: s.update(gpu={"count": 1, "product": "NVIDIA-H100-80GB-HBM3"}, device="cuda"),
        lambda p: p.get("nodeSelector", {}).get("nvidia.com/gpu.product"),
    ),
    "template.resources": (
        lambda s: s["template"].update(resources={"limits": {"memory": "10Gi"}}),
        lambda p: p["containers"][0].get("resources", {}).get("limits", {}).get("memory"),
    ),
    "template.nodeSelector": (
        lambda s: s["template"].update(nodeSelector={"pool": "gpu"}),
        lambda p: p.get("nodeSelector"),
    ),
    "template.tolerations": (
        lambda s: s["template"].update(tolerations=[{"key": "team", "operator": "Exists"}]),
        lambda p: p.get("tolerations"),
    ),
    "template.affinity": (
        lambda s: s["template"].update(
            affinity={
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                        ]
                    }
                }
            }
        ),
        lambda p: p.get("affinity"),
    ),
    "template.serviceAccountName": (
        lambda s: s["template"].update(serviceAccountName="runner"),
        lambda p: p.get("serviceAccountName") == "runner",  # "default" when none is given
    ),
}


@pytest.mark.parametrize("field", sorted(REMOVABLE))
def test_a_field_removed_from_the_cr_leaves_the_deployment(field):
    add, seen = REMOVABLE[field]
    kube, rec = setup()
    doc = cr_doc()
    base_spec = copy.deepcopy(doc["spec"])
    if field == "template.resources":
        base_spec["template"].pop("resources")
    with_field = copy.deepcopy(base_spec)
    add(with_field)
    doc["spec"] = with_field
    kube.create(doc)
    rec.drain()
    assert seen(pod_spec(kube)), f"{field} did not reach the Deployment"

    update_spec(kube, "tiny", base_spec)
    rec.drain()
    assert not seen(pod_spec(kube)), f"{field} stayed in the Deployment: {pod_spec(kube)}"
    assert conditions(cr(kube))["ConfigValid"]["status"] == "True"
    assert cr(kube)["status"]["observedGeneration"] == 2


def test_child_events_that_change_nothing_a_reconcile_reads_queue_nothing():
    kube, rec = setup()
    kube.create(cr_doc())
    rec.drain()

    def revision(obj: dict) -> None:  # what the Deployment controller adds after a create
        obj["metadata"].setdefault("annotations", {})["deployment.kubernetes.io/revision"] = "1"

    kube.edit("Deployment", NS, "tiny", revision, manager="kube-controller-manager")
    kube.set_status("Deployment", NS, "tiny", {"conditions": [{"type": "Available", "status": "False"}]})
    assert len(rec.queue) == 0
    kube.set_status("Deployment", NS, "tiny", {"replicas": 1, "observedGeneration": 1})
    assert len(rec.queue) == 1  # replicas is read into the CR's status
    rec.drain()
    assert cr(kube)["status"]["replicas"] == 1


def test_edits_by_someone_else_are_put_back_and_their_additions_kept():
    kube, rec = setup()
    doc = cr_doc()
    doc["spec"]["template"]["nodeSelector"] = {"pool": "cpu"}
    kube.create(doc)
    rec.drain()
    image = pod_spec(kube)["containers"][0]["image"]

    def hack(obj: dict) -> None:
        spec = obj["spec"]["template"]["spec"]
        spec["containers"][0]["image"] = "registry.invalid/hacked:1"
        del spec["nodeSelector"]
        obj["metadata"].setdefault("annotations", {})["team"] = "ours"  # not a field the operator sets

    kube.edit("Deployment", NS, "tiny", hack, manager="kubectl-edit")
    rec.drain()
    spec = pod_spec(kube)
    assert spec["containers"][0]["image"] == image
    assert spec["nodeSelector"] == {"pool": "cpu"}
    assert deployment(kube)["metadata"]["annotations"]["team"] == "ours"
    # and no apply loop: the next passes write nothing
    writes = kube.total_writes()
    rec.resync([NS])
    rec.drain()
    assert kube.total_writes() == writes


# valid for the CRD and the operator (affinity is free-form), refused by the API server's validation
BAD_AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "Near"}]}]
        }
    }
}


def test_a_child_refused_as_invalid_is_a_condition_with_the_servers_message_and_one_event():
    kube, rec = setup()
    doc = cr_doc()
    doc["spec"]["template"]["affinity"] = BAD_AFFINITY
    kube.create(doc)
    rec.drain()
    obj = cr(kube)
    cond = conditions(obj)
    assert cond["Synced"]["status"] == "False" and cond["Synced"]["reason"] == "Invalid"
    assert "Deployment tiny: " in cond["Synced"]["message"]
    assert (
        'matchExpressions[0].operator: Invalid value: "Near": not a valid selector operator'
        in cond["Synced"]["message"]
    )
    assert cond["ConfigValid"]["status"] == "False" and cond["ConfigValid"]["reason"] == "RejectedByAPIServer"
    assert cond["Ready"]["status"] == "False"
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    assert [(e["type"], e["reason"]) for e in kube.events] == [("Warning", "ApplyFailed")]
    assert kube.events[0]["message"] == cond["Synced"]["message"]
    assert kube.get("apps/v1", "Deployment", NS, "tiny") is None
    assert len(rec.queue) == 1 and rec.queue.next_due() > 4  # tried again in 5 s, not in a loop

    # retries post no second event and write no status
    writes = kube.total_writes("DiffusionDeployment/status")
    for _ in range(3):
        rec.resync([NS])
        rec.drain()
    assert len(kube.events) == 1
    assert kube.total_writes("DiffusionDeployment/status") == writes

    fixed = copy.deepcopy(doc["spec"])
    fixed["template"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0]["matchExpressions"][0].update(operator="In", values=["a"])
    update_spec(kube, "tiny", fixed)
    rec.drain()
    cond = conditions(cr(kube))
    assert cond["Synced"]["status"] == "True" and cond["ConfigValid"]["status"] == "True"
    assert "nodeAffinity" in pod_spec(kube)["affinity"]


def test_the_fake_refuses_a_negative_quantity_like_the_api_server():
    kube = FakeKube()
    dep = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d", "namespace": NS},
        "spec": {
            "template": {"spec": {"containers": [{"name": "c", "resources": {"limits": {"memory": "-1"}}}]}}
        },
    }
    with pytest.raises(Exception) as refused:
        kube.apply(dep)
    assert getattr(refused.value, "status", None) == 422
    assert 'Deployment.apps "d" is invalid: spec.template.spec.containers[0].resources.limits[memory]' in str(
        refused.value
    )
    assert kube.get("apps/v1", "Deployment", NS, "d") is None


def test_a_refused_update_leaves_every_running_child_as_it_was():
    kube, rec = setup()
    kube.create(cr_doc())
    rec.drain()
    before = {k: kube.get("", k, NS, "tiny-config" if k == "ConfigMap" else "tiny") for k in CHILDREN}
    spec = cr_doc()["spec"]
    spec["cacheDit"]["cache_config"]["residual_diff_threshold"] = 0.3  # changes the ConfigMap too
    spec["template"]["affinity"] = BAD_AFFINITY
    update_spec(kube, "tiny", spec)
    rec.drain()
    after = {k: kube.get("", k, NS, "tiny-config" if k == "ConfigMap" else "tiny") for k in CHILDREN}
    assert after == before
    assert conditions(cr(kube))["Synced"]["reason"] == "Invalid"
    assert kube.writes[("DRYRUN", "ConfigMap")] >= 1


def test_forbidden_is_a_synced_condition_not_an_invalid_config():
    kube, rec = setup()
    kube.refuse(
        "PATCH",
        "PodDisruptionBudget",
        403,
        'poddisruptionbudgets.policy "tiny" is forbidden: User "op" cannot patch resource',
        reason="Forbidden",
    )
    kube.create(cr_doc())
    rec.drain()
    cond = conditions(cr(kube))
    assert cond["Synced"]["status"] == "False" and cond["Synced"]["reason"] == "Forbidden"
    assert "PodDisruptionBudget tiny: " in cond["Synced"]["message"]
    assert "cannot patch resource" in cond["Synced"]["message"]
    assert cond["ConfigValid"]["status"] == "True"
    assert len(kube.events) == 1
    kube.allow("PATCH", "PodDisruptionBudget")
    rec.resync([NS])
    rec.drain()
    assert conditions(cr(kube))["Synced"]["status"] == "True"
    assert kube.get("policy/v1", "PodDisruptionBudget", NS, "tiny") is not None


def test_transient_errors_are_retried_with_backoff():
    kube, rec = setup()
    kube.refuse("PATCH", "Service", 500, "etcdserver: request timed out")
    kube.create(cr_doc())
    rec.process(("ns", "tiny"))
    assert "Synced" not in conditions(cr(kube))  # not a condition: it retries
    assert len(rec.queue) == 1  # requeued with a delay
    kube.allow("PATCH", "Service")
    assert rec.drain() >= 1
    assert conditions(cr(kube))["Synced"]["status"] == "True"
    assert kube.get("v1", "Service", NS, "tiny") is not None


def test_a_transient_error_that_persists_is_reported_and_still_retried():
    kube, rec = setup()
    kube.refuse("PATCH", "Deployment", 500, "Internal error: failed to create typed patch object")
    kube.create(cr_doc())
    for attempt in range(1, 4):
        rec.process(("ns", "tiny"))
        synced = conditions(cr(kube)).get("Synced")
        assert (synced is not None) == (attempt >= 3), (attempt, synced)
    assert synced["reason"] == "HTTP500" and "failed to create typed patch object" in synced["message"]
    assert len(kube.events) == 1 and len(rec.queue) == 1  # and it goes on retrying
    kube.allow("PATCH", "Deployment")
    rec.drain()
    assert conditions(cr(kube))["Synced"]["status"] == "True"


def test_an_invalid_spec_writes_status_once_and_no_child():
    kube, rec = setup()
    doc = cr_doc()
    doc["spec"]["cacheDit"]["cache_config"]["steps_computation_mask"] = "fastest"  # no such policy
    kube.create(doc)
    rec.drain()
    cond = conditions(cr(kube))["ConfigValid"]
    assert cond["status"] == "False"
    assert cond["message"].startswith("spec.cacheDit.cache_config.steps_computation_mask"), cond
    assert [k for (_, k) in kube.writes] == ["DiffusionDeployment/status", "Event"]
    rec.resync([NS])
    rec.drain()
    assert kube.total_writes() == 2


def test_removing_autoscaling_deletes_the_hpa():
    kube, rec = setup()
    doc = cr_doc("qwen-image", "qwen-image.yaml")
    kube.create(doc)
    rec.drain()
    if kube.get("autoscaling/v2", "HorizontalPodAutoscaler", NS, "qwen-image") is None:
        pytest.fail(f"no HPA: {cr(kube, 'qwen-image').get('status')}")
    spec = copy.deepcopy(doc["spec"])
    del spec["autoscaling"]
    spec["replicas"] = 1
    update_spec(kube, "qwen-image", spec)
    rec.drain()
    assert kube.get("autoscaling/v2", "HorizontalPodAutoscaler", NS, "qwen-image") is None
    assert deployment(kube, "qwen-image")["spec"]["replicas"] == 1


def test_a_restarted_reconciler_writes_nothing_for_converged_crs_and_finishes_half_done_ones():
    kube, rec = setup()
    for i in range(3):
        kube.create(cr_doc(f"t{i}"))
    rec.drain()
    # a CR whose reconcile was killed half-way: its ConfigMap exists, nothing else, no status
    kube.create(cr_doc("half"))
    first = rec._reconcile  # noqa: SLF001 - simulate the kill after the first apply
    kube.refuse("PATCH", "Deployment", 500, "killed")
    rec.process(("ns", "half"))
    kube.allow("PATCH", "Deployment")
    assert kube.get("v1", "ConfigMap", NS, "half-config") is not None
    assert "status" not in cr(kube, "half")
    del first
    writes = kube.total_writes()

    fresh = Reconciler(kube, child_delay=0.05)  # a new process: empty caches
    fresh.resync([NS])
    fresh.drain()
    new_writes = kube.total_writes() - writes
    # "half" has no status yet, so it is applied whole without reading first (its ConfigMap again, an
    # idempotent apply); the converged CRs cost nothing
    assert new_writes == len(CHILDREN) + 1, kube.writes
    for name in ("t0", "t1", "t2", "half"):
        owned = [o for (kind, ns, n), o in kube.objects.items() if kind in CHILDREN and n.startswith(name)]
        assert len(owned) == len(CHILDREN), (name, owned)


def test_many_crs_created_at_once_converge_with_few_reconciles_each():
    kube, rec = setup(child_delay=0.05)
    rec.start(workers=4)
    try:
        for i in range(40):
            kube.create(cr_doc(f"c{i}"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (
            rec.queue.idle() and kube.total_writes("Deployment") == 40
        ):
            time.sleep(0.02)
        for i in range(40):
            roll_out(kube, f"c{i}")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ready = [conditions(cr(kube, f"c{i}"))["Ready"]["status"] for i in range(40)]
            if all(r == "True" for r in ready) and rec.queue.idle():
                break
            time.sleep(0.02)
        assert all(conditions(cr(kube, f"c{i}"))["Ready"]["status"] == "True" for i in range(40))
    finally:
        rec.stop()
    assert rec.reconciles <= 2 * 40, (rec.reconciles, rec.skipped)


# ---- the work queue ---------------------------------------------------------------------------------


def test_queue_folds_repeated_keys_and_reruns_a_key_added_while_running():
    q = WorkQueue()
    assert q.add("a") is True
    assert q.add("a") is False and q.add("a", delay=5) is False
    assert q.get(timeout=1) == "a"
    assert q.get(timeout=0.05) is None  # one run for three adds
    q.add("a")  # while running
    q.add("a")
    assert q.get(timeout=0.05) is None  # never twice at once
    q.done("a")
    assert q.get(timeout=1) == "a"  # once more after
    q.done("a")
    assert q.idle()


def test_queue_delay_and_an_earlier_add_wins():
    q = WorkQueue()
    q.add("k", delay=10)
    assert q.get(timeout=0.05) is None
    q.add("k", delay=0)
    assert q.get(timeout=1) == "k"
    q.done("k")
    q.close()
    assert q.get(timeout=1) is None


def test_queue_serves_several_workers():
    q = WorkQueue()
    seen: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        while (key := q.get(timeout=0.5)) is not None:
            with lock:
                seen.append(str(key))
            q.done(key)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(100):
        q.add(i % 10)
    for t in threads:
        t.join()
    assert set(seen) == {str(i) for i in range(10)} and len(seen) <= 100


def test_the_kopf_handlers_only_hand_events_to_the_reconciler():
    import asyncio

    import kopf
    from diffusion_operator import handlers

    kube, rec = setup()
    doc = kube.create(cr_doc())
    rec.drain()
    memo = kopf.Memo(reconciler=rec)
    child = kube.get("apps/v1", "Deployment", NS, "tiny")
    assert child is not None
    child["status"] = {"replicas": 1}
    child["metadata"]["resourceVersion"] = "99999"
    asyncio.run(handlers.on_child(event={"type": "MODIFIED", "object": child}, body=child, memo=memo))
    asyncio.run(handlers.on_diffusiondeployment(event={"type": None, "object": doc}, body=doc, memo=memo))
    assert len(rec.queue) == 1  # one key for both (the CR body was the version already seen)
    assert rec.reconciles == 1  # nothing ran in the handlers
    asyncio.run(
        handlers.on_diffusiondeployment(event={"type": "DELETED", "object": doc}, body=doc, memo=memo)
    )
    assert rec.cached_child("Deployment", NS, "tiny")["metadata"]["resourceVersion"] == "99999"
