"""Least privilege of the local cluster's Prometheus and prometheus-adapter, proven with their own
bound tokens against the real API server (`kubectl auth can-i`, i.e. SelfSubjectAccessReviews as
them, and the reads they really make). The same objects and tokens run the metrics pipeline
(`diffusion_dev.monitoring.MetricsPipeline`); the HPA test through the adapter
(tests/cluster/test_cluster_autoscale.py) proves that they are enough."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from diffusion_dev import find_kubectl
from diffusion_dev.monitoring import ADAPTER_SA, NAMESPACE, PROMETHEUS_SA, TOKEN_DURATION, rbac_objects

pytestmark = pytest.mark.cluster


class As:
    """kubectl with one ServiceAccount's bound token, and nothing else."""

    def __init__(self, cluster, sa: str, tmp_path) -> None:
        self.sa = sa
        token = cluster.token_for(NAMESPACE, sa, TOKEN_DURATION)
        self.env = dict(
            os.environ, KUBECONFIG=str(cluster.kubeconfig_for_token(token, tmp_path / f"{sa}.kubeconfig"))
        )
        self.kubectl_bin = find_kubectl(cluster.bin_dir)

    def kubectl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.kubectl_bin, *args], capture_output=True, text=True, env=self.env, input=input, timeout=60
        )

    def can(self, *args: str) -> bool:
        out = self.kubectl("auth", "can-i", *args)
        assert out.stdout.strip() in ("yes", "no"), (args, out.stdout, out.stderr)
        return out.stdout.strip() == "yes"


@pytest.fixture(scope="module")
def monitoring_rbac(cluster):
    cluster.apply(rbac_objects())


# what neither may do: read Secrets, write anything
FORBIDDEN = [
    ("get", "secrets", "-n", "kube-system"),
    ("list", "secrets", "--all-namespaces"),
    ("create", "pods", "-n", "default"),
    ("delete", "pods", "-n", "default"),
    ("patch", "deployments.apps", "-n", "default"),
    ("create", "serviceaccounts/token", "-n", NAMESPACE),
    ("update", "apiservices.apiregistration.k8s.io"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ("escalate", "clusterroles.rbac.authorization.k8s.io"),
    ("impersonate", "serviceaccounts"),
    ("get", "nodes/proxy"),
    ("create", "pods/exec", "-n", "default"),
    ("*", "*"),
]


@pytest.mark.parametrize("sa", [PROMETHEUS_SA, ADAPTER_SA])
def test_neither_reads_secrets_nor_writes_anything(cluster, monitoring_rbac, tmp_path, sa):
    who = As(cluster, sa, tmp_path)
    whoami = json.loads(who.kubectl("auth", "whoami", "-o", "json").stdout)
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{NAMESPACE}:{sa}"
    allowed = [args for args in FORBIDDEN if who.can(*args)]
    assert not allowed, f"{sa} may {allowed}"
    denied = who.kubectl("get", "secrets", "-n", "kube-system")
    assert denied.returncode != 0 and "Forbidden" in denied.stderr, denied.stderr


def test_prometheus_may_discover_pods_and_nothing_more(cluster, monitoring_rbac, tmp_path):
    prom = As(cluster, PROMETHEUS_SA, tmp_path)
    for verb in ("list", "watch"):
        assert prom.can(verb, "pods", "--all-namespaces"), verb
    listed = prom.kubectl("get", "pods", "--all-namespaces", "-o", "name")
    assert listed.returncode == 0, listed.stderr
    for args in [("list", "services", "--all-namespaces"), ("list", "configmaps", "--all-namespaces"),
                 ("list", "endpointslices.discovery.k8s.io", "--all-namespaces"), ("get", "nodes"),
                 ("get", "pods/log", "-n", "default"), ("create", "tokenreviews.authentication.k8s.io")]:  # fmt: skip
        assert not prom.can(*args), args


def test_the_adapter_may_do_what_an_aggregated_metrics_server_needs(cluster, monitoring_rbac, tmp_path):
    adapter = As(cluster, ADAPTER_SA, tmp_path)
    # delegated authentication and authorization of the callers (the HPA controller)
    assert adapter.can("create", "tokenreviews.authentication.k8s.io")
    assert adapter.can("create", "subjectaccessreviews.authorization.k8s.io")
    review = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": "not-a-token"},
    }
    made = adapter.kubectl("create", "--validate=false", "-o", "json", "-f", "-", input=json.dumps(review))
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["status"].get("authenticated") is not True
    # the client CA and request-header settings, and only that ConfigMap of kube-system
    got = adapter.kubectl(
        "get", "configmap", "extension-apiserver-authentication", "-n", "kube-system", "-o", "json"
    )
    assert got.returncode == 0 and "requestheader-client-ca-file" in json.loads(got.stdout)["data"], (
        got.stderr
    )
    assert not adapter.can("get", "configmaps/kube-root-ca.crt", "-n", "kube-system")
    assert not adapter.can("list", "configmaps", "-n", "kube-system")
    # the objects its metrics describe: pods (an HPA's selector) and namespaces, read-only
    assert adapter.can("list", "pods", "--all-namespaces") and adapter.can("get", "namespaces")
    assert adapter.kubectl("get", "pods", "-n", "kube-system", "-o", "name").returncode == 0
    for args in [("list", "services", "--all-namespaces"), ("update", "pods", "-n", "default"),
                 ("get", "nodes"), ("list", "deployments.apps", "--all-namespaces")]:  # fmt: skip
        assert not adapter.can(*args), args
