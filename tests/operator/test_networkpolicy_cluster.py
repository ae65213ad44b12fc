"""The serving pods' NetworkPolicy against the real API server (kwok pods; no real node needed).

What is proven here: the operator (with exactly its declared RBAC) applies the NetworkPolicy, the API
server validates and stores it as rendered, its pod selector selects exactly the Deployment's pods
(and not the front door's or the download Job's), its API peers select the front door and the pods the
CR allows, bad fields are refused at admission, and `enabled: false` deletes it.

What is not: enforcement. The local cluster's real node runs the CNI bridge plugin, which does not
implement NetworkPolicy (nothing watches these objects there), so no packet is dropped by them; a
cluster with Calico, Cilium or another policy engine enforces them (docs/network.md).
"""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from diffusion_dev import on_fake_cpu_node, wait_for
from diffusion_operator.builders.common import front_door_labels, selector
from op_helpers import OperatorProcess, get_json, restricted_kubeconfig, sample

pytestmark = pytest.mark.cluster
MONITORING = "diffusion-monitoring"
PUBLIC_POD_RANGE = "34.118.224.0/20"  # a cluster whose pod range is a public one


def selector_arg(sel: dict) -> str:
    """A LabelSelector (matchLabels and matchExpressions) as kubectl's -l syntax."""
    parts = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for e in sel.get("matchExpressions") or []:
        op = e["operator"]
        if op in ("In", "NotIn"):
            parts.append(f"{e['key']} {op.lower()} ({','.join(e['values'])})")
        else:
            parts.append(e["key"] if op == "Exists" else f"!{e['key']}")
    return ",".join(parts)


def pod_names(cluster, namespace: str, sel: dict) -> set[str]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", selector_arg(sel), "-o", "json")
    return {p["metadata"]["name"] for p in json.loads(out.stdout)["items"]}


def bare_pod(name: str, labels: dict) -> dict:
    """A pod that is never scheduled (no node fits its selector): only its labels matter here."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "nodeSelector": {"diffusion.dev/no-such-node": "true"},
            "containers": [{"name": "c", "image": "registry.invalid/app:1"}],
        },
    }


def apply(cluster, namespace: str, doc: dict, check: bool = True):
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc), check=check)


@pytest.fixture
def restricted_operator(cluster, crd, namespace, tmp_path):
    kubeconfig = restricted_kubeconfig(cluster, namespace, tmp_path)
    proc = OperatorProcess(
        kubeconfig,
        [namespace],
        tmp_path / "operator.log",
        args=["--monitoring-namespace", MONITORING, "--cluster-cidr", PUBLIC_POD_RANGE],
    ).start()
    yield proc
    proc.assert_alive()
    proc.stop()


def test_network_policy_validates_selects_the_pods_and_goes_when_disabled(
    cluster, namespace, restricted_operator
):
    doc = on_fake_cpu_node(sample("tiny-cpu.yaml"))
    doc["spec"]["replicas"] = 2
    doc["spec"]["server"]["webhookAllow"] = ["10.1.2.3", "hooks.internal"]
    doc["spec"]["networkPolicy"] = {
        "apiFrom": [
            {"podSelector": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["gateway"]}]}},
            {"namespaceSelector": {"matchLabels": {"team": "imaging"}}},
        ],
        "egressCIDRs": ["192.0.2.0/24", "fd00:10::/64"],
    }
    apply(cluster, namespace, doc)

    def policy():
        got = cluster.kubectl("get", "networkpolicy", "tiny", "-n", namespace, "-o", "json", check=False)
        return json.loads(got.stdout) if got.returncode == 0 else None

    stored = wait_for(policy, 60, "the NetworkPolicy", interval=0.5)
    spec = stored["spec"]
    assert spec["podSelector"] == {"matchLabels": selector("tiny")}
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    owner = stored["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "DiffusionDeployment" and owner["name"] == "tiny" and owner["controller"] is True
    # stored as rendered: IPv4 and IPv6 blocks with their excepts, the webhook address, the extra CIDRs
    egress_blocks = [p["ipBlock"]["cidr"] for r in spec["egress"] for p in r.get("to", [])]
    assert egress_blocks == ["0.0.0.0/0", "::/0", "10.1.2.3/32", "192.0.2.0/24", "fd00:10::/64"]
    assert {"169.254.0.0/16", PUBLIC_POD_RANGE} <= set(spec["egress"][1]["to"][0]["ipBlock"]["except"])
    metrics = [r for r in spec["ingress"] if r["ports"][0]["port"] == 9090]
    assert metrics[0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": MONITORING}}}
    ]

    # the policy's selector picks exactly the Deployment's pods (kwok runs them)
    def serving_pods():
        pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
        owned = {p["metadata"]["name"] for p in pods if p["metadata"].get("ownerReferences")}
        return owned if len(owned) == 2 else None

    owned = wait_for(serving_pods, 60, "2 serving pods", interval=0.5)
    # pods the API peers are meant for, and pods nothing admits
    for name, labels in {
        "front-door": front_door_labels("tiny"),
        "other-front-door": front_door_labels("other"),
        "gateway": {"role": "gateway"},
        "stranger": {"role": "web"},
    }.items():
        apply(cluster, namespace, bare_pod(name, labels))
    assert pod_names(cluster, namespace, spec["podSelector"]) == owned
    api = next(r for r in spec["ingress"] if r["ports"][0]["port"] == 8000)
    admitted = set()
    for peer in api["from"]:
        assert "namespaceSelector" in peer or "podSelector" in peer, peer
        if "podSelector" in peer and "namespaceSelector" not in peer:  # this namespace's pods
            admitted |= pod_names(cluster, namespace, peer["podSelector"])
    assert admitted == {"front-door", "gateway"}
    team = next(p for p in api["from"] if "namespaceSelector" in p)
    cluster.kubectl("label", "namespace", namespace, "team=imaging")
    ns_names = cluster.kubectl(
        "get", "namespaces", "-l", selector_arg(team["namespaceSelector"]), "-o", "name"
    )
    assert f"namespace/{namespace}" in ns_names.stdout.split()

    # bad fields are refused at admission (CEL), naming the field
    bad = copy.deepcopy(doc)
    bad["metadata"]["name"] = "bad"
    bad["spec"]["networkPolicy"] = {"egressCIDRs": ["10.0.0.1/8"]}
    refused = apply(cluster, namespace, bad, check=False)
    assert refused.returncode != 0 and "egressCIDRs" in refused.stderr and "CIDR" in refused.stderr, (
        refused.stderr
    )
    bad["spec"]["networkPolicy"] = {"apiFrom": [{}]}
    refused = apply(cluster, namespace, bad, check=False)
    assert refused.returncode != 0 and "namespaceSelector and/or podSelector" in refused.stderr, (
        refused.stderr
    )

    # opt out: the operator deletes its NetworkPolicy; back on: it is applied again
    doc["spec"]["networkPolicy"]["enabled"] = False
    apply(cluster, namespace, doc)
    wait_for(lambda: policy() is None, 60, "the NetworkPolicy deleted", interval=0.5)
    assert get_json(cluster, "deployment", "tiny", "-n", namespace)["spec"]["replicas"] == 2
    doc["spec"]["networkPolicy"]["enabled"] = True
    apply(cluster, namespace, doc)
    wait_for(policy, 60, "the NetworkPolicy back", interval=0.5)
