"""Pure builders: parsed spec in, Kubernetes object (a dict) out. No API calls here."""

from __future__ import annotations

from diffusion_operator.builders.common import labels, owner_reference, selector, selector_string
from diffusion_operator.builders.configmap import (
    build_configmap,
    render_cache_dit_yaml,
    render_runtime_config,
)
from diffusion_operator.builders.deployment import build_deployment
from diffusion_operator.builders.hpa import build_hpa
from diffusion_operator.builders.pdb import build_pdb
from diffusion_operator.builders.service import build_service, endpoint

__all__ = [
    "build_all",
    "build_configmap",
    "build_deployment",
    "build_hpa",
    "build_pdb",
    "build_service",
    "endpoint",
    "labels",
    "owner_reference",
    "render_cache_dit_yaml",
    "render_runtime_config",
    "selector",
    "selector_string",
]


def build_all(spec, owner: dict) -> list[dict]:
    """Every child of one DiffusionDeployment, in apply order: the ConfigMap first (the pods mount it),
    then the Deployment (the slow part: scheduling, image pull, model load), then the rest."""
    configmap = build_configmap(spec, owner)
    children = [
        configmap,
        build_deployment(spec, owner, configmap),
        build_service(spec, owner),
        build_pdb(spec, owner),
    ]
    if spec.autoscaling is not None:
        children.append(build_hpa(spec, owner))
    return children
