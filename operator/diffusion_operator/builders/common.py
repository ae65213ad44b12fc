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


# The front door's pods (spec.queue; builders/frontdoor.py) in one place: its Deployment and Service select
# `front_door_selector(name)`, its pods carry `front_door_labels(name)`, the serving pods' NetworkPolicy admits
# `front_door_selector(name)` to the API port. Never the serving pods' `selector(name)`: the runtime
# Service, PDB and policy must not select the front door.
COMPONENT_LABEL = "app.kubernetes.io/component"
FRONT_DOOR_APP = "diffusion-frontdoor"  # app.kubernetes.io/name of the front-door pods
FRONT_DOOR_COMPONENT = "front-door"
DEPLOYMENT_LABEL = "diffusion.dev/deployment"
# app.kubernetes.io/name of the chart's queue server pods (charts/.../templates/queue.yaml; a chart test
# checks they carry it): the serving pods' NetworkPolicy lets them reach it
QUEUE_SERVER_APP = "diffusion-queue"


def front_door_selector(name: str) -> dict[str, str]:
    """The front door pods of DiffusionDeployment `name` (in its namespace)."""
    return {"app.kubernetes.io/name": FRONT_DOOR_APP, "app.kubernetes.io/instance": name}


def front_door_labels(name: str) -> dict[str, str]:
    """Labels of the front door pods."""
    return {
        **front_door_selector(name),
        COMPONENT_LABEL: FRONT_DOOR_COMPONENT,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        DEPLOYMENT_LABEL: name,
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
