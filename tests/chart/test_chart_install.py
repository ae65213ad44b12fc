"""`helm install` into the local control plane, then the operator runs with the chart's RBAC only.

1. The release goes into a namespace enforcing PodSecurity `restricted`; the operator pod is
   admitted (kwok runs it on a fake node) and becomes Ready.
2. The operator runs here as a subprocess with a kubeconfig holding nothing but the chart
   ServiceAccount's token, against the RBAC-enforcing API server, and reconciles
   samples/tiny-cpu.yaml to Ready: the chart's RBAC is sufficient. The chart's own replicas are
   scaled to 0 first and the subprocess joins the chart's leader election (its Lease, by the chart's
   name): the Lease names the subprocess as holder and the CR's status field manager names it, so
   the test knows which instance did the work.
3. The same token cannot list Secrets in another namespace nor create ClusterRoles: it is least
   privilege (the Lease: get/update of the chart's one Lease, no create; CRDs: get/patch of the
   operator's own, nothing else).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from chartlib import CHART, REPO, forbidden_lines, run_helm
from diffusion_dev import on_fake_cpu_node
from diffusion_dev.real_node import NODE_NAME
from diffusion_operator.kube import status_manager

pytestmark = pytest.mark.cluster

SAMPLE = REPO / "samples" / "tiny-cpu.yaml"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kubectl_as(cluster, kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    from diffusion_dev.cluster import find_kubectl

    env = dict(os.environ, KUBECONFIG=str(kubeconfig))
    return subprocess.run(
        [find_kubectl(cluster.bin_dir), *args], capture_output=True, text=True, env=env, timeout=60
    )


def _wait(condition, timeout: float, what: str, diagnose=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{diagnose()}")


def _install(cluster, helm: Path, namespace: str, *sets: str):
    name = f"dop-{uuid.uuid4().hex[:6]}"
    kube = ("--kubeconfig", str(cluster.kubeconfig))
    args = ["install", name, str(CHART), "--namespace", namespace, *kube, "--wait", "--timeout", "120s"]
    for s in sets:
        args += ["--set", s]
    proc = run_helm(helm, *args)
    uninstall = ("uninstall", name, "--namespace", namespace, *kube, "--wait")
    return {
        "name": name,
        "namespace": namespace,
        "fullname": f"{name}-diffusion-operator",
        "install": proc,
    }, (lambda: run_helm(helm, *uninstall, check=False))


@pytest.fixture
def release(cluster, helm_bin, namespace, chart_operator_image):
    """The chart installed (cluster-wide mode) into `namespace`, which enforces `restricted`."""
    cluster.kubectl(
        "label",
        "namespace",
        namespace,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    )
    info, uninstall = _install(cluster, helm_bin, namespace)
    try:
        yield info
    finally:
        uninstall()


def test_restricted_namespace_refuses_a_non_compliant_pod(cluster, release):
    # the control: the label is enforced, so admitting the operator pod below means something
    bad = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "privileged", "namespace": release["namespace"]},
        "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]},
    }
    proc = cluster.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False)
    assert proc.returncode != 0
    assert "violates PodSecurity" in proc.stderr and "restricted" in proc.stderr, proc.stderr


def test_operator_pod_is_admitted_under_restricted_and_ready(cluster, release):
    ns = release["namespace"]
    out = release["install"].stdout
    assert "STATUS: deployed" in out
    notes = out.split("NOTES:", 1)[1]  # NOTES.txt tells the next step
    assert f"kubectl -n {ns} rollout status deployment/{release['fullname']}" in notes
    assert "kubectl apply" in notes and "/v1/images/generations" in notes
    deploy = json.loads(
        cluster.kubectl("get", "deployment", release["fullname"], "-n", ns, "-o", "json").stdout
    )
    assert deploy["status"].get("readyReplicas") == 2, deploy["status"]  # a leader and a standby
    pods = json.loads(
        cluster.kubectl(
            "get", "pods", "-n", ns, "-l", f"app.kubernetes.io/instance={release['name']}", "-o", "json"
        ).stdout
    )["items"]
    assert len(pods) == 2
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        # a real pod on the real node when it runs (the kwok CPU node is tainted then), else a kwok fake
        if cluster.node is not None:
            assert pod["spec"]["nodeName"] == NODE_NAME
            assert pod["status"]["containerStatuses"][0]["ready"], pod["status"]
        else:
            assert pod["spec"]["nodeName"].startswith("kwok-")
        assert pod["spec"]["serviceAccountName"] == release["fullname"]
    if cluster.node is not None:  # real pods: one of them holds the chart's Lease
        lease = json.loads(
            cluster.kubectl("get", "lease", release["fullname"], "-n", ns, "-o", "json").stdout
        )
        assert lease["spec"].get("holderIdentity") in {p["metadata"]["name"] for p in pods}, lease
    pdb = json.loads(cluster.kubectl("get", "pdb", release["fullname"], "-n", ns, "-o", "json").stdout)
    assert pdb["spec"]["maxUnavailable"] == 1
    events = cluster.kubectl("get", "events", "-n", ns, "-o", "json").stdout
    assert "FailedCreate" not in events


def test_operator_with_chart_token_reconciles_sample_and_is_least_privilege(cluster, release, tmp_path):
    ns = release["namespace"]
    token = cluster.token_for(ns, release["fullname"])
    kubeconfig = cluster.kubeconfig_for_token(token, tmp_path / "operator.kubeconfig")
    config = yaml.safe_load(kubeconfig.read_text())
    assert config["users"][0]["user"] == {"token": token}, "the operator must hold the SA token only"

    # the chart's replicas stop (a real one releases the Lease on SIGTERM; kwok's fakes never held it):
    # the subprocess below is then the one writer, and the Lease and managedFields show it
    cluster.kubectl("scale", "deployment", release["fullname"], "-n", ns, "--replicas=0")
    selector = f"app.kubernetes.io/instance={release['name']}"
    _wait(
        lambda: (
            not json.loads(cluster.kubectl("get", "pods", "-n", ns, "-l", selector, "-o", "json").stdout)[
                "items"
            ]
        ),
        60,
        "the chart's operator pods to stop",
    )
    identity = f"chart-test-{uuid.uuid4().hex[:6]}"
    health, metrics = _free_port(), _free_port()
    log_path = tmp_path / "operator.log"
    operator = subprocess.Popen(
        [str(Path(sys.executable).parent / "diffusion-operator"), "run", "--namespace", ns]
        + ["--health-port", str(health), "--metrics-port", str(metrics), "--bind", "127.0.0.1"]
        + ["--log-format", "plain", "--resync-seconds", "0"]
        + ["--leader-election-id", release["fullname"], "--leader-identity", identity],
        env=dict(os.environ, KUBECONFIG=str(kubeconfig)),
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def log_tail() -> str:
        return "--- operator log ---\n" + log_path.read_text()[-4000:]

    try:
        # the chart's RBAC is what is tested: fake pods on the kwok CPU node suffice (the real
        # node runs this sample in tests/cluster/test_cluster_realpods.py)
        doc = on_fake_cpu_node(yaml.safe_load(SAMPLE.read_text()))
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(doc))
        name = doc["metadata"]["name"]

        def ready():
            assert operator.poll() is None, f"operator exited with {operator.returncode}\n{log_tail()}"
            out = cluster.kubectl("get", "dd", name, "-n", ns, "-o", "json", check=False)
            if out.returncode != 0:
                return None
            dd = json.loads(out.stdout)
            conds = {c["type"]: c for c in dd.get("status", {}).get("conditions", [])}
            return dd if conds.get("Ready", {}).get("status") == "True" else None

        def status():
            out = cluster.kubectl("get", "dd", name, "-n", ns, "-o", "jsonpath={.status}", check=False)
            return f"status: {out.stdout}\n{log_tail()}"

        dd = _wait(ready, 180, f"DiffusionDeployment {ns}/{name} Ready", status)
        assert dd["status"]["observedGeneration"] == dd["metadata"]["generation"]
        # which instance did the work: the subprocess, the holder of the chart's Lease
        lease = json.loads(
            cluster.kubectl("get", "lease", release["fullname"], "-n", ns, "-o", "json").stdout
        )
        assert lease["spec"]["holderIdentity"] == identity, lease
        managed = json.loads(
            cluster.kubectl("get", "dd", name, "-n", ns, "-o", "json", "--show-managed-fields").stdout
        )["metadata"]["managedFields"]
        status_writers = {m["manager"] for m in managed if m.get("subresource") == "status"}
        assert status_writers == {status_manager(identity)}, managed
        # its runtime pods were admitted under `restricted` too (kwok runs them)
        pods = json.loads(
            cluster.kubectl(
                "get", "pods", "-n", ns, "-l", f"diffusion.dev/deployment={name}", "-o", "json"
            ).stdout
        )["items"]
        assert pods and all(p["status"]["phase"] == "Running" for p in pods), [p["status"] for p in pods]
        # the children were written with the SA token (no admin anywhere in the operator)
        for kind in ("deployment", "service", "configmap"):
            obj_name = f"{name}-config" if kind == "configmap" else name
            cluster.kubectl("get", kind, obj_name, "-n", ns)
        assert forbidden_lines(log_path.read_text()) == [], log_tail()

        with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=10) as response:
            assert response.status == 200
            assert json.loads(response.read())["leader"] is True
    finally:
        if operator.poll() is None:
            operator.send_signal(signal.SIGTERM)
            try:
                operator.wait(timeout=30)
            except subprocess.TimeoutExpired:
                operator.kill()
                operator.wait()

    # least privilege, checked with real requests made with the same token
    other = f"other-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", other)
    try:
        cluster.kubectl("create", "secret", "generic", "db", "-n", other, "--from-literal=password=x")
        denied = _kubectl_as(cluster, kubeconfig, "get", "secrets", "-n", other)
        assert denied.returncode != 0 and "Forbidden" in denied.stderr, denied.stderr
        denied = _kubectl_as(cluster, kubeconfig, "get", "secrets", "-n", ns)
        assert denied.returncode != 0 and "Forbidden" in denied.stderr, denied.stderr
        denied = _kubectl_as(
            cluster, kubeconfig, "create", "clusterrole", "escalate", "--verb=*", "--resource=*"
        )
        assert denied.returncode != 0 and "Forbidden" in denied.stderr, denied.stderr
        for verb, resource, where, *extra in [
            ("list", "secrets", other),
            ("get", "secrets", ns),
            ("create", "clusterroles", None),
            ("create", "rolebindings", ns),
            ("create", "pods", ns, "--subresource=exec"),
            ("create", "pods", ns),
            ("delete", "pods", ns),
            ("patch", "pods", ns),
            ("delete", "jobs", ns),
            ("delete", "namespaces", None),
            ("impersonate", "serviceaccounts", ns),
        ]:
            args = ["auth", "can-i", verb, resource, *extra] + (["-n", where] if where else [])
            answer = _kubectl_as(cluster, kubeconfig, *args)
            assert answer.stdout.strip() == "no", (verb, resource, answer.stdout, answer.stderr)
        # the Lease and the CRD: one object each, by name; never create
        crd = "customresourcedefinitions/diffusiondeployments.diffusion.dev"
        for verb, resource, where, want in [
            ("update", f"leases/{release['fullname']}", ns, "yes"),
            ("update", "leases/someone-elses", ns, "no"),
            ("create", "leases", ns, "no"),
            ("update", f"leases/{release['fullname']}", other, "no"),
            ("patch", crd, None, "yes"),
            ("patch", "customresourcedefinitions/other.example.com", None, "no"),
            ("create", "customresourcedefinitions", None, "no"),
            ("delete", crd, None, "no"),
        ]:
            args = ["auth", "can-i", verb, resource] + (["-n", where] if where else [])
            answer = _kubectl_as(cluster, kubeconfig, *args)
            assert answer.stdout.strip() == want, (verb, resource, answer.stdout, answer.stderr)
        # ...while what it needs is allowed (the token is valid, the denials are RBAC's)
        allowed = _kubectl_as(cluster, kubeconfig, "auth", "can-i", "patch", "deployments", "-n", ns)
        assert allowed.stdout.strip() == "yes", allowed.stdout + allowed.stderr
    finally:
        cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)


def test_namespaced_install_grants_only_the_watched_namespace(cluster, helm_bin, namespace, tmp_path):
    watched = f"watched-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", watched)
    info, uninstall = _install(
        cluster, helm_bin, namespace, "watch.allNamespaces=false", f"watch.namespaces={{{watched}}}"
    )
    try:
        token = cluster.token_for(namespace, info["fullname"])
        kubeconfig = cluster.kubeconfig_for_token(token, tmp_path / "sa.kubeconfig")

        def can(verb: str, resource: str, ns: str | None, *extra: str) -> str:
            args = ["auth", "can-i", verb, resource, *extra] + (["-n", ns] if ns else [])
            return _kubectl_as(cluster, kubeconfig, *args).stdout.strip()

        assert can("patch", "deployments", watched) == "yes"
        assert can("watch", "diffusiondeployments.diffusion.dev", watched) == "yes"
        assert can("patch", "diffusiondeployments.diffusion.dev", watched, "--subresource=status") == "yes"
        assert can("patch", "diffusiondeployments.diffusion.dev", watched) == "no"  # spec is the user's
        # not where it is installed, not anywhere else, nothing cluster-wide
        assert can("patch", "deployments", namespace) == "no"
        assert can("patch", "deployments", "default") == "no"
        assert can("list", "namespaces", None) == "no"
        assert can("list", "secrets", watched) == "no"
        deployment = json.loads(
            cluster.kubectl("get", "deployment", info["fullname"], "-n", namespace, "-o", "json").stdout
        )
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[:2] == ["--namespace", watched]
    finally:
        uninstall()
        cluster.kubectl("delete", "namespace", watched, "--wait=false", check=False)
