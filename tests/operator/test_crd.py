"""The committed CRD equals the generator's output; the schema is strict and documented."""

from __future__ import annotations

import importlib.util
import sys

import yaml
from diffusion_operator.api import types
from op_helpers import REPO

CRD_PATH = REPO / "crds" / "diffusion.dev_diffusiondeployments.yaml"


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_crd", REPO / "tools" / "gen_crd.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_crd"] = module
    spec.loader.exec_module(module)
    return module


def crd() -> dict:
    return yaml.safe_load(CRD_PATH.read_text())


def schema() -> dict:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_equals_generator_output():
    gen = load_generator()
    assert CRD_PATH.read_text() == gen.render(), "crds/ is stale: run .venv/bin/python tools/gen_crd.py"


def walk(node: dict, path: str = ""):
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_every_spec_and_status_field_has_a_description():
    root = schema()
    missing = [
        p
        for p, node in walk(root)
        if p.startswith((".spec", ".status"))
        and "{}" not in p
        and not p.endswith("[]")
        and not node.get("description")
    ]
    assert missing == []


def test_cache_dit_and_quantize_are_strict():
    spec = schema()["properties"]["spec"]["properties"]
    for path, node in list(walk(spec["cacheDit"], ".cacheDit")) + list(walk(spec["quantize"], ".quantize")):
        if path.endswith(".steps_computation_mask"):
            # list-or-policy-name: the one untyped node, checked by the operator (test_spec)
            assert "fast" in node["description"], path
            continue
        assert "x-kubernetes-preserve-unknown-fields" not in node, path
        if node.get("type") == "object":
            assert "properties" in node or "additionalProperties" in node, path
    cache = spec["cacheDit"]["properties"]["cache_config"]["properties"]
    assert "enable_separate_cfg" in cache and "enable_sperate_cfg" not in cache
    for key in (
        "Fn_compute_blocks",
        "Bn_compute_blocks",
        "residual_diff_threshold",
        "enable_taylorseer",
        "taylorseer_order",
    ):
        assert key in cache
    assert set(spec["cacheDit"]["properties"]) == {"cache_config", "parallelism_config", "attention_backend"}
    quant = spec["quantize"]["properties"]["quant_type"]["enum"]
    for value in (
        "float8_per_row",
        "float8_per_tensor",
        "float8_per_block",
        "float8_weight_only",
        "int8_per_row",
        "int8_per_tensor",
        "int8_weight_only",
        "int4_weight_only",
        "float8",
    ):
        assert value in quant


def test_crd_names_subresources_columns_and_cel_rules():
    doc = crd()
    names = doc["spec"]["names"]
    assert names["shortNames"] == ["dd"] and "diffusion" in names["categories"]
    version = doc["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert "status" in version["subresources"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == [
        "Model",
        "Ready",
        "Cache",
        "Quant",
        "Status",
        "Reason",
        "Age",
        "Queue",
        "Front",
        "Cold",
        "Warm",
        "Message",
    ]
    wide = {c["name"]: c for c in version["additionalPrinterColumns"] if c.get("priority")}
    assert set(wide) == {"Cold", "Warm", "Queue", "Front", "Message"}  # kubectl get dd -o wide
    assert wide["Queue"]["jsonPath"] == ".status.queue.demand"
    assert wide["Cold"]["jsonPath"] == ".status.startup.lastCold.seconds"
    spec = schema()["properties"]["spec"]
    rules = " ".join(r["rule"] for r in spec["x-kubernetes-validations"])
    assert "has(self.replicas) && has(self.autoscaling)" in rules and "ulysses_size" in rules
    messages = [r["message"] for r in spec["x-kubernetes-validations"]]
    assert f"cacheDit.parallelism_config: {types.PARALLEL_ON_GPUS}" in messages
    assert f"cacheDit.parallelism_config: {types.PARALLEL_ON_CPU}" in messages
    auto = spec["properties"]["autoscaling"]["x-kubernetes-validations"][0]["rule"]
    assert auto == "self.minReplicas <= self.maxReplicas"
