"""Local Kubernetes control plane with fake GPU nodes (etcd, apiserver, controller manager,
scheduler and kwok built from the Go module proxy), for tests and the demo."""

from .build import BuildError, ensure_binaries
from .cluster import ComponentError, KubectlError, LocalCluster, find_kubectl, wait_for
from .nodes import DEFAULT_POOL, PROFILES, NodeSpec, node_object, parse_pool

__all__ = [
    "DEFAULT_POOL",
    "PROFILES",
    "BuildError",
    "ComponentError",
    "KubectlError",
    "LocalCluster",
    "NodeSpec",
    "ensure_binaries",
    "find_kubectl",
    "node_object",
    "parse_pool",
    "wait_for",
]
