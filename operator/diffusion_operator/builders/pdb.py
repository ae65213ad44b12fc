"""PodDisruptionBudget `<name>`: voluntary disruptions take at most `spec.disruption.maxUnavailable` pods."""

from __future__ import annotations

from diffusion_operator.builders.common import metadata, selector


def build_pdb(spec, owner: dict) -> dict:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(spec.name, spec, owner),
        "spec": {
            "maxUnavailable": spec.pdb_max_unavailable,
            "selector": {"matchLabels": selector(spec.name)},
        },
    }
