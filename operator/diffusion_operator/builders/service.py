"""Service `<name>`: http 8000 (API, /health, /ready, /metrics) and metrics 9090."""

from __future__ import annotations

from diffusion_operator.builders.common import HTTP_PORT, METRICS_PORT, metadata, selector


def endpoint(spec) -> str:
    return f"http://{spec.name}.{spec.namespace}.svc:{HTTP_PORT}"


def build_service(spec, owner: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(spec.name, spec, owner),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(spec.name),
            "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }
