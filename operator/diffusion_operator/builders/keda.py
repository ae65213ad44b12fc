"""KEDA ScaledObject (keda.sh/v1alpha1) on the same per-pod demand signal as the HPA, read from
Prometheus (the trigger's serverAddress is the operator's `--keda-prometheus-address`).

The query sums `diffusion_demand_requests` over the DiffusionDeployment's pods (the labels the chart's
PodMonitor attaches: `namespace` and `diffusion_dev_deployment`, from the pod label
`diffusion.dev/deployment`, an exact match, unlike a `pod=~"NAME-.*"` regex that also matches
another deployment named NAME-x). With `metricType: AverageValue` KEDA hands that total to the HPA it
creates as an External metric with an AverageValue target, and the HPA divides it by the current
replica count: the same per-pod average the `hpa` engine's Pods metric aims for, at `threshold` =
targetDemand. No series (no pod scraped yet) reads as 0 (`or vector(0)`).
"""

from __future__ import annotations

from diffusion_operator.api.funcs import behavior, target_demand
from diffusion_operator.api.types import DiffusionDeployment
from diffusion_operator.builders.common import metadata
from diffusion_operator.builders.hpa import DEMAND_METRIC, quantity

KEDA_API_VERSION = "keda.sh/v1alpha1"
SCALED_OBJECT = "ScaledObject"
SCALED_OBJECTS = "scaledobjects"


def demand_query(namespace: str, name: str) -> str:
    """PromQL: the total demand of one DiffusionDeployment's pods (KEDA divides by replicas)."""
    return f'sum({DEMAND_METRIC}{{namespace="{namespace}",diffusion_dev_deployment="{name}"}}) or vector(0)'


def threshold(value: float) -> str:
    """KEDA's threshold is a decimal string: 1 -> "1", 1.5 -> "1.5"."""
    return f"{value:g}"


def build_scaled_object(dd: DiffusionDeployment, owner: dict, prometheus_address: str) -> dict:
    a = dd.spec.autoscaling
    assert a is not None
    return {
        "apiVersion": KEDA_API_VERSION,
        "kind": SCALED_OBJECT,
        "metadata": metadata(dd.name, dd, owner),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": dd.name},
            "minReplicaCount": a.min_replicas,
            "maxReplicaCount": a.max_replicas,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": behavior(a.behavior)}},
            "triggers": [
                {
                    "type": "prometheus",
                    "metricType": "AverageValue",
                    "metadata": {
                        "serverAddress": prometheus_address,
                        "query": demand_query(dd.namespace, dd.name),
                        "threshold": threshold(target_demand(a)),
                    },
                }
            ],
        },
    }


__all__ = ["build_scaled_object", "demand_query", "quantity"]
