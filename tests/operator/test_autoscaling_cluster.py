"""spec.autoscaling on the real control plane (no metrics pipeline, no real pods: kwok nodes).

- engine hpa renders the HPA on the per-pod demand metric with the spec's behavior;
- engine keda without KEDA's CRD: ConfigValid=False naming the missing CRD;
- with KEDA's own ScaledObject CRD (from KEDA's released Go module, dev/diffusion_dev/keda.py) installed,
  the ScaledObject the operator renders is accepted by the API server (real server-side apply by the
  operator), switching engines deletes the other engine's object, and the operator never sets the
  Deployment's replicas.
The operator runs with exactly the RBAC rules it declares (rbac.py), as the chart grants them.
"""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from diffusion_dev import wait_for
from diffusion_dev.keda import keda_scaledobject_crd
from diffusion_operator.builders.common import FIELD_MANAGER
from op_helpers import OperatorProcess, get_json, restricted_kubeconfig, sample

pytestmark = pytest.mark.cluster

PROM = "http://prometheus-operated.monitoring.svc:9090"
KEDA_CRD = "scaledobjects.keda.sh"


def tiny(**autoscaling) -> dict:
    doc = copy.deepcopy(sample("tiny-cpu.yaml"))
    del doc["spec"]["replicas"]
    doc["spec"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 3, "targetDemand": 1, **autoscaling}
    return doc


def apply_doc(cluster, namespace: str, doc: dict) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))


def condition(cluster, namespace: str, type_: str) -> dict | None:
    obj = get_json(cluster, "dd", "tiny", "-n", namespace)
    gen = obj["metadata"]["generation"]
    st = obj.get("status") or {}
    if st.get("observedGeneration") != gen:
        return None
    return next((c for c in st.get("conditions", []) if c["type"] == type_), None)


def exists(cluster, namespace: str, resource: str) -> bool:
    return cluster.kubectl("get", resource, "tiny", "-n", namespace, check=False).returncode == 0


def keda_served(cluster) -> bool:
    out = cluster.kubectl("api-resources", "--api-group=keda.sh", "-o", "name", check=False)
    return out.returncode == 0 and "scaledobjects.keda.sh" in out.stdout


def start_operator(cluster, namespace: str, tmp_path) -> OperatorProcess:
    """The operator with a ServiceAccount token bound to exactly its declared namespaced rules
    (rbac.py): KEDA discovery needs no grant, ScaledObjects only get/create/patch/delete."""
    kubeconfig = restricted_kubeconfig(cluster, namespace, tmp_path)
    return OperatorProcess(
        kubeconfig, [namespace], tmp_path / "operator.log", args=["--keda-prometheus-address", PROM]
    ).start()


@pytest.fixture
def no_keda(cluster):
    """The cluster without KEDA's CRD (another test of this session may have installed it)."""
    if keda_served(cluster):
        cluster.kubectl("delete", "crd", KEDA_CRD, "--wait=true", "--timeout=60s")
        wait_for(lambda: not keda_served(cluster), 30, "keda.sh gone from discovery")


@pytest.fixture
def keda_crd(cluster):
    path = keda_scaledobject_crd()
    cluster.kubectl("apply", "--server-side", "-f", str(path))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{KEDA_CRD}")
    wait_for(lambda: keda_served(cluster), 30, "scaledobjects.keda.sh in discovery")
    yield path
    cluster.kubectl("delete", "crd", KEDA_CRD, "--wait=false", check=False)


def test_hpa_engine_on_demand_and_keda_without_its_crd_is_config_invalid(
    cluster, crd, no_keda, namespace, tmp_path
):
    op = start_operator(cluster, namespace, tmp_path)
    try:
        apply_doc(cluster, namespace, tiny(behavior={"scaleDown": {"stabilizationWindowSeconds": 30}}))
        hpa = wait_for(
            lambda: exists(cluster, namespace, "hpa") and get_json(cluster, "hpa", "tiny", "-n", namespace),
            30,
            "the HPA",
        )
        assert hpa["spec"]["metrics"][0]["pods"] == {
            "metric": {"name": "diffusion_demand_requests"},
            "target": {"type": "AverageValue", "averageValue": "1"},
        }
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 30
        assert hpa["spec"]["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0

        apply_doc(cluster, namespace, tiny(engine="keda"))
        cond = wait_for(
            lambda: (c := condition(cluster, namespace, "ConfigValid")) and c["status"] == "False" and c,
            30,
            "ConfigValid=False for engine keda without KEDA",
        )
        assert cond["message"].startswith("spec.autoscaling.engine: keda needs KEDA's ScaledObject CRD"), cond
        assert "install KEDA, or use engine hpa" in cond["message"]
        assert exists(cluster, namespace, "hpa"), "a refused change leaves the running children as they were"
        op.assert_alive()
    finally:
        op.stop()


def test_keda_scaled_object_is_accepted_and_engines_switch(cluster, crd, keda_crd, namespace, tmp_path):
    op = start_operator(cluster, namespace, tmp_path)
    try:
        apply_doc(
            cluster,
            namespace,
            tiny(engine="keda", behavior={"scaleDown": {"stabilizationWindowSeconds": 45}}),
        )
        so = wait_for(
            lambda: (
                exists(cluster, namespace, "scaledobjects.keda.sh")
                and get_json(cluster, "scaledobjects.keda.sh", "tiny", "-n", namespace)
            ),
            30,
            "the ScaledObject",
        )
        # accepted by the API server under KEDA's own schema (pruning would drop unknown fields)
        assert so["spec"]["scaleTargetRef"]["name"] == "tiny"
        assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (1, 3)
        trigger = so["spec"]["triggers"][0]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        assert trigger["metadata"] == {
            "serverAddress": PROM,
            "query": "sum(rate(diffusion_demand_request_seconds_total"
            f'{{namespace="{namespace}",diffusion_dev_deployment="tiny"}}[1m])) or vector(0)',
            "threshold": "1",
        }
        behavior = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 45
        assert so["metadata"]["ownerReferences"][0]["kind"] == "DiffusionDeployment"
        assert wait_for(
            lambda: (c := condition(cluster, namespace, "ConfigValid")) and c["status"] == "True",
            30,
            "ConfigValid",
        )
        assert not exists(cluster, namespace, "hpa")
        dep = get_json(cluster, "deployment", "tiny", "-n", namespace, "--show-managed-fields")
        ours = [m for m in dep["metadata"]["managedFields"] if m["manager"] == FIELD_MANAGER]
        assert ours and all("f:replicas" not in json.dumps(m["fieldsV1"].get("f:spec", {})) for m in ours), (
            "the operator must not own spec.replicas while an autoscaler drives it"
        )

        apply_doc(cluster, namespace, tiny(engine="hpa"))
        wait_for(lambda: exists(cluster, namespace, "hpa"), 30, "the HPA after switching to engine hpa")
        wait_for(
            lambda: not exists(cluster, namespace, "scaledobjects.keda.sh"), 30, "the ScaledObject deleted"
        )
        apply_doc(cluster, namespace, tiny(engine="keda"))
        wait_for(lambda: exists(cluster, namespace, "scaledobjects.keda.sh"), 30, "the ScaledObject again")
        wait_for(lambda: not exists(cluster, namespace, "hpa"), 30, "the HPA deleted")
        op.assert_alive()
    finally:
        op.stop()
