"""Autoscaling reaction time on the local cluster's real node, split into metric pipeline and pod start.

Starts its own local cluster (control plane, the real node, Prometheus + prometheus-adapter from
`diffusion_dev.monitoring`), loads the images built from the Dockerfile, installs the chart and runs
the tiny model (CPU) from a volume. Two phases, same cluster, same pod template:

  1. baseline: a DiffusionDeployment with `replicas: 1`, scaled to 2 by hand (`kubectl scale`):
     the time from the scale to the second pod Ready is the pod start alone.
  2. autoscaling (min 1, max 3, targetDemand 1): a closed-loop load of N clients through the Service;
     measured from load start:
       - first scrape of the new demand: the first sample of the first pod's gauge
         `diffusion_demand_requests` (the demand now) above the target, from the samples Prometheus stored;
       - the autoscalers' signal above the target: the first second at which the pod's average demand
         (the rate of `diffusion_demand_request_seconds_total` over `DEMAND_RATE_WINDOW`, what the
         adapter serves the HPA) exceeds the target, from a subquery at 1 s resolution;
       - HPA decision: the Deployment's replicas raised (polled every 0.25 s);
       - second pod Ready (polled every 0.25 s).
     Metric pipeline = load start -> decision; pod start = decision -> second pod Ready.

    .venv/bin/python bench/autoscale.py [--clients 4] [--out DIR]

Prints the settings used (scrape interval, adapter relist, HPA sync period) and the ratio of the
reaction time to the baseline pod start.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

import yaml
from diffusion_dev import LocalCluster, wait_for
from diffusion_dev.cluster import HPA_SYNC_PERIOD
from diffusion_dev.install import helm, install_operator, load_images, restricted
from diffusion_dev.loadgen import ClosedLoopLoad
from diffusion_dev.workloads import model_volume, tiny_model_root, with_model_on_volume
from diffusion_runtime.contract.autoscaling import DEMAND_METRIC, DEMAND_RATE_WINDOW, DEMAND_SECONDS_METRIC

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "tiny-cpu.yaml"
OPERATOR_NS = "diffusion-system"
TARGET = 1


def _json(cluster, *args) -> dict:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def _ready_pods(cluster, ns: str, name: str) -> list[dict]:
    pods = _json(cluster, "get", "pods", "-n", ns, "-l", f"app.kubernetes.io/instance={name}")["items"]
    return [
        p for p in pods
        if not p["metadata"].get("deletionTimestamp")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    ]  # fmt: skip


def _poll(condition, timeout: float, what: str) -> float:
    """Poll every 0.25 s; the wall-clock time when the condition first held."""
    wait_for(condition, timeout, what, interval=0.25)
    return time.time()


def _apply_dd(cluster, ns: str, name: str, autoscaling: dict | None) -> None:
    doc = with_model_on_volume(yaml.safe_load(SAMPLE.read_text()))
    doc["metadata"]["name"] = name
    doc["spec"]["server"]["maxQueue"] = 2
    if autoscaling:
        doc["spec"].pop("replicas")
        doc["spec"]["autoscaling"] = autoscaling
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
    wait_for(
        lambda: len(_ready_pods(cluster, ns, name)) == 1, 600, f"dd/{name}'s first pod Ready", interval=1
    )


def baseline_pod_start(cluster, ns: str) -> float:
    name = "manual"
    _apply_dd(cluster, ns, name, None)
    t0 = time.time()
    cluster.kubectl("scale", "dd", name, "-n", ns, "--replicas", "2")
    ready = _poll(lambda: len(_ready_pods(cluster, ns, name)) >= 2, 600, "the second manual pod Ready")
    cluster.kubectl("delete", "dd", name, "-n", ns, "--wait=true", timeout=300)
    wait_for(lambda: not _ready_pods(cluster, ns, name), 300, "the manual pods gone", interval=1)
    return ready - t0


def autoscaled(cluster, ns: str, clients: int) -> dict:
    mon = cluster.monitoring
    name = "auto"
    _apply_dd(cluster, ns, name, {"minReplicas": 1, "maxReplicas": 3, "targetDemand": TARGET})
    (first,) = _ready_pods(cluster, ns, name)
    pod = first["metadata"]["name"]

    def hpa_reads_metric() -> bool:
        hpa = _json(cluster, "get", "hpa", name, "-n", ns)
        conds = {c["type"]: c["status"] for c in hpa.get("status", {}).get("conditions", [])}
        return conds.get("ScalingActive") == "True"

    wait_for(hpa_reads_metric, 180, "the HPA to read the demand metric", interval=1)
    svc = _json(cluster, "get", "service", name, "-n", ns)
    load = ClosedLoopLoad(f"http://{svc['spec']['clusterIP']}:8000/v1/images/generations", clients=clients)
    start = time.time()
    load.start()
    try:
        decided = _poll(
            lambda: _json(cluster, "get", "deployment", name, "-n", ns)["spec"]["replicas"] > 1,
            300, "the HPA to raise the replicas",
        )  # fmt: skip
        ready = _poll(lambda: len(_ready_pods(cluster, ns, name)) >= 2, 600, "the second pod Ready")
    finally:
        load.stop()
    # the samples Prometheus stored for the first pod since the load started
    window = int(time.time() - start) + 5
    selector = f'{{namespace="{ns}",pod="{pod}"}}'
    (series,) = mon.query(f"{DEMAND_METRIC}{selector}[{window}s]")
    samples = [(float(t), float(v)) for t, v in series["values"] if float(t) >= start]
    scraped = next((t for t, v in samples if v > TARGET), None)
    (averaged,) = mon.query(
        f"rate({DEMAND_SECONDS_METRIC}_total{selector}[{DEMAND_RATE_WINDOW}])[{window}s:1s]"
    )
    signal = next((float(t) for t, v in averaged["values"] if float(t) >= start and float(v) > TARGET), None)
    return {
        "first_scrape_above_target_s": None if scraped is None else round(scraped - start, 2),
        "signal_above_target_s": None if signal is None else round(signal - start, 2),
        "hpa_decision_s": round(decided - start, 2),
        "second_pod_ready_s": round(ready - start, 2),
        "pod_start_s": round(ready - decided, 2),
        "requests": dict(load.counts),
        "lost": load.failures,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--out", type=Path, help="write autoscale_cpu.json there (bench/results)")
    args = ap.parse_args()
    with LocalCluster(real_node=True, metrics=True, timeout=120) as cluster:
        assert cluster.node is not None and cluster.monitoring is not None
        load_images(cluster.node)
        release = f"bench-{uuid.uuid4().hex[:5]}"
        install_operator(cluster, OPERATOR_NS, release)
        ns = "bench-autoscale"
        restricted(cluster, ns)
        cluster.apply(model_volume(ns, tiny_model_root()))
        base = baseline_pod_start(cluster, ns)
        result = autoscaled(cluster, ns, args.clients)
        helm(cluster, "uninstall", release, "--namespace", OPERATOR_NS, "--wait")
        settings = {
            **cluster.monitoring.settings,
            "hpa_sync_period": HPA_SYNC_PERIOD,
            "target_demand": TARGET,
            "clients": args.clients,
            "scale_up_behavior": "operator default (no stabilization)",
            "demand_rate_window": DEMAND_RATE_WINDOW,
        }
    reaction = result["second_pod_ready_s"]
    from _common import run_record, write_result  # bench/ is on sys.path when run as a script

    report = {**run_record("autoscale.py"), "settings": settings, "baseline_manual_scale_pod_ready_s": round(base, 2),
              **result, "reaction_vs_manual_pod_start": round(reaction / base, 2)}  # fmt: skip
    print("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    rows = [
        ("load start -> first scrape of demand > target", result["first_scrape_above_target_s"]),
        (f"load start -> average demand ({DEMAND_RATE_WINDOW}) > target", result["signal_above_target_s"]),
        ("load start -> HPA decision (metric pipeline)", result["hpa_decision_s"]),
        ("HPA decision -> second pod Ready (pod start)", result["pod_start_s"]),
        ("load start -> second pod Ready (reaction)", reaction),
        ("baseline: kubectl scale -> second pod Ready", round(base, 2)),
    ]
    print("| figure | seconds |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value} |")
    print(f"reaction / baseline pod start: x{report['reaction_vs_manual_pod_start']}; requests {result['requests']}"
          f"{'; LOST ' + str(result['lost']) if result['lost'] else ''}")  # fmt: skip
    if args.out:
        write_result(args.out / "autoscale_cpu.json", report)
    return 1 if result["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
