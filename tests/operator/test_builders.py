"""Unit tests of the pure builders (one object each) and of the desired-vs-observed comparison."""

from __future__ import annotations

import copy

import yaml
from diffusion_operator import builders, validation
from diffusion_operator.api import funcs
from diffusion_operator.builders.common import CONFIG_HASH_ANNOTATION, labels
from diffusion_operator.controller.diff import is_subset, parse_quantity
from diffusion_operator.hashing import config_hash
from op_helpers import owner_for, sample

FLUX_DOC = sample("flux-dev.yaml")
OWNER = owner_for(FLUX_DOC)
CONTRACT_LABELS = {
    "app.kubernetes.io/name": "diffusion-runtime",
    "app.kubernetes.io/instance": "flux-dev",
    "app.kubernetes.io/managed-by": "diffusion-operator",
    "diffusion.dev/deployment": "flux-dev",
}


def parsed(spec: dict | None = None, name: str = "flux-dev"):
    result = validation.parse(name, "ns", spec if spec is not None else FLUX_DOC["spec"])
    assert result.ok, [str(e) for e in result.errors]
    return result.cr


def test_every_child_has_contract_labels_and_controller_owner():
    children = builders.build_all(parsed(), OWNER)
    assert [c["kind"] for c in children] == [
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ]
    for child in children:
        meta = child["metadata"]
        assert meta["labels"] == CONTRACT_LABELS
        assert meta["namespace"] == "ns"
        (ref,) = meta["ownerReferences"]
        assert ref == {
            "apiVersion": "diffusion.dev/v1alpha1",
            "kind": "DiffusionDeployment",
            "name": "flux-dev",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }


def test_configmap_runtime_yaml_follows_the_contract():
    cm = builders.build_configmap(parsed(), OWNER)
    assert cm["metadata"]["name"] == "flux-dev-config"
    runtime = yaml.safe_load(cm["data"]["runtime.yaml"])
    assert runtime == {
        "model": {
            "uri": "hf://black-forest-labs/FLUX.1-dev",
            "revision": "main",
            "pipeline": "FluxPipeline",
            "dtype": "bfloat16",
        },
        "cache_dit_config": "cache-dit.yaml",
        "compile": True,
        "device": "auto",
        "warmup": {"resolutions": ["1024x1024"], "steps": 28, "prompt": "a photo of a cat", "frames": 9},
        "server": {
            "host": "0.0.0.0",
            "port": 8000,
            "metrics_port": 9090,
            "max_queue": 16,
            "request_timeout_seconds": 300,
            "max_pixels": 4194304,
            "max_steps": 100,
            "max_n": 4,
            "max_upload_bytes": 33554432,
            "max_batch": 1,
            "max_batch_delay_seconds": 0.02,
            "max_jobs": 64,
            "job_ttl_seconds": 600.0,
            "store_max_bytes": 512 << 20,
            "max_frames": 129,
            "max_video_seconds": 12,
            "max_video_pixels": 74649600,
            "video_fps": 16,
            "video_crf": 20,
            "video_store_max_bytes": 2 << 30,
            "webhook_allow": [],
            "webhook_attempts": 5,
            "webhook_backoff_seconds": 1.0,
            "webhook_backoff_max_seconds": 30.0,
            "webhook_timeout_seconds": 10.0,
        },
        "adapters": [],
    }
    cache = yaml.safe_load(cm["data"]["cache-dit.yaml"])
    assert cache["cache_config"] == FLUX_DOC["spec"]["cacheDit"]["cache_config"]
    assert cache["quantize_config"] == {
        "quant_type": "float8_per_row",
        "exclude_layers": ["embedder", "embed"],
    }
    assert "token" not in cm["data"]["runtime.yaml"]


def test_configmap_renders_float8_alias_as_current_name():
    spec = copy.deepcopy(FLUX_DOC["spec"])
    spec["quantize"]["quant_type"] = "float8"
    cm = builders.build_configmap(parsed(spec), OWNER)
    assert yaml.safe_load(cm["data"]["cache-dit.yaml"])["quantize_config"]["quant_type"] == "float8_per_row"


def test_configmap_without_cache_dit_has_no_cache_file():
    spec = {"model": {"uri": "hf://a/b"}, "gpu": {"count": 1}}
    cm = builders.build_configmap(parsed(spec, "plain"), OWNER)
    assert set(cm["data"]) == {"runtime.yaml"}
    assert "cache_dit_config" not in yaml.safe_load(cm["data"]["runtime.yaml"])


def test_pvc_model_is_mounted_read_only_and_rewritten():
    spec = {"model": {"uri": "pvc://models/flux"}, "gpu": {"count": 1}}
    s = parsed(spec, "p")
    cm = builders.build_configmap(s, OWNER)
    assert yaml.safe_load(cm["data"]["runtime.yaml"])["model"]["uri"] == "/models/models/flux"
    pod = builders.build_deployment(s, OWNER, cm)["spec"]["template"]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}} in pod[
        "volumes"
    ]


def deployment(spec=None, name="flux-dev"):
    s = parsed(spec, name)
    return builders.build_deployment(s, OWNER, builders.build_configmap(s, OWNER))


def test_deployment_gpu_float8_affinity_toleration_and_selector():
    d = deployment()
    pod = d["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert terms == [
        {"matchExpressions": [{"key": "nvidia.com/gpu.compute.major", "operator": "Gt", "values": ["8"]}]},
        {
            "matchExpressions": [
                {"key": "nvidia.com/gpu.compute.major", "operator": "In", "values": ["8"]},
                {"key": "nvidia.com/gpu.compute.minor", "operator": "Gt", "values": ["8"]},
            ]
        },
    ]
    assert "nodeSelector" not in pod  # no explicit product in the sample
    assert d["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "diffusion-runtime",
        "app.kubernetes.io/instance": "flux-dev",
    }
    assert d["spec"]["template"]["metadata"]["labels"] == CONTRACT_LABELS


def test_float8_affinity_is_anded_with_user_affinity():
    spec = copy.deepcopy(FLUX_DOC["spec"])
    user_term = {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
    spec["template"]["affinity"] = {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [user_term]}}
    }
    terms = deployment(spec)["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert len(terms) == 2
    assert all(t["matchExpressions"][0]["key"] == "zone" for t in terms)


def test_explicit_product_becomes_node_selector_and_no_float8_no_affinity():
    spec = copy.deepcopy(FLUX_DOC["spec"])
    spec["gpu"] = {"count": 2, "product": "NVIDIA-H100-80GB-HBM3"}
    spec["quantize"] = {"quant_type": "int8_per_row"}
    pod = deployment(spec)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert "affinity" not in pod


def test_cpu_deployment_has_no_gpu_parts():
    doc = sample("tiny-cpu.yaml")
    s = parsed(doc["spec"], "tiny")
    pod = builders.build_deployment(s, OWNER, builders.build_configmap(s, OWNER))["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"].get("limits", {})
    assert "tolerations" not in pod and "affinity" not in pod


def test_probes_security_shm_token_and_rollout():
    d = deployment()
    pod = d["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["ports"] == [
        {"name": "http", "containerPort": 8000, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9090, "protocol": "TCP"},
    ]
    assert c["startupProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"  # the runtime's one-line reason
    startup = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
    assert startup >= funcs.startup_budget_seconds(parsed().spec) >= 900  # FLUX download + compile + warmup
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] == 1000 and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert (
        pod["securityContext"]["runAsNonRoot"]
        and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    )
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert {"name": "config", "mountPath": "/etc/diffusion", "readOnly": True} in c["volumeMounts"]
    assert {"name": "config", "configMap": {"name": "flux-dev-config"}} in pod["volumes"]
    token = [e for e in c["env"] if e["name"] == "HF_TOKEN"]
    assert token == [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}
    ]
    assert d["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert d["spec"]["replicas"] == 1


def test_config_hash_annotation_changes_with_cache_config_only():
    a = deployment()
    same = deployment(copy.deepcopy(FLUX_DOC["spec"]))
    changed_spec = copy.deepcopy(FLUX_DOC["spec"])
    changed_spec["cacheDit"]["cache_config"]["residual_diff_threshold"] = 0.2
    b = deployment(changed_spec)
    ha = a["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    assert ha == same["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    assert ha != b["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
    cm = builders.build_configmap(parsed(), OWNER)
    assert ha == config_hash(cm["data"])


def test_service_pdb_and_hpa():
    s = parsed()
    svc = builders.build_service(s, OWNER)
    assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [
        ("http", 8000, "http"),
        ("metrics", 9090, "metrics"),
    ]
    assert svc["spec"]["selector"] == builders.selector("flux-dev")
    assert builders.endpoint(s) == "http://flux-dev.ns.svc:8000"
    pdb = builders.build_pdb(s, OWNER)
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 1
    qwen = sample("qwen-image.yaml")
    q = parsed(qwen["spec"], "qwen-image")
    children = builders.build_all(q, owner_for(qwen))
    hpa = children[-1]
    assert hpa["kind"] == "HorizontalPodAutoscaler" and hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "qwen-image",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "diffusion_demand_requests"},
                "target": {"type": "AverageValue", "averageValue": "1"},
            },
        }
    ]
    dep = next(c for c in children if c["kind"] == "Deployment")
    assert "replicas" not in dep["spec"]  # the HPA owns it


def test_hpa_fractional_target_is_a_quantity():
    spec = copy.deepcopy(sample("qwen-image.yaml")["spec"])
    spec["autoscaling"]["targetDemand"] = 1.5
    hpa = builders.build_hpa(parsed(spec, "q"), OWNER)
    assert hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "1500m"


def test_is_subset_ignores_server_defaults_and_normalises_quantities():
    desired = {"spec": {"a": 1, "limits": {"cpu": "1000m", "memory": "1Gi"}, "l": [{"x": 1}]}}
    observed = {
        "spec": {"a": 1, "b": 2, "limits": {"cpu": "1", "memory": "1073741824"}, "l": [{"x": 1, "y": 0}]}
    }
    assert is_subset(desired, observed)
    assert not is_subset(desired, {"spec": {**observed["spec"], "a": 2}})
    assert not is_subset(desired, {"spec": {**observed["spec"], "l": []}})
    assert not is_subset({"a": "1"}, {"a": 1})  # plain fields: types matter
    assert parse_quantity("1500m") == parse_quantity("1.5")


def test_labels_are_the_contract():
    assert labels("flux-dev") == CONTRACT_LABELS
