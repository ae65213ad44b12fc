"""Fixtures of the operator's cluster tests: the CRD installed once, the operator as a real subprocess."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import pytest
from op_helpers import OperatorProcess

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "diffusion.dev_diffusiondeployments.yaml"


@pytest.fixture(scope="session")
def crd(cluster):
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/diffusiondeployments.diffusion.dev"
    )
    # the apiserver serves the new resource a moment after Established
    deadline = time.monotonic() + 30
    while cluster.kubectl("get", "dd", "-A", check=False).returncode != 0:
        if time.monotonic() > deadline:
            pytest.fail("diffusiondeployments not served after the CRD was Established", pytrace=False)
        time.sleep(0.5)
    return CRD


@pytest.fixture
def operator(cluster, crd, namespace, tmp_path):
    proc = OperatorProcess(cluster.kubeconfig, [namespace], tmp_path / "operator.log").start()
    yield proc
    proc.assert_alive()
    proc.stop()
    crashed = [line for line in proc.log().splitlines() if "crashed" in line or "Traceback" in line]
    assert not crashed, "\n".join(crashed[:20])


@pytest.fixture(scope="module")
def load_configs():
    """cache-dit's own config loader (`cache_dit.load_configs`), imported quietly."""
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    try:
        from cache_dit import load_configs
    finally:
        logging.disable(logging.NOTSET)
    return load_configs
