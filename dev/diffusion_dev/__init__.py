"""diffusion-dev: the developer tooling of diffusion-operator.

A local Kubernetes cluster (etcd, kube-apiserver, controller manager, scheduler built from the Go
module proxy; kwok fake GPU nodes; optionally one real node: containerd + runc + kubelet +
kube-proxy), image builds from the repository's Dockerfile with buildah, and the demo.
"""

from .build import BuildError, ensure_binaries
from .cluster import KubectlError, LocalCluster, find_kubectl
from .components import ApiError, ComponentError, wait_for
from .fake_nodes import (
    DEFAULT_POOL,
    PROFILES,
    REAL_NODE_POOL,
    NodeSpec,
    node_object,
    on_fake_cpu_node,
    parse_pool,
)

__all__ = [
    "DEFAULT_POOL",
    "PROFILES",
    "REAL_NODE_POOL",
    "ApiError",
    "BuildError",
    "ComponentError",
    "KubectlError",
    "LocalCluster",
    "NodeSpec",
    "ensure_binaries",
    "find_kubectl",
    "node_object",
    "on_fake_cpu_node",
    "parse_pool",
    "wait_for",
]
