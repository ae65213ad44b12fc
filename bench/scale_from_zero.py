"""Request-to-image from zero runtime pods against a warm pod's, on the local cluster's real node.

Starts its own local cluster (control plane, the real node, Prometheus + prometheus-adapter), loads the
images built from the Dockerfile, installs the chart with its queue server (queue.enabled) and runs the
tiny model (CPU) with `spec.queue` and `autoscaling.minReplicas: 0` (HPA engine, Object metric
diffusion_queue_demand). Each round, interleaved:

  - from zero: wait until the HPA has taken every runtime pod away, then one sync request through the
    front door's Service; its request-to-image time, split at the runtime pod's creation (its
    creationTimestamp, second resolution): the scale-up (request -> pod created: the demand metric,
    Prometheus, the adapter, the HPA) and the pod's start (pod created -> image: scheduling, container
    start, model load, warmup, the job), whose share of the wait is reported;
  - warm: right after, the same request against the now-warm pod.

Medians with min/max over `--rounds` rounds; the ratio from-zero / warm is the figure.

    .venv/bin/python bench/scale_from_zero.py [--rounds 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import yaml
from diffusion_dev import LocalCluster, images, wait_for
from diffusion_dev.install import (
    helm,
    install_with_queue,
    load_images,
    restricted,
)
from diffusion_dev.loadgen import DEFAULT_BODY, post
from diffusion_dev.workloads import (
    model_volume,
    tiny_model_root,
    with_model_on_volume,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "tiny-cpu.yaml"
OPERATOR_NS = "diffusion-system"
NS = "bench-zero"
NAME = "zero"
REQUEST_TIMEOUT = 300
SCALE_DOWN_WINDOW = 10


def _json(cluster, *args) -> dict:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def _stamp(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def _runtime_pods(cluster) -> list[dict]:
    sel = f"app.kubernetes.io/name=diffusion-runtime,app.kubernetes.io/instance={NAME}"
    return _json(cluster, "get", "pods", "-n", NS, "-l", sel)["items"]


def _request(url: str) -> float:
    t = time.monotonic()
    code, _, body = post(url, {**DEFAULT_BODY, "response_format": "b64_json"}, REQUEST_TIMEOUT + 30)
    if code != 200:
        raise RuntimeError(f"request answered {code}: {body[:300]!r}")
    return time.monotonic() - t


def _deploy(cluster) -> str:
    doc = with_model_on_volume(yaml.safe_load(SAMPLE.read_text()))
    doc["metadata"]["name"] = NAME
    doc["spec"].pop("replicas")
    doc["spec"]["server"]["requestTimeoutSeconds"] = REQUEST_TIMEOUT
    doc["spec"]["queue"] = {}
    doc["spec"]["autoscaling"] = {
        "minReplicas": 0,
        "maxReplicas": 1,
        "targetDemand": 1,
        "behavior": {
            "scaleDown": {
                "stabilizationWindowSeconds": SCALE_DOWN_WINDOW,
                "policies": [{"type": "Percent", "value": 100, "periodSeconds": 5}],
            }
        },
    }
    cluster.kubectl("apply", "-n", NS, "-f", "-", input=yaml.safe_dump(doc))
    sel = f"app.kubernetes.io/name=diffusion-frontdoor,app.kubernetes.io/instance={NAME}"

    def doors_ready() -> bool:
        pods = _json(cluster, "get", "pods", "-n", NS, "-l", sel)["items"]
        ready = [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                         for c in p["status"].get("conditions", []))]  # fmt: skip
        return len(ready) >= 1

    wait_for(doors_ready, 600, "the front door Ready", interval=1)
    svc = _json(cluster, "get", "service", f"{NAME}-frontdoor", "-n", NS)
    return f"http://{svc['spec']['clusterIP']}:8000/v1/images/generations"


def run(rounds: int) -> dict:
    with LocalCluster(real_node=True, metrics=True, timeout=120) as cluster:
        assert cluster.node is not None and cluster.monitoring is not None
        restricted(cluster, NS)
        release = f"bench-{uuid.uuid4().hex[:5]}"
        cluster.apply(model_volume(NS, tiny_model_root()))
        load_images(cluster.node, images.TARGETS)
        install_with_queue(cluster, OPERATOR_NS, release, [NS])
        url = _deploy(cluster)
        samples = []
        for i in range(rounds):
            t = time.monotonic()
            wait_for(lambda: not _runtime_pods(cluster), 600, "the runtime pods scaled to zero", interval=1)
            idle = time.monotonic() - t
            asked = time.time()
            cold = _request(url)
            answered = asked + cold

            def ready_pod() -> dict | None:
                # a worker pulls its first job once its model is warm: the API's Ready condition (the
                # readiness probe's next period) can come a moment after the image
                pods = [p for p in _runtime_pods(cluster) if not p["metadata"].get("deletionTimestamp")]
                conds = [c for p in pods for c in p["status"].get("conditions", [])]
                ok = any(c["type"] == "Ready" and c["status"] == "True" for c in conds)
                return pods[0] if len(pods) == 1 and ok else None

            pod = wait_for(ready_pod, 60, "the woken runtime pod Ready", interval=0.5)
            warm = _request(url)
            created = _stamp(pod["metadata"]["creationTimestamp"])  # second resolution (the API's stamps)
            row = {"round": i + 1, "from_zero_s": round(cold, 2), "warm_s": round(warm, 3),
                   "scale_up_s": round(created - asked, 1), "pod_start_s": round(answered - created, 1),
                   "waited_for_zero_s": round(idle, 1)}  # fmt: skip
            print(json.dumps(row), flush=True)
            samples.append(row)
        helm(cluster, "uninstall", release, "--namespace", OPERATOR_NS, "--wait")
        settings = {**cluster.monitoring.settings, "scale_down_window_s": SCALE_DOWN_WINDOW}
    return {"settings": settings, "samples": samples}


def summary(samples: list[dict]) -> dict:
    def stat(key: str) -> dict:
        values = [s[key] for s in samples]
        return {"median": round(statistics.median(values), 3), "min": min(values), "max": max(values)}

    cold, warm = stat("from_zero_s"), stat("warm_s")
    shares = [min(1.0, max(0.0, s["pod_start_s"] / s["from_zero_s"])) for s in samples]
    return {
        "from_zero_s": cold,
        "warm_s": warm,
        "scale_up_s": stat("scale_up_s"),
        "pod_start_s": stat("pod_start_s"),
        "from_zero_vs_warm": round(cold["median"] / warm["median"], 1),
        "pod_start_share": round(statistics.median(shares), 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write scale_from_zero_realpods.json there")
    args = ap.parse_args()
    result = run(args.rounds)
    report = {
        "command": " ".join(["bench/scale_from_zero.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "body": DEFAULT_BODY,
        **result,
        "summary": summary(result["samples"]),
    }
    s = report["summary"]
    print(f"from zero: median {s['from_zero_s']['median']}s (min {s['from_zero_s']['min']}, max "
          f"{s['from_zero_s']['max']}); warm: median {s['warm_s']['median']}s; x{s['from_zero_vs_warm']}; "
          f"pod start {s['pod_start_s']['median']}s = {s['pod_start_share']:.0%} of the wait from zero")  # fmt: skip
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scale_from_zero_realpods.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
