"""NetworkPolicy `<name>`: what may reach the serving pods and what they may reach (docs/network.md).

Ingress (everything else is refused):
- the API port (`http`: the API, /health, /ready) from the front door (`common.front_door_selector`)
  and from `spec.networkPolicy.apiFrom` (unset: every pod of the DiffusionDeployment's namespace);
- the metrics port from the monitoring namespace the operator is configured with
  (`NetworkSettings.monitoring_namespace`: `--monitoring-namespace`, chart value
  `networkPolicy.monitoringNamespace`); none when unset.

Egress (everything else is refused):
- DNS (UDP and TCP 53) to any address: cluster DNS lives at different places (kube-dns pods, a
  node-local cache on a link-local address);
- with `publicEgress` (default): public addresses, every range of `contract.networks.NON_PUBLIC` left
  out, and the cluster's own pod and Service ranges where they are public ones
  (`NetworkSettings.cluster_cidrs`: `--cluster-cidr`, chart value `networkPolicy.clusterCIDRs`): the
  Hugging Face Hub (hf:// models without model.cache download at start) and public webhook
  receivers; never the cluster's private ranges, loopback or the metadata address;
- the addresses and CIDRs of `spec.server.webhookAllow` (host names cannot be expressed in a
  NetworkPolicy) and `spec.networkPolicy.egressCIDRs`;
- with `spec.queue`, the chart's queue server pods (`common.QUEUE_SERVER_APP`, any namespace); a
  queue server elsewhere goes in `egressCIDRs`.

The download Job's pods are not selected (their labels differ): they reach the Hub whatever this says.
Pure: the typed CR in, the object out.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from diffusion_runtime.contract.networks import NON_PUBLIC

from diffusion_operator.api.types import DiffusionDeployment, LabelSelector, NetworkPeer
from diffusion_operator.builders.common import (
    HTTP_PORT,
    METRICS_PORT,
    QUEUE_SERVER_APP,
    front_door_selector,
    metadata,
    selector,
)

DNS_PORT = 53
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by the API server on every namespace
PUBLIC = {4: "0.0.0.0/0", 6: "::/0"}


@dataclass(frozen=True)
class NetworkSettings:
    """What the operator is configured with for every NetworkPolicy (runner flags, chart values)."""

    monitoring_namespace: str = ""  # its pods may scrape the metrics port; empty: none may
    cluster_cidrs: tuple[str, ...] = ()  # the cluster's pod and Service ranges, never public egress


DEFAULT_NETWORK = NetworkSettings()


def _selector(sel: LabelSelector) -> dict:
    out: dict = {}
    if sel.match_labels:
        out["matchLabels"] = dict(sel.match_labels)
    if sel.match_expressions:
        out["matchExpressions"] = [
            {"key": e.key, "operator": e.operator, **({"values": list(e.values)} if e.values else {})}
            for e in sel.match_expressions
        ]
    return out


def _peer(peer: NetworkPeer) -> dict:
    out: dict = {}
    if peer.namespace_selector is not None:
        out["namespaceSelector"] = _selector(peer.namespace_selector)
    if peer.pod_selector is not None:
        out["podSelector"] = _selector(peer.pod_selector)
    return out


def public_blocks(cluster_cidrs: tuple[str, ...] = ()) -> list[dict]:
    """ipBlocks of every public address: the whole space of each family, its non-public ranges excepted,
    and the cluster's own ranges (`cluster_cidrs`) that are not inside one of them already."""
    blocks = []
    for version, whole in PUBLIC.items():
        excepted = [net for net, _ in NON_PUBLIC if ipaddress.ip_network(net).version == version]
        for cidr in cluster_cidrs:
            net = ipaddress.ip_network(cidr, strict=False)
            inside = any(
                net.network_address in other and net.broadcast_address in other
                for other in map(ipaddress.ip_network, excepted)
            )
            if net.version == version and not inside:
                excepted.append(str(net))
        blocks.append({"ipBlock": {"cidr": whole, "except": excepted}})
    return blocks


def webhook_cidrs(dd: DiffusionDeployment) -> list[str]:
    """The addresses and networks of spec.server.webhookAllow, as CIDRs (host names are left out)."""
    cidrs = []
    for entry in dd.spec.server.webhook_allow or []:
        try:
            cidrs.append(str(ipaddress.ip_network(entry.strip(), strict=False)))
        except ValueError:
            continue  # a host name: its addresses go in spec.networkPolicy.egressCIDRs
    return cidrs


def api_peers(dd: DiffusionDeployment) -> list[dict]:
    """Who may call the API port: the front door, then spec.networkPolicy.apiFrom (unset: the namespace)."""
    peers: list[dict] = [{"podSelector": {"matchLabels": front_door_selector(dd.name)}}]
    api_from = dd.spec.network_policy.api_from
    if api_from is None:
        peers.append({"podSelector": {}})  # every pod of this namespace
    else:
        peers += [_peer(p) for p in api_from]
    return peers


def build_network_policy(
    dd: DiffusionDeployment, owner: dict, network: NetworkSettings = DEFAULT_NETWORK
) -> dict:
    spec = dd.spec.network_policy
    monitoring_namespace = network.monitoring_namespace
    ingress: list[dict] = [
        {"from": api_peers(dd), "ports": [{"protocol": "TCP", "port": HTTP_PORT}]},
    ]
    if monitoring_namespace:
        ingress.append(
            {
                "from": [
                    {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: monitoring_namespace}}}
                ],
                "ports": [{"protocol": "TCP", "port": METRICS_PORT}],
            }
        )
    egress: list[dict] = [
        {"ports": [{"protocol": "UDP", "port": DNS_PORT}, {"protocol": "TCP", "port": DNS_PORT}]},
    ]
    if spec.public_egress:
        egress.append({"to": public_blocks(network.cluster_cidrs)})
    extra = list(dict.fromkeys([*webhook_cidrs(dd), *(spec.egress_cidrs or [])]))
    if extra:
        egress.append({"to": [{"ipBlock": {"cidr": c}} for c in extra]})
    if dd.spec.queue is not None:
        egress.append(
            {
                "to": [
                    {
                        "namespaceSelector": {},
                        "podSelector": {"matchLabels": {"app.kubernetes.io/name": QUEUE_SERVER_APP}},
                    }
                ]
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(dd.name, dd, owner),
        "spec": {
            "podSelector": {"matchLabels": selector(dd.name)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": egress,
        },
    }
