"""Defaults the operator applies that are not a field's plain default (they depend on other fields,
or the API server must not store them in every CR)."""

from __future__ import annotations

from typing import Any

DEFAULT_IMAGE = "ghcr.io/diffusion-operator/runtime:0.1.0"
# the per-pod demand a replica is sized for when neither targetDemand nor targetQueueDepth is set: a pod
# generates one request at a time, so 1 = every pod busy with nothing waiting
DEFAULT_TARGET_DEMAND = 1.0
# spec.queue: the Secret the chart's queue server writes (charts/.../templates/queue.yaml; a chart test
# checks they agree), its keys, and the front door's defaults
DEFAULT_QUEUE_SECRET = "diffusion-queue"
DEFAULT_QUEUE_SECRET_KEYS = {"url": "url", "address": "address", "password": "password"}
DEFAULT_FRONT_DOOR_REPLICAS = 2
DEFAULT_FRONT_DOOR_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "100m", "memory": "256Mi"},
    "limits": {"memory": "1Gi"},
}
# scale up fast, scale down slow (autoscaling/v2 HPAScalingRules; spec.autoscaling.behavior merges over these)
DEFAULT_BEHAVIOR: dict[str, dict[str, Any]] = {
    "scaleUp": {
        "stabilizationWindowSeconds": 0,
        "selectPolicy": "Max",
        "policies": [
            {"type": "Percent", "value": 100, "periodSeconds": 15},
            {"type": "Pods", "value": 4, "periodSeconds": 15},
        ],
    },
    "scaleDown": {
        "stabilizationWindowSeconds": 300,
        "selectPolicy": "Max",
        "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
    },
}
