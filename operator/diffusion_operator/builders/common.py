"""Labels, selectors and owner references shared by every child (see docs/contracts.md)."""

from __future__ import annotations

from diffusion_runtime.contract.config import ServerConfig

from diffusion_operator.api.group import API_VERSION, KIND
from diffusion_operator.api.types import DiffusionDeployment

MANAGED_BY = "diffusion-operator"
FIELD_MANAGER = "diffusion-operator"
CONFIG_HASH_ANNOTATION = "diffusion.dev/config-hash"
HTTP_PORT = ServerConfig().port  # the runtime's defaults, rendered into runtime.yaml
METRICS_PORT = ServerConfig().metrics_port
RUNTIME_UID = 1000  # the runtime image's user and group (Dockerfile: uid/gid 1000)


def pod_security_context() -> dict:
    """Restricted PodSecurity for runtime pods (serving and download): non-root, the image's uid."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUNTIME_UID,
        "runAsGroup": RUNTIME_UID,
        "fsGroup": RUNTIME_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict:
    """Restricted PodSecurity for a runtime container: no privilege escalation, read-only root, no caps."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": RUNTIME_UID,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


# the component label of a DiffusionDeployment's pods other than the serving ones: the front door's
# Deployment puts `front_door_labels(name)` on its pods, the serving pods' NetworkPolicy admits
# `front_door_selector(name)` to the API port (one place for both)
COMPONENT_LABEL = "app.kubernetes.io/component"
FRONT_DOOR_COMPONENT = "front-door"
DEPLOYMENT_LABEL = "diffusion.dev/deployment"


def front_door_selector(name: str) -> dict[str, str]:
    """The front door pods of DiffusionDeployment `name` (in its namespace)."""
    return {DEPLOYMENT_LABEL: name, COMPONENT_LABEL: FRONT_DOOR_COMPONENT}


def front_door_labels(name: str) -> dict[str, str]:
    """Labels of the front door pods: never the serving pods' `selector(name)` (the Service, PDB and
    NetworkPolicy must not select them)."""
    return {
        "app.kubernetes.io/name": "diffusion-front-door",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        **front_door_selector(name),
    }


def labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "diffusion-runtime",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        DEPLOYMENT_LABEL: name,
    }


def selector(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "diffusion-runtime", "app.kubernetes.io/instance": name}


def selector_string(name: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector(name).items()))


def owner_reference(owner: dict) -> dict:
    """The CR as controller owner: deleting it garbage-collects every child."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner.get("apiVersion", API_VERSION),
        "kind": owner.get("kind", KIND),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(name: str, dd: DiffusionDeployment, owner: dict) -> dict:
    return {
        "name": name,
        "namespace": dd.namespace,
        "labels": labels(dd.name),
        "ownerReferences": [owner_reference(owner)],
    }
