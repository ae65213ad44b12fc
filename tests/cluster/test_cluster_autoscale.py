"""Autoscaling end to end on real pods: Prometheus scrapes them, prometheus-adapter serves their average
demand (the rate of their request-seconds counter), the HPA the operator renders scales the Deployment up under load and back down after it.

The metrics pipeline is the local cluster's (`diffusion_dev.monitoring`: Prometheus v3 and
prometheus-adapter v0.12.0 built from the module proxy, scraping with the chart's PodMonitor
selection, the adapter with the chart's rule file). The operator is the in-cluster one (chart), the
pods run the runtime image built from the Dockerfile (fixtures of test_cluster_realpods.py).
Traffic: the test's clients -> the Service's ClusterIP on the local bridge.
"""

from __future__ import annotations

import json
import time

import pytest
from diffusion_dev import wait_for
from diffusion_dev.loadgen import ClosedLoopLoad
from diffusion_dev.monitoring import chart_exprs, uses_front_door_metrics
from diffusion_dev.real_node import NODE_NAME
from diffusion_operator.builders.keda import demand_query
from diffusion_runtime.contract.autoscaling import DEMAND_RATE_WINDOW_SECONDS
from test_cluster_realpods import (  # noqa: F401
    _apply,
    _diagnose,
    _json,
    _pods,
    _sample,
    operator_release,
    workload_ns,
)

pytestmark = pytest.mark.cluster

SCALE_DOWN_WINDOW = 30  # seconds, the HPA's scale-down stabilization window set in the CR
LOAD_LIMIT = 120  # seconds of load at most
CLIENTS = 4
TRICKLE_THINK = 0.1  # seconds the one client left after the burst waits between requests (~45 ms each)


def _quantity(q: str) -> float:
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _ready_pods(cluster, ns, name) -> list[dict]:
    out = []
    for pod in _pods(cluster, ns, name):
        conds = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
        if conds.get("Ready") == "True" and not pod["metadata"].get("deletionTimestamp"):
            out.append(pod)
    return out


def _hpa(cluster, ns, name) -> dict:
    return _json(cluster, "get", "hpa", name, "-n", ns)


def _served_metric(cluster, ns) -> dict:
    raw = cluster.kubectl(
        "get",
        "--raw",
        f"/apis/custom.metrics.k8s.io/v1beta2/namespaces/{ns}/pods/*/diffusion_demand_requests",
    ).stdout
    return {item["describedObject"]["name"]: _quantity(item["value"]) for item in json.loads(raw)["items"]}


def test_the_hpa_scales_on_demand_read_from_prometheus_through_the_adapter(
    cluster,
    node,
    workload_ns,  # noqa: F811 - the fixture imported above
    operator_release,  # noqa: F811
):
    mon = cluster.monitoring
    if mon is None:
        pytest.skip("the metrics pipeline is off (DIFFUSION_DEV_METRICS=0)")
    ns = workload_ns
    doc = _sample()
    name = doc["metadata"]["name"]
    doc["spec"].pop("replicas")
    doc["spec"]["autoscaling"] = {
        "minReplicas": 1,
        "maxReplicas": 3,
        "targetDemand": 1,
        # scale down quickly once the window has passed: the test waits for the window, not a policy
        "behavior": {
            "scaleDown": {
                "stabilizationWindowSeconds": SCALE_DOWN_WINDOW,
                "policies": [{"type": "Percent", "value": 100, "periodSeconds": 5}],
            }
        },
    }
    # 4 clients on one pod: one runs, two wait, the fourth is turned away (429 + Retry-After, retried)
    doc["spec"]["server"]["maxQueue"] = 2
    _apply(cluster, ns, doc)
    try:
        wait_for(
            lambda: len(_ready_pods(cluster, ns, name)) == 1, 600, f"dd/{name}'s first pod Ready", interval=2
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{_diagnose(cluster, ns)}") from None
    (first,) = _ready_pods(cluster, ns, name)

    # the pipeline carries the pod's gauge: Prometheus target up, the adapter serves it, the HPA reads it
    try:
        served = wait_for(lambda: _served_metric(cluster, ns).get(first["metadata"]["name"]) is not None and
                          _served_metric(cluster, ns), 120, "the adapter to serve the pod's demand", interval=1)  # fmt: skip
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{mon.diagnose()}") from None
    assert served[first["metadata"]["name"]] == 0.0, served

    def hpa_active():
        conds = {c["type"]: c for c in _hpa(cluster, ns, name).get("status", {}).get("conditions", [])}
        return conds.get("ScalingActive", {}).get("status") == "True"

    wait_for(hpa_active, 120, "the HPA to read the metric (ScalingActive)", interval=1)

    load = ClosedLoopLoad(f"{cluster.service_url(ns, name)}/v1/images/generations", clients=CLIENTS)
    load.start()
    seen_demand = 0.0
    scaled_pods: list[dict] = []
    try:
        while time.monotonic() - load.started_at < LOAD_LIMIT:
            current = _hpa(cluster, ns, name).get("status", {}).get("currentMetrics") or []
            for m in current:
                seen_demand = max(seen_demand, _quantity(m["pods"]["current"]["averageValue"]))
            scaled_pods = _ready_pods(cluster, ns, name)
            if len(scaled_pods) >= 2:
                break
            time.sleep(1)
        scaled_at = time.monotonic() - load.started_at
        assert len(scaled_pods) >= 2, (
            f"not scaled to 2 Ready pods within {LOAD_LIMIT}s of load (HPA saw demand {seen_demand}; "
            f"{load.summary()})\n{_diagnose(cluster, ns)}"
        )
        assert all(p["spec"]["nodeName"] == NODE_NAME for p in scaled_pods)
        # a few seconds of load on the new pods too, then every chart expression against live data
        time.sleep(5)
        exprs = chart_exprs(
            cluster.bin_dir / "helm", {"namespace": ns, "deployment": name, "__rate_interval": "1m"}
        )
        # the shared queue's panels and alerts read the front door: test_cluster_queue_realpods checks them
        exprs = [(title, expr) for title, expr in exprs if not uses_front_door_metrics(expr)]
        empty = [(title, expr) for title, expr in exprs if not mon.query(expr)]
        # the KEDA engine's query (the same signal, summed over the pods) against the same live data
        (keda_total,) = mon.query(demand_query(ns, name))
    finally:
        load.stop()
    stopped = time.monotonic()
    assert not empty, f"chart expressions without a series from the live Prometheus: {empty}"
    rules = [r for g in mon.api("/api/v1/rules")["data"]["groups"] for r in g["rules"]]
    assert rules and all(r["health"] == "ok" for r in rules), rules
    assert seen_demand > 1, seen_demand  # the HPA read the demand from Prometheus via the adapter
    assert float(keda_total["value"][1]) > 1, keda_total

    # the burst is over; one client stays, pausing after each answer (TRICKLE_THINK, about twice a
    # request's time), so its demand is clearly below one pod's worth, not at the target where a ceil
    # may rightly ask for two: back to one pod once the burst has left the averaging window and the
    # scale-down stabilization window has passed, and the requests in flight on the pods that go are
    # drained, not lost
    trickle = ClosedLoopLoad(load.url, clients=1, think=TRICKLE_THINK).start()

    def decided_one() -> bool:  # the HPA's decision: the Deployment asked for one pod
        return _json(cluster, "get", "deployment", name, "-n", ns)["spec"]["replicas"] == 1

    try:
        wait_for(decided_one, DEMAND_RATE_WINDOW_SECONDS + SCALE_DOWN_WINDOW + 120, "the HPA to scale back to 1",
                 interval=1)  # fmt: skip
        down = time.monotonic() - stopped
        # the pods that go drain their requests in flight (the trickle keeps sending meanwhile)
        wait_for(
            lambda: len(_pods(cluster, ns, name)) == 1, 180, "the extra pods to drain and go", interval=1
        )
        gone = time.monotonic() - stopped
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {_hpa(cluster, ns, name).get('status')}") from None
    finally:
        trickle.stop()
    print(f"scaled to {len(scaled_pods)} Ready pods {scaled_at:.0f}s after load start (max demand seen "
          f"{seen_demand:g}); scale-down to 1 decided {down:.0f}s after the burst (window {SCALE_DOWN_WINDOW}s), "
          f"extra pods gone after {gone:.0f}s; requests: burst {load.summary()}; during scale-down "
          f"{trickle.summary()}")  # fmt: skip
    assert _hpa(cluster, ns, name)["status"].get("desiredReplicas") == 1
    # not before the window has passed, and once the burst has left the demand's averaging window (the
    # trickle alone averages below one pod's worth) plus the stabilization window, an HPA sync (5 s),
    # scrapes (1 s) and relists (2 s). With the gauge sampled once per scrape, the trickle's request
    # showed on a random subset of the pods at each sync, the stabilization window kept the largest
    # recommendation and CI measured 158 s for a 30 s window
    assert SCALE_DOWN_WINDOW - 5 <= down <= DEMAND_RATE_WINDOW_SECONDS + SCALE_DOWN_WINDOW + 45, down
    # nothing lost: every request answered 200, some only after a 429/503 + Retry-After retry
    assert not load.failures and not trickle.failures, (load.failures, trickle.failures)
    assert load.counts["200"] >= 10 and trickle.counts["200"] >= 1, (load.summary(), trickle.summary())
    assert load.counts["429 retried"] > 0, load.summary()  # the 4th client on one pod was turned away
