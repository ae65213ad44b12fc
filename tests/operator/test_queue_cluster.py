"""spec.queue on the real control plane (kwok nodes, no real pods, no metrics pipeline), the operator
running with exactly the RBAC rules it declares (rbac.py):

- a CR with a queue and `autoscaling.minReplicas: 0` yields the front door (Deployment, Service, PDB),
  the runtime children, and an HPA with minReplicas 0 on the Object metric, which the API server
  accepts (HPAScaleToZero, on by default in this Kubernetes); status.endpoint names the front door;
- the HPA scaling the runtime Deployment to 0 shows as Ready=True/ScaledToZero and status.queue;
- with KEDA's ScaledObject and TriggerAuthentication CRDs the keda engine's objects are accepted;
- the queue removed: the front door and the TriggerAuthentication are deleted.
"""

from __future__ import annotations

import copy
import json
import subprocess

import pytest
import yaml
from diffusion_dev import wait_for
from diffusion_dev.fake_nodes import fake_cpu_placement
from diffusion_dev.keda import keda_scaledobject_crd, keda_triggerauthentication_crd
from diffusion_runtime.contract.config import QUEUE_URL_ENV
from op_helpers import OperatorProcess, get_json, restricted_kubeconfig, sample

pytestmark = pytest.mark.cluster

KEDA_CRDS = ("scaledobjects.keda.sh", "triggerauthentications.keda.sh")


def tiny_queue(**autoscaling) -> dict:
    doc = copy.deepcopy(sample("tiny-cpu.yaml"))
    del doc["spec"]["replicas"]
    doc["spec"]["queue"] = {"maxAttempts": 2}
    doc["spec"]["autoscaling"] = {"minReplicas": 0, "maxReplicas": 3, "targetDemand": 1, **autoscaling}
    return doc


def apply_doc(cluster, namespace: str, doc: dict, check: bool = True):
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc), check=check)


def exists(cluster, namespace: str, resource: str, name: str) -> bool:
    return cluster.kubectl("get", resource, name, "-n", namespace, check=False).returncode == 0


def current_status(cluster, namespace: str) -> dict | None:
    obj = get_json(cluster, "dd", "tiny", "-n", namespace)
    st = (obj or {}).get("status") or {}
    return st if st.get("observedGeneration") == obj["metadata"]["generation"] else None


def ready(status: dict | None) -> dict:
    return next((c for c in (status or {}).get("conditions", []) if c["type"] == "Ready"), {})


def start_operator(cluster, namespace: str, tmp_path) -> OperatorProcess:
    kubeconfig = restricted_kubeconfig(cluster, namespace, tmp_path)
    return OperatorProcess(kubeconfig, [namespace], tmp_path / "operator.log").start()


def test_scale_to_zero_without_a_queue_is_refused_by_the_api_server(cluster, crd, namespace):
    doc = tiny_queue()
    del doc["spec"]["queue"]
    out = apply_doc(cluster, namespace, doc, check=False)
    assert out.returncode != 0
    assert "autoscaling.minReplicas 0 (scale to zero) needs spec.queue" in out.stderr, out.stderr


def test_a_queue_yields_the_front_door_and_an_hpa_that_scales_to_zero(cluster, crd, namespace, tmp_path):
    op = start_operator(cluster, namespace, tmp_path)
    try:
        apply_doc(cluster, namespace, tiny_queue())
        hpa = wait_for(
            lambda: (
                exists(cluster, namespace, "hpa", "tiny")
                and get_json(cluster, "hpa", "tiny", "-n", namespace)
            ),
            30,
            "the HPA",
        )
        # stored by the API server as sent: minReplicas 0 (HPAScaleToZero) on the queue's Object metric
        assert hpa["spec"]["minReplicas"] == 0
        assert hpa["spec"]["metrics"] == [
            {
                "type": "Object",
                "object": {
                    "describedObject": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tiny"},
                    "metric": {"name": "diffusion_queue_demand"},
                    "target": {"type": "AverageValue", "averageValue": "1"},
                },
            }
        ]
        front = wait_for(
            lambda: get_json(cluster, "deployment", "tiny-frontdoor", "-n", namespace), 30, "the front door"
        )
        pod = front["spec"]["template"]["spec"]
        assert pod["containers"][0]["args"][0] == "front-door" and front["spec"]["replicas"] == 2
        if cluster.node is not None:
            # with the real node, kwok's CPU node is tainted and untainted CPU pods land on the real node,
            # which has not imported the images: pin these front-door pods to the kwok CPU node (another
            # field manager: the operator's apply neither owns nor reverts these fields)
            placement = json.dumps({"spec": {"template": {"spec": fake_cpu_placement()}}})
            cluster.kubectl("patch", "deployment", "tiny-frontdoor", "-n", namespace, "--type", "merge",
                            "-p", placement)  # fmt: skip
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env[QUEUE_URL_ENV]["valueFrom"]["secretKeyRef"] == {"name": "diffusion-queue", "key": "url"}
        svc = get_json(cluster, "service", "tiny-frontdoor", "-n", namespace)
        assert svc["spec"]["selector"]["app.kubernetes.io/name"] == "diffusion-frontdoor"
        pdb = get_json(cluster, "pdb", "tiny-frontdoor", "-n", namespace)
        assert pdb["spec"]["maxUnavailable"] == 1
        assert exists(cluster, namespace, "service", "tiny") and exists(cluster, namespace, "pdb", "tiny")
        # kwok runs the front door's pods: its Service has endpoints, the runtime's Service none of them
        status = wait_for(
            lambda: (
                (s := current_status(cluster, namespace))
                and s.get("queue", {}).get("frontDoor") == "2/2"
                and s
            ),
            60,
            "status.queue.frontDoor 2/2",
        )
        assert status["endpoint"] == f"http://tiny-frontdoor.{namespace}.svc:8000"
        cm = get_json(cluster, "configmap", "tiny-config", "-n", namespace)
        queue = yaml.safe_load(cm["data"]["runtime.yaml"])["queue"]
        assert queue["name"] == f"{namespace}/tiny" and queue["max_attempts"] == 2

        # what the HPA does at zero demand: the runtime Deployment at 0 replicas
        cluster.kubectl("scale", "deployment", "tiny", "-n", namespace, "--replicas=0")
        status = wait_for(
            lambda: (
                (s := current_status(cluster, namespace))
                and s.get("queue", {}).get("scaledToZero")
                and ready(s).get("reason") == "ScaledToZero"
                and s
            ),
            60,
            "Ready=True ScaledToZero",
        )
        assert ready(status)["status"] == "True", status
        wide = cluster.kubectl("get", "dd", "tiny", "-n", namespace, "-o", "wide").stdout.splitlines()
        header = wide[0].split()
        assert header[-5:] == ["QUEUE", "FRONT", "COLD", "WARM", "MESSAGE"], wide  # MESSAGE stays last
        at = (wide[0] + " ").index(" FRONT ") + 1
        assert wide[1][at:].split()[0] == "2/2", wide
        assert "ScaledToZero" in wide[1], wide

        # the queue turned off: the front door goes, the runtime pods' Service is the endpoint again
        doc = copy.deepcopy(sample("tiny-cpu.yaml"))
        apply_doc(cluster, namespace, doc)
        for kind in ("deployment", "service", "pdb"):
            wait_for(
                lambda k=kind: not exists(cluster, namespace, k, "tiny-frontdoor"), 30, f"{kind} deleted"
            )
        status = wait_for(
            lambda: (s := current_status(cluster, namespace)) and "queue" not in s and s,
            30,
            "status.queue gone",
        )
        assert status["endpoint"] == f"http://tiny.{namespace}.svc:8000"
        op.assert_alive()
    finally:
        op.stop()


@pytest.fixture
def keda_crds(cluster):
    for path in (keda_scaledobject_crd(), keda_triggerauthentication_crd()):
        cluster.kubectl("apply", "--server-side", "-f", str(path))
    for crd in KEDA_CRDS:
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd}")
    yield
    for crd in KEDA_CRDS:
        cluster.kubectl("delete", "crd", crd, "--wait=false", check=False)


def test_keda_engine_reads_the_work_stream_and_its_trigger_authentication_is_accepted(
    cluster, crd, keda_crds, namespace, tmp_path
):
    op = start_operator(cluster, namespace, tmp_path)
    try:
        apply_doc(cluster, namespace, tiny_queue(engine="keda"))
        so = wait_for(
            lambda: (
                exists(cluster, namespace, "scaledobjects.keda.sh", "tiny")
                and get_json(cluster, "scaledobjects.keda.sh", "tiny", "-n", namespace)
            ),
            60,
            "the ScaledObject",
        )
        assert so["spec"]["minReplicaCount"] == 0
        triggers = so["spec"]["triggers"]
        assert [(t["type"], t["metadata"]["streamLength"]) for t in triggers] == [("redis-streams", "1")]
        assert {t["metadata"]["stream"] for t in triggers} == {f"dq:{namespace}/tiny:work"}
        assert not any("consumerGroup" in t["metadata"] for t in triggers)  # XLEN, not the pending count
        auth = get_json(cluster, "triggerauthentications.keda.sh", "tiny-queue", "-n", namespace)
        assert {r["parameter"]: r["key"] for r in auth["spec"]["secretTargetRef"]} == {
            "address": "address",
            "password": "password",
        }
        assert not exists(cluster, namespace, "hpa", "tiny")
        # back to the hpa engine: the TriggerAuthentication goes with the ScaledObject
        apply_doc(cluster, namespace, tiny_queue(engine="hpa"))
        wait_for(lambda: exists(cluster, namespace, "hpa", "tiny"), 30, "the HPA")
        wait_for(
            lambda: not exists(cluster, namespace, "scaledobjects.keda.sh", "tiny"), 30, "ScaledObject gone"
        )
        wait_for(
            lambda: not exists(cluster, namespace, "triggerauthentications.keda.sh", "tiny-queue"),
            30,
            "TriggerAuthentication gone",
        )
        op.assert_alive()
    finally:
        op.stop()


def test_the_charts_queue_server_objects_are_accepted_by_the_api_server(cluster, namespace):
    """`helm template` of the queue server (StatefulSet on a claim, Service, Secrets), server-side dry
    run against this API server (admission included: the namespace enforces PodSecurity restricted)."""
    from pathlib import Path

    cluster.kubectl(
        "label", "namespace", namespace, "--overwrite", "pod-security.kubernetes.io/enforce=restricted"
    )
    helm = str(Path(cluster.bin_dir) / "helm")
    chart = Path(__file__).resolve().parents[2] / "charts" / "diffusion-operator"
    out = subprocess.run(
        [helm, "template", "dq", str(chart), "--namespace", namespace, "--set", "queue.enabled=true",
         "--set", f"queue.secretNamespaces={{{namespace}}}", "--show-only", "templates/queue.yaml"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(out) if d)
    assert kinds == ["Secret", "Secret", "Service", "StatefulSet"], kinds
    applied = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=out, check=False)
    assert applied.returncode == 0, applied.stderr
    assert "Warning" not in applied.stderr, applied.stderr  # no PodSecurity warning either
