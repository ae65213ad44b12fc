"""Fixtures for the local control plane (owned by the cluster work).

`cluster`: one LocalCluster for the whole session (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, kwok with fake GPU nodes). If any component cannot be built or started the tests
FAIL with the component's name and log tail; they are never skipped.
`namespace`: a fresh namespace per test (with its `default` ServiceAccount), deleted afterwards.
"""

from __future__ import annotations

import re
import uuid

import pytest
from diffusion_operator.devcluster import BuildError, ComponentError, LocalCluster, wait_for

__all__ = ["cluster", "namespace"]


@pytest.fixture(scope="session")
def cluster():
    local = LocalCluster(timeout=120)
    try:
        local.start()
    except (BuildError, ComponentError) as exc:
        pytest.fail(f"local control plane failed to start: {exc}", pytrace=False)
    try:
        yield local
    finally:
        local.stop()


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
