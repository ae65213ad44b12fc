"""The front door of a DiffusionDeployment with spec.queue: Deployment, Service and PodDisruptionBudget
`<name>-frontdoor`.

A small CPU-only Deployment of the runtime image running `diffusion-runtime front-door` with the same
runtime.yaml as the runtime pods (its `queue:` section, the server limits) and the queue server's URL
from the Secret by reference (DIFFUSION_QUEUE_URL): it validates, enqueues and answers every request
from the shared queue, on any replica, so `status.endpoint` names its Service. No GPU, no model, no
node placement of the runtime pods (it runs on any node). Its pods carry their own
`app.kubernetes.io/name`, so the runtime Deployment, Service and PDB never select them, and the
owner label `diffusion.dev/deployment` (the PodMonitor turns it into the `diffusion_dev_deployment`
label the autoscaling metric is read by).
"""

from __future__ import annotations

import copy

from diffusion_operator.api.defaults import DEFAULT_FRONT_DOOR_RESOURCES
from diffusion_operator.api.types import DiffusionDeployment
from diffusion_operator.builders.common import (  # noqa: F401 - FRONT_DOOR_APP, ... re-exported
    CONFIG_HASH_ANNOTATION,
    FRONT_DOOR_APP,
    FRONT_DOOR_COMPONENT,
    HTTP_PORT,
    METRICS_PORT,
    container_security_context,
    front_door_labels,
    front_door_selector,
    owner_reference,
    pod_security_context,
)
from diffusion_operator.builders.configmap import CONFIG_DIR, configmap_name
from diffusion_operator.builders.deployment import PRESTOP_SLEEP_SECONDS, shared_secret_env
from diffusion_operator.hashing import config_hash

FRONT_DOOR_CONTAINER = "front-door"
FRONT_DOOR_COMMAND = "front-door"  # `diffusion-runtime front-door --config runtime.yaml`
FRONT_DOOR_SUFFIX = "-frontdoor"


def front_door_name(dd: DiffusionDeployment) -> str:
    return f"{dd.name}{FRONT_DOOR_SUFFIX}"


def _metadata(dd: DiffusionDeployment, owner: dict) -> dict:
    return {
        "name": front_door_name(dd),
        "namespace": dd.namespace,
        "labels": front_door_labels(dd.name),
        "ownerReferences": [owner_reference(owner)],
    }


def front_door_endpoint(dd: DiffusionDeployment) -> str:
    return f"http://{front_door_name(dd)}.{dd.namespace}.svc:{HTTP_PORT}"


def front_door_resources(dd: DiffusionDeployment) -> dict:
    assert dd.spec.queue is not None
    resources = dd.spec.queue.front_door.resources
    if resources is None:
        return copy.deepcopy(DEFAULT_FRONT_DOOR_RESOURCES)
    return resources.model_dump(by_alias=True, exclude_none=True)


def front_door_placement(dd: DiffusionDeployment) -> dict:
    """nodeSelector, tolerations and affinity of the front-door pods (spec.queue.frontDoor): theirs alone,
    none of the runtime pods' GPU placement; without an affinity, prefer one front-door pod per node."""
    fd = dd.spec.queue.front_door if dd.spec.queue is not None else None
    assert fd is not None
    out: dict = {}
    if fd.node_selector:
        out["nodeSelector"] = dict(fd.node_selector)
    if fd.tolerations:
        out["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in fd.tolerations]
    out["affinity"] = copy.deepcopy(fd.affinity) if fd.affinity else {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "labelSelector": {"matchLabels": front_door_selector(dd.name)},
                        "topologyKey": "kubernetes.io/hostname",
                    },
                }
            ]
        }
    }  # fmt: skip
    return out


def build_front_door_deployment(dd: DiffusionDeployment, owner: dict, configmap: dict) -> dict:
    queue = dd.spec.queue
    assert queue is not None
    spec = dd.spec
    container = {
        "name": FRONT_DOOR_CONTAINER,
        "image": spec.template.image,
        "command": ["diffusion-runtime"],
        "args": [FRONT_DOOR_COMMAND, "--config", f"{CONFIG_DIR}/runtime.yaml"],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "env": [{"name": "HOME", "value": "/tmp"}, *shared_secret_env(dd)],
        "resources": front_door_resources(dd),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "http"},
            "periodSeconds": 5,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        # as the runtime pods: out of the Service before SIGTERM, so no new connection reaches it
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        "securityContext": container_security_context(),
    }
    if spec.template.image_pull_policy:
        container["imagePullPolicy"] = spec.template.image_pull_policy
    pod_spec: dict = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # a sync request is held up to its timeout: the pod may finish answering the ones it holds
        "terminationGracePeriodSeconds": spec.server.request_timeout_seconds + 30,
        "securityContext": pod_security_context(),
        "serviceAccountName": spec.template.service_account_name or "default",
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": configmap_name(dd)}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    pod_spec.update(front_door_placement(dd))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(dd, owner),
        "spec": {
            "replicas": queue.front_door.replicas,
            "selector": {"matchLabels": front_door_selector(dd.name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": front_door_labels(dd.name),
                    "annotations": {CONFIG_HASH_ANNOTATION: config_hash(configmap["data"])},
                },
                "spec": pod_spec,
            },
        },
    }


def build_front_door_service(dd: DiffusionDeployment, owner: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(dd, owner),
        "spec": {
            "type": "ClusterIP",
            "selector": front_door_selector(dd.name),
            "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


def build_front_door_pdb(dd: DiffusionDeployment, owner: dict) -> dict:
    """At most one front-door pod down at a time (with the default 2 replicas, one always answers)."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(dd, owner),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": front_door_selector(dd.name)}},
    }


def build_front_door(dd: DiffusionDeployment, owner: dict, configmap: dict) -> list[dict]:
    return [
        build_front_door_deployment(dd, owner, configmap),
        build_front_door_service(dd, owner),
        build_front_door_pdb(dd, owner),
    ]
