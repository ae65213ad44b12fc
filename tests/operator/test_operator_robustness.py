"""The operator against the real control plane under abuse: 500 generated broken CRs, and a SIGKILL
while 50 new CRs are being reconciled. API calls are batched (one `kubectl create` of a List, one
`kubectl get -o json` per poll) so the suite stays fast on a small machine."""

from __future__ import annotations

import copy
import os
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from diffusion_dev import on_fake_cpu_node, wait_for
from diffusion_operator.kube import ApiError, Kube
from op_helpers import get_json, sample
from restart_scenario import LAST_GOOD_KEY, sigkill_during_creation

pytestmark = pytest.mark.cluster

CRD = Path(__file__).resolve().parents[2] / "crds" / "diffusion.dev_diffusiondeployments.yaml"


def spec_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def schema_leaves(schema: dict, path: tuple = ()) -> list[tuple[tuple, dict]]:
    """Every property of the spec schema with its own schema (objects too)."""
    out = [(path, schema)] if path else []
    for key, sub in (schema.get("properties") or {}).items():
        out += schema_leaves(sub, (*path, key))
    return out


def set_at(spec: dict, path: tuple, value) -> None:
    node = spec
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value


Mutation = Callable[[dict, random.Random], str]


def schema_mutations() -> list[Mutation]:
    """Broken by the CRD's own schema: wrong types, out of range, unknown keys, huge values."""
    out: list[Mutation] = []
    for path, sch in schema_leaves(spec_schema()):
        t = sch.get("type")
        wrong = {
            "integer": "seven",
            "number": "a lot",
            "boolean": "yes",
            "string": {"nested": 1},
            "array": "not-a-list",
            "object": 42,
        }.get(t)
        if wrong is not None:
            out.append(lambda s, r, p=path, v=wrong: (set_at(s, p, v), f"wrong type {'.'.join(p)}")[1])
        if "minimum" in sch:
            out.append(
                lambda s, r, p=path, v=sch["minimum"] - 1: (set_at(s, p, v), f"below minimum {'.'.join(p)}")[
                    1
                ]
            )
        if "maximum" in sch:
            out.append(
                lambda s, r, p=path, v=sch["maximum"] + 1: (set_at(s, p, v), f"above maximum {'.'.join(p)}")[
                    1
                ]
            )
        if "enum" in sch:
            out.append(lambda s, r, p=path: (set_at(s, p, "not-in-the-enum"), f"enum {'.'.join(p)}")[1])
        if "maxLength" in sch:
            v = "a" * (sch["maxLength"] + 1)
            out.append(lambda s, r, p=path, v=v: (set_at(s, p, v), f"too long {'.'.join(p)}")[1])
        if "maxItems" in sch:
            v = ["64x64"] * (sch["maxItems"] + 1)
            out.append(lambda s, r, p=path, v=v: (set_at(s, p, v), f"too many items {'.'.join(p)}")[1])
        if t == "integer":
            out.append(lambda s, r, p=path: (set_at(s, p, 10**30), f"huge integer {'.'.join(p)}")[1])
        if t == "object" and sch.get("properties") and not sch.get("x-kubernetes-preserve-unknown-fields"):
            out.append(
                lambda s, r, p=path: (set_at(s, (*p, "zzUnknownKey"), 1), f"unknown key {'.'.join(p)}")[1]
            )
    return out


def semantic_and_child_mutations() -> list[Mutation]:
    """Valid by the schema: the operator refuses them (ConfigValid=False), or the API server refuses
    the child they render into (ConfigValid=False, reason RejectedByAPIServer)."""

    def tmpl(key, value):
        return lambda s, r: (s.setdefault("template", {}).__setitem__(key, value), f"template.{key}")[1]

    def cache(key, value):
        return lambda s, r: (s["cacheDit"]["cache_config"].__setitem__(key, value), f"cache_config.{key}")[1]

    def float8_on_a100(s, r):
        s.update(gpu={"count": 1, "product": "NVIDIA-A100-SXM4-80GB"}, device="cuda")
        s["quantize"] = {"quant_type": "float8_per_row"}
        return "float8 on an A100"

    return [
        cache("Fn_compute_blocks", 0),
        cache("steps_computation_mask", "fastest"),
        cache("steps_computation_mask", [2, 3]),
        float8_on_a100,
        tmpl("resources", {"limits": {"memory": "-1"}}),
        tmpl("resources", {"requests": {"cpu": "-5"}}),
        tmpl(
            "affinity",
            {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [{"key": "k", "operator": "Near"}]}]
                    }
                }
            },
        ),
        tmpl("tolerations", [{"key": "", "operator": "Equal", "value": "x"}]),
        tmpl("tolerations", [{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 5}]),
        tmpl("serviceAccountName", "Not_A_Valid_Name!"),
        tmpl("nodeSelector", {"bad key!": "v"}),
        lambda s, r: (s.__setitem__("rollout", {"maxSurge": "200"}), "rollout.maxSurge not a percent")[1],
        lambda s, r: (s.__setitem__("disruption", {"maxUnavailable": "x%"}), "disruption.maxUnavailable")[1],
        lambda s, r: (s.__setitem__("replicas", 2**40), "replicas above int32")[1],
    ]


def broken_crs(count: int, seed: int = 8) -> dict[str, tuple[dict, list[str]]]:
    rnd = random.Random(seed)
    schema_side, operator_side = schema_mutations(), semantic_and_child_mutations()
    base = on_fake_cpu_node(sample("tiny-cpu.yaml"))  # hundreds of CRs: fake pods (kwok)
    out = {}
    for i in range(count):
        doc = copy.deepcopy(base)
        name = f"broken-{i}"
        doc["metadata"] = {"name": name}
        # every third CR is broken only past the schema (the operator's and the API server's checks)
        pool = operator_side if i % 3 == 0 else schema_side
        whats = [pool[(i // 3 if pool is operator_side else i) % len(pool)](doc["spec"], rnd)]
        if rnd.random() < 0.3:  # sometimes a second, random problem
            whats.append(rnd.choice(pool)(doc["spec"], rnd))
        out[name] = (doc, whats)
    return out


def api(cluster) -> Kube:
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=configuration)
    return Kube(configuration)


def dd_items(cluster, namespace: str) -> list[dict]:
    return get_json(cluster, "dd", "-n", namespace)["items"]


def conditions(obj: dict) -> dict:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}


def test_500_broken_crs_are_refused_or_reported_invalid_and_nothing_crashes(cluster, namespace, operator):
    crs = broken_crs(500)
    kube = api(cluster)
    path = kube.collection("diffusion.dev/v1alpha1", "DiffusionDeployment", namespace)

    def create(name: str) -> tuple[str, str | None]:
        try:  # Strict: an unknown field is refused, not dropped with a warning
            kube.request("POST", path, body=crs[name][0], query={"fieldValidation": "Strict"})
            return name, None
        except ApiError as error:
            return name, f"HTTP {error.status}: {error.reason}"

    with ThreadPoolExecutor(8) as pool:
        results = dict(pool.map(create, crs))
    refused = {n: m for n, m in results.items() if m is not None}
    stored = {o["metadata"]["name"] for o in dd_items(cluster, namespace)}
    assert stored == {n for n, m in results.items() if m is None}
    unexplained = {n: m for n, m in refused.items() if not m.startswith(("HTTP 422", "HTTP 400"))}
    assert not unexplained, list(unexplained.items())[:5]
    assert stored, "every CR was refused at admission: the operator was not exercised"

    def all_reported():
        pending = []
        for obj in dd_items(cluster, namespace):
            valid = conditions(obj).get("ConfigValid", {})
            done = obj.get("status", {}).get("observedGeneration") == obj["metadata"]["generation"]
            if not done or valid.get("status") != "False":
                pending.append((obj["metadata"]["name"], valid))
        return None if pending else True

    try:
        wait_for(all_reported, 240, "every stored broken CR reported ConfigValid=False", interval=2)
    except TimeoutError:
        objs = {o["metadata"]["name"]: o for o in dd_items(cluster, namespace)}
        wrong = {
            n: (crs[n][1], conditions(o).get("ConfigValid"), conditions(o).get("Synced"))
            for n, o in objs.items()
            if conditions(o).get("ConfigValid", {}).get("status") != "False"
        }
        pytest.fail(f"{len(wrong)} broken CRs not reported invalid, e.g. {list(wrong.items())[:5]}")
    operator.assert_alive()
    log = operator.log()
    assert "Traceback" not in log and "crashed" not in log, log[-3000:]
    # how each was caught (printed for the record)
    reasons: dict[str, int] = {}
    for obj in dd_items(cluster, namespace):
        reason = conditions(obj)["ConfigValid"]["reason"]
        reasons[reason] = reasons.get(reason, 0) + 1
    print(f"\n500 broken CRs: {len(refused)} refused at admission, stored ones by reason: {reasons}")
    assert set(reasons) <= {"InvalidSpec", "RejectedByAPIServer"}


# issue 22: after a SIGKILL while 50 CRs are being created, every CR Ready within 15 s of the restart
# (same identity), or of the standby holding the Lease (takeover; its Lease wait is reported apart).
# Measured on the helpers' shared 2-core machine: bench/results/operator_restart_kwok.json. Timed from a
# settled cluster (`settled`): the namespace of the test before (500 CRs, or the other scenario's 50 CRs
# with their children and pods) is deleted without waiting, and was seen still terminating during the
# timed run; a CI run that took 17.7 s (PATCH at 0.62 s mean) had it in the way, among other load.
RESTART_BOUND_S = 15.0


@pytest.mark.parametrize("takeover", [False, True], ids=["same-identity-restart", "standby-takeover"])
def test_sigkill_while_50_crs_are_created_then_all_ready_within_15s_one_set_each(
    cluster, namespace, crd, settled, tmp_path, record_property, takeover
):
    record_property("settled_s", settled)
    record = sigkill_during_creation(cluster.kubeconfig, namespace, tmp_path, takeover)
    assert record["ready_at_kill"] < 50, "everything had converged before the kill: nothing was tested"
    for key in ("restart_s", "lease_wait_s", "phases_s", "requests"):
        if key in record:
            record_property(key, record[key])
    print(
        f"\n{record['scenario']}: SIGKILL with {record['deployments_at_kill']}/50 Deployments created and "
        f"{record['ready_at_kill']}/50 CRs Ready; all 50 Ready {record['restart_s']:.1f} s after "
        + (
            "the restart"
            if not takeover
            else f"the standby led (its Lease wait {record['lease_wait_s']:.1f} s)"
        )
        + f"; phases {record['phases_s']}; load {os.getloadavg()[0]:.1f}; requests {record['requests']}"
        + f"; earlier namespaces gone after {settled} s"
    )
    # no orphans, no duplicates: exactly one child of each kind per CR, each owned by its CR
    for kind, owners in record["children"].items():
        if kind == LAST_GOOD_KEY:  # written once a CR's revision serves: at most one per CR, none orphaned
            assert len(set(owners)) == len(owners) and set(owners) <= set(record["names"]), owners
            continue
        assert owners == record["names"], (kind, owners)
    assert record["replicasets"] == 50 and record["pods"] == 50, record
    assert "Traceback" not in record["log"] and "crashed" not in record["log"], record["log"][-3000:]
    assert record["restart_s"] <= RESTART_BOUND_S, (
        f"{record['scenario']}: all 50 Ready {record['restart_s']} s after "
        f"{'the restart' if not takeover else 'the takeover'} (bound {RESTART_BOUND_S} s; "
        f"load average {os.getloadavg()})"
    )
