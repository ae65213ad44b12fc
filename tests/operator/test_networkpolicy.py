"""The serving pods' NetworkPolicy: the pure builder (ingress, egress, selectors), the CR fields and the
opt-out (the operator deletes its NetworkPolicy when spec.networkPolicy.enabled turns false)."""

from __future__ import annotations

import copy
import ipaddress

import pytest
from diffusion_operator import builders, validation
from diffusion_operator.builders.common import (
    HTTP_PORT,
    METRICS_PORT,
    front_door_labels,
    front_door_selector,
    labels,
    selector,
)
from diffusion_operator.builders.networkpolicy import NetworkSettings, build_network_policy, public_blocks
from diffusion_operator.controller import Reconciler
from diffusion_runtime.contract.networks import NON_PUBLIC
from fakekube import FakeKube
from op_helpers import deliver_watch, owner_for, sample

DOC = sample("flux-dev.yaml")
OWNER = owner_for(DOC)
NS = "ns"


def parsed(**network_policy):
    spec = copy.deepcopy(DOC["spec"])
    spec.update(network_policy.pop("spec", {}))
    if network_policy:
        spec["networkPolicy"] = network_policy
    result = validation.parse("flux-dev", NS, spec)
    assert result.ok, [str(e) for e in result.errors]
    return result.cr


def rule_for(policy: dict, port: int) -> dict:
    (rule,) = [r for r in policy["spec"]["ingress"] if r["ports"] == [{"protocol": "TCP", "port": port}]]
    return rule


def in_blocks(address: str, peers: list[dict]) -> bool:
    """Whether a NetworkPolicy peer list (ipBlocks) admits `address`, as the API defines ipBlock/except."""
    ip = ipaddress.ip_address(address)
    for peer in peers:
        block = peer["ipBlock"]
        net = ipaddress.ip_network(block["cidr"])
        if ip.version == net.version and ip in net:
            if not any(ip in ipaddress.ip_network(e) for e in block.get("except", []) if
                       ipaddress.ip_network(e).version == ip.version):  # fmt: skip
                return True
    return False


def test_default_policy_selects_the_serving_pods_and_denies_by_default():
    policy = build_network_policy(parsed(), OWNER, NetworkSettings("monitoring"))
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["kind"] == "NetworkPolicy"
    assert policy["metadata"]["name"] == "flux-dev" and policy["metadata"]["labels"] == labels("flux-dev")
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    spec = policy["spec"]
    # the Deployment's own pod selector: the policy selects exactly its pods
    deployment = builders.build_deployment(parsed(), OWNER, builders.build_configmap(parsed(), OWNER))
    assert spec["podSelector"] == deployment["spec"]["selector"] == {"matchLabels": selector("flux-dev")}
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert len(spec["ingress"]) == 2  # the API port and the metrics port, nothing else


def test_api_port_admits_the_front_door_and_by_default_the_namespace():
    api = rule_for(build_network_policy(parsed(), OWNER), HTTP_PORT)
    assert api["from"] == [
        {"podSelector": {"matchLabels": front_door_selector("flux-dev")}},
        {"podSelector": {}},
    ]
    # the front door's own labels carry its selector, never the serving pods' selector
    assert front_door_selector("flux-dev").items() <= front_door_labels("flux-dev").items()
    assert not selector("flux-dev").items() <= front_door_labels("flux-dev").items()


def test_api_from_replaces_the_namespace_default():
    peers = [
        {"namespaceSelector": {"matchLabels": {"team": "imaging"}}},
        {"podSelector": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["gateway"]}]}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "web"}},
         "podSelector": {"matchLabels": {"app": "ui"}}},
    ]  # fmt: skip
    api = rule_for(build_network_policy(parsed(apiFrom=peers), OWNER), HTTP_PORT)
    assert api["from"] == [{"podSelector": {"matchLabels": front_door_selector("flux-dev")}}, *peers]
    only_front_door = rule_for(build_network_policy(parsed(apiFrom=[]), OWNER), HTTP_PORT)
    assert only_front_door["from"] == [{"podSelector": {"matchLabels": front_door_selector("flux-dev")}}]


def test_metrics_port_only_from_the_monitoring_namespace():
    policy = build_network_policy(parsed(), OWNER, NetworkSettings("observability"))
    metrics = rule_for(policy, METRICS_PORT)
    assert metrics["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}
    ]
    # no monitoring namespace configured: nobody may reach the metrics port
    unset = build_network_policy(parsed(), OWNER, NetworkSettings(""))
    assert [r["ports"] for r in unset["spec"]["ingress"]] == [[{"protocol": "TCP", "port": HTTP_PORT}]]


def test_egress_dns_public_addresses_and_nothing_private():
    egress = build_network_policy(parsed(), OWNER)["spec"]["egress"]
    assert egress[0] == {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}
    public = egress[1]["to"]
    assert public == public_blocks() and len(egress) == 2
    for address in ("18.244.0.1", "2600:9000::1", "8.8.8.8"):  # the Hub's CDN, public receivers
        assert in_blocks(address, public), address
    for address in ("127.0.0.1", "169.254.169.254", "10.96.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.10",
                    "::1", "fe80::1", "fd00::1", "0.0.0.0"):  # fmt: skip
        assert not in_blocks(address, public), address
    # the excepted ranges are exactly the runtime's non-public ones (one list: contract.networks)
    assert sorted(e for p in public for e in p["ipBlock"]["except"]) == sorted(net for net, _ in NON_PUBLIC)


def test_public_cluster_ranges_are_left_out_of_public_egress():
    network = NetworkSettings(cluster_cidrs=("34.118.224.0/20", "10.96.0.0/12", "2600:1900:4000::/44"))
    public = build_network_policy(parsed(), OWNER, network)["spec"]["egress"][1]["to"]
    assert not in_blocks("34.118.230.5", public) and not in_blocks("2600:1900:4000::5", public)
    assert in_blocks("34.118.240.1", public)  # just outside the range
    excepted = [e for p in public for e in p["ipBlock"]["except"]]
    assert "10.96.0.0/12" not in excepted  # inside 10.0.0.0/8, excepted already


def test_runner_takes_cluster_cidrs_from_flags_or_env_and_refuses_bad_ones(monkeypatch, capsys):
    from diffusion_operator.runner import parse_args

    args = parse_args(
        ["--namespace", "ns", "--cluster-cidr", "34.118.224.0/20", "--cluster-cidr", "fd00::/8"]
    )
    assert args.cluster_cidr == ["34.118.224.0/20", "fd00::/8"]
    monkeypatch.setenv("DIFFUSION_OPERATOR_CLUSTER_CIDRS", "34.118.224.0/20, 100.64.0.0/10")
    assert parse_args(["--namespace", "ns"]).cluster_cidr == ["34.118.224.0/20", "100.64.0.0/10"]
    with pytest.raises(SystemExit):
        parse_args(["--namespace", "ns", "--cluster-cidr", "pods.internal"])
    assert "--cluster-cidr 'pods.internal'" in capsys.readouterr().err


def test_webhook_allow_cidrs_and_egress_cidrs_become_ip_blocks_host_names_cannot():
    dd = parsed(
        spec={"server": {"webhookAllow": ["10.1.2.3", "192.168.0.0/16", "hooks.internal", "fd00::/8"]}},
        publicEgress=False,
        egressCIDRs=["10.20.0.0/16", "192.168.0.0/16"],
    )
    egress = build_network_policy(dd, OWNER)["spec"]["egress"]
    assert len(egress) == 2  # DNS, the listed addresses; no public egress
    listed = [p["ipBlock"]["cidr"] for p in egress[1]["to"]]
    assert listed == ["10.1.2.3/32", "192.168.0.0/16", "fd00::/8", "10.20.0.0/16"]  # no duplicate
    assert in_blocks("10.1.2.3", egress[1]["to"]) and not in_blocks("10.1.2.4", egress[1]["to"])
    assert not in_blocks("8.8.8.8", egress[1]["to"])


@pytest.mark.parametrize(
    "network_policy, needle",
    [
        ({"egressCIDRs": ["10.0.0.1/8"]}, "host bits set"),
        ({"egressCIDRs": ["hooks.internal"]}, "not a CIDR"),
        (
            {"apiFrom": [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}]},
            "operator",
        ),
        ({"enabled": "no"}, "enabled"),
        ({"apiFrom": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}, "ipBlock"),
    ],
)
def test_bad_network_policy_fields_are_refused_naming_the_field(network_policy, needle):
    spec = {**copy.deepcopy(DOC["spec"]), "networkPolicy": network_policy}
    result = validation.parse("flux-dev", NS, spec)
    assert not result.ok
    text = " ".join(str(e) for e in result.errors)
    assert "networkPolicy" in text and needle in text, text


def test_disabled_network_policy_is_not_built():
    kinds = [c["kind"] for c in builders.build_all(parsed(enabled=False), OWNER)]
    assert "NetworkPolicy" not in kinds
    assert "NetworkPolicy" in [c["kind"] for c in builders.build_all(parsed(), OWNER)]


def test_operator_deletes_its_network_policy_when_disabled_and_restores_it():
    kube = FakeKube()
    rec = Reconciler(kube, child_delay=0.05, network=NetworkSettings(monitoring_namespace="monitoring"))
    deliver_watch(kube, rec)
    doc = sample("tiny-cpu.yaml")
    doc["metadata"] = {"name": "tiny", "namespace": NS}
    kube.create(doc)
    rec.drain()
    policy = kube.get("networking.k8s.io/v1", "NetworkPolicy", NS, "tiny")
    assert policy is not None
    assert rule_for(policy, METRICS_PORT)["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }

    def set_enabled(enabled: bool) -> None:
        def mutate(obj: dict) -> None:
            obj["spec"] = {**copy.deepcopy(obj["spec"]), "networkPolicy": {"enabled": enabled}}

        kube.edit("DiffusionDeployment", NS, "tiny", mutate, manager="kubectl")
        rec.drain()

    set_enabled(False)
    assert kube.get("networking.k8s.io/v1", "NetworkPolicy", NS, "tiny") is None
    assert kube.writes[("DELETE", "NetworkPolicy")] == 1
    assert kube.get("apps/v1", "Deployment", NS, "tiny") is not None  # nothing else goes
    set_enabled(True)
    assert kube.get("networking.k8s.io/v1", "NetworkPolicy", NS, "tiny") is not None
    assert kube.writes[("DELETE", "NetworkPolicy")] == 1
