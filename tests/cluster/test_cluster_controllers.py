"""Controllers of the real kube-controller-manager: garbage collector, ReplicaSets, ServiceAccounts."""

from __future__ import annotations

import json

import pytest
from diffusion_dev import wait_for
from diffusion_dev.fake_nodes import fake_cpu_placement

pytestmark = pytest.mark.cluster


def get_json(cluster, *args) -> dict:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def test_deleting_owner_deletes_dependents(cluster, namespace):
    owner = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "owner", "namespace": namespace},
        "data": {"k": "v"},
    }
    cluster.apply(owner)
    uid = get_json(cluster, "configmap", "owner", "-n", namespace)["metadata"]["uid"]
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}
    cluster.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": f"dependent-{i}", "namespace": namespace, "ownerReferences": [ref]},
            }
            for i in range(3)
        ]
        + [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "bystander", "namespace": namespace},
            }
        ]
    )

    def names():
        return {c["metadata"]["name"] for c in get_json(cluster, "configmaps", "-n", namespace)["items"]}

    assert {"dependent-0", "dependent-1", "dependent-2", "bystander"} <= names()
    # background propagation: only the garbage collector can remove the dependents
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace, "--cascade=background")
    wait_for(lambda: not any(n.startswith("dependent-") for n in names()), 60, "dependents to be collected")
    assert "bystander" in names()


def test_deployment_delete_cascades_to_replicaset_and_pods(cluster, namespace):
    cluster.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": namespace},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "c", "image": "registry.invalid/web:1"}]},
                },
            },
        }
    )
    wait_for(
        lambda: len(get_json(cluster, "pods", "-n", namespace, "-l", "app=web")["items"]) == 2,
        60,
        "2 pods created by the ReplicaSet",
    )
    assert len(get_json(cluster, "replicasets", "-n", namespace)["items"]) == 1
    cluster.kubectl("delete", "deployment", "web", "-n", namespace, "--cascade=background")
    wait_for(
        lambda: (
            not get_json(cluster, "replicasets", "-n", namespace)["items"]
            and not get_json(cluster, "pods", "-n", namespace, "-l", "app=web")["items"]
        ),
        60,
        "ReplicaSet and pods to be garbage collected",
    )


def test_job_pod_completes_and_job_succeeds(cluster, namespace):
    cluster.apply(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "once", "namespace": namespace},
            "spec": {
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "c", "image": "registry.invalid/j:1"}],
                        **fake_cpu_placement(),  # kwok completes it (an image nobody can pull)
                    }
                }
            },
        }
    )
    wait_for(
        lambda: get_json(cluster, "job", "once", "-n", namespace)["status"].get("succeeded") == 1,
        60,
        "Job once to succeed",
    )
    pods = get_json(cluster, "pods", "-n", namespace, "-l", "job-name=once")["items"]
    assert [p["status"]["phase"] for p in pods] == ["Succeeded"]
    assert pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"


def test_hpa_controller_reconciles_horizontal_pod_autoscalers(cluster, namespace):
    cluster.apply(
        [
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "scaled", "namespace": namespace},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": "scaled"}},
                    "template": {
                        "metadata": {"labels": {"app": "scaled"}},
                        "spec": {"containers": [{"name": "c", "image": "registry.invalid/s:1"}]},
                    },
                },
            },
            {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": "scaled", "namespace": namespace},
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "scaled"},
                    "minReplicas": 2,
                    "maxReplicas": 3,
                    "metrics": [
                        {
                            "type": "Resource",
                            "resource": {
                                "name": "cpu",
                                "target": {"type": "Utilization", "averageUtilization": 50},
                            },
                        }
                    ],
                },
            },
        ]
    )
    # the HPA controller enforces minReplicas even without a metrics API, and reports why it cannot measure
    wait_for(
        lambda: get_json(cluster, "deployment", "scaled", "-n", namespace)["spec"]["replicas"] == 2,
        60,
        "the HPA to raise replicas to minReplicas=2",
    )
    conditions = wait_for(
        lambda: {
            c["type"]: c
            for c in get_json(cluster, "hpa", "scaled", "-n", namespace)["status"].get("conditions", [])
        },
        30,
        "HPA status conditions",
    )
    assert conditions["AbleToScale"]["status"] == "True"
