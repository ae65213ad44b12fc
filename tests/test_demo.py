"""The README's demo command, end to end: `diffusion-operator demo` (what `make demo` runs after bootstrap).

A real subprocess: its own local control plane, the operator, the tiny CPU sample applied with
kubectl, the rendered ConfigMap served by the real runtime, one image generated over HTTP.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

BIN = Path(sys.executable).parent / "diffusion-operator"


def test_demo_generates_an_image_from_the_operator_rendered_config(tmp_path):
    output = tmp_path / "demo.png"
    proc = subprocess.run(
        [str(BIN), "demo", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert f"Image written to {output.resolve()}" in proc.stdout, proc.stdout[-2000:]
    with Image.open(output) as image:
        assert image.format == "PNG" and image.size == (64, 64)
    # the config the runtime served is the one the operator rendered: the sample's static mask caches steps
    cached = re.search(r'diffusion_cache_steps_total\{result="cached"\} ([0-9.]+)', proc.stdout)
    assert cached and float(cached.group(1)) > 0, proc.stdout[-2000:]
    assert "stopping the runtime, the operator and the control plane" in proc.stdout
