"""Shared helpers of the operator tests (no fixtures here)."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples"
OWNER = {
    "apiVersion": "diffusion.dev/v1alpha1",
    "kind": "DiffusionDeployment",
    "metadata": {"name": "x", "namespace": "ns", "uid": "0000-uid"},
}


def sample(name: str) -> dict:
    return yaml.safe_load((SAMPLES / name).read_text())


def owner_for(doc: dict, namespace: str = "ns") -> dict:
    return {
        "apiVersion": doc["apiVersion"],
        "kind": doc["kind"],
        "metadata": {"name": doc["metadata"]["name"], "namespace": namespace, "uid": "uid-1"},
    }
