"""spec.autoscaling: the demand signal, the two engines (hpa | keda), behavior, and the reconciler's
engine switching and missing-KEDA condition (pure builders + the in-memory API server)."""

from __future__ import annotations

import copy

import pytest
from diffusion_operator import builders, validation
from diffusion_operator.api import defaults, funcs
from diffusion_operator.api.types import DiffusionDeployment
from diffusion_operator.builders.keda import demand_query
from diffusion_operator.controller import Reconciler
from fakekube import FakeKube
from op_helpers import deliver_watch, owner_for, sample

NS = "ns"
PROM = "http://prometheus-operated.monitoring.svc:9090"
HPA = ("autoscaling/v2", "HorizontalPodAutoscaler")
SO = ("keda.sh/v1alpha1", "ScaledObject")


def qwen(**autoscaling) -> dict:
    doc = copy.deepcopy(sample("qwen-image.yaml"))
    doc["metadata"] = {"name": "qwen-image", "namespace": NS}
    doc["spec"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 4, **autoscaling}
    return doc


def parsed(doc: dict) -> DiffusionDeployment:
    result = validation.parse(doc["metadata"]["name"], NS, doc["spec"])
    assert result.ok, [str(e) for e in result.errors]
    assert result.cr is not None
    return result.cr


def errors(doc: dict) -> list[str]:
    return [str(e) for e in validation.parse(doc["metadata"]["name"], NS, doc["spec"]).errors]


# ---- spec -----------------------------------------------------------------------------------------


def test_defaults_hpa_engine_demand_target_one_and_fast_up_slow_down():
    a = parsed(qwen()).spec.autoscaling
    assert a is not None
    assert (a.engine, funcs.target_demand(a)) == ("hpa", defaults.DEFAULT_TARGET_DEMAND) == ("hpa", 1.0)
    behavior = funcs.behavior(a.behavior)
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert behavior["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 60}]


def test_target_queue_depth_is_a_deprecated_alias_of_target_demand():
    a = parsed(qwen(targetQueueDepth=3)).spec.autoscaling
    assert a is not None and funcs.target_demand(a) == 3.0 and a.target_queue_depth is not None
    assert errors(qwen(targetQueueDepth=3, targetDemand=2)) == [
        "spec.autoscaling.targetQueueDepth: is the deprecated name of targetDemand: set only targetDemand"
    ]


def test_behavior_merges_per_direction_and_field_over_the_defaults():
    a = parsed(qwen(behavior={"scaleDown": {"stabilizationWindowSeconds": 30}})).spec.autoscaling
    assert a is not None
    behavior = funcs.behavior(a.behavior)
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 30
    assert behavior["scaleDown"]["policies"] == defaults.DEFAULT_BEHAVIOR["scaleDown"]["policies"]
    assert behavior["scaleUp"] == defaults.DEFAULT_BEHAVIOR["scaleUp"]
    policies = [{"type": "Pods", "value": 2, "periodSeconds": 5}]
    a = parsed(qwen(behavior={"scaleUp": {"policies": policies, "selectPolicy": "Min"}})).spec.autoscaling
    assert a is not None and funcs.behavior(a.behavior)["scaleUp"]["policies"] == policies
    assert funcs.behavior(a.behavior)["scaleUp"]["selectPolicy"] == "Min"


@pytest.mark.parametrize(
    "autoscaling, field",
    [
        ({"engine": "vpa"}, "spec.autoscaling.engine"),
        ({"behavior": {"scaleDown": {"stabilizationWindowSeconds": -1}}}, "spec.autoscaling.behavior"),
        (
            {"behavior": {"scaleUp": {"policies": [{"type": "Cores", "value": 1, "periodSeconds": 5}]}}},
            "spec.autoscaling.behavior",
        ),
        ({"behavior": {"scaleUp": {"tolerance": 0.1}}}, "spec.autoscaling.behavior"),
        ({"targetDemand": 0}, "spec.autoscaling.targetDemand"),
    ],
)
def test_bad_autoscaling_is_refused_naming_the_field(autoscaling, field):
    errs = errors(qwen(**autoscaling))
    assert errs and errs[0].startswith(field), errs


# ---- builders -------------------------------------------------------------------------------------


def test_hpa_targets_the_demand_gauge_with_behavior():
    doc = qwen(targetDemand=1.5, behavior={"scaleDown": {"stabilizationWindowSeconds": 20}})
    s = parsed(doc)
    hpa = builders.build_hpa(s, owner_for(doc))
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "diffusion_demand_requests"},
                "target": {"type": "AverageValue", "averageValue": "1500m"},
            },
        }
    ]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 20
    assert hpa["spec"]["behavior"]["scaleUp"] == defaults.DEFAULT_BEHAVIOR["scaleUp"]


def test_keda_engine_builds_a_scaled_object_and_no_hpa():
    doc = qwen(
        engine="keda",
        targetDemand=1.5,
        minReplicas=2,
        behavior={"scaleDown": {"stabilizationWindowSeconds": 20}},
    )
    s = parsed(doc)
    children = builders.build_all(s, owner_for(doc), keda_prometheus_address=PROM)
    kinds = [c["kind"] for c in children]
    assert "HorizontalPodAutoscaler" not in kinds and kinds.count("ScaledObject") == 1
    so = children[kinds.index("ScaledObject")]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert so["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "qwen-image",
    }
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (2, 4)
    assert so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == funcs.behavior(
        s.spec.autoscaling.behavior
    )  # type: ignore[union-attr]
    assert so["spec"]["triggers"] == [
        {
            "type": "prometheus",
            "metricType": "AverageValue",
            "metadata": {
                "serverAddress": PROM,
                "query": "sum(rate(diffusion_demand_request_seconds_total"
                '{namespace="ns",diffusion_dev_deployment="qwen-image"}[1m])) or vector(0)',
                "threshold": "1.5",
            },
        }
    ]
    deployment = children[kinds.index("Deployment")]
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it


def test_demand_query_selects_one_deployment_exactly():
    q = demand_query("team-a", "flux")
    assert 'diffusion_dev_deployment="flux"' in q and "=~" not in q and 'namespace="team-a"' in q


# ---- reconciler (in-memory API server) -----------------------------------------------------------


def setup(keda: bool, address: str = PROM) -> tuple[FakeKube, Reconciler]:
    kube = FakeKube()
    if keda:
        kube.served["keda.sh/v1alpha1"] = ["scaledobjects", "scaledjobs", "triggerauthentications"]
    rec = Reconciler(kube, child_delay=0.01, keda_prometheus_address=address, discovery_ttl=0.0)
    deliver_watch(kube, rec)
    return kube, rec


def condition(kube: FakeKube, type_: str) -> dict:
    cr = kube.get("diffusion.dev/v1alpha1", "DiffusionDeployment", NS, "qwen-image") or {}
    return next(c for c in cr["status"]["conditions"] if c["type"] == type_)


def set_autoscaling(kube: FakeKube, **autoscaling) -> None:
    def mutate(obj: dict) -> None:
        obj["spec"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 4, **autoscaling}

    kube.edit("DiffusionDeployment", NS, "qwen-image", mutate, manager="kubectl")


def test_switching_engines_deletes_the_other_engines_object():
    kube, rec = setup(keda=True)
    kube.create(qwen())
    rec.drain()
    assert kube.get(*HPA, NS, "qwen-image") is not None and kube.get(*SO, NS, "qwen-image") is None
    set_autoscaling(kube, engine="keda")
    rec.drain()
    assert kube.get(*HPA, NS, "qwen-image") is None, "the HPA must go when the engine is keda"
    so = kube.get(*SO, NS, "qwen-image")
    assert so is not None and so["spec"]["triggers"][0]["metadata"]["serverAddress"] == PROM
    assert condition(kube, "ConfigValid")["status"] == "True"
    dep = kube.get("apps/v1", "Deployment", NS, "qwen-image")
    assert dep is not None and "replicas" not in dep["spec"]
    set_autoscaling(kube, engine="hpa")
    rec.drain()
    assert kube.get(*SO, NS, "qwen-image") is None and kube.get(*HPA, NS, "qwen-image") is not None
    # removing autoscaling removes whichever autoscaler there is
    set_autoscaling(kube, engine="keda")
    rec.drain()

    def drop(obj: dict) -> None:
        del obj["spec"]["autoscaling"]
        obj["spec"]["replicas"] = 2

    kube.edit("DiffusionDeployment", NS, "qwen-image", drop, manager="kubectl")
    rec.drain()
    assert kube.get(*SO, NS, "qwen-image") is None and kube.get(*HPA, NS, "qwen-image") is None
    dep = kube.get("apps/v1", "Deployment", NS, "qwen-image")
    assert dep is not None and dep["spec"]["replicas"] == 2


def test_keda_without_its_crd_is_config_invalid_and_renders_once_it_appears():
    kube, rec = setup(keda=False)
    kube.create(qwen(engine="keda"))
    rec.drain()
    cond = condition(kube, "ConfigValid")
    assert cond["status"] == "False"
    assert "keda needs KEDA's ScaledObject CRD (scaledobjects.keda.sh/v1alpha1)" in cond["message"], cond
    assert cond["message"].startswith("spec.autoscaling.engine"), cond
    assert kube.get(*SO, NS, "qwen-image") is None and kube.get(*HPA, NS, "qwen-image") is None
    events = [e for e in kube.events if e["reason"] == "InvalidSpec"]
    assert len(events) == 1 and "KEDA" in events[0]["message"]
    kube.served["keda.sh/v1alpha1"] = ["scaledobjects"]  # KEDA installed
    rec.resync([NS])
    rec.drain()
    assert condition(kube, "ConfigValid")["status"] == "True"
    assert kube.get(*SO, NS, "qwen-image") is not None


def test_keda_without_a_prometheus_address_is_config_invalid():
    kube, rec = setup(keda=True, address="")
    kube.create(qwen(engine="keda"))
    rec.drain()
    cond = condition(kube, "ConfigValid")
    assert cond["status"] == "False" and "--keda-prometheus-address" in cond["message"], cond
    assert "autoscaling.keda.prometheusAddress" in cond["message"]
    assert kube.get(*SO, NS, "qwen-image") is None


def test_hpa_engine_needs_no_keda_and_discovery_is_cached():
    kube, rec = setup(keda=False)
    rec.discovery_ttl = 3600.0
    kube.create(qwen())
    rec.drain()
    assert condition(kube, "ConfigValid")["status"] == "True"
    hpa = kube.get(*HPA, NS, "qwen-image")
    assert (
        hpa is not None and hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "diffusion_demand_requests"
    )
    for _ in range(3):
        rec.resync([NS])
        rec.drain()
    assert kube.reads[("DISCOVERY", "keda.sh/v1alpha1")] == 1


def test_readme_shows_the_scaled_object_the_operator_renders():
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"What the operator renders for\n.*?```yaml\n(.*?)```", readme, re.S)
    assert block is not None
    shown = yaml.safe_load(block.group(1))
    doc = copy.deepcopy(sample("qwen-image.yaml"))
    doc["spec"]["autoscaling"]["engine"] = "keda"
    result = validation.parse("qwen-image", "models", doc["spec"])
    assert result.cr is not None
    owner = owner_for(doc, "models")
    rendered = builders.build_scaled_object(result.cr, owner, PROM)
    assert shown["spec"] == rendered["spec"]
    assert shown["metadata"] == {"name": "qwen-image", "namespace": "models"}
