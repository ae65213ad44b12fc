"""Certificates and keys for the local control plane, made with the `openssl` command line.

ECDSA P-256 keys throughout: generating them is fast, which keeps the start time short. Every
file is written 0600 into the cluster's private temp dir.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import hosttools


class PKIError(RuntimeError):
    pass


def _openssl(*args: str, cwd: Path) -> None:
    try:
        exe = hosttools.path_of("openssl")
    except hosttools.ToolMissing as exc:
        raise PKIError(str(exc)) from None
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PKIError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()[-2000:]}")


def _ec_key(path: Path) -> None:
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", path.name, cwd=path.parent)
    os.chmod(path, 0o600)


@dataclass(frozen=True)
class ClientCert:
    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    sa_key: Path
    sa_pub: Path
    clients: dict[str, ClientCert]
    front_proxy_ca: Path  # aggregation layer: the apiserver authenticates to extension apiservers
    front_proxy_client: ClientCert


# name -> (CN, O): the identities the components authenticate as (RBAC bootstrap roles bind these)
CLIENTS = {
    "admin": ("kubernetes-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", ""),
    "scheduler": ("system:kube-scheduler", ""),
    "kwok": ("kwok-controller", "system:masters"),
}


def make_pki(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> PKI:
    d = directory
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = d / "ca.key", d / "ca.crt"
    _make_ca(d, ca_key, ca_cert, "diffusion-operator-dev-ca")
    san = ",".join(
        [f"IP:{h}" if h.replace(".", "").isdigit() else f"DNS:{h}" for h in hosts]
        + ["DNS:kubernetes", "DNS:kubernetes.default", "DNS:kubernetes.default.svc", "IP:10.0.0.1"]
    )
    serving_key, serving_cert = d / "apiserver.key", d / "apiserver.crt"
    _sign(d, serving_key, serving_cert, "/CN=kube-apiserver", f"subjectAltName={san}", "serverAuth")
    clients = {}
    for name, (cn, org) in CLIENTS.items():
        subj = f"/CN={cn}" + (f"/O={org}" if org else "")
        key, cert = d / f"{name}.key", d / f"{name}.crt"
        _sign(d, key, cert, subj, None, "clientAuth")
        clients[name] = ClientCert(cert=cert, key=key)
    sa_key, sa_pub = d / "sa.key", d / "sa.pub"
    _ec_key(sa_key)
    _openssl("ec", "-in", sa_key.name, "-pubout", "-out", sa_pub.name, cwd=d)
    fp_key, fp_ca = d / "front-proxy-ca.key", d / "front-proxy-ca.crt"
    _make_ca(d, fp_key, fp_ca, "diffusion-operator-dev-front-proxy-ca")
    fp_client = ClientCert(d / "front-proxy-client.crt", d / "front-proxy-client.key")
    _sign(d, fp_client.key, fp_client.cert, "/CN=front-proxy-client", None, "clientAuth", ca="front-proxy-ca")
    return PKI(ca_cert, ca_key, serving_cert, serving_key, sa_key, sa_pub, clients, fp_ca, fp_client)


@dataclass(frozen=True)
class NodeCerts:
    kubelet_client: ClientCert  # system:node:<name> in system:nodes (Node authorizer, NodeRestriction)
    kubelet_serving: ClientCert  # the kubelet's HTTPS server (logs, exec, port-forward), IP SAN
    kube_proxy: ClientCert  # system:kube-proxy (bound to system:node-proxier by the RBAC bootstrap)
    apiserver_kubelet_client: ClientCert  # the apiserver's identity towards the kubelet


def make_node_certs(directory: Path, node_name: str, node_ip: str) -> NodeCerts:
    """Certificates of one real node, signed by the cluster CA that `make_pki` made in `directory`."""
    d = directory

    def client(name: str, subj: str, san: str | None = None, usage: str = "clientAuth") -> ClientCert:
        key, cert = d / f"{name}.key", d / f"{name}.crt"
        _sign(d, key, cert, subj, san, usage)
        return ClientCert(cert=cert, key=key)

    return NodeCerts(
        kubelet_client=client("kubelet-client", f"/CN=system:node:{node_name}/O=system:nodes"),
        kubelet_serving=client(
            "kubelet-serving",
            f"/CN=system:node:{node_name}/O=system:nodes",
            f"subjectAltName=IP:{node_ip},DNS:{node_name}",
            "serverAuth",
        ),  # fmt: skip
        kube_proxy=client("kube-proxy", "/CN=system:kube-proxy"),
        apiserver_kubelet_client=client(
            "apiserver-kubelet-client", "/CN=kube-apiserver-kubelet-client/O=system:masters"
        ),
    )


def _make_ca(d: Path, key: Path, cert: Path, cn: str) -> None:
    _ec_key(key)
    _openssl(
        "req", "-x509", "-new", "-key", key.name, "-sha256", "-days", "3650",
        "-subj", f"/CN={cn}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", "-out", cert.name,
        cwd=d,
    )  # fmt: skip


def _sign(d: Path, key: Path, cert: Path, subj: str, san: str | None, usage: str, ca: str = "ca") -> None:
    _ec_key(key)
    csr = cert.with_suffix(".csr")
    _openssl("req", "-new", "-key", key.name, "-subj", subj, "-out", csr.name, cwd=d)
    ext = d / (cert.stem + ".ext")
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\n" + (f"{san}\n" if san else "")
    )
    _openssl(
        "x509", "-req", "-in", csr.name, "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-days", "3650", "-sha256", "-extfile", ext.name, "-out", cert.name, cwd=d,
    )  # fmt: skip
    csr.unlink()
    ext.unlink()


def make_serving_cert(
    directory: Path, name: str, dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), client: bool = False
) -> ClientCert:
    """A TLS server certificate signed by the cluster CA that `make_pki` made in `directory`
    (e.g. for an extension apiserver the aggregation layer verifies with the CA); `client`: good for
    client authentication too (mutual TLS between two processes holding the same certificate)."""
    san = "subjectAltName=" + ",".join([f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips])
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _sign(directory, key, cert, f"/CN={name}", san, "serverAuth,clientAuth" if client else "serverAuth")
    return ClientCert(cert=cert, key=key)
