"""What the tests and the demo put on the real node besides the CR: the tiny model on a volume.

The tiny random-weight pipeline is generated on the host once (by the runtime's own generator) and
served to runtime pods the way a user's model would be: through the CR's `pvc://claim/path` model
source, a PersistentVolumeClaim bound to a `local` PersistentVolume on the real node.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .build import cache_home, repo_root
from .real_node import NODE_NAME

MODEL_CLAIM = "tiny-model"  # samples/tiny-cpu.yaml: pvc://tiny-model/tiny-flux
MODEL_FOLDER = "tiny-flux"
WAN_CLAIM, WAN_FOLDER = "tiny-wan", "tiny-wan"  # the tiny WanPipeline's volume: pvc://tiny-wan/tiny-wan
STORAGE_CLASS = "diffusion-dev-local"


def tiny_model_root() -> Path:
    """A folder holding `tiny-flux/` (the runtime's tiny pipeline), made once per generator version."""
    return _generated("tiny", MODEL_FOLDER)


def tiny_wan_root() -> Path:
    """A folder holding `tiny-wan/` (the tiny random-weight WanPipeline, for video), made once per
    generator version."""
    return _generated("tiny-wan", WAN_FOLDER, "wan-tiny")


def _generated(name: str, folder: str, variant: str | None = None) -> Path:
    generator = repo_root() / "runtime" / "diffusion_runtime" / "tiny.py"
    key = hashlib.sha256(generator.read_bytes()).hexdigest()[:10] if generator.is_file() else "installed"
    root = cache_home() / "models" / f"{name}-{key}"
    if (root / folder / "model_index.json").is_file():
        return root
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    variant_args = ["--variant", variant] if variant else []
    subprocess.run(
        [sys.executable, "-m", "diffusion_runtime.cli", "tiny-model", str(staging / folder), *variant_args],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    for path in [staging, *staging.rglob("*")]:  # readable by the pod's non-root user
        path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    return root


def model_uri() -> str:
    return f"pvc://{MODEL_CLAIM}/{MODEL_FOLDER}"


def with_model_on_volume(doc: dict) -> dict:
    """The CR with its model read from the tiny-model claim (a no-op when it already is)."""
    out = json.loads(json.dumps(doc))
    out["spec"]["model"]["uri"] = model_uri()
    return out


def model_volume(namespace: str, host_path: Path, claim: str = MODEL_CLAIM) -> list[dict]:
    """A `local` PersistentVolume on the real node, pre-bound to the claim `namespace/claim`."""
    pv_name = f"{claim}-{namespace}"[:63]
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": pv_name, "labels": {"diffusion.dev/dev-volume": claim}},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadOnlyMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": STORAGE_CLASS,
            "claimRef": {"namespace": namespace, "name": claim},
            "local": {"path": str(host_path)},
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [
                            {"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE_NAME]}
                        ]}
                    ]
                }
            },
        },
    }  # fmt: skip
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "namespace": namespace},
        "spec": {
            "accessModes": ["ReadOnlyMany"],
            "storageClassName": STORAGE_CLASS,
            "volumeName": pv_name,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    return [pv, pvc]


def queue_data_dir(name: str) -> Path:
    """A host folder for the queue server's data on the real node (owned by the image's uid 1000)."""
    path = cache_home() / "queue-data" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        os.chown(path, 1000, 1000)
    except PermissionError:
        path.chmod(0o777)
    return path


def queue_volume(namespace: str, claim: str, host_path: Path, size: str = "1Gi") -> dict:
    """A `local` PersistentVolume on the real node pre-bound to the chart's queue server claim
    (`data-<statefulset>-0`, volumeClaimTemplates): the local cluster has no dynamic provisioner."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"queue-{namespace}-{claim}"[:63], "labels": {"diffusion.dev/dev-volume": "queue"}},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": STORAGE_CLASS,
            "claimRef": {"namespace": namespace, "name": claim},
            "local": {"path": str(host_path)},
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [
                            {"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE_NAME]}
                        ]}
                    ]
                }
            },
        },
    }  # fmt: skip
