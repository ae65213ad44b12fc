"""autoscaling/v2 HorizontalPodAutoscaler with the spec's scale-up/scale-down behavior, on the demand:

- without spec.queue, the runtime's per-pod demand (Pods metric `diffusion_demand_requests`: requests
  waiting + running in each pod, averaged over `DEMAND_RATE_WINDOW`: the adapter serves the rate of the
  runtime's request-seconds counter under that name, contract/autoscaling.py);
- with spec.queue, the queue's demand (`diffusion_queue_demand`: jobs waiting + running, read from the
  queue server by every front-door replica, so it exists at zero runtime pods) as an Object metric
  describing the runtime Deployment: prometheus-adapter serves it from the front-door pods' series by
  their `diffusion_dev_deployment` label (charts/diffusion-operator/files/prometheus-adapter-rules.yaml).
  With an AverageValue target the HPA asks for ceil(demand / targetDemand) pods whatever the current
  count, 0 included, which is what lets minReplicas be 0 (HPAScaleToZero, on by default since
  Kubernetes 1.37, needs an Object or External metric)."""

from __future__ import annotations

from diffusion_runtime.contract.autoscaling import (
    DEMAND_METRIC,  # the runtime's per-pod demand (adapter: averaged)
)
from diffusion_runtime.contract.queue import QUEUE_DEMAND_METRIC  # the front door's gauge: waiting + running

from diffusion_operator.api.funcs import behavior, target_demand
from diffusion_operator.api.types import DiffusionDeployment
from diffusion_operator.builders.common import metadata


def quantity(value: float) -> str:
    """2 -> "2", 1.5 -> "1500m" (Kubernetes quantity, no float noise)."""
    milli = round(value * 1000)
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def demand_metric(dd: DiffusionDeployment) -> dict:
    """The HPA's one metric: the queue's demand (Object) with spec.queue, else the pods' (Pods)."""
    a = dd.spec.autoscaling
    assert a is not None
    target = {"type": "AverageValue", "averageValue": quantity(target_demand(a))}
    if dd.spec.queue is not None:
        return {
            "type": "Object",
            "object": {
                "describedObject": {"apiVersion": "apps/v1", "kind": "Deployment", "name": dd.name},
                "metric": {"name": QUEUE_DEMAND_METRIC},
                "target": target,
            },
        }
    return {"type": "Pods", "pods": {"metric": {"name": DEMAND_METRIC}, "target": target}}


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
            "metrics": [demand_metric(dd)],
            "behavior": behavior(a.behavior),
        },
    }
