"""Unit tests of spec parsing and semantic validation (pure functions)."""

from __future__ import annotations

import copy

import pytest
from diffusion_operator import spec as specs
from diffusion_operator.models import model_facts, product_capability
from op_helpers import sample

FLUX = sample("flux-dev.yaml")["spec"]


def parse(spec: dict, name: str = "x"):
    return specs.parse(name, "ns", spec)


def fields(parsed) -> list[str]:
    return [e.field for e in parsed.errors]


def test_samples_parse_without_errors():
    for name in ("flux-dev.yaml", "qwen-image.yaml", "tiny-cpu.yaml"):
        doc = sample(name)
        parsed = parse(doc["spec"], doc["metadata"]["name"])
        assert parsed.ok, (name, [str(e) for e in parsed.errors])


def test_flux_sample_values():
    s = parse(FLUX).spec
    assert s.model.uri == "hf://black-forest-labs/FLUX.1-dev"
    assert s.model.token_secret == "hf-token" and s.model.token_key == "token"
    assert s.gpu_count == 1 and s.replicas == 1 and s.compile is True
    assert s.quantize == {"quant_type": "float8_per_row", "exclude_layers": ["embedder", "embed"]}
    assert s.needs_float8_gpu


def test_float8_alias_is_normalised():
    spec = copy.deepcopy(FLUX)
    spec["quantize"]["quant_type"] = "float8"
    s = parse(spec).spec
    assert s.quantize["quant_type"] == "float8_per_row"
    assert s.quant_type_alias == "float8"
    assert spec["quantize"]["quant_type"] == "float8"  # input untouched


def test_fn_plus_bn_above_flux_blocks_names_the_field():
    spec = copy.deepcopy(FLUX)
    spec["cacheDit"]["cache_config"].update(Fn_compute_blocks=12, Bn_compute_blocks=8)
    parsed = parse(spec)
    assert not parsed.ok
    assert fields(parsed) == ["spec.cacheDit.cache_config.Fn_compute_blocks"]
    assert "12 + 8 = 20 exceeds the 19 transformer blocks of FLUX.1-dev" in str(parsed.errors[0])


def test_fn_plus_bn_at_the_limit_is_fine():
    spec = copy.deepcopy(FLUX)
    spec["cacheDit"]["cache_config"].update(Fn_compute_blocks=10, Bn_compute_blocks=9)
    assert parse(spec).ok


def test_unknown_model_is_not_block_checked():
    spec = copy.deepcopy(FLUX)
    spec["model"]["uri"] = "hf://someone/unknown-model"
    spec["cacheDit"]["cache_config"].update(Fn_compute_blocks=100, Bn_compute_blocks=100)
    assert parse(spec).ok


def test_float8_on_a100_product_is_refused():
    spec = copy.deepcopy(FLUX)
    spec["gpu"] = {"count": 1, "product": "NVIDIA-A100-SXM4-80GB"}
    parsed = parse(spec)
    assert fields(parsed) == ["spec.quantize.quant_type"]
    assert "8.9" in parsed.errors[0].message and "8.0" in parsed.errors[0].message


def test_float8_on_h100_product_and_int8_on_a100_are_fine():
    spec = copy.deepcopy(FLUX)
    spec["gpu"] = {"count": 1, "product": "NVIDIA-H100-80GB-HBM3"}
    assert parse(spec).ok
    spec["gpu"] = {"count": 1, "product": "NVIDIA-A100-SXM4-80GB"}
    spec["quantize"]["quant_type"] = "int8_per_row"
    parsed = parse(spec)
    assert parsed.ok and not parsed.spec.needs_float8_gpu


def test_parallel_sizes_must_multiply_to_gpu_count():
    spec = copy.deepcopy(FLUX)
    spec["cacheDit"]["parallelism_config"] = {"ulysses_size": 2, "ring_size": 2}
    spec["gpu"] = {"count": 2}
    parsed = parse(spec)
    assert fields(parsed) == ["spec.cacheDit.parallelism_config"]
    assert "= 4 must equal spec.gpu.count = 2" in parsed.errors[0].message
    spec["gpu"] = {"count": 4}
    assert parse(spec).ok


def test_parallel_sizes_all_one_is_refused():
    spec = copy.deepcopy(FLUX)
    spec["cacheDit"]["parallelism_config"] = {"ulysses_size": 1}
    parsed = parse(spec)
    assert fields(parsed) == ["spec.cacheDit.parallelism_config"]
    assert "all 1" in parsed.errors[0].message


def test_quantize_on_cpu_is_refused():
    spec = copy.deepcopy(sample("tiny-cpu.yaml")["spec"])
    spec["quantize"] = {"quant_type": "int8_weight_only"}
    parsed = parse(spec)
    assert fields(parsed) == ["spec.quantize"]
    assert "needs CUDA" in parsed.errors[0].message


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda s: s.pop("model"), "spec.model.uri"),
        (lambda s: s["model"].update(uri="s3://bucket/x"), "spec.model.uri"),
        (lambda s: s.update(replicas="two"), "spec.replicas"),
        (lambda s: s.update(replicas=-1), "spec.replicas"),
        (lambda s: s["gpu"].update(count=True), "spec.gpu.count"),
        (lambda s: s["model"].update(dtype="int3"), "spec.model.dtype"),
        (lambda s: s.update(warmup={"resolutions": ["big"]}), "spec.warmup.resolutions"),
        (
            lambda s: s.update(autoscaling={"minReplicas": 5, "maxReplicas": 2}),
            "spec.autoscaling.minReplicas",
        ),
        (lambda s: s.update(template={"env": [{"name": "HF_TOKEN", "value": "leak"}]}), "spec.template.env"),
        (lambda s: s["cacheDit"].update(cache_configs={}), "spec.cacheDit.cache_configs"),
        (lambda s: s.update(rollout={"maxSurge": 0, "maxUnavailable": 0}), "spec.rollout"),
    ],
)
def test_bad_input_gives_field_named_errors_never_raises(mutate, field):
    spec = copy.deepcopy(FLUX)
    mutate(spec)
    parsed = parse(spec)
    assert field in fields(parsed), [str(e) for e in parsed.errors]


def test_garbage_spec_does_not_raise():
    for garbage in (None, "text", 3, [], {"model": "x"}, {"model": {"uri": 5}}):
        parsed = parse(garbage)
        assert not parsed.ok and parsed.errors


def test_replicas_and_autoscaling_together_refused():
    spec = copy.deepcopy(FLUX)
    spec["autoscaling"] = {"maxReplicas": 3}
    assert "spec.replicas" in fields(parse(spec))


def test_model_facts_and_capabilities():
    assert model_facts("hf://black-forest-labs/FLUX.1-dev").max_cache_blocks == 19
    assert model_facts("hf://Qwen/Qwen-Image").max_cache_blocks == 60
    assert model_facts("file:///models/tiny-flux") is None
    assert product_capability("NVIDIA-H100-80GB-HBM3") == (9, 0)
    assert product_capability("NVIDIA-A100-SXM4-80GB") == (8, 0)
    assert product_capability("NVIDIA-L4") == (8, 9)
    assert product_capability("Mystery-GPU") is None


def test_startup_budget_grows_with_compile_and_resolutions():
    base = parse(FLUX).spec
    more = copy.deepcopy(FLUX)
    more["warmup"]["resolutions"] = ["1024x1024", "768x1344"]
    assert specs.startup_budget_seconds(parse(more).spec) > specs.startup_budget_seconds(base)
    no_compile = copy.deepcopy(FLUX)
    no_compile["compile"] = False
    assert specs.startup_budget_seconds(parse(no_compile).spec) < specs.startup_budget_seconds(base)
    pinned = copy.deepcopy(FLUX)
    pinned["startupTimeoutSeconds"] = 120
    assert specs.startup_budget_seconds(parse(pinned).spec) == 120


@pytest.mark.parametrize(
    "mask, steps, message",
    [
        ("fast", 8, None),
        ([1, 1, 0, 1], 4, None),
        ([1, 1, 0, 1], None, None),
        ("fastest", 8, "is not one of cache-dit's masks slow, medium, fast, ultra"),
        ("fast", None, "needs cache_config.num_inference_steps"),
        ([1, 2], 2, "must be a non-empty list of 0/1"),
        ([], 2, "must be a non-empty list of 0/1"),
        ({"a": 1}, 2, "must be a non-empty list of 0/1"),
        ([1, 0, 1], 8, "has 3 entries but num_inference_steps is 8"),
    ],
)
def test_steps_computation_mask_list_or_policy_name(mask, steps, message):
    spec = copy.deepcopy(sample("tiny-cpu.yaml")["spec"])
    cache = spec["cacheDit"]["cache_config"]
    cache["steps_computation_mask"] = mask
    cache.pop("num_inference_steps")
    if steps is not None:
        cache["num_inference_steps"] = steps
    parsed = parse(spec)
    if message is None:
        assert parsed.errors == []
    else:
        assert fields(parsed) == ["spec.cacheDit.cache_config.steps_computation_mask"]
        assert message in parsed.errors[0].message
