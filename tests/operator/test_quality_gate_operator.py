"""spec.qualityGate: rendered into runtime.yaml, refused with its CR field, the rollout default it
implies, and the QualityGate condition from the serving pods (status units, then the reconciler
against the in-memory API server; tests/operator/test_quality_gate_cluster.py does it with real pods)."""

from __future__ import annotations

import copy

import pytest
import yaml
from diffusion_operator import builders, validation
from diffusion_operator import status as st
from diffusion_operator.api import funcs
from diffusion_operator.api.types import DiffusionDeployment
from diffusion_operator.builders.deployment import CONFIG_HASH_ANNOTATION
from diffusion_runtime.contract.config import config_from_dict, runtime_errors
from diffusion_runtime.contract.lines import GATE_FAILED as FAILED
from op_helpers import sample
from test_reconciler import NS, conditions, cr, cr_doc, roll_out, setup, update_spec

GATE = {"prompts": ["a cat"], "seeds": [0, 1], "minPSNR": 30.0, "minSSIM": 0.8}
FAILURE = f"{FAILED}PSNR 12.10 dB < min 30, SSIM 0.4000 < min 0.8 (worst of 2 canaries, optimized vs plain pipeline)"


def parsed(spec: dict) -> DiffusionDeployment:
    p = validation.parse("tiny", NS, spec)
    assert p.ok and p.cr is not None, p.errors
    return p.cr


def tiny_spec(**extra) -> dict:
    doc = sample("tiny-cpu.yaml")["spec"]
    doc.update(copy.deepcopy(extra))
    return doc


def runtime_yaml(spec: DiffusionDeployment) -> dict:
    cm = builders.build_all(spec, {"metadata": {"name": "tiny", "uid": "u"}, "apiVersion": "x", "kind": "y"})[
        0
    ]
    return yaml.safe_load(cm["data"]["runtime.yaml"])


def test_the_gate_renders_into_runtime_yaml_and_the_runtime_accepts_it():
    spec = parsed(tiny_spec(qualityGate=GATE))
    rendered = runtime_yaml(spec)
    assert rendered["quality_gate"] == {
        "prompts": ["a cat"],
        "seeds": [0, 1],
        "min_psnr": 30.0,
        "min_ssim": 0.8,
    }
    assert runtime_errors(config_from_dict(rendered), None, "cpu", None) == []


def test_disabled_or_absent_gate_renders_nothing():
    assert "quality_gate" not in runtime_yaml(parsed(tiny_spec()))
    assert "quality_gate" not in runtime_yaml(parsed(tiny_spec(qualityGate={**GATE, "enabled": False})))


def test_defaults_come_from_the_runtime():
    from diffusion_runtime.contract.config import QualityGateConfig

    rendered = runtime_yaml(parsed(tiny_spec(qualityGate={})))["quality_gate"]
    d = QualityGateConfig()
    assert rendered == {
        "prompts": d.prompts,
        "seeds": d.seeds,
        "min_psnr": d.min_psnr,
        "min_ssim": d.min_ssim,
    }


@pytest.mark.parametrize(
    "gate, field",
    [
        ({"minPSNR": -3}, "spec.qualityGate.minPSNR"),
        ({"minSSIM": 1.5}, "spec.qualityGate.minSSIM"),
        ({"size": "1000x1000"}, "spec.qualityGate.size"),  # the runtime's rule: multiples of 16
        ({"steps": 500}, "spec.qualityGate.steps"),  # above server.maxSteps (runtime rule)
        ({"prompts": ["a"] * 9, "seeds": [0, 1]}, "spec.qualityGate.seeds"),  # 18 canaries (runtime rule)
        ({"minPNSR": 30}, "spec.qualityGate.minPNSR"),
    ],
)
def test_refusals_name_the_cr_field(gate, field):
    p = validation.parse("tiny", NS, tiny_spec(qualityGate=gate))
    assert not p.ok
    assert any(e.field == field for e in p.errors), p.errors


def test_with_a_gate_and_room_to_surge_a_rollout_never_takes_a_serving_pod_down():
    surge = {"maxSurge": 1}
    assert funcs.max_unavailable(parsed(tiny_spec(qualityGate=GATE, rollout=surge)).spec) == 0
    assert funcs.max_unavailable(parsed(tiny_spec(rollout=surge)).spec) == 1  # no gate: the usual default
    assert (
        funcs.max_unavailable(parsed(tiny_spec(qualityGate=GATE)).spec) == 1
    )  # maxSurge 0: must take one down
    explicit = {"maxSurge": 1, "maxUnavailable": 1}
    assert (
        funcs.max_unavailable(parsed(tiny_spec(qualityGate=GATE, rollout=explicit)).spec) == 1
    )  # the user decides


# ---- the condition -----------------------------------------------------------------------------


def pod(name: str, config_hash: str, message: str | None = None, where: str = "lastState") -> dict:
    status: dict = {"containerStatuses": [{"name": "runtime"}]}
    if message is not None:
        status["containerStatuses"][0][where] = {"terminated": {"exitCode": 1, "message": message}}
    return {
        "metadata": {"name": name, "annotations": {CONFIG_HASH_ANNOTATION: config_hash}, "labels": {}},
        "status": status,
    }


def test_gate_failure_reads_the_runtimes_line_from_either_termination():
    assert st.gate_failure(pod("p", "h", FAILURE)) == FAILURE
    assert st.gate_failure(pod("p", "h", f"some log line\n{FAILURE}\n", where="state")) == FAILURE
    assert st.gate_failure(pod("p", "h", "model load failed: OSError: x")) is None
    assert st.gate_failure(pod("p", "h")) is None


def test_condition_false_with_the_figures_only_for_pods_of_the_current_config():
    old_failed = pod("old", "h0", FAILURE)
    cond = st.quality_gate_condition([old_failed, pod("new", "h1")], "h1", ready=False, generation=4)
    assert (cond["status"], cond["reason"]) == ("Unknown", "Pending")
    cond = st.quality_gate_condition([pod("new", "h1", FAILURE)], "h1", ready=False, generation=4)
    assert (cond["status"], cond["reason"]) == ("False", "Failed")
    assert "PSNR 12.10 dB < min 30" in cond["message"] and "pod new" in cond["message"]
    cond = st.quality_gate_condition([pod("new", "h1")], "h1", ready=True, generation=4)
    assert (cond["status"], cond["reason"]) == ("True", "Passed")


def test_valid_status_drops_the_condition_when_the_gate_is_off():
    dep = {"metadata": {"generation": 1}, "spec": {"replicas": 1}, "status": {"observedGeneration": 1}}
    on = st.valid_status({}, 2, 1, dep, "s", "e", "h1", "t", gate_pods=[pod("p", "h1", FAILURE)])
    assert {c["type"]: c["status"] for c in on["conditions"]}[st.QUALITY_GATE] == "False"
    off = st.valid_status(on, 3, 1, dep, "s", "e", "h1", "t")
    assert st.QUALITY_GATE not in {c["type"] for c in off["conditions"]}


# ---- the reconciler ----------------------------------------------------------------------------


def test_reconciler_reports_a_failed_gate_from_a_pod_event_and_recovers():
    kube, rec = setup()
    doc = cr_doc()
    doc["spec"]["qualityGate"] = GATE
    kube.create(doc)
    rec.drain()
    roll_out(kube)
    rec.drain()
    status = cr(kube)["status"]
    assert conditions(cr(kube))[st.QUALITY_GATE]["status"] == "True"
    config_hash = status["configHash"]

    # a new setting: its pod fails the gate (the runtime's line as the termination message)
    original = copy.deepcopy(cr(kube)["spec"])
    spec = copy.deepcopy(original)
    spec["cacheDit"] = {"cache_config": {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.5}}
    update_spec(kube, "tiny", spec)
    rec.drain()
    new_hash = cr(kube)["status"]["configHash"]
    assert new_hash != config_hash
    failing = {"kind": "Pod", **pod("tiny-new", new_hash, FAILURE)}
    failing["metadata"].update(namespace=NS, labels={"diffusion.dev/deployment": "tiny"})
    rec.on_pod_event("ADDED", failing)
    assert rec.drain() == 1
    cond = conditions(cr(kube))[st.QUALITY_GATE]
    assert cond["status"] == "False" and "PSNR 12.10 dB < min 30" in cond["message"]
    events = [e for e in kube.events if e["reason"] == "QualityGateFailed"]
    assert len(events) == 1 and "PSNR 12.10" in events[0]["message"]

    # the same failure again (a restart of the same pod): nothing new to do
    rec.on_pod_event("MODIFIED", failing)
    assert rec.drain() == 0

    # back to the old setting: the failing pod goes, the condition recovers
    update_spec(kube, "tiny", original)
    rec.on_pod_event("DELETED", failing)
    rec.drain()
    roll_out(kube)
    rec.drain()
    assert cr(kube)["status"]["configHash"] == config_hash
    assert conditions(cr(kube))[st.QUALITY_GATE]["status"] == "True"
