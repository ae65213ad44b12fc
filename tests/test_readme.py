"""README: the configuration reference covers every CRD spec field; a fresh machine needs two commands."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _spec_schema() -> dict:
    docs = [d for p in sorted((REPO / "crds").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    (crd,) = [d for d in docs if d["metadata"]["name"] == "diffusiondeployments.diffusion.dev"]
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def _reference_section() -> str:
    start = README.index("## Configuration reference")
    return README[start : README.index("\n## ", start + 1)]


def test_reference_names_every_spec_field_two_levels_deep():
    section = _reference_section()
    missing = []
    for name, prop in _spec_schema()["properties"].items():
        if not re.search(rf"`{re.escape(name)}(\.|`)", section):
            missing.append(name)
        if name == "cacheDit":
            children = prop.get("properties", {})  # cache-dit's own sections
        else:
            children = prop.get("properties", {}) if prop.get("type") == "object" else {}
        for child in children:
            if not re.search(
                rf"(`{re.escape(name)}\.{re.escape(child)}|[`,] ?\.?{re.escape(child)}[`.,])", section
            ):
                missing.append(f"{name}.{child}")
    assert not missing, f"README's configuration reference lacks: {missing}"


def test_reference_names_every_status_field():
    docs = [d for p in sorted((REPO / "crds").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    (crd,) = [d for d in docs if d["metadata"]["name"] == "diffusiondeployments.diffusion.dev"]
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    section = _reference_section()
    for name in version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]:
        assert f"`{name}`" in section, name


def test_reference_lists_every_quant_type_and_default():
    section = _reference_section()
    spec = _spec_schema()["properties"]
    for quant in spec["quantize"]["properties"]["quant_type"]["enum"]:
        assert f"`{quant}`" in section, quant
    assert f"({spec['server']['properties']['maxQueue']['default']})" in section


def test_fresh_machine_needs_exactly_two_commands():
    start = README.index("## On a fresh machine")
    section = README[start : README.index("\n## ", start + 1)]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert block.split("\n")[:-1] == ["make demo", "make test"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^test: bootstrap lint pytest$", makefile, re.M)
    assert re.search(r"^demo: bootstrap\n\t\$\(VENV\)/bin/diffusion-dev demo$", makefile, re.M)


def test_benchmark_section_is_marked_for_the_lead():
    assert "### Performance (cache-dit + torchao)" in README
