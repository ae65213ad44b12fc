"""The README's demo command, end to end: `diffusion-dev demo` (what `make demo` runs after bootstrap).

A real subprocess: its own local cluster with the real node, the Dockerfile's images, the chart's
operator in the cluster, the tiny CPU sample applied with kubectl and running as a real pod, one
image generated through `kubectl port-forward` of its Service.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_demo_generates_an_image_on_real_pods(tmp_path, cluster):
    # one real node per machine: the session's node makes way for the demo's own, then returns
    node_was_running = cluster.node is not None
    if node_was_running:
        cluster.stop_node()
    try:
        _run_demo(tmp_path)
    finally:
        if node_was_running:
            cluster.start_node()


def _run_demo(tmp_path):
    output = tmp_path / "demo.png"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "dev"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion_dev", "demo", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=1500,
        env=env,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert f"Image written to {output.resolve()}" in proc.stdout, proc.stdout[-2000:]
    with Image.open(output) as image:
        assert image.format == "PNG" and image.size == (64, 64)
    # the config the runtime served is the one the operator rendered: the sample's static mask caches steps
    cached = re.search(r'diffusion_cache_steps_total\{result="cached"\} ([0-9.]+)', proc.stdout)
    assert cached and float(cached.group(1)) > 0, proc.stdout[-2000:]
    # real pods: the operator from the chart and the runtime pod ran on the real node
    assert re.search(r"^diffusion-operator-\S+\s+1/1\s+Running.*diffusion-dev-node", proc.stdout, re.M), (
        proc.stdout
    )
    assert re.search(r"^pod/tiny-\S+\s+1/1\s+Running.*diffusion-dev-node", proc.stdout, re.M), proc.stdout
    assert "warmup done in" in proc.stdout  # kubectl logs of the runtime pod
    assert "stopping the port-forward, the pods, the node and the control plane" in proc.stdout
