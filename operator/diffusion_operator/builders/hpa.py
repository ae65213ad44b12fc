"""autoscaling/v2 HorizontalPodAutoscaler on the runtime's per-pod queue depth (Pods metric)."""

from __future__ import annotations

from diffusion_operator.builders.common import metadata

QUEUE_METRIC = "diffusion_queue_depth"


def quantity(value: float) -> str:
    """2 -> "2", 1.5 -> "1500m" (Kubernetes quantity, no float noise)."""
    milli = round(value * 1000)
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def build_hpa(spec, owner: dict) -> dict:
    a = spec.autoscaling
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(spec.name, spec, owner),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name},
            "minReplicas": a.min_replicas,
            "maxReplicas": a.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": QUEUE_METRIC},
                        "target": {"type": "AverageValue", "averageValue": quantity(a.target_queue_depth)},
                    },
                }
            ],
        },
    }
