"""Admission and authorization on the real apiserver: PodSecurity and RBAC with bound SA tokens."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from diffusion_dev import find_kubectl

pytestmark = pytest.mark.cluster

RESTRICTED_OK = {
    "securityContext": {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    },
    "containers": [
        {
            "name": "c",
            "image": "registry.invalid/app:1",
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        }
    ],
}


def pod(name: str, namespace: str, spec: dict) -> str:
    return json.dumps(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    )


def test_restricted_namespace_refuses_privileged_pod(cluster, namespace):
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    privileged = {
        "containers": [
            {"name": "c", "image": "registry.invalid/app:1", "securityContext": {"privileged": True}}
        ]
    }
    refused = cluster.kubectl("apply", "-f", "-", input=pod("priv", namespace, privileged), check=False)
    assert refused.returncode != 0
    assert "violates PodSecurity" in refused.stderr and "restricted" in refused.stderr, refused.stderr
    assert "privileged" in refused.stderr
    # the same namespace accepts a pod that meets the restricted profile
    cluster.kubectl("apply", "-f", "-", input=pod("ok", namespace, RESTRICTED_OK))
    # and without the label the privileged pod is admitted (so the refusal came from PodSecurity)
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce-")
    cluster.kubectl("apply", "-f", "-", input=pod("priv", namespace, privileged))


def _as_token(cluster, token: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    kubeconfig = cluster.kubeconfig_for_token(token, tmp_path / "token.kubeconfig")
    env = dict(os.environ, KUBECONFIG=str(kubeconfig))
    return subprocess.run(
        [find_kubectl(cluster.bin_dir), *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_service_account_token_without_rbac_gets_403_on_secrets(cluster, namespace, tmp_path):
    cluster.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    cluster.kubectl("create", "secret", "generic", "s1", "-n", namespace, "--from-literal=k=v")
    token = cluster.token_for(namespace, "reader")

    # authenticated as the SA (not anonymous), but not authorized
    who = _as_token(cluster, token, tmp_path, "auth", "whoami", "-o", "json")
    assert who.returncode == 0, who.stderr
    assert (
        json.loads(who.stdout)["status"]["userInfo"]["username"]
        == f"system:serviceaccount:{namespace}:reader"
    )
    denied = _as_token(cluster, token, tmp_path, "get", "secrets", "-n", namespace)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr and 'cannot list resource "secrets"' in denied.stderr, denied.stderr

    # grant exactly that, and the same token may list secrets in this namespace only
    cluster.kubectl("create", "role", "secret-reader", "-n", namespace, "--verb=list", "--resource=secrets")
    cluster.kubectl(
        "create",
        "rolebinding",
        "reader",
        "-n",
        namespace,
        "--role=secret-reader",
        f"--serviceaccount={namespace}:reader",
    )
    allowed = _as_token(cluster, token, tmp_path, "get", "secrets", "-n", namespace, "-o", "name")
    assert allowed.returncode == 0, allowed.stderr
    assert "secret/s1" in allowed.stdout
    other = _as_token(cluster, token, tmp_path, "get", "secrets", "-n", "kube-system")
    assert other.returncode != 0 and "Forbidden" in other.stderr


def test_forged_token_is_unauthorized(cluster, tmp_path):
    result = _as_token(cluster, "not-a-real-token", tmp_path, "get", "namespaces")
    assert result.returncode != 0
    assert "Unauthorized" in result.stderr or "provide credentials" in result.stderr, result.stderr


def test_front_proxy_identity_is_accepted_only_from_the_front_proxy_cert(cluster):
    """The aggregation layer's request-header auth is configured (for extension apiservers)."""
    import ssl
    import urllib.error
    import urllib.request

    def whoami(cert) -> tuple[int, dict]:
        ctx = ssl.create_default_context(cafile=str(cluster.pki.ca_cert))
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
        body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode()
        req = urllib.request.Request(
            cluster.server + "/apis/authentication.k8s.io/v1/selfsubjectreviews", data=body, method="POST"
        )
        req.add_header("Content-Type", "application/json")
        req.add_header("X-Remote-User", "alice")
        req.add_header("X-Remote-Group", "team-a")
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, {}

    status, review = whoami(cluster.pki.front_proxy_client)
    assert status == 201
    assert review["status"]["userInfo"]["username"] == "alice"
    assert "team-a" in review["status"]["userInfo"]["groups"]
    # the same headers from an ordinary client certificate are ignored: it stays itself
    status, review = whoami(cluster.pki.clients["scheduler"])
    assert status == 201 and review["status"]["userInfo"]["username"] == "system:kube-scheduler"
