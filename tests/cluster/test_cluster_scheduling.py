"""Scheduling onto the fake GPU nodes, against the real apiserver, scheduler and kwok."""

from __future__ import annotations

import json

import pytest
from diffusion_dev import wait_for

pytestmark = pytest.mark.cluster

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def pod_spec(gpus: int, **extra) -> dict:
    return {
        "tolerations": [GPU_TOLERATION],
        "containers": [
            {
                "name": "main",
                "image": "registry.invalid/diffusion-runtime:test",
                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
            }
        ],
        **extra,
    }


def get_json(cluster, *args) -> dict:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def node_labels(cluster) -> dict[str, dict]:
    return {n["metadata"]["name"]: n["metadata"]["labels"] for n in get_json(cluster, "nodes")["items"]}


def test_default_pool_has_gpu_nodes_with_gfd_labels(cluster):
    nodes = {n["metadata"]["name"]: n for n in get_json(cluster, "nodes")["items"]}
    h100 = [
        n
        for n in nodes.values()
        if n["metadata"]["labels"].get("nvidia.com/gpu.product") == "NVIDIA-H100-80GB-HBM3"
    ]
    a100 = [
        n
        for n in nodes.values()
        if n["metadata"]["labels"].get("nvidia.com/gpu.product") == "NVIDIA-A100-SXM4-80GB"
    ]
    cpu = [
        n
        for n in nodes.values()
        if "nvidia.com/gpu.present" not in n["metadata"]["labels"]
        and n["metadata"]["labels"].get("type") == "kwok"
    ]
    assert (len(h100), len(a100), len(cpu)) == (2, 1, 1), sorted(nodes)
    for node in h100:
        labels = node["metadata"]["labels"]
        assert labels["nvidia.com/gpu.compute.major"] == "9" and labels["nvidia.com/gpu.compute.minor"] == "0"
        assert labels["nvidia.com/gpu.memory"] == "81559"
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in node["spec"]["taints"]
    assert a100[0]["metadata"]["labels"]["nvidia.com/gpu.compute.major"] == "8"
    assert "nvidia.com/gpu" not in cpu[0]["status"]["allocatable"]
    for node in nodes.values():
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", node["metadata"]["name"]


def test_gpu_deployment_runs_ready_on_a_gpu_node(cluster, namespace):
    cluster.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "gpu-app", "namespace": namespace},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "gpu-app"}},
                "template": {"metadata": {"labels": {"app": "gpu-app"}}, "spec": pod_spec(1)},
            },
        }
    )

    def ready_pod():
        pods = get_json(cluster, "pods", "-n", namespace, "-l", "app=gpu-app")["items"]
        for pod in pods:
            conds = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
            if pod["status"].get("phase") == "Running" and conds.get("Ready") == "True":
                return pod
        return None

    pod = wait_for(ready_pod, 60, "a Running and Ready gpu-app pod")
    labels = node_labels(cluster)[pod["spec"]["nodeName"]]
    assert labels.get("nvidia.com/gpu.present") == "true", pod["spec"]["nodeName"]
    # the Deployment controller sees it too
    wait_for(
        lambda: (
            get_json(cluster, "deployment", "gpu-app", "-n", namespace)["status"].get("readyReplicas") == 1
        ),
        30,
        "deployment readyReplicas == 1",
    )


def test_compute_capability_affinity_lands_only_on_h100(cluster, namespace):
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": "nvidia.com/gpu.compute.major", "operator": "In", "values": ["9"]}
                        ]
                    }
                ]
            }
        }
    }
    # six pods: without the affinity the scheduler's spreading would put some on the A100
    cluster.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"needs-sm90-{i}", "namespace": namespace, "labels": {"app": "sm90"}},
                "spec": pod_spec(1, affinity=affinity),
            }
            for i in range(6)
        ]
    )

    def all_bound():
        pods = get_json(cluster, "pods", "-n", namespace, "-l", "app=sm90")["items"]
        return pods if len(pods) == 6 and all(p["spec"].get("nodeName") for p in pods) else None

    pods = wait_for(all_bound, 60, "6 sm90 pods bound")
    labels = node_labels(cluster)
    used = {p["spec"]["nodeName"] for p in pods}
    assert {labels[n]["nvidia.com/gpu.product"] for n in used} == {"NVIDIA-H100-80GB-HBM3"}, used


def test_pod_requesting_nine_gpus_stays_pending_with_failed_scheduling(cluster, namespace):
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "too-big", "namespace": namespace},
            "spec": pod_spec(9),
        }
    )

    def failed_event():
        events = get_json(
            cluster, "events", "-n", namespace, "--field-selector", "involvedObject.name=too-big"
        )
        return [
            e
            for e in events["items"]
            if e["reason"] == "FailedScheduling" and "Insufficient nvidia.com/gpu" in e["message"]
        ]

    events = wait_for(failed_event, 60, "a FailedScheduling event (Insufficient nvidia.com/gpu) for too-big")
    assert events[0]["type"] == "Warning"
    pod = get_json(cluster, "pod", "too-big", "-n", namespace)
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")


def test_kwok_renews_node_leases_so_nodes_stay_ready(cluster):
    def renew_times():
        leases = get_json(cluster, "leases", "-n", "kube-node-lease")["items"]
        return {lease["metadata"]["name"]: lease["spec"].get("renewTime") for lease in leases}

    first = renew_times()
    assert set(first) >= {n.name for n in cluster.node_specs}, first
    # the node lifecycle controller marks a node NotReady without renewals (grace period 50 s)
    wait_for(
        lambda: all(renew_times()[name] != first[name] for name in (n.name for n in cluster.node_specs)),
        45,
        "every node lease to be renewed",
    )
