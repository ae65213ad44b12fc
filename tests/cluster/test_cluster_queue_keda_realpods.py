"""Engine keda on real pods, with KEDA itself running (`diffusion_dev.keda.Keda`: its operator and
metrics API server built from its released module, installed with its own CRDs and RBAC): a
DiffusionDeployment with spec.queue and `autoscaling: {engine: keda, minReplicas: 0}`. The operator's
ScaledObject (a redis-streams trigger on the deployment's work stream, through a TriggerAuthentication
on the queue Secret) is reconciled by KEDA (Ready, its HPA on the external metric); idle, KEDA scales
the runtime pods to zero after the CR's scale-down window; a sync request through the front door then
waits in the queue, its stream entry makes the trigger active, KEDA scales 0 -> 1 and the request
gets its image; idle again, back to zero. The external metric is read where the HPA reads it (the
external metrics API KEDA serves)."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.parse

import pytest
import yaml
from diffusion_dev import wait_for
from diffusion_dev.keda import Keda
from diffusion_dev.loadgen import DEFAULT_BODY, post
from diffusion_dev.real_node import NODE_IP
from fixtures_cluster import REAL_NODE_OFF, switched_off
from PIL import Image
from test_cluster_queue_realpods import _front_door_ready, _runtime_pods, queue_chart
from test_cluster_realpods import _diagnose, _json, _sample

pytestmark = pytest.mark.cluster

REQUEST_TIMEOUT = 300  # seconds a sync request is held (server.requestTimeoutSeconds): a cold start fits
COOLDOWN = 10  # the CR's scale-down window: KEDA's cooldownPeriod before it scales to zero


@pytest.fixture(scope="module")
def keda(cluster):
    if cluster.node is None:
        switched_off(REAL_NODE_OFF)
    k = Keda(cluster, NODE_IP)
    try:
        k.start()
        yield k
    finally:
        k.stop()


def _no_runtime_pods(cluster, ns: str, name: str) -> bool:
    return not _runtime_pods(cluster, ns, name, terminating=True)


# KEDA's build on a cold cache, the shared real node, images, two scale-to-zero windows and a cold start
@pytest.mark.timeout(3600)
def test_keda_scales_a_queued_deployment_to_zero_and_a_request_wakes_it(cluster, node, keda, namespace):
    # with a queue, engine keda needs no Prometheus (KEDA reads the stream): the chart sets no address
    with queue_chart(cluster, namespace) as release:
        ns = release["namespace"]
        doc = _sample()
        name = doc["metadata"]["name"]
        doc["spec"].pop("replicas")
        doc["spec"]["server"]["requestTimeoutSeconds"] = REQUEST_TIMEOUT
        doc["spec"]["queue"] = {}
        doc["spec"]["autoscaling"] = {
            "engine": "keda",
            "minReplicas": 0,
            "maxReplicas": 2,
            "targetDemand": 1,
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": COOLDOWN}},
        }
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
        try:
            _front_door_ready(cluster, ns, name)

            # KEDA took the ScaledObject: Ready (its trigger authenticated and reached the queue server)
            def keda_ready() -> dict | None:
                so = _json(cluster, "get", "scaledobject", name, "-n", ns)
                conds = {c["type"]: c for c in so.get("status", {}).get("conditions", [])}
                return so if conds.get("Ready", {}).get("status") == "True" else None

            so = wait_for(keda_ready, 120, "KEDA: the ScaledObject Ready", interval=2)
            assert so["spec"]["cooldownPeriod"] == COOLDOWN, so["spec"]
            hpa = wait_for(
                lambda: _json(cluster, "get", "hpa", f"keda-hpa-{name}", "-n", ns),
                60,
                "KEDA's HPA",
                interval=2,
            )
            (metric,) = hpa["spec"]["metrics"]
            assert metric["type"] == "External", hpa["spec"]
            # idle: KEDA scales the runtime pods to zero after the cooldown
            t0 = time.monotonic()
            wait_for(lambda: _no_runtime_pods(cluster, ns, name), 300, "KEDA: zero runtime pods", interval=2)
            print(f"zero runtime pods {time.monotonic() - t0:.0f}s after the ScaledObject was Ready")
            # the external metric where the HPA reads it: KEDA's metrics API server, through the aggregator
            selector = urllib.parse.quote(f"scaledobject.keda.sh/name={name}")
            raw = cluster.kubectl(
                "get", "--raw",
                f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/{metric['external']['metric']['name']}"
                f"?labelSelector={selector}",
            ).stdout  # fmt: skip
            items = json.loads(raw)["items"]
            assert items and items[0]["value"] in ("0", "0m"), raw  # an empty stream: no demand

            # a sync request at zero pods: held by the front door; its stream entry wakes the deployment
            base = cluster.service_url(ns, f"{name}-frontdoor", ready=2)
            t1 = time.monotonic()
            code, _, body = post(
                f"{base}/v1/images/generations", {**DEFAULT_BODY, "response_format": "b64_json"},
                REQUEST_TIMEOUT + 30,
            )  # fmt: skip
            waited = time.monotonic() - t1
            assert code == 200, (code, body[:500], keda.diagnose())
            png = base64.b64decode(json.loads(body)["data"][0]["b64_json"])
            with Image.open(io.BytesIO(png)) as image:
                assert (image.format, image.size) == ("PNG", (64, 64))
            assert _runtime_pods(cluster, ns, name), "a runtime pod served it"
            print(f"request-to-image from zero runtime pods with KEDA: {waited:.1f}s")

            # idle again: back to zero
            t2 = time.monotonic()
            wait_for(lambda: _no_runtime_pods(cluster, ns, name), 300, "KEDA: back to zero", interval=2)
            print(f"back to zero {time.monotonic() - t2:.0f}s after the request")
        except (AssertionError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n{_diagnose(cluster, ns)}\n{keda.diagnose()}") from None
