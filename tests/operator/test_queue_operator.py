"""spec.queue on the operator side: what the builders render (the front door, the runtime pods' queue
settings, the scale-to-zero autoscalers), what validation refuses, the status, and the reconciler's
life cycle of the front door (fakekube.py). tests/operator/test_queue_cluster.py proves the objects
against the real API server."""

from __future__ import annotations

import copy

import pytest
import yaml
from diffusion_operator import builders, validation
from diffusion_operator.api.defaults import DEFAULT_FRONT_DOOR_REPLICAS, DEFAULT_QUEUE_SECRET
from diffusion_operator.builders.common import QUEUE_SERVER_APP, selector
from diffusion_operator.builders.frontdoor import FRONT_DOOR_APP, front_door_selector
from diffusion_operator.controller import Reconciler
from diffusion_operator.status import queue_status, valid_status
from diffusion_runtime.contract.config import (
    QUEUE_URL_ENV,
    QueueConfig,
    config_from_dict,
    validate,
)
from diffusion_runtime.contract.queue import QUEUE_DEMAND_METRIC
from fakekube import FakeKube
from op_helpers import deliver_watch, owner_for, sample

NS = "ns"


def tiny_queue(queue: dict | None = None, **autoscaling) -> dict:
    doc = copy.deepcopy(sample("tiny-cpu.yaml"))
    doc["metadata"] = {"name": "tiny", "namespace": NS}
    doc["spec"]["queue"] = queue if queue is not None else {}
    if autoscaling:
        del doc["spec"]["replicas"]
        doc["spec"]["autoscaling"] = {"maxReplicas": 3, **autoscaling}
    return doc


def built(doc: dict) -> dict[tuple[str, str], dict]:
    parsed = validation.parse("tiny", NS, doc["spec"])
    assert parsed.ok, parsed.errors
    objs = builders.build_all(parsed.cr, owner_for(doc), keda_prometheus_address="")
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_the_queue_adds_the_front_door_and_the_runtime_pods_get_the_queue_section_and_url():
    objs = built(tiny_queue({"secretRef": {"name": "my-redis", "key": "uri"}, "maxAttempts": 5}))
    assert set(objs) == {
        ("ConfigMap", "tiny-config"),
        ("Deployment", "tiny"),
        ("Service", "tiny"),
        ("PodDisruptionBudget", "tiny"),
        ("Deployment", "tiny-frontdoor"),
        ("Service", "tiny-frontdoor"),
        ("PodDisruptionBudget", "tiny-frontdoor"),
        ("NetworkPolicy", "tiny"),
    }
    # the serving pods' policy lets them reach the chart's queue server (and admits the front door)
    egress = objs[("NetworkPolicy", "tiny")]["spec"]["egress"]
    assert {"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {
        "app.kubernetes.io/name": QUEUE_SERVER_APP}}}]} in egress  # fmt: skip
    ingress = objs[("NetworkPolicy", "tiny")]["spec"]["ingress"]
    front_door_pods = objs[("Deployment", "tiny-frontdoor")]["spec"]["template"]["metadata"]["labels"]
    peers = [
        p["podSelector"].get("matchLabels", {})
        for rule in ingress
        for p in rule.get("from", [])
        if "podSelector" in p and "namespaceSelector" not in p
    ]
    assert front_door_selector("tiny") in peers, peers
    assert front_door_selector("tiny").items() <= front_door_pods.items(), front_door_pods
    raw = yaml.safe_load(objs[("ConfigMap", "tiny-config")]["data"]["runtime.yaml"])
    assert raw["queue"] == {"name": f"{NS}/tiny", "max_attempts": 5, "claim_idle_seconds": 30.0,
                            "max_waiting": 10000}  # fmt: skip
    cfg = config_from_dict(raw)
    validate(cfg)  # the runtime accepts what the operator renders
    assert cfg.queue is not None and cfg.queue.stream == f"dq:{NS}/tiny:work"
    url = {"name": QUEUE_URL_ENV, "valueFrom": {"secretKeyRef": {"name": "my-redis", "key": "uri"}}}
    runtime = objs[("Deployment", "tiny")]["spec"]["template"]["spec"]["containers"][0]
    assert env_of(runtime)[QUEUE_URL_ENV] == url  # by reference only: never a value
    front = objs[("Deployment", "tiny-frontdoor")]
    pod = front["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert env_of(container)[QUEUE_URL_ENV] == url
    assert container["args"] == ["front-door", "--config", "/etc/diffusion/runtime.yaml"]
    assert container["image"] == runtime["image"]
    assert pod["volumes"][0] == {"name": "config", "configMap": {"name": "tiny-config"}}  # the same file
    # the front door rolls with the configuration, as the runtime pods do
    hash_key = "diffusion.dev/config-hash"
    assert (
        front["spec"]["template"]["metadata"]["annotations"][hash_key]
        == objs[("Deployment", "tiny")]["spec"]["template"]["metadata"]["annotations"][hash_key]
    )
    assert front["spec"]["replicas"] == DEFAULT_FRONT_DOOR_REPLICAS == 2
    assert "nvidia.com/gpu" not in str(container["resources"]) and container["resources"]["requests"]
    # restricted PodSecurity, as the runtime pods
    assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert (
        sc["readOnlyRootFilesystem"]
        and not sc["allowPrivilegeEscalation"]
        and sc["capabilities"]["drop"] == ["ALL"]
    )
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # the front door's pods and the runtime pods never select each other
    fd_labels = front["spec"]["template"]["metadata"]["labels"]
    assert not selector("tiny").items() <= fd_labels.items()
    rt_labels = objs[("Deployment", "tiny")]["spec"]["template"]["metadata"]["labels"]
    assert not front_door_selector("tiny").items() <= rt_labels.items()
    assert fd_labels["app.kubernetes.io/name"] == FRONT_DOOR_APP
    assert fd_labels["diffusion.dev/deployment"] == "tiny"  # the metric's label (PodMonitor)
    assert objs[("Service", "tiny-frontdoor")]["spec"]["selector"] == front_door_selector("tiny")
    pdb = objs[("PodDisruptionBudget", "tiny-frontdoor")]["spec"]
    assert pdb == {"maxUnavailable": 1, "selector": {"matchLabels": front_door_selector("tiny")}}
    parsed = validation.parse("tiny", NS, tiny_queue()["spec"])
    assert builders.endpoint(parsed.cr) == f"http://tiny-frontdoor.{NS}.svc:8000"
    assert parsed.cr.spec.queue.secret_ref.name == DEFAULT_QUEUE_SECRET


def test_without_a_queue_nothing_changes():
    doc = copy.deepcopy(sample("tiny-cpu.yaml"))
    parsed = validation.parse("tiny", NS, doc["spec"])
    objs = builders.build_all(parsed.cr, owner_for(doc))
    kinds = ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"]
    assert [o["kind"] for o in objs] == kinds
    assert "queue" not in yaml.safe_load(objs[0]["data"]["runtime.yaml"])
    assert QUEUE_URL_ENV not in env_of(objs[1]["spec"]["template"]["spec"]["containers"][0])
    assert builders.endpoint(parsed.cr) == f"http://tiny.{NS}.svc:8000"


def test_front_door_replicas_and_resources():
    objs = built(tiny_queue({"frontDoor": {"replicas": 3, "resources": {"limits": {"cpu": "2"}}}}))
    front = objs[("Deployment", "tiny-frontdoor")]
    assert front["spec"]["replicas"] == 3
    assert front["spec"]["template"]["spec"]["containers"][0]["resources"] == {"limits": {"cpu": "2"}}


def test_front_door_placement_is_its_own_and_spreads_by_default():
    # the runtime pods' GPU placement (template) is not the front door's; its own fields are
    doc = tiny_queue({"frontDoor": {}})
    doc["spec"]["template"] = {
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "gpu", "operator": "Exists"}],
    }
    pod = built(doc)[("Deployment", "tiny-frontdoor")]["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
    term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert term["podAffinityTerm"] == {
        "labelSelector": {"matchLabels": front_door_selector("tiny")},
        "topologyKey": "kubernetes.io/hostname",
    }
    placed = {
        "nodeSelector": {"pool": "cpu"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "api", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 1, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}}
        ]}},
    }  # fmt: skip
    pod = built(tiny_queue({"frontDoor": placed}))[("Deployment", "tiny-frontdoor")]["spec"]["template"][
        "spec"
    ]
    assert {k: pod[k] for k in placed} == placed  # as given: the user's affinity replaces the default


def test_scale_to_zero_hpa_reads_the_queue_demand_as_an_object_metric():
    objs = built(tiny_queue(minReplicas=0, targetDemand=2))
    hpa = objs[("HorizontalPodAutoscaler", "tiny")]["spec"]
    assert hpa["minReplicas"] == 0 and hpa["maxReplicas"] == 3
    assert hpa["scaleTargetRef"]["name"] == "tiny"
    assert hpa["metrics"] == [
        {
            "type": "Object",
            "object": {
                "describedObject": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tiny"},
                "metric": {"name": QUEUE_DEMAND_METRIC},
                "target": {"type": "AverageValue", "averageValue": "2"},
            },
        }
    ]
    # without a queue the per-pod metric stays (and minReplicas >= 1)
    doc = copy.deepcopy(sample("tiny-cpu.yaml"))
    del doc["spec"]["replicas"]
    doc["spec"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 3}
    plain = {
        (o["kind"]): o for o in builders.build_all(validation.parse("t", NS, doc["spec"]).cr, owner_for(doc))
    }
    assert plain["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["type"] == "Pods"


def test_scale_to_zero_keda_reads_the_work_stream_through_a_trigger_authentication():
    doc = tiny_queue({"secretRef": {"name": "r", "addressKey": "hostport"}}, minReplicas=0, engine="keda")
    objs = built(doc)
    auth = objs[("TriggerAuthentication", "tiny-queue")]
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "address", "name": "r", "key": "hostport"},
        {"parameter": "password", "name": "r", "key": "password"},
    ]
    so = objs[("ScaledObject", "tiny")]["spec"]
    assert so["minReplicaCount"] == 0
    # to zero after the CR's scale-down window (KEDA's own default would be 300 s whatever the CR says)
    assert so["cooldownPeriod"] == 300 and so["pollingInterval"] == 5
    windowed = tiny_queue(
        minReplicas=0, engine="keda", behavior={"scaleDown": {"stabilizationWindowSeconds": 20}}
    )
    assert built(windowed)[("ScaledObject", "tiny")]["spec"]["cooldownPeriod"] == 20
    stream = QueueConfig(name=f"{NS}/tiny").stream  # the runtime's own name for it
    (trigger,) = so["triggers"]
    assert trigger["type"] == "redis-streams"
    # the stream's length is waiting + running (the runtime deletes an entry when its job ends)
    # no consumerGroup: with one KEDA counts the group's pending (started) entries only, and jobs waiting
    # at zero pods would never wake the deployment (found running KEDA: test_cluster_queue_keda_realpods)
    assert trigger["metadata"] == {"stream": stream, "databaseIndex": "0", "streamLength": "1"}
    assert trigger["authenticationRef"] == {"name": "tiny-queue"}
    # apply order: the TriggerAuthentication before the ScaledObject that names it
    kinds = list(k for k, _ in objs)
    assert kinds.index("TriggerAuthentication") < kinds.index("ScaledObject")


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (lambda s: s.pop("queue"), "spec.autoscaling.minReplicas", "needs spec.queue"),
        (lambda s: s["queue"].update(maxAttempts=0), "spec.queue.maxAttempts", "greater than or equal to 1"),
        (lambda s: s["queue"].update(maxAttempts=11), "spec.queue.maxAttempts", "less than or equal to 10"),
        (
            lambda s: s["queue"].update(claimIdleSeconds=1),
            "spec.queue.claimIdleSeconds",
            "greater than or equal to 3",
        ),
        (
            lambda s: s["queue"]["frontDoor"].update(replicas=0),
            "spec.queue.frontDoor.replicas",
            "greater than or equal to 1",
        ),
        (lambda s: s["queue"].update(url="redis://x"), "spec.queue.url", "unknown field"),
        (
            lambda s: s["template"].update(env=[{"name": QUEUE_URL_ENV, "value": "redis://x"}]),
            "spec.template.env",
            "only from spec.queue.secretRef",
        ),
    ],
)
def test_invalid_queue_specs_are_refused_naming_the_field(mutate, field, words):
    doc = tiny_queue({"frontDoor": {}}, minReplicas=0)
    mutate(doc["spec"])
    errors = validation.parse("tiny", NS, doc["spec"]).errors
    assert any(e.field == field and words in e.message for e in errors), errors


def test_min_replicas_zero_with_a_queue_is_valid():
    assert validation.parse("tiny", NS, tiny_queue(minReplicas=0)["spec"]).ok


def _deployment(replicas: int, ready: int, spec_replicas: int | None = None) -> dict:
    return {
        "metadata": {"generation": 1},
        "spec": {"replicas": replicas if spec_replicas is None else spec_replicas},
        "status": {"observedGeneration": 1, "replicas": replicas, "readyReplicas": ready,
                   "updatedReplicas": replicas, "availableReplicas": ready},
    }  # fmt: skip


def _status(runtime: dict, front: dict | None, demand: float | None) -> dict:
    base = valid_status({}, 1, None, runtime, "sel", "http://x", "h", "")
    return queue_status(base, {}, runtime, front, 2, demand, 1)


def _ready(status: dict) -> dict:
    return next(c for c in status["conditions"] if c["type"] == "Ready")


def test_status_scaled_to_zero_is_ready_and_says_so():
    st = _status(_deployment(0, 0), _deployment(2, 2), 0)
    assert st["queue"] == {"demand": 0, "frontDoor": "2/2", "scaledToZero": True}
    ready = _ready(st)
    assert (ready["status"], ready["reason"]) == ("True", "ScaledToZero")
    assert "requests wait in the queue" in ready["message"]


def test_status_without_a_ready_front_door_is_not_ready():
    st = _status(_deployment(1, 1), _deployment(2, 0), 3)
    assert st["queue"] == {"demand": 3, "frontDoor": "0/2", "scaledToZero": False}
    ready = _ready(st)
    assert (ready["status"], ready["reason"]) == ("False", "FrontDoorNotReady")
    # serving with a ready front door: the runtime's own Ready; no metrics adapter: no demand
    st = _status(_deployment(1, 1), _deployment(2, 1), None)
    assert "demand" not in st["queue"] and _ready(st)["status"] == "True"


# ---- the reconciler (in-memory API server) ----------------------------------------------------------


def setup() -> tuple[FakeKube, Reconciler]:
    kube = FakeKube()
    rec = Reconciler(kube, child_delay=0.05)
    rec.queue_poll = None  # the test drives every change
    deliver_watch(kube, rec)
    return kube, rec


def _cr(kube: FakeKube) -> dict:
    obj = kube.get("diffusion.dev/v1alpha1", "DiffusionDeployment", NS, "tiny")
    assert obj is not None
    return obj


def test_reconciler_creates_the_front_door_reports_the_demand_and_removes_it_with_the_queue():
    kube, rec = setup()
    kube.object_metrics[(NS, "Deployment", "tiny", QUEUE_DEMAND_METRIC)] = 7.0
    kube.create(tiny_queue(minReplicas=0))
    rec.drain()
    for kind in ("Deployment", "Service", "PodDisruptionBudget"):
        assert kube.get({"Deployment": "apps/v1", "Service": "v1"}.get(kind, "policy/v1"), kind, NS,
                        "tiny-frontdoor"), kind  # fmt: skip
    assert kube.get("autoscaling/v2", "HorizontalPodAutoscaler", NS, "tiny")["spec"]["minReplicas"] == 0
    status = _cr(kube)["status"]
    assert status["endpoint"] == f"http://tiny-frontdoor.{NS}.svc:8000"
    assert status["queue"]["demand"] == 7 and status["queue"]["frontDoor"] == "0/2"

    def no_queue(obj: dict) -> None:
        obj["spec"].pop("queue")
        obj["spec"]["autoscaling"]["minReplicas"] = 1

    kube.edit("DiffusionDeployment", NS, "tiny", no_queue, manager="kubectl")
    rec.drain()
    for api, kind in (("apps/v1", "Deployment"), ("v1", "Service"), ("policy/v1", "PodDisruptionBudget")):
        assert kube.get(api, kind, NS, "tiny-frontdoor") is None, kind
        assert kube.get(api, kind, NS, "tiny") is not None, kind  # the runtime pods' stay
    status = _cr(kube)["status"]
    assert "queue" not in status and status["endpoint"] == f"http://tiny.{NS}.svc:8000"
