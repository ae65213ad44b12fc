"""autoscaling/v2 HorizontalPodAutoscaler on the runtime's per-pod demand (Pods metric
`diffusion_demand_requests`: requests waiting + running), with the spec's scale-up/scale-down behavior."""

from __future__ import annotations

from diffusion_operator.api.funcs import behavior, target_demand
from diffusion_operator.api.types import DiffusionDeployment
from diffusion_operator.builders.common import metadata

# the runtime's per-pod demand gauge (waiting + running requests, sync and async): every autoscaling
# path scales on it (HPA Pods metric, KEDA Prometheus query, dashboard)
DEMAND_METRIC = "diffusion_demand_requests"


def quantity(value: float) -> str:
    """2 -> "2", 1.5 -> "1500m" (Kubernetes quantity, no float noise)."""
    milli = round(value * 1000)
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def build_hpa(dd: DiffusionDeployment, owner: dict) -> dict:
    a = dd.spec.autoscaling
    assert a is not None
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(dd.name, dd, owner),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": dd.name},
            "minReplicas": a.min_replicas,
            "maxReplicas": a.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": DEMAND_METRIC},
                        "target": {"type": "AverageValue", "averageValue": quantity(target_demand(a))},
                    },
                }
            ],
            "behavior": behavior(a.behavior),
        },
    }
