"""The operator against the real control plane (kube-apiserver, controller manager, scheduler, kwok GPU nodes).

The operator runs as a subprocess (`diffusion-operator run --namespace NS`), started by the `operator`
fixture. kwok marks scheduled pods Running and Ready, so Deployments become available without GPUs.
"""

from __future__ import annotations

import copy
import json
import time

import pytest
import yaml
from diffusion_dev import on_fake_cpu_node, wait_for
from diffusion_operator import rbac
from diffusion_operator.api import types
from op_helpers import OperatorProcess, get_json, restricted_kubeconfig, sample

pytestmark = pytest.mark.cluster

CHILDREN = (("configmap", "{}-config"), ("deployment", "{}"), ("service", "{}"), ("pdb", "{}"))


def apply_doc(cluster, namespace: str, doc: dict, check: bool = True):
    gpu = (doc.get("spec") or {}).get("gpu") if isinstance(doc.get("spec"), dict) else None
    if isinstance(gpu, dict) and gpu.get("count") == 0:
        # reconcile tests: fake pods on the kwok CPU node, not real ones on the real node
        doc = on_fake_cpu_node(doc)
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc), check=check)


def dd(cluster, namespace: str, name: str) -> dict:
    return get_json(cluster, "dd", name, "-n", namespace)


def conditions(obj: dict) -> dict:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}


def wait_ready(cluster, namespace: str, name: str, replicas: int = 1, timeout: float = 90) -> dict:
    def ready():
        obj = dd(cluster, namespace, name)
        st = obj.get("status") or {}
        if (
            conditions(obj).get("Ready", {}).get("status") == "True"
            and st.get("readyReplicas") == replicas
            and st.get("observedGeneration") == obj["metadata"]["generation"]
        ):
            return obj
        return None

    try:
        return wait_for(ready, timeout, f"dd/{name} Ready with {replicas} replicas")
    except TimeoutError:
        pytest.fail(
            f"dd/{name} not Ready: {json.dumps(dd(cluster, namespace, name).get('status'), indent=1)}"
        )


def children_versions(cluster, namespace: str, name: str) -> dict:
    out = {"dd": dd(cluster, namespace, name)["metadata"]["resourceVersion"]}
    for kind, pattern in CHILDREN:
        out[kind] = get_json(cluster, kind, pattern.format(name), "-n", namespace)["metadata"][
            "resourceVersion"
        ]
    return out


IDLE_RESOURCES = {"diffusiondeployments", "configmaps", "services", "poddisruptionbudgets", "deployments"}


def apiserver_patches(cluster, resources: set[str] = IDLE_RESOURCES) -> float:
    """PATCH/APPLY requests the apiserver counted for `resources` (its own /metrics, parsed).

    The operator writes only with server-side apply and merge patches. Other writers in the shared
    test cluster (namespace deletion of earlier tests: DELETE; controllers' status updates: PUT;
    the root CA publisher: POST/PUT) never PATCH these resources, so this counter is the operator's.
    """
    from prometheus_client.parser import text_string_to_metric_families

    text = cluster.kubectl("get", "--raw", "/metrics").stdout
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "apiserver_request":
            continue
        for s in family.samples:
            if (
                s.name == "apiserver_request_total"
                and s.labels.get("verb") in ("PATCH", "APPLY")
                and s.labels.get("resource") in resources
            ):
                total += s.value
    return total


def test_flux_sample_children_scheduling_status_columns_and_scale(cluster, namespace, operator):
    cluster.kubectl(
        "create", "secret", "generic", "hf-token", "-n", namespace, "--from-literal=token=hf_fake"
    )
    doc = sample("flux-dev.yaml")
    apply_doc(cluster, namespace, doc)
    obj = wait_ready(cluster, namespace, "flux-dev")
    uid = obj["metadata"]["uid"]

    for kind, pattern in CHILDREN:
        child = get_json(cluster, kind, pattern.format("flux-dev"), "-n", namespace)
        assert child is not None, kind
        (ref,) = child["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
            "DiffusionDeployment",
            "flux-dev",
            uid,
            True,
        )
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "diffusion-operator"
    svc = get_json(cluster, "service", "flux-dev", "-n", namespace)
    assert sorted((p["name"], p["port"]) for p in svc["spec"]["ports"]) == [("http", 8000), ("metrics", 9090)]

    st = obj["status"]
    assert st["readyReplicas"] == st["replicas"] == 1
    assert st["endpoint"] == f"http://flux-dev.{namespace}.svc:8000"
    assert st["selector"] == "app.kubernetes.io/instance=flux-dev,app.kubernetes.io/name=diffusion-runtime"
    assert st["cacheTag"] == "DBCache_F1B0_W8I2M0MC2_R0.12"
    assert {c: conditions(obj)[c]["status"] for c in ("Ready", "Progressing", "ConfigValid")} == {
        "Ready": "True",
        "Progressing": "False",
        "ConfigValid": "True",
    }

    def pods_nodes() -> list[str]:
        pods = get_json(cluster, "pods", "-n", namespace, "-l", "app.kubernetes.io/instance=flux-dev")[
            "items"
        ]
        return [p["spec"].get("nodeName") for p in pods if p["status"].get("phase") == "Running"]

    nodes = {n["metadata"]["name"]: n["metadata"]["labels"] for n in get_json(cluster, "nodes")["items"]}
    (node,) = pods_nodes()
    assert nodes[node]["nvidia.com/gpu.compute.major"] == "9", nodes[node]  # float8 -> compute >= 8.9 only

    table = cluster.kubectl("get", "dd", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "MODEL", "READY", "CACHE", "QUANT", "STATUS", "REASON", "AGE"], table
    assert table[1].split()[:7] == [
        "flux-dev",
        "hf://black-forest-labs/FLUX.1-dev",
        "1/1",
        "DBCache_F1B0_W8I2M0MC2_R0.12",
        "float8_per_row",
        "True",
        "AllReplicasReady",
    ], table

    cluster.kubectl("scale", "dd/flux-dev", "-n", namespace, "--replicas", "2")
    obj = wait_ready(cluster, namespace, "flux-dev", replicas=2)
    assert get_json(cluster, "deployment", "flux-dev", "-n", namespace)["spec"]["replicas"] == 2
    assert obj["status"]["ready"] == "2/2"
    placed = wait_for(lambda: (n := pods_nodes()) and len(n) == 2 and n, 30, "2 running pods")
    assert all(nodes[n]["nvidia.com/gpu.compute.major"] == "9" for n in placed)
    assert cluster.kubectl("get", "dd", "-n", namespace).stdout.splitlines()[1].split()[2] == "2/2"


def test_float8_lands_only_on_h100_and_product_selector(cluster, namespace, operator):
    doc = sample("flux-dev.yaml")
    doc["spec"]["replicas"] = 3
    apply_doc(cluster, namespace, doc)
    wait_ready(cluster, namespace, "flux-dev", replicas=3)
    nodes = {n["metadata"]["name"]: n["metadata"]["labels"] for n in get_json(cluster, "nodes")["items"]}
    pods = get_json(cluster, "pods", "-n", namespace)["items"]
    assert len(pods) == 3
    assert all(
        nodes[p["spec"]["nodeName"]]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3" for p in pods
    )

    # int8 pinned to the A100 product lands on the A100 node
    a100 = copy.deepcopy(sample("flux-dev.yaml"))
    a100["metadata"]["name"] = "flux-a100"
    a100["spec"]["gpu"] = {"count": 1, "product": "NVIDIA-A100-SXM4-80GB"}
    a100["spec"]["quantize"] = {"quant_type": "int8_weight_only"}
    apply_doc(cluster, namespace, a100)
    wait_ready(cluster, namespace, "flux-a100")
    (pod,) = get_json(cluster, "pods", "-n", namespace, "-l", "app.kubernetes.io/instance=flux-a100")["items"]
    assert nodes[pod["spec"]["nodeName"]]["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"


def test_cache_change_rolls_and_idle_resync_makes_no_writes(cluster, namespace, operator):
    doc = sample("tiny-cpu.yaml")
    apply_doc(cluster, namespace, doc)
    before = wait_ready(cluster, namespace, "tiny")
    # idle: the operator resyncs every 2 s (fixture), kopf re-lists; nothing may be written
    time.sleep(3)
    versions = children_versions(cluster, namespace, "tiny")
    ours = operator.writes()
    apiserver = apiserver_patches(cluster)
    reconciles = operator.samples()[("diffusion_operator_reconcile_duration_seconds_count", ())]
    time.sleep(8)
    assert (
        operator.samples()[("diffusion_operator_reconcile_duration_seconds_count", ())] > reconciles
    )  # it did resync
    assert operator.writes() == ours, "the operator wrote during an idle period"
    assert apiserver_patches(cluster) == apiserver
    assert children_versions(cluster, namespace, "tiny") == versions

    dep = get_json(cluster, "deployment", "tiny", "-n", namespace)
    old_hash = dep["spec"]["template"]["metadata"]["annotations"]["diffusion.dev/config-hash"]
    assert old_hash == before["status"]["configHash"]
    old_rs = {rs["metadata"]["name"] for rs in get_json(cluster, "replicasets", "-n", namespace)["items"]}
    cluster.kubectl(
        "patch", "dd", "tiny", "-n", namespace, "--type", "merge",
        "-p", json.dumps({"spec": {"cacheDit": {"cache_config": {"residual_diff_threshold": 0.2}}}}),
    )  # fmt: skip
    after = wait_for(
        lambda: (o := wait_ready(cluster, namespace, "tiny"))["status"]["configHash"] != old_hash and o,
        60,
        "a new config hash",
    )
    new_hash = after["status"]["configHash"]
    cm = get_json(cluster, "configmap", "tiny-config", "-n", namespace)
    assert "residual_diff_threshold: 0.2" in cm["data"]["cache-dit.yaml"]
    dep = get_json(cluster, "deployment", "tiny", "-n", namespace)
    assert dep["spec"]["template"]["metadata"]["annotations"]["diffusion.dev/config-hash"] == new_hash
    new_rs = {rs["metadata"]["name"] for rs in get_json(cluster, "replicasets", "-n", namespace)["items"]}
    assert new_rs - old_rs, "no new ReplicaSet: the Deployment did not roll"
    assert "_R0.2_" in after["status"]["cacheTag"] + "_"


def test_drift_is_corrected_and_deleting_the_cr_removes_children(cluster, namespace, operator):
    apply_doc(cluster, namespace, sample("tiny-cpu.yaml"))
    wait_ready(cluster, namespace, "tiny")
    old_uid = get_json(cluster, "deployment", "tiny", "-n", namespace)["metadata"]["uid"]
    cluster.kubectl("delete", "deployment", "tiny", "-n", namespace)
    wait_for(
        lambda: (
            (d := get_json(cluster, "deployment", "tiny", "-n", namespace))
            and d["metadata"]["uid"] != old_uid
        ),
        30,
        "the Deployment to be recreated",
    )
    wait_ready(cluster, namespace, "tiny")

    # a hand edit of an owned field is reverted
    cluster.kubectl("set", "image", "deployment/tiny", "runtime=registry.invalid/hacked:1", "-n", namespace)
    wait_for(
        lambda: (
            get_json(cluster, "deployment", "tiny", "-n", namespace)["spec"]["template"]["spec"][
                "containers"
            ][0]["image"]
            != "registry.invalid/hacked:1"
        ),
        30,
        "the hand-edited image to be restored",
    )
    cluster.kubectl("delete", "configmap", "tiny-config", "-n", namespace)
    wait_for(
        lambda: get_json(cluster, "configmap", "tiny-config", "-n", namespace),
        30,
        "the ConfigMap to be recreated",
    )

    cluster.kubectl("delete", "dd", "tiny", "-n", namespace)

    def all_gone():
        return all(get_json(cluster, kind, p.format("tiny"), "-n", namespace) is None for kind, p in CHILDREN)

    wait_for(all_gone, 60, "every child to be garbage-collected")
    wait_for(
        lambda: not get_json(cluster, "pods", "-n", namespace)["items"], 60, "the pods to go away"
    )  # fmt: skip


def test_schema_refuses_unknown_key_bad_enum_and_min_above_max(cluster, namespace, crd):
    typo = sample("flux-dev.yaml")
    typo["spec"]["cacheDit"]["cache_config"]["enable_sperate_cfg"] = True
    out = apply_doc(cluster, namespace, typo, check=False)
    assert out.returncode != 0
    assert 'unknown field "spec.cacheDit.cache_config.enable_sperate_cfg"' in out.stderr, out.stderr

    enum = sample("flux-dev.yaml")
    enum["spec"]["quantize"]["quant_type"] = "float7_per_row"
    out = apply_doc(cluster, namespace, enum, check=False)
    assert out.returncode != 0
    assert 'spec.quantize.quant_type: Unsupported value: "float7_per_row"' in out.stderr, out.stderr

    autoscale = sample("qwen-image.yaml")
    autoscale["spec"]["autoscaling"] = {"minReplicas": 5, "maxReplicas": 2}
    out = apply_doc(cluster, namespace, autoscale, check=False)
    assert out.returncode != 0
    assert "autoscaling.minReplicas must be <= autoscaling.maxReplicas" in out.stderr, out.stderr

    both = sample("qwen-image.yaml")
    both["spec"]["replicas"] = 2
    out = apply_doc(cluster, namespace, both, check=False)
    assert "spec.replicas and spec.autoscaling are mutually exclusive" in out.stderr, out.stderr

    par = sample("qwen-image.yaml")
    par["spec"]["gpu"]["count"] = 4
    par["spec"]["cacheDit"]["parallelism_config"] = {"ulysses_size": 2}
    out = apply_doc(cluster, namespace, par, check=False)
    assert types.PARALLEL_ON_GPUS in out.stderr, out.stderr

    cpu_ranks = sample("tiny-cpu.yaml")  # device cpu: the ranks are CPU processes, not GPUs
    cpu_ranks["spec"]["cacheDit"]["parallelism_config"] = {"ulysses_size": 2}
    holding = copy.deepcopy(cpu_ranks)
    holding["spec"]["gpu"] = {"count": 2}
    out = apply_doc(cluster, namespace, holding, check=False)
    assert types.PARALLEL_ON_CPU in out.stderr, out.stderr
    many = copy.deepcopy(cpu_ranks)
    many["spec"]["cacheDit"]["parallelism_config"] = {"ulysses_size": 4, "tp_size": types.MAX_RANKS}
    out = apply_doc(cluster, namespace, many, check=False)
    assert types.PARALLEL_ON_CPU in out.stderr, out.stderr

    assert get_json(cluster, "dd", "-n", namespace)["items"] == []  # nothing was stored

    apply_doc(cluster, namespace, cpu_ranks)  # 2 CPU ranks, no GPU: admitted
    stored = dd(cluster, namespace, cpu_ranks["metadata"]["name"])
    assert stored["spec"]["gpu"]["count"] == 0
    assert stored["spec"]["cacheDit"]["parallelism_config"] == {"ulysses_size": 2}


def test_steps_computation_mask_takes_a_cache_dit_policy_name(cluster, namespace, operator):
    doc = sample("tiny-cpu.yaml")
    doc["spec"]["cacheDit"]["cache_config"]["steps_computation_mask"] = "fast"  # cache-dit expands it
    apply_doc(cluster, namespace, doc)
    obj = wait_ready(cluster, namespace, "tiny")
    assert conditions(obj)["ConfigValid"]["status"] == "True"
    cm = get_json(cluster, "configmap", "tiny-config", "-n", namespace)
    assert yaml.safe_load(cm["data"]["cache-dit.yaml"])["cache_config"]["steps_computation_mask"] == "fast"


def events_for(cluster, namespace: str, name: str) -> list[dict]:
    items = get_json(cluster, "events", "-n", namespace)["items"]
    return [
        e
        for e in items
        if e["involvedObject"]["name"] == name and e["involvedObject"]["kind"] == "DiffusionDeployment"
    ]


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda s: s["cacheDit"]["cache_config"].update(Fn_compute_blocks=58, Bn_compute_blocks=8),
         "spec.cacheDit.cache_config.Fn_compute_blocks"),
        (lambda s: s.update(gpu={"count": 1, "product": "NVIDIA-A100-SXM4-80GB"}), "spec.quantize.quant_type"),
        (lambda s: s["cacheDit"].update(parallelism_config={"ulysses_size": 1}), "spec.cacheDit.parallelism_config"),
        (lambda s: s["cacheDit"]["cache_config"].update(steps_computation_mask="fastest"),
         "spec.cacheDit.cache_config.steps_computation_mask"),
    ],
    ids=["fn-bn-above-blocks", "float8-on-a100", "parallel-all-ones", "unknown-mask-policy"],
)  # fmt: skip
def test_semantic_error_sets_config_valid_false_with_one_event(cluster, namespace, operator, mutate, field):
    doc = sample("flux-dev.yaml")
    mutate(doc["spec"])
    apply_doc(cluster, namespace, doc)

    def invalid():
        cond = conditions(dd(cluster, namespace, "flux-dev")).get("ConfigValid")
        return cond if cond and cond["status"] == "False" else None

    cond = wait_for(invalid, 30, "ConfigValid=False")
    assert cond["reason"] == "InvalidSpec" and cond["message"].startswith(field), cond
    events = wait_for(lambda: events_for(cluster, namespace, "flux-dev"), 15, "a Warning event")
    assert [(e["type"], e["reason"]) for e in events] == [("Warning", "InvalidSpec")]
    assert field in events[0]["message"]
    assert events[0]["reportingInstance"] == operator.identity  # which operator instance posted it
    # nothing half-applied, no retry storm: over a few resyncs no child, no second event, no writes
    writes = operator.writes()
    time.sleep(6)
    assert operator.writes() == writes
    assert len(events_for(cluster, namespace, "flux-dev")) == 1
    for kind, pattern in CHILDREN:
        assert get_json(cluster, kind, pattern.format("flux-dev"), "-n", namespace) is None, kind
    operator.assert_alive()

    # fixing the spec brings everything up
    apply_doc(cluster, namespace, sample("flux-dev.yaml"))
    obj = wait_ready(cluster, namespace, "flux-dev")
    assert conditions(obj)["ConfigValid"]["status"] == "True"


def test_autoscaling_builds_an_hpa_and_removing_it_deletes_the_hpa(cluster, namespace, operator):
    doc = sample("qwen-image.yaml")
    apply_doc(cluster, namespace, doc)
    hpa = wait_for(lambda: get_json(cluster, "hpa", "qwen-image", "-n", namespace), 30, "the HPA")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "qwen-image"
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "diffusion_demand_requests"
    assert hpa["spec"]["metrics"][0]["pods"]["target"] == {"type": "AverageValue", "averageValue": "1"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    pod_spec = get_json(cluster, "deployment", "qwen-image", "-n", namespace)["spec"]["template"]["spec"]
    assert pod_spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod_spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"  # ulysses_size 2

    del doc["spec"]["autoscaling"]
    doc["spec"]["replicas"] = 1
    apply_doc(cluster, namespace, doc)
    wait_for(
        lambda: get_json(cluster, "hpa", "qwen-image", "-n", namespace) is None, 30, "the HPA to be deleted"
    )
    wait_ready(cluster, namespace, "qwen-image")


def test_operator_metrics_health_and_json_logs(cluster, namespace, operator):
    apply_doc(cluster, namespace, sample("tiny-cpu.yaml"))
    wait_ready(cluster, namespace, "tiny")
    samples = operator.samples()
    assert samples[("diffusion_operator_reconcile_duration_seconds_count", ())] >= 1
    assert samples[("diffusion_operator_managed_objects", (("kind", "DiffusionDeployment"),))] == 1
    assert samples[("diffusion_operator_managed_objects", (("kind", "children"),))] == 4
    assert samples[("diffusion_operator_reconciles_total", (("result", "ok"),))] >= 1
    json_lines = [json.loads(line) for line in operator.log().splitlines() if line.startswith("{")]
    assert json_lines and all("message" in line for line in json_lines)
    # alone on its namespace: it leads, says so in /metrics and /healthz
    assert samples[("diffusion_operator_leader", ())] == 1
    health = operator.healthz()
    assert health["leader"] is True and health["identity"] == operator.identity == health["holder"]
    assert health["lease"] == f"{namespace}/diffusion-operator"


def test_operator_runs_with_a_least_privilege_token(cluster, namespace, crd, tmp_path):
    kubeconfig = restricted_kubeconfig(cluster, namespace, tmp_path)

    # the token really is restricted
    def can_i(*args: str) -> str:
        return cluster.kubectl(
            "--kubeconfig", str(kubeconfig), "auth", "can-i", *args, check=False
        ).stdout.strip()

    assert can_i("list", "secrets", "-n", namespace) == "no"
    # pods: read-only (the download's progress, the quality gate's termination messages)
    for verb in ("create", "delete", "patch"):
        assert can_i(verb, "pods", "-n", namespace) == "no", verb
    assert can_i("create", "pods", "--subresource=exec", "-n", namespace) == "no"
    assert can_i("list", "pods", "-n", "default") == "no"
    assert can_i("patch", "deployments", "-n", "default") == "no"
    assert can_i("patch", "deployments", "-n", namespace) == "yes"
    proc = OperatorProcess(kubeconfig, [namespace], tmp_path / "operator.log").start()
    try:
        apply_doc(cluster, namespace, sample("tiny-cpu.yaml"))
        wait_ready(cluster, namespace, "tiny")
        bad = sample("flux-dev.yaml")
        bad["spec"]["cacheDit"]["cache_config"]["Fn_compute_blocks"] = 60
        apply_doc(cluster, namespace, bad)
        wait_for(lambda: events_for(cluster, namespace, "flux-dev"), 30, "the Warning event (events: create)")
        proc.assert_alive()
        # (not a bare "403": log timestamps carry microseconds)
        assert "HTTP 403" not in proc.log() and "Forbidden" not in proc.log(), proc.log()[-3000:]
    finally:
        proc.stop()


def test_an_invalid_update_keeps_the_running_children(cluster, namespace, operator):
    apply_doc(cluster, namespace, sample("tiny-cpu.yaml"))
    before = wait_ready(cluster, namespace, "tiny")
    versions = {k: v for k, v in children_versions(cluster, namespace, "tiny").items() if k != "dd"}
    cluster.kubectl(
        "patch", "dd", "tiny", "-n", namespace, "--type", "merge",
        "-p", json.dumps({"spec": {"quantize": {"quant_type": "float8_per_row"}}}),
    )  # fmt: skip

    def invalid():
        obj = dd(cluster, namespace, "tiny")
        cond = conditions(obj).get("ConfigValid", {})
        return obj if cond.get("status") == "False" and obj["status"]["observedGeneration"] == 2 else None

    obj = wait_for(invalid, 30, "ConfigValid=False after the update")
    assert conditions(obj)["ConfigValid"]["message"].startswith(
        "spec.quantize.quant_type: float8_per_row needs a CUDA GPU"
    )
    assert conditions(obj)["Ready"]["status"] == "True"  # the old pods keep serving
    assert obj["status"]["configHash"] == before["status"]["configHash"]
    wait_for(lambda: events_for(cluster, namespace, "tiny"), 15, "a Warning event")
    time.sleep(3)
    after = {k: v for k, v in children_versions(cluster, namespace, "tiny").items() if k != "dd"}
    assert after == versions, "children were touched by an invalid spec"


REMOVABLE_TEMPLATE = {
    "resources": {"requests": {"cpu": "100m"}, "limits": {"memory": "10Gi"}},
    "nodeSelector": {"diffusion.dev/node-profile": "h100"},
    "tolerations": [{"key": "team", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 1,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "flux-dev"}},
                    },
                }
            ]
        }
    },
    "serviceAccountName": "runner",
}


def test_fields_removed_from_the_cr_leave_the_deployment_and_edits_are_put_back(cluster, namespace, operator):
    cluster.kubectl("create", "serviceaccount", "runner", "-n", namespace)
    doc = sample("flux-dev.yaml")
    doc["spec"]["gpu"] = {"count": 1, "product": "NVIDIA-H100-80GB-HBM3"}
    doc["spec"]["template"] = copy.deepcopy(REMOVABLE_TEMPLATE)
    apply_doc(cluster, namespace, doc)
    obj = wait_ready(cluster, namespace, "flux-dev")
    pod = get_json(cluster, "deployment", "flux-dev", "-n", namespace)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {
        "diffusion.dev/node-profile": "h100",
        "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    }
    assert pod["containers"][0]["resources"]["limits"]["memory"] == "10Gi"
    assert {"key": "team", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "podAntiAffinity" in pod["affinity"] and pod["serviceAccountName"] == "runner"

    # someone else edits fields the operator owns: they are put back
    cluster.kubectl(
        "patch", "deployment", "flux-dev", "-n", namespace, "--type", "json", "-p", json.dumps([
            {"op": "remove", "path": "/spec/template/spec/nodeSelector/nvidia.com~1gpu.product"},
            {"op": "replace", "path": "/spec/template/spec/serviceAccountName", "value": "default"},
        ]),
    )  # fmt: skip

    def restored():
        pod = get_json(cluster, "deployment", "flux-dev", "-n", namespace)["spec"]["template"]["spec"]
        return (
            pod.get("nodeSelector", {}).get("nvidia.com/gpu.product") == "NVIDIA-H100-80GB-HBM3"
            and pod.get("serviceAccountName") == "runner"
        )

    wait_for(restored, 30, "the edited fields to be put back")

    # the same CR re-applied without them (kubectl apply computes the removal from its annotation)
    del doc["spec"]["gpu"]["product"]
    del doc["spec"]["template"]
    apply_doc(cluster, namespace, doc)

    def removed():
        dep = get_json(cluster, "deployment", "flux-dev", "-n", namespace)
        pod = dep["spec"]["template"]["spec"]
        limits = pod["containers"][0].get("resources", {}).get("limits", {})
        return (
            "nodeSelector" not in pod
            and "memory" not in limits
            and "requests" not in pod["containers"][0].get("resources", {})
            and all(t.get("key") != "team" for t in pod.get("tolerations", []))
            and "podAntiAffinity" not in pod.get("affinity", {})
            and pod.get("serviceAccountName", "default") == "default"
            and dep
        )

    try:
        dep = wait_for(removed, 30, "the removed fields to leave the Deployment")
    except TimeoutError:
        left = get_json(cluster, "deployment", "flux-dev", "-n", namespace)["spec"]["template"]["spec"]
        pytest.fail(f"removed fields stayed in the Deployment: {json.dumps(left, indent=1)}")
    pod = dep["spec"]["template"]["spec"]
    # what the operator still sets stays: the GPU limit, toleration and float8 affinity
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "nodeAffinity" in pod["affinity"]
    after = wait_ready(cluster, namespace, "flux-dev")
    assert after["metadata"]["generation"] > obj["metadata"]["generation"]
    assert conditions(after)["Synced"]["status"] == "True"


BAD_AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "Near"}]}]
        }
    }
}


def test_a_negative_integer_memory_limit_passes_admission_and_is_reported_naming_the_field(
    cluster, namespace, operator
):
    """The issue's example of a CR that went silent, as an integer: the CRD's quantity pattern applies
    to strings only (int-or-string), so the API server stores it and the operator reports
    ConfigValid=False naming the field, with one event, and applies nothing. (The string "-1" is refused
    at admission: test_contract_cluster.py.)"""
    doc = sample("tiny-cpu.yaml")
    doc["spec"]["template"]["resources"] = {"limits": {"memory": -1}}
    out = apply_doc(cluster, namespace, doc, check=False)
    assert out.returncode == 0, f"admission refused the integer: {out.stderr}"

    def reported():
        cond = conditions(dd(cluster, namespace, "tiny")).get("ConfigValid", {})
        return cond if cond.get("status") == "False" else None

    cond = wait_for(reported, 30, "ConfigValid=False")
    assert cond["message"].startswith("spec.template.resources.limits.memory"), cond
    assert get_json(cluster, "deployment", "tiny", "-n", namespace) is None
    assert [
        e["reason"] for e in wait_for(lambda: events_for(cluster, namespace, "tiny"), 15, "an event")
    ] == [cond["reason"]]


def test_a_child_the_api_server_refuses_is_a_condition_with_its_message_and_one_event(
    cluster, namespace, operator
):
    # a negative memory limit is refused at admission now (the CRD's quantity pattern); node affinity is
    # free-form in the CRD, so an operator the API server does not know reaches the Deployment apply
    doc = sample("tiny-cpu.yaml")
    doc["spec"]["template"]["affinity"] = copy.deepcopy(BAD_AFFINITY)
    out = apply_doc(cluster, namespace, doc, check=False)
    assert out.returncode == 0, f"admission refused it, nothing for the operator to report: {out.stderr}"

    def refused():
        obj = dd(cluster, namespace, "tiny")
        cond = conditions(obj).get("Synced")
        return obj if cond and cond["status"] == "False" else None

    obj = wait_for(refused, 30, "Synced=False")
    cond = conditions(obj)
    assert cond["Synced"]["reason"] == "Invalid", cond
    message = cond["Synced"]["message"]
    assert message.startswith("Deployment tiny: "), message
    # the API server's own words, naming the field
    assert 'Deployment.apps "tiny" is invalid' in message, message
    assert 'matchExpressions[0].operator: Invalid value: "Near": not a valid selector operator' in message, (
        message
    )
    assert cond["ConfigValid"]["status"] == "False" and cond["ConfigValid"]["reason"] == "RejectedByAPIServer"
    assert cond["Ready"]["status"] == "False"
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    table = cluster.kubectl("get", "dd", "tiny", "-n", namespace).stdout.splitlines()
    assert table[1].split()[-3] == "False", table  # the STATUS column shows it (then REASON, AGE)

    events = wait_for(lambda: events_for(cluster, namespace, "tiny"), 15, "the Warning event")
    assert [(e["type"], e["reason"], e["message"]) for e in events] == [("Warning", "ApplyFailed", message)]
    # resyncs (every 2 s) retry without a second event or a status write
    version = obj["metadata"]["resourceVersion"]
    time.sleep(6)
    assert len(events_for(cluster, namespace, "tiny")) == 1
    assert dd(cluster, namespace, "tiny")["metadata"]["resourceVersion"] == version
    operator.assert_alive()

    doc["spec"]["template"]["affinity"] = copy.deepcopy(REMOVABLE_TEMPLATE["affinity"])
    apply_doc(cluster, namespace, doc)
    fixed = wait_ready(cluster, namespace, "tiny")
    assert conditions(fixed)["Synced"]["status"] == "True"
    assert conditions(fixed)["ConfigValid"]["status"] == "True"


def test_a_child_rbac_forbids_is_a_synced_condition_with_the_servers_message(
    cluster, namespace, crd, tmp_path
):
    """RBAC missing one verb (patch on PodDisruptionBudgets): Synced=False, reason Forbidden, the API
    server's message, one Warning event; granting it heals on the next resync."""
    full = rbac.role("diffusion-operator", namespace)
    narrowed = copy.deepcopy(full)
    for rule in narrowed["rules"]:
        if "poddisruptionbudgets" in rule["resources"]:
            rule["verbs"] = ["get", "list", "watch"]
    kubeconfig = restricted_kubeconfig(cluster, namespace, tmp_path, role=narrowed)
    proc = OperatorProcess(kubeconfig, [namespace], tmp_path / "operator.log").start()
    try:
        apply_doc(cluster, namespace, sample("tiny-cpu.yaml"))

        def forbidden():
            cond = conditions(dd(cluster, namespace, "tiny")).get("Synced", {})
            return cond if cond.get("status") == "False" else None

        cond = wait_for(forbidden, 30, "Synced=False")
        assert cond["reason"] == "Forbidden", cond
        assert cond["message"].startswith("PodDisruptionBudget tiny: "), cond
        assert 'poddisruptionbudgets.policy "tiny" is forbidden' in cond["message"], cond
        assert f"system:serviceaccount:{namespace}:diffusion-operator" in cond["message"], cond
        assert conditions(dd(cluster, namespace, "tiny"))["ConfigValid"]["status"] == "True"
        events = wait_for(lambda: events_for(cluster, namespace, "tiny"), 15, "the Warning event")
        time.sleep(5)  # resyncs every 2 s: retried, no second event
        events = events_for(cluster, namespace, "tiny")
        assert [(e["type"], e["reason"], e["message"]) for e in events] == [
            ("Warning", "ApplyFailed", cond["message"])
        ]

        cluster.apply(full)

        def healed():
            obj = dd(cluster, namespace, "tiny")
            return obj if conditions(obj).get("Synced", {}).get("status") == "True" else None

        wait_for(healed, 60, "Synced=True after the Role was fixed")
        wait_ready(cluster, namespace, "tiny")
        assert get_json(cluster, "pdb", "tiny", "-n", namespace) is not None
        proc.assert_alive()
        assert "Traceback" not in proc.log()
    finally:
        proc.stop()
