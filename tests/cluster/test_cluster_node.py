"""The real node: containerd + runc + kubelet + kube-proxy, running pods from images built here.

Network rule: every request below goes to loopback, to the node's bridge address or to a pod or
Service address inside the network namespaces this cluster made; pods have no default route.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from diffusion_dev import hoststate, wait_for
from diffusion_dev.fake_nodes import FAKE_CPU_TAINT
from diffusion_dev.install import default_image_names
from diffusion_dev.real_node import BRIDGE, NODE_IP, NODE_NAME, POD_SUBNET

pytestmark = pytest.mark.cluster

RESTRICTED = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                      "readOnlyRootFilesystem": True}  # fmt: skip

# what the pod runs: logs a line, serves HTTP, and can call the apiserver through its Service
WEB = """
import http.server, os, sys
print("hello from", os.uname().nodename, "uid", os.getuid(), flush=True)
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), http.server.SimpleHTTPRequestHandler).serve_forever()
"""
API_CALL = """
import json, os, ssl, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
ctx = ssl.create_default_context(cafile=sa + "/ca.crt")
host = os.environ["KUBERNETES_SERVICE_HOST"] + ":" + os.environ["KUBERNETES_SERVICE_PORT"]
req = urllib.request.Request("https://" + host + "/version",
                             headers={"Authorization": "Bearer " + open(sa + "/token").read()})
print(json.load(urllib.request.urlopen(req, context=ctx, timeout=10))["gitVersion"])
"""


def _restricted_namespace(cluster, namespace):
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")


def _pod(cluster, namespace, name):
    return json.loads(cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout)


def _ready(pod) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", [])
    )


def test_node_registers_with_its_own_identity(cluster, node):
    obj = cluster.api_get(f"/api/v1/nodes/{NODE_NAME}")
    info = obj["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.37.2" and info["kubeProxyVersion"] in ("", "v1.37.2")
    assert info["containerRuntimeVersion"].startswith("containerd://2.")
    assert {"type": "InternalIP", "address": NODE_IP} in obj["status"]["addresses"]
    assert obj["metadata"]["labels"]["diffusion.dev/node-profile"] == "real"
    assert not any(t["key"].startswith("node.kubernetes.io/") for t in obj["spec"].get("taints", []))
    # Node authorizer + NodeRestriction: the kubelet's identity reaches only what its pods need
    as_node = ["--as", f"system:node:{NODE_NAME}", "--as-group", "system:nodes"]
    can = cluster.kubectl("auth", "can-i", "list", "secrets", "-A", *as_node, check=False).stdout
    assert can.startswith("no") and "node: can only read namespaced object" in can, can
    other = cluster.kubectl("label", "node", "kwok-h100-0", "x=y", *as_node, check=False)
    assert other.returncode != 0 and "Forbidden" in other.stderr, other.stderr
    # CPU pods land here: the kwok CPU node is tainted (tests pin fake pods to it on purpose)
    fake = cluster.api_get("/api/v1/nodes/kwok-cpu-0")
    assert FAKE_CPU_TAINT in fake["spec"]["taints"]


def test_pod_from_a_locally_built_image_serves_through_its_service(cluster, node, namespace, operator_image,
                                                                   tmp_path):  # fmt: skip
    _restricted_namespace(cluster, namespace)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": namespace, "labels": {"app": "web"}},
        "spec": {
            "securityContext": RESTRICTED,
            "containers": [
                {
                    "name": "web",
                    "image": operator_image.ref,
                    "imagePullPolicy": "Never",
                    "command": ["python3", "-c", WEB],
                    "workingDir": "/tmp",
                    "ports": [{"containerPort": 8080, "name": "http"}],
                    "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
                    "securityContext": CONTAINER_SECURITY,
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                }
            ],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http", "name": "http"}]},
    }
    cluster.apply([pod, service])
    obj = wait_for(lambda: (p := _pod(cluster, namespace, "web")) and _ready(p) and p, 120, "pod web Ready")
    assert obj["spec"]["nodeName"] == NODE_NAME
    status = obj["status"]["containerStatuses"][0]
    # CRI names the image by one of its tags (ours, or the chart's default it also carries); the
    # image ID is what proves it is the image built here
    assert status["image"] in (operator_image.ref, default_image_names()["operator"]), status["image"]
    inspect = json.loads(node.crictl("inspecti", operator_image.ref).stdout)["status"]
    assert status["imageID"] in (inspect["id"], *inspect["repoDigests"]), (status["imageID"], inspect)
    assert obj["status"]["podIP"].startswith(POD_SUBNET.rsplit(".", 1)[0] + ".")

    # the Service, from the host: kube-proxy's rules take the ClusterIP to the pod
    svc = json.loads(cluster.kubectl("get", "service", "web", "-n", namespace, "-o", "json").stdout)
    ip = svc["spec"]["clusterIP"]
    body = wait_for(lambda: urllib.request.urlopen(f"http://{ip}/", timeout=5).read(), 30, "Service answers")
    assert b"Directory listing" in body

    # kubectl logs, exec, port-forward: apiserver -> kubelet -> containerd streaming
    logs = cluster.kubectl("logs", "web", "-n", namespace).stdout
    assert "hello from web uid 1000" in logs and '"GET / HTTP/1.1" 200' in logs, logs
    out = cluster.kubectl("exec", "web", "-n", namespace, "--", "python3", "-c", API_CALL).stdout
    assert out.strip() == "v1.37.2"  # the pod reached the apiserver through the `kubernetes` Service
    routes = cluster.kubectl("exec", "web", "-n", namespace, "--", "cat", "/proc/net/route").stdout
    destinations = [line.split()[1] for line in routes.splitlines()[1:] if line.strip()]
    assert "00000000" not in destinations, routes  # no default route: nothing leaves the machine
    # a pod reaches a Service through its ClusterIP: kube-proxy's DNAT on the host, which forwards what
    # came in on the bridge back onto it (here the pod's own Service: the hairpin case)...
    fetch = f"import urllib.request; print(urllib.request.urlopen('http://{ip}/', timeout=10).status)"
    assert (
        cluster.kubectl("exec", "web", "-n", namespace, "--", "python3", "-c", fetch).stdout.strip() == "200"
    )
    # ...and nowhere else: forwarding is on for the bridge only, and the first rule of mangle FORWARD
    # (before kube-proxy's accepts in filter FORWARD) drops whatever would leave through another link
    assert (Path("/proc/sys/net/ipv4/conf") / BRIDGE / "forwarding").read_text().strip() == "1"
    assert (
        Path("/proc/sys/net/ipv4/ip_forward").read_text()
        == node.baseline.sysctls["net/ipv4/ip_forward"] + "\n"
    )
    mangle = subprocess.run(
        ["iptables", "-w", "-t", "mangle", "-S", "FORWARD"], capture_output=True, text=True
    )
    first = mangle.stdout.splitlines()[1]  # after the chain's policy line
    assert f"-i {BRIDGE} ! -o {BRIDGE}" in first and first.endswith("-j DROP"), mangle.stdout
    forward = subprocess.Popen(
        [*_kubectl(cluster), "port-forward", "svc/web", ":80", "-n", namespace],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = forward.stdout.readline()
        port = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert port, line + forward.stderr.read()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/", timeout=10).read()
        assert b"Directory listing" in body
    finally:
        forward.terminate()
        forward.wait(10)


def _kubectl(cluster) -> list[str]:
    from diffusion_dev import find_kubectl

    return [find_kubectl(cluster.bin_dir), "--kubeconfig", str(cluster.kubeconfig)]


def test_stopping_the_node_puts_the_host_back(cluster, node, namespace):
    """kubelet, kube-proxy and containerd changed the host; stopping the node undoes all of it."""
    _restricted_namespace(cluster, namespace)
    # a running pod: a sandbox with its netns, veth, mounts and cgroups exists at stop time
    cluster.apply({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper", "namespace": namespace},
        "spec": {"securityContext": RESTRICTED, "containers": [{
            "name": "c", "image": node.pause_ref, "imagePullPolicy": "Never", "securityContext": CONTAINER_SECURITY,
        }]},
    })  # fmt: skip
    wait_for(lambda: _ready(_pod(cluster, namespace, "sleeper")), 60, "pod sleeper Ready")
    running = hoststate.diff(node.baseline, hoststate.snapshot())
    # the node did change the host: chains, bridge, cgroups, processes (so the comparison can fail)
    assert any("iptables ipv4 filter" in d and "KUBE-" in d for d in running), running
    assert any(d.startswith("links added") and "ddev0" in d for d in running), running
    assert any(d.startswith("processes") for d in running), running
    t = time.monotonic()
    stopped = cluster.stop_node()
    stop_s = time.monotonic() - t
    after = hoststate.snapshot()
    assert hoststate.diff(stopped.baseline, after) == [], stopped.restored
    assert not any(":KUBE-" in rules for rules in after.iptables.values())
    assert not any(p in ("kubelet", "kube-proxy", "containerd", "containerd-shim") for p in after.processes)
    print(f"node stop + host restore: {stop_s:.1f}s; restored: {stopped.restored}")
    t = time.monotonic()
    cluster.start_node()
    print(f"node start again: {time.monotonic() - t:.1f}s")


def test_a_rebuild_with_the_same_layers_keeps_its_new_name_in_containerd(node, operator_image):
    """A rebuild whose layers all came from buildah's cache (new content tag, same image id: the
    queue image when only Python changed) is imported under its new name and the old name is
    dropped: the new one must stay (CRI's remove-by-id took both, and `ctr images tag` then failed)."""
    from diffusion_dev import images

    twin = f"{operator_image.ref.rsplit(':', 1)[0]}:same-layers-{uuid.uuid4().hex[:6]}"
    images.buildah("tag", operator_image.ref, twin)
    try:
        images.import_into(node, images.Image("operator", twin))
        names = node.images()
        assert twin in names, sorted(names)
        assert operator_image.ref not in names, sorted(names)  # the stale name went, by name only
        node.ctr("images", "tag", "--force", twin, operator_image.ref)  # put the session's name back
    finally:
        images.buildah("rmi", twin, timeout=300)
        node.ctr("images", "rm", twin, check=False)
    assert operator_image.ref in node.images()
