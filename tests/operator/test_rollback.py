"""Automatic rollback (controller/rollback.py): the pure decision, the store of the last good revision,
the status it writes, then the reconciler against the in-memory API server (fakekube.py): a new
revision whose pod fails is undone, the spec stays as written, the failing revision is not retried
until the spec changes, and a restarted operator holds the same decision.
(tests/operator/test_rollback_cluster.py: the same on the local control plane.)"""

from __future__ import annotations

import copy

from diffusion_operator import status as st
from diffusion_operator.controller import Reconciler, rollback
from diffusion_operator.controller.informers import pod_gate_view
from diffusion_runtime.contract.lines import GATE_FAILED
from test_reconciler import NS, conditions, cr, cr_doc, deployment, roll_out, setup, update_spec

GATE = {"prompts": ["a cat"], "seeds": [0], "minPSNR": 45.0}
FIGURES = f"{GATE_FAILED}PSNR 31.20 dB < min 45 (worst of 1 canaries, optimized vs plain pipeline)"
MISSING = "model file:///models/nope: folder /models/nope does not exist"
NOW = "2026-01-02T10:00:00Z"


def pod(
    name: str, rs: str, *, ready: bool = False, message: str | None = None, reason: str = "Error"
) -> dict:
    """A serving pod as the kubelet reports it: Ready, or crash-looping with `message` (the runtime's last
    line), of ReplicaSet `rs`."""
    cs: dict = {"name": "runtime", "ready": ready, "restartCount": 0, "state": {"running": {}}}
    if message is not None:
        cs.update(
            restartCount=1,
            state={"waiting": {"reason": "CrashLoopBackOff"}},
            lastState={"terminated": {"exitCode": 1, "reason": reason, "message": message}},
        )
    return {
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"diffusion.dev/deployment": "tiny", rollback.POD_TEMPLATE_HASH: rs},
            "annotations": {},
        },
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [cs],
        },
    }


def good(revision: str = "r1", hashes: frozenset[str] = frozenset({"aaa"})) -> rollback.LastGood:
    return rollback.LastGood(
        revision, "s1", 1, "c1", "tag1", hashes, {"kind": "ConfigMap"}, {"kind": "Deployment"}
    )


# ---- the decision ------------------------------------------------------------------------------


def test_nothing_to_go_back_to_applies_the_desired_revision():
    views = [pod_gate_view(pod("p", "bbb", message=MISSING))]
    assert rollback.decide("s2", 2, "r2", None, None, views, NOW).action == rollback.APPLY


def test_a_failing_pod_of_the_new_revision_rolls_back_with_its_own_words():
    views = [pod_gate_view(pod("old", "aaa", ready=True)), pod_gate_view(pod("new", "bbb", message=FIGURES))]
    decision = rollback.decide("s2", 2, "r2", good(), None, views, NOW)
    assert decision.action == rollback.ROLLBACK
    record = decision.record
    assert record is not None
    assert record["reason"] == "QualityGateFailed"
    assert record["message"] == f"pod new: {FIGURES}"
    assert (record["failedSpecHash"], record["failedGeneration"], record["failedRevision"]) == ("s2", 2, "r2")
    assert (record["restoredRevision"], record["restoredGeneration"]) == ("r1", 1)
    assert record["failedPodHashes"] == ["bbb"] and record["active"] is True


def test_a_crash_of_the_good_revisions_pod_or_an_eviction_is_no_reason_to_roll_back():
    crashed_old = pod_gate_view(pod("old", "aaa", message=MISSING))
    assert rollback.decide("s2", 2, "r2", good(), None, [crashed_old], NOW).action == rollback.APPLY
    evicted = pod("new", "bbb")
    evicted["status"] = {"phase": "Failed", "reason": "Evicted", "message": "the node was low on memory"}
    assert (
        rollback.decide("s2", 2, "r2", good(), None, [pod_gate_view(evicted)], NOW).action == rollback.APPLY
    )
    starting = pod_gate_view(pod("new", "bbb"))  # running, not ready yet: warming up
    assert rollback.decide("s2", 2, "r2", good(), None, [starting], NOW).action == rollback.APPLY


def test_the_good_revision_itself_is_never_rolled_back():
    views = [pod_gate_view(pod("new", "bbb", message=MISSING))]
    assert rollback.decide("s1", 1, "r1", good(), None, views, NOW).action == rollback.APPLY


def test_a_rollback_is_held_until_the_spec_changes_and_old_failures_are_not_blamed_on_the_next():
    views = [pod_gate_view(pod("new", "bbb", message=MISSING))]
    record = rollback.decide("s2", 2, "r2", good(), None, views, NOW).record
    assert record is not None
    # the failing pod went (the restored ReplicaSet serves): still held, the same spec is not retried
    held = rollback.decide("s2", 2, "r2", good(), record, [], NOW)
    assert held.action == rollback.HOLD and held.record == record
    # a new spec: applied; a pod of the failed ReplicaSet still failing is not the new revision's
    after = rollback.decide("s3", 3, "r3", good(), record, views, NOW)
    assert after.action == rollback.APPLY
    newer = [pod_gate_view(pod("newer", "ccc", message=FIGURES))]
    assert rollback.decide("s3", 3, "r3", good(), record, newer, NOW).action == rollback.ROLLBACK
    # a record no longer active (the spec changed since) never holds
    assert (
        rollback.decide("s2", 2, "r2", good(), {**record, "active": False}, [], NOW).action == rollback.APPLY
    )


def test_the_store_round_trips_and_belongs_to_its_cr():
    owner = {"apiVersion": "diffusion.dev/v1alpha1", "kind": "DiffusionDeployment"}
    owner["metadata"] = {"name": "tiny", "namespace": NS, "uid": "u1"}
    kept = good(hashes=frozenset({"aaa", "bbb"}))
    obj = rollback.build_store(owner, kept)
    assert obj["metadata"]["name"] == "tiny-last-good"
    assert obj["metadata"]["ownerReferences"][0]["uid"] == "u1"
    back = rollback.parse_store(obj, owner)
    assert back == kept and back is not None and back.configmap == kept.configmap
    other = copy.deepcopy(owner)
    other["metadata"]["uid"] = "u2"  # a new CR of the same name
    assert rollback.parse_store(obj, other) is None
    broken = copy.deepcopy(obj)
    broken["data"]["configmap"] = "{not json"
    assert rollback.parse_store(broken, owner) is None


def conds(status: dict) -> dict:
    return {c["type"]: c for c in status.get("conditions", [])}


def test_status_says_rolled_back_then_spec_changed():
    views = [pod_gate_view(pod("new", "bbb", message=FIGURES))]
    decision = rollback.decide("s2", 2, "r2", good(), None, views, NOW)
    base = {"conditions": [st.condition(st.QUALITY_GATE, True, "Passed", "ok", 2)], "cacheTag": "tag2"}
    out = rollback.with_rollback(base, {}, decision, 2, decision.good)
    cond = conds(out)[rollback.ROLLED_BACK]
    assert (cond["status"], cond["reason"]) == ("True", "QualityGateFailed")
    assert "PSNR 31.20 dB < min 45" in cond["message"] and "generation 2 failed" in cond["message"]
    assert "configuration of generation 1" in cond["message"]
    gate = conds(out)[st.QUALITY_GATE]
    assert gate["status"] == "False" and "PSNR 31.20" in gate["message"]
    assert out["cacheTag"] == "tag1" and out["rollback"]["active"] is True
    serving = {"conditions": [st.condition(st.READY, True, "AllReplicasReady", "1/1 pods ready", 2)]}
    ready = conds(rollback.with_rollback(serving, {}, decision, 2, decision.good))[st.READY]
    assert ready["message"] == "1/1 pods ready; rolled back to generation 1's configuration (see RolledBack)"
    later = rollback.with_rollback({"conditions": []}, out, rollback.Decision(rollback.APPLY), 3, None)
    cond = conds(later)[rollback.ROLLED_BACK]
    assert (cond["status"], cond["reason"]) == ("False", "SpecChanged")
    assert later["rollback"]["active"] is False
    # nothing ever rolled back: no condition at all
    assert rollback.with_rollback({"conditions": []}, {}, rollback.Decision(rollback.APPLY), 1, None) == {
        "conditions": []
    }


# ---- the reconciler ----------------------------------------------------------------------------


def serving(kube, rec) -> tuple[dict, dict]:
    """A tiny CR with the quality gate, rolled out, its pod Ready: the last good revision is kept."""
    doc = cr_doc()
    doc["spec"]["qualityGate"] = GATE
    kube.create(doc)
    rec.drain()
    roll_out(kube)
    rec.on_pod_event("ADDED", pod("tiny-aaa-1", "aaa", ready=True))
    rec.drain()
    assert conditions(cr(kube))["Ready"]["status"] == "True"
    store = kube.get("v1", "ConfigMap", NS, "tiny-last-good")
    assert store is not None and store["data"]["podHashes"] == "aaa"
    return cr(kube), kube.get("v1", "ConfigMap", NS, "tiny-config")


def bad_cache_setting(kube) -> dict:
    spec = copy.deepcopy(cr(kube)["spec"])
    spec["cacheDit"] = {"cache_config": {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.5}}
    update_spec(kube, "tiny", spec)
    return spec


def test_a_revision_that_fails_the_gate_is_rolled_back_and_not_retried_until_the_spec_changes():
    kube, rec = setup()
    before, configmap = serving(kube, rec)
    good_template = deployment(kube)["spec"]["template"]
    spec = bad_cache_setting(kube)
    rec.drain()
    assert deployment(kube)["spec"]["template"] != good_template  # the new revision is rolled out
    rec.on_pod_event("DELETED", pod("tiny-aaa-1", "aaa", ready=True))  # maxSurge 0: the old pod goes first
    rec.on_pod_event("ADDED", pod("tiny-bbb-1", "bbb", message=FIGURES))
    rec.drain()

    after = cr(kube)
    assert after["spec"] == spec  # as the user wrote it
    assert deployment(kube)["spec"]["template"] == good_template
    assert kube.get("v1", "ConfigMap", NS, "tiny-config")["data"] == configmap["data"]
    assert after["status"]["configHash"] == before["status"]["configHash"]
    cond = conditions(after)[rollback.ROLLED_BACK]
    assert cond["status"] == "True" and cond["reason"] == "QualityGateFailed"
    assert "PSNR 31.20 dB < min 45" in cond["message"]
    assert after["status"]["rollback"]["failedGeneration"] == after["metadata"]["generation"]
    events = [e for e in kube.events if e["reason"] == rollback.ROLLED_BACK]
    assert len(events) == 1 and "PSNR 31.20" in events[0]["message"]

    # the restored revision serves again; resyncs, restarts of the failing pod: no retry, no write
    roll_out(kube)
    rec.on_pod_event("MODIFIED", pod("tiny-bbb-1", "bbb", message=FIGURES))
    rec.on_pod_event("ADDED", pod("tiny-aaa-2", "aaa", ready=True))
    rec.on_pod_event("DELETED", pod("tiny-bbb-1", "bbb", message=FIGURES))
    rec.drain()
    assert conditions(cr(kube))["Ready"]["status"] == "True"
    writes = kube.total_writes()
    rec.resync([NS])
    rec.drain()
    fresh = Reconciler(kube, child_delay=0.05)  # an operator restart: empty caches, same decision
    fresh.resync([NS])
    fresh.drain()
    assert kube.total_writes() == writes, kube.writes
    assert deployment(kube)["spec"]["template"] == good_template
    assert len([e for e in kube.events if e["reason"] == rollback.ROLLED_BACK]) == 1

    # a new spec is rolled out (the user's next try), and RolledBack says why it is False now
    spec["cacheDit"]["cache_config"]["residual_diff_threshold"] = 0.05
    update_spec(kube, "tiny", spec)
    rec.drain()
    assert deployment(kube)["spec"]["template"] != good_template
    cond = conditions(cr(kube))[rollback.ROLLED_BACK]
    assert (cond["status"], cond["reason"]) == ("False", "SpecChanged")


def test_an_operator_killed_between_the_record_and_the_restore_holds_after_its_restart():
    kube, rec = setup()
    serving(kube, rec)
    good_template = deployment(kube)["spec"]["template"]
    bad_cache_setting(kube)
    rec.drain()
    kube.refuse("PATCH", "Deployment", 500, "killed")  # the restore never lands
    rec.on_pod_event("ADDED", pod("tiny-bbb-1", "bbb", message=MISSING))
    rec.drain(timeout=2)
    assert cr(kube)["status"]["rollback"]["active"] is True  # recorded first
    assert deployment(kube)["spec"]["template"] != good_template
    kube.allow("PATCH", "Deployment")
    rec.stop()

    fresh = Reconciler(kube, child_delay=0.05)  # no pod seen yet: the record alone decides
    fresh.resync([NS])
    fresh.drain()
    assert deployment(kube)["spec"]["template"] == good_template
    cond = conditions(cr(kube))[rollback.ROLLED_BACK]
    assert cond["status"] == "True" and cond["reason"] == "CrashLoopBackOff" and MISSING in cond["message"]
    assert len([e for e in kube.events if e["reason"] == rollback.ROLLED_BACK]) == 1


def test_a_cr_that_never_served_is_not_rolled_back():
    kube, rec = setup()
    kube.create(cr_doc())
    rec.drain()
    template = deployment(kube)["spec"]["template"]
    rec.on_pod_event("ADDED", pod("tiny-aaa-1", "aaa", message=MISSING))
    rec.drain()
    assert kube.get("v1", "ConfigMap", NS, "tiny-last-good") is None
    assert deployment(kube)["spec"]["template"] == template
    assert rollback.ROLLED_BACK not in conditions(cr(kube))
    assert conditions(cr(kube))["Ready"]["reason"] == "CrashLoopBackOff"


def test_only_a_revision_that_serves_is_kept():
    ready = {"conditions": [st.condition(st.READY, True, "AllReplicasReady", "1/1 pods ready", 1)]}
    waiting = {"conditions": [st.condition(st.READY, False, "WaitingForReady", "0/1", 1)]}
    apply = rollback.Decision(rollback.APPLY)
    dep = {"spec": {"replicas": 1}}
    assert rollback.should_save(apply, ready, "r2", dep)
    assert not rollback.should_save(apply, waiting, "r2", dep)
    assert not rollback.should_save(apply, ready, "r2", {"spec": {"replicas": 0}})  # a model downloading
    assert not rollback.should_save(rollback.Decision(rollback.APPLY, good=good("r2")), ready, "r2", dep)
    assert not rollback.should_save(rollback.Decision(rollback.HOLD, {}, good()), ready, "r2", dep)


def test_a_serving_cr_without_failing_pods_costs_no_extra_api_read():
    kube, rec = setup()
    serving(kube, rec)
    before = kube.reads[("GET", "ConfigMap")]
    rec.on_pod_event("MODIFIED", pod("tiny-aaa-1", "aaa", ready=True))
    rec.resync([NS])
    rec.drain()
    # the resync lists the children by label (no GET per child), the last good revision not read at all
    assert kube.reads[("GET", "ConfigMap")] == before
