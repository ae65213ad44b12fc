"""The quality gate with real pods: a cache setting that fails it never replaces the serving pods (and
the operator rolls it back).

The in-cluster operator (chart), the runtime image built from the Dockerfile, the tiny model from the
CR's pvc:// source (fixtures of test_cluster_realpods.py). Thresholds are set for the random-weight
tiny model (its mild static mask gives about 49 dB, a mask caching 6 of 8 steps about 42 dB).
"""

from __future__ import annotations

import copy
import json

import pytest
from diffusion_dev import wait_for
from test_cluster_realpods import (  # noqa: F401
    _apply,
    _diagnose,
    _json,
    _pods,
    _post,
    _sample,
    operator_release,
    workload_ns,
)

pytestmark = pytest.mark.cluster

GATE = {"prompts": ["a photo of a cat", "a red car"], "seeds": [0], "minPSNR": 45.0, "minSSIM": 0.99}


def _conditions(cluster, ns, name) -> dict:
    dd = _json(cluster, "get", "dd", name, "-n", ns)
    return {c["type"]: c for c in dd.get("status", {}).get("conditions", [])}


def test_a_failing_setting_leaves_the_old_pods_serving_and_reports_the_figures(
    cluster,
    node,
    workload_ns,  # noqa: F811 - the fixture imported above
    operator_release,  # noqa: F811
):
    ns = workload_ns
    good = _sample()
    good["spec"]["qualityGate"] = GATE
    good["spec"]["rollout"] = {"maxSurge": 1}  # with the gate: maxUnavailable 0
    name = good["metadata"]["name"]
    _apply(cluster, ns, good)

    def gate_is(status):
        def check():
            c = _conditions(cluster, ns, name)
            ok = c.get("QualityGate", {}).get("status") == status
            return c if ok and (status != "True" or c.get("Ready", {}).get("status") == "True") else None

        return check

    try:
        wait_for(gate_is("True"), 600, f"dd/{name} QualityGate=True", interval=2)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{_diagnose(cluster, ns)}") from None
    (serving,) = _pods(cluster, ns, name)
    url = f"{cluster.service_url(ns, name)}/v1/images/generations"
    assert _post(url)[0] == 200

    bad = copy.deepcopy(good)
    bad["spec"]["cacheDit"]["cache_config"].update(
        steps_computation_mask=[1, 0, 0, 0, 0, 0, 0, 1], max_warmup_steps=1
    )
    _apply(cluster, ns, bad)
    try:
        conds = wait_for(
            lambda: (c := gate_is("False")()) and c.get("RolledBack", {}).get("status") == "True" and c,
            600,
            f"dd/{name} QualityGate=False and RolledBack",
            interval=2,
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{_diagnose(cluster, ns)}") from None
    message = conds["QualityGate"]["message"]
    assert "PSNR" in message and "< min 45" in message and "SSIM" in message, message
    # the operator rolled the failing revision back (controller/rollback.py): the old pod, never
    # taken down (a surge with maxUnavailable 0), still serves; the new one never turned Ready
    rolled = conds["RolledBack"]
    assert (rolled["status"], rolled["reason"]) == ("True", "QualityGateFailed"), rolled
    assert "quality gate failed: PSNR" in rolled["message"], rolled
    pods = {p["metadata"]["name"]: p for p in _pods(cluster, ns, name)}
    assert serving["metadata"]["name"] in pods
    old = pods[serving["metadata"]["name"]]
    assert old["status"]["containerStatuses"][0]["ready"]
    for _ in range(3):
        assert _post(url)[0] == 200
    new = [p for n, p in pods.items() if n != serving["metadata"]["name"]]
    assert not any(p["status"]["containerStatuses"][0].get("ready") for p in new)
    for reason in ("QualityGateFailed", "RolledBack"):
        events = _json(cluster, "get", "events", "-n", ns, "--field-selector", f"reason={reason}")["items"]
        assert len(events) == 1, json.dumps(events)[:2000]
    wait_for(lambda: len(_pods(cluster, ns, name)) == 1 or None, 120, "the failing pod gone", interval=2)

    # back to the good setting: Ready with the gate passed, the failing pod gone
    _apply(cluster, ns, good)
    wait_for(gate_is("True"), 600, f"dd/{name} QualityGate=True again", interval=2)
    wait_for(lambda: len(_pods(cluster, ns, name)) == 1 or None, 120, "one pod left", interval=2)
    assert _post(url)[0] == 200
