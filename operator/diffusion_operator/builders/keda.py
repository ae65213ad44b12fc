"""KEDA ScaledObject (keda.sh/v1alpha1) on the same per-pod demand signal as the HPA, read from
Prometheus (the trigger's serverAddress is the operator's `--keda-prometheus-address`).

The query sums the pods' average demand (the rate of `diffusion_demand_request_seconds_total` over
`DEMAND_RATE_WINDOW`, the same signal the adapter serves the HPA) over the DiffusionDeployment's pods (the labels the chart's
PodMonitor attaches: `namespace` and `diffusion_dev_deployment`, from the pod label
`diffusion.dev/deployment`, an exact match, unlike a `pod=~"NAME-.*"` regex that also matches
another deployment named NAME-x). With `metricType: AverageValue` KEDA hands that total to the HPA it
creates as an External metric with an AverageValue target, and the HPA divides it by the current
replica count: the same per-pod average the `hpa` engine's Pods metric aims for, at `threshold` =
targetDemand. No series (no pod scraped yet) reads as 0 (`or vector(0)`).

With spec.queue the ScaledObject reads the queue server itself, not Prometheus: one `redis-streams`
trigger on the deployment's work stream (the runtime contract's `QueueConfig.stream`; no consumer group,
which would make KEDA count only started jobs) with `streamLength` = targetDemand: the runtime deletes a job's entry when the job
finishes or is cancelled, so the stream's length is the jobs waiting + running (docs/queue.md), the
same demand as the front door's gauge, and 0 when idle (the trigger turns inactive and KEDA scales to
minReplicaCount, 0 included; any entry wakes it). The server's address and password come from the
queue Secret through a TriggerAuthentication `<name>-queue` (secretTargetRef: by reference, never
copied): KEDA's scaler takes host:port and a password, not the URL (queue.secretRef.addressKey and
passwordKey; database 0).
"""

from __future__ import annotations

from diffusion_runtime.contract.autoscaling import DEMAND_RATE_WINDOW, DEMAND_SECONDS_METRIC
from diffusion_runtime.contract.config import QueueConfig

from diffusion_operator.api.funcs import behavior, queue_name, target_demand
from diffusion_operator.api.types import DiffusionDeployment
from diffusion_operator.builders.common import metadata
from diffusion_operator.builders.hpa import quantity

KEDA_API_VERSION = "keda.sh/v1alpha1"
SCALED_OBJECT = "ScaledObject"
SCALED_OBJECTS = "scaledobjects"
TRIGGER_AUTHENTICATION = "TriggerAuthentication"
# how often KEDA reads a trigger (its default 30 s): at zero pods this bounds how late a request wakes the
# deployment; a stream length or one PromQL query every 5 s costs the servers nothing
POLLING_SECONDS = 5


def trigger_auth_name(dd: DiffusionDeployment) -> str:
    return f"{dd.name}-queue"


def work_stream(dd: DiffusionDeployment) -> str:
    """The deployment's work stream, as the runtime names it (the contract's QueueConfig.stream)."""
    return QueueConfig(name=queue_name(dd.namespace, dd.name)).stream


def build_trigger_authentication(dd: DiffusionDeployment, owner: dict) -> dict:
    q = dd.spec.queue
    assert q is not None
    ref = q.secret_ref
    return {
        "apiVersion": KEDA_API_VERSION,
        "kind": TRIGGER_AUTHENTICATION,
        "metadata": metadata(trigger_auth_name(dd), dd, owner),
        "spec": {
            "secretTargetRef": [
                {"parameter": "address", "name": ref.name, "key": ref.address_key},
                {"parameter": "password", "name": ref.name, "key": ref.password_key},
            ]
        },
    }


def queue_triggers(dd: DiffusionDeployment) -> list[dict]:
    a = dd.spec.autoscaling
    assert a is not None
    target = threshold(target_demand(a))
    return [
        {
            "type": "redis-streams",
            "name": "demand",
            # no consumerGroup: with one, KEDA's scaler counts the group's pending entries (started,
            # not acknowledged) and ignores streamLength, so jobs waiting at zero pods (never
            # delivered: not pending) would never wake the deployment. Without it: XLEN.
            "metadata": {"stream": work_stream(dd), "databaseIndex": "0", "streamLength": target},
            "authenticationRef": {"name": trigger_auth_name(dd)},
        }
    ]


def demand_query(namespace: str, name: str) -> str:
    """PromQL: the total demand of one DiffusionDeployment's pods (KEDA divides by replicas)."""
    series = f'{DEMAND_SECONDS_METRIC}_total{{namespace="{namespace}",diffusion_dev_deployment="{name}"}}'
    return f"sum(rate({series}[{DEMAND_RATE_WINDOW}])) or vector(0)"


def threshold(value: float) -> str:
    """KEDA's threshold is a decimal string: 1 -> "1", 1.5 -> "1.5"."""
    return f"{value:g}"


def prometheus_trigger(dd: DiffusionDeployment, prometheus_address: str) -> dict:
    a = dd.spec.autoscaling
    assert a is not None
    return {
        "type": "prometheus",
        "metricType": "AverageValue",
        "metadata": {
            "serverAddress": prometheus_address,
            "query": demand_query(dd.namespace, dd.name),
            "threshold": threshold(target_demand(a)),
        },
    }


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
            # KEDA scales 1 -> 0 itself, `cooldownPeriod` after the trigger last showed demand (its own
            # default 300 s): the CR's one scale-down window serves both engines
            "cooldownPeriod": behavior(a.behavior)["scaleDown"]["stabilizationWindowSeconds"],
            "pollingInterval": POLLING_SECONDS,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": behavior(a.behavior)}},
            "triggers": queue_triggers(dd)
            if dd.spec.queue is not None
            else [prometheus_trigger(dd, prometheus_address)],
        },
    }


__all__ = ["build_scaled_object", "build_trigger_authentication", "demand_query", "quantity"]
