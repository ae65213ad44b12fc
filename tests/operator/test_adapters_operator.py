"""spec.adapters: refused declarations name their field; the builders render runtime.yaml's adapters
(hf:// -> their file in the model cache, pvc:// -> the claim mounted read-only, file:// as is), the
download Job fetches hf:// ones once beside the model, and adding one changes the config hash (a
rolling restart, docs/adapters.md)."""

from __future__ import annotations

import copy

import yaml
from diffusion_operator import builders
from diffusion_operator.builders.common import CONFIG_HASH_ANNOTATION
from diffusion_operator.builders.modelcache import MODEL_CACHE_MOUNT
from diffusion_operator.validation import parse
from diffusion_runtime.contract.config import config_from_dict, validate
from op_helpers import OWNER
from test_model_cache import NS, cached_doc, parsed

HUB_A = {
    "name": "watercolor",
    "uri": "hf://tiny-org/loras",
    "revision": "v2",
    "weightName": "a/w.safetensors",
}
HUB_B = {"name": "pixel", "uri": "hf://tiny-org/pixel-lora", "scale": 0.6}
PVC_C = {"name": "ink", "uri": "pvc://styles/ink/lora.safetensors", "scale": -0.5}
FILE_D = {"name": "baked", "uri": "file:///opt/loras/baked"}


def _doc(*adapters: dict, cache: bool = True) -> dict:
    doc = cached_doc()
    if not cache:
        doc["spec"]["model"] = {"uri": "file:///models/tiny", "pipeline": "FluxPipeline", "dtype": "float32"}
    doc["spec"]["adapters"] = [copy.deepcopy(a) for a in adapters]
    return doc


def _errors(doc: dict) -> list[str]:
    return [str(e) for e in parse("tiny", NS, doc["spec"]).errors]


def test_invalid_declarations_are_refused_with_the_field_named():
    assert _errors(_doc(HUB_A, HUB_B, PVC_C, FILE_D)) == []
    assert _errors(_doc({**HUB_B, "name": "Pixel Art"}))[0].startswith(
        "spec.adapters[0].name: String should match"
    )
    assert _errors(_doc({**HUB_B, "uri": "s3://bucket/x"}))[0].startswith(
        "spec.adapters[0].uri: String should match"
    )
    assert _errors(_doc({**HUB_B, "uri": "pvc://claim-only"}))[0].startswith("spec.adapters[0].uri:")
    assert _errors(_doc({**HUB_B, "scale": 11}))[0].startswith("spec.adapters[0].scale: Input should be less")
    assert _errors(_doc({**HUB_A, "weightName": "../x.safetensors"}))[0].startswith(
        "spec.adapters[0].weightName: String should match"
    )
    assert _errors(_doc({**HUB_B, "bogus": 1})) == ["spec.adapters[0].bogus: unknown field"]
    assert _errors(_doc(HUB_B, {**PVC_C, "name": "pixel"})) == [
        "spec.adapters[1].name: 'pixel' is declared more than once"
    ]
    assert _errors(_doc({**PVC_C, "revision": "v1"})) == [
        "spec.adapters[0].revision: only for hf:// adapters"
    ]
    assert _errors(_doc(HUB_B, cache=False)) == [
        "spec.adapters[0].uri: hf:// adapters are downloaded into spec.model.cache; set it (or use pvc:// or "
        "file://)"
    ]
    # the runtime's own refusal, mapped back to the CR field
    doc = _doc(PVC_C)
    doc["spec"]["quantize"] = {"quant_type": "int8_weight_only"}
    assert "spec.adapters: not supported together with spec.quantize" in _errors(doc)


def test_builders_render_the_adapters_fetch_hub_ones_once_and_mount_claims_read_only():
    spec = parsed(_doc(HUB_A, HUB_B, PVC_C, FILE_D))
    children = {o["kind"]: o for o in builders.build_all(spec, OWNER)}
    runtime = yaml.safe_load(children["ConfigMap"]["data"]["runtime.yaml"])
    assert runtime["adapters"] == [
        {"name": "watercolor", "path": f"{MODEL_CACHE_MOUNT}/adapters/watercolor/a/w.safetensors", "scale": 1.0},
        {"name": "pixel", "path": f"{MODEL_CACHE_MOUNT}/adapters/pixel/pytorch_lora_weights.safetensors",
         "scale": 0.6},
        {"name": "ink", "path": "/models/styles/ink/lora.safetensors", "scale": -0.5},
        {"name": "baked", "path": "/opt/loras/baked", "scale": 1.0},
    ]  # fmt: skip
    assert [str(e) for e in validate(config_from_dict(runtime)).adapters]  # the runtime accepts it

    args = children["Job"]["spec"]["template"]["spec"]["containers"][0]["args"]
    adapter_args = [args[i + 1 : i + 5] for i, a in enumerate(args) if a == "--adapter"]
    assert adapter_args == [
        ["hf://tiny-org/loras", "v2", "a/w.safetensors", f"{MODEL_CACHE_MOUNT}/adapters/watercolor"],
        ["hf://tiny-org/pixel-lora", "main", "pytorch_lora_weights.safetensors",
         f"{MODEL_CACHE_MOUNT}/adapters/pixel"],
    ]  # fmt: skip

    pod = children["Deployment"]["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/models/styles"]["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mounts["/models/styles"]["name"])
    assert volume["persistentVolumeClaim"] == {"claimName": "styles", "readOnly": True}


def test_adding_an_adapter_changes_the_config_hash_and_the_download_job():
    def rendered(doc):
        children = {o["kind"]: o for o in builders.build_all(parsed(doc), OWNER)}
        dep = children["Deployment"]["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH_ANNOTATION]
        return dep, children["Job"]["metadata"]["name"]

    base_hash, base_job = rendered(_doc())
    pvc_hash, pvc_job = rendered(_doc(PVC_C))
    hub_hash, hub_job = rendered(_doc(PVC_C, HUB_B))
    assert len({base_hash, pvc_hash, hub_hash}) == 3  # every change of adapters: a rolling restart
    assert pvc_job == base_job  # a pvc:// adapter downloads nothing
    assert hub_job != base_job  # an hf:// one: a new download Job (the model's files are not fetched again)
