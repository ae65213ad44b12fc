"""Fixtures for the local cluster (owned by the cluster work).

`cluster`: one LocalCluster for the whole session (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, kwok with fake GPU nodes and, when the real node is on, containerd + kubelet +
kube-proxy). If any component cannot be built or started the tests FAIL with the component's
name and log tail; they are never skipped. With the real node the session also records the host
state before the cluster starts and fails at teardown if anything was left behind.
`namespace`: a fresh namespace per test (with its `default` ServiceAccount), deleted afterwards.
`node`: the real node (tests that need real pods; skipped only when the real node was turned off
with DIFFUSION_DEV_REAL_NODE=0).
`operator_image`, `runtime_image`: the Dockerfile's targets built with buildah and imported into
the node (cached by content hash).
`tiny_model`: the tiny model as the PVC `tiny-model` in a namespace (the sample's pvc:// source).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from pathlib import Path

import pytest

# the dev tooling of this checkout (dev/diffusion_dev), ahead of any installed copy
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dev"))

from diffusion_dev import (  # noqa: E402
    BuildError,
    ComponentError,
    LocalCluster,
    wait_for,
)
from diffusion_dev.real_node import NodeError  # noqa: E402

REAL_NODE_OFF = "the real node was turned off (DIFFUSION_DEV_REAL_NODE=0); it is on by default (root, runc, CNI plugins, buildah)"


def switched_off(reason: str) -> None:
    """A part of the core path turned off by a documented switch: skipped on a workstation, a failure
    in CI (`CI` set), where nothing on the core path may be off."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI runs the whole core path, nothing may be switched off")
    pytest.skip(reason)


__all__ = [
    "switched_off",
    "chart_operator_image",
    "cluster",
    "namespace",
    "node",
    "settled",
    "operator_image",
    "runtime_image",
    "tiny_model",
]


@pytest.fixture(scope="session")
def cluster():
    local = LocalCluster(timeout=120)
    try:
        local.start()
    except (BuildError, ComponentError, NodeError) as exc:
        pytest.fail(f"local cluster failed to start: {exc}", pytrace=False)
    node = None
    try:
        yield local
    finally:
        node = local.node  # the one running now (a test may have restarted it)
        local.stop()
    if node is not None:
        # the node's own check: its baseline is taken once it holds the one-node-per-machine lock and
        # the comparison is made before it lets go of it, so a node of a parallel session waiting for
        # the lock is never counted as ours
        assert node.baseline is not None
        assert not node.leftovers, f"the real node left host state behind: {node.leftovers}"


@pytest.fixture
def namespace(cluster, request):
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{slug}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    # pods are refused until the ServiceAccount controller created `default`
    wait_for(
        lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
        30,
        f"ServiceAccount {name}/default",
    )
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


# real pods end within their grace period (30 s); kwok pods and objects go at once
SETTLE_TIMEOUT_S = 180


def terminating_namespaces(cluster) -> dict[str, str]:
    """Each namespace being deleted, with what its deletion still waits for (its status conditions)."""
    listed = json.loads(cluster.kubectl("get", "namespaces", "-o", "json").stdout)
    return {
        ns["metadata"]["name"]: "; ".join(
            c.get("message", "") for c in ns["status"].get("conditions") or [] if c.get("status") == "True"
        )
        for ns in listed["items"]
        if ns.get("status", {}).get("phase") == "Terminating"
    }


@pytest.fixture
def settled(cluster):
    """For a timed scenario: the namespaces of earlier tests (deleted without waiting) are gone first, so
    their garbage collection (children, ReplicaSets, pods) does not load the API server while it runs.
    Returns the seconds waited; a namespace still terminating after SETTLE_TIMEOUT_S fails the test
    with what it waits for."""
    started = time.monotonic()
    try:
        wait_for(
            lambda: not terminating_namespaces(cluster),
            SETTLE_TIMEOUT_S,
            "earlier namespaces deleted",
            interval=0.5,
        )
    except TimeoutError:
        pytest.fail(
            f"namespaces still terminating after {SETTLE_TIMEOUT_S} s: {terminating_namespaces(cluster)}"
        )
    return round(time.monotonic() - started, 1)


@pytest.fixture
def node(cluster):
    if cluster.node is None:
        switched_off(REAL_NODE_OFF)
    return cluster.node


def _image(cluster, target: str):
    from diffusion_dev import images
    from diffusion_dev.install import load_images

    if cluster.node is None:
        switched_off(REAL_NODE_OFF)
    try:  # built (cached by content hash), imported, tagged with the chart's / CRD's default name
        return load_images(cluster.node, (target,))[target]
    except images.ImageError as exc:
        pytest.fail(f"image {target} could not be built: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def operator_image(cluster):
    return _image(cluster, "operator")


@pytest.fixture(scope="session")
def runtime_image(cluster):
    return _image(cluster, "runtime")


@pytest.fixture(scope="session")
def chart_operator_image(cluster):
    """With the real node, the chart's default operator image is there (built here); else None
    (kwok runs the operator pod without an image)."""
    return _image(cluster, "operator") if cluster.node is not None else None


@pytest.fixture
def tiny_model(cluster, namespace):
    """The PVC `tiny-model` in `namespace`, holding `tiny-flux/` (pvc://tiny-model/tiny-flux)."""
    from diffusion_dev.workloads import model_volume, tiny_model_root

    if cluster.node is None:
        switched_off(REAL_NODE_OFF)
    objects = model_volume(namespace, tiny_model_root())
    cluster.apply(objects)
    yield objects[1]["metadata"]["name"]
    cluster.kubectl("delete", "pv", objects[0]["metadata"]["name"], "--wait=false", check=False)
