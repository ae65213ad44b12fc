"""PodDisruptionBudget `<name>`: voluntary disruptions take at most `spec.disruption.maxUnavailable` pods."""

from __future__ import annotations

from diffusion_operator.api.types import DiffusionDeployment
from diffusion_operator.builders.common import metadata, selector


def build_pdb(dd: DiffusionDeployment, owner: dict) -> dict:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(dd.name, dd, owner),
        "spec": {
            "maxUnavailable": dd.spec.disruption.max_unavailable,
            "selector": {"matchLabels": selector(dd.name)},
        },
    }
