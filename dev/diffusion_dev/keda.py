"""KEDA's own ScaledObject and TriggerAuthentication CRDs (for tests of the ScaledObjects the operator renders), taken from KEDA's released Go module through the Go module proxy
(`go mod download`, the ordinary client) and kept in the per-user cache next to the built binaries:
`$XDG_CACHE_HOME/diffusion-operator/keda/<version>/keda.sh_scaledobjects.yaml`. KEDA itself is not built.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .build import cache_home

KEDA_MODULE = "github.com/kedacore/keda/v2"
KEDA_VERSION = "v2.21.0"  # the newest v2 release on the proxy when this was written
CRD_IN_MODULE = "config/crd/bases/keda.sh_scaledobjects.yaml"
# spec.queue with engine keda: the ScaledObject's triggers authenticate through a TriggerAuthentication
TRIGGER_AUTH_CRD_IN_MODULE = "config/crd/bases/keda.sh_triggerauthentications.yaml"


def keda_scaledobject_crd(version: str = KEDA_VERSION) -> Path:
    """The ScaledObject CRD file, downloaded once per version (file-locked: concurrent test sessions share it)."""
    return keda_crd(CRD_IN_MODULE, version)


def keda_triggerauthentication_crd(version: str = KEDA_VERSION) -> Path:
    """The TriggerAuthentication CRD file, from the same module download."""
    return keda_crd(TRIGGER_AUTH_CRD_IN_MODULE, version)


def keda_crd(in_module: str, version: str = KEDA_VERSION) -> Path:
    """A CRD file of KEDA's module (`in_module`), downloaded once per version (file-locked)."""
    target = cache_home() / "keda" / version / Path(in_module).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        go = shutil.which("go")
        if go is None:
            raise RuntimeError("go not found: needed to download KEDA's module for its ScaledObject CRD")
        print(
            f"downloading {KEDA_MODULE}@{version} from the Go module proxy (its ScaledObject CRD)", flush=True
        )
        with tempfile.TemporaryDirectory() as empty:  # outside any module: a plain download
            out = subprocess.run(
                [go, "mod", "download", "-json", f"{KEDA_MODULE}@{version}"],
                cwd=empty,
                env={**os.environ, "GOFLAGS": "-mod=mod"},
                capture_output=True,
                text=True,
                timeout=600,
            )
        if out.returncode != 0:
            raise RuntimeError(f"go mod download {KEDA_MODULE}@{version} failed: {out.stdout}{out.stderr}")
        source = Path(json.loads(out.stdout)["Dir"]) / in_module
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(target)
    return target
