"""Service `<name>`: http 8000 (API, /health, /ready, /metrics) and metrics 9090."""

from __future__ import annotations

from diffusion_operator.api.types import DiffusionDeployment
from diffusion_operator.builders.common import HTTP_PORT, METRICS_PORT, metadata, selector


def endpoint(dd: DiffusionDeployment) -> str:
    """Where clients send requests: the front door's Service with spec.queue, else the runtime pods'."""
    if dd.spec.queue is not None:
        from diffusion_operator.builders.frontdoor import front_door_endpoint

        return front_door_endpoint(dd)
    return f"http://{dd.name}.{dd.namespace}.svc:{HTTP_PORT}"


def build_service(dd: DiffusionDeployment, owner: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(dd.name, dd, owner),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(dd.name),
            "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }
