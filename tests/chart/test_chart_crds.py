"""The chart ships the CRDs of the top-level crds/ folder, byte for byte, and so does the operator
package (the CRD the leader applies at start: crd.py) (tools/sync_chart_crds.sh)."""

from __future__ import annotations

import subprocess

import yaml
from chartlib import CHART, REPO

SOURCE = REPO / "crds"
COPY = CHART / "crds"


def test_chart_crds_are_byte_identical_to_top_level_crds():
    source = {p.name: p.read_bytes() for p in sorted(SOURCE.glob("*.yaml"))}
    copy = {p.name: p.read_bytes() for p in sorted(COPY.iterdir()) if p.is_file()}
    assert source, "crds/ holds no CRD YAML"
    assert sorted(copy) == sorted(source), "run tools/sync_chart_crds.sh: the chart's crds/ lists other files"
    for name, data in source.items():
        assert copy[name] == data, f"charts/diffusion-operator/crds/{name} differs from crds/{name}"


def test_operator_package_crd_is_byte_identical_to_top_level_crd():
    from diffusion_operator import crd

    package = REPO / "operator" / "diffusion_operator" / "api" / crd.CRD_FILE
    assert package.read_bytes() == (SOURCE / crd.CRD_FILE).read_bytes(), "run tools/sync_chart_crds.sh"
    assert crd.bundled_crd() == yaml.safe_load((SOURCE / crd.CRD_FILE).read_text())


def test_chart_crds_hold_the_diffusiondeployment_crd():
    docs = [d for p in sorted(COPY.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    names = {d["metadata"]["name"] for d in docs if d.get("kind") == "CustomResourceDefinition"}
    assert "diffusiondeployments.diffusion.dev" in names


def test_sync_script_check_mode_agrees():
    proc = subprocess.run(
        [str(REPO / "tools" / "sync_chart_crds.sh"), "--check"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr


def test_sync_script_detects_and_repairs_drift(tmp_path):
    # a copy of the layout the script expects, with a stale and an extra chart CRD
    (tmp_path / "tools").mkdir()
    script = tmp_path / "tools" / "sync_chart_crds.sh"
    script.write_bytes((REPO / "tools" / "sync_chart_crds.sh").read_bytes())
    script.chmod(0o755)
    (tmp_path / "crds").mkdir()
    (tmp_path / "crds" / "a.yaml").write_text("kind: A\n")
    dst = tmp_path / "charts" / "diffusion-operator" / "crds"
    dst.mkdir(parents=True)
    (dst / "a.yaml").write_text("kind: stale\n")
    (dst / "gone.yaml").write_text("kind: Gone\n")

    check = subprocess.run([str(script), "--check"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 1 and "differs" in check.stderr

    sync = subprocess.run([str(script)], capture_output=True, text=True, timeout=30)
    assert sync.returncode == 0, sync.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["a.yaml"]
    assert (dst / "a.yaml").read_text() == "kind: A\n"
    assert subprocess.run([str(script), "--check"], capture_output=True, timeout=30).returncode == 0
