"""Unit tests of spec parsing and semantic validation (pure functions)."""

from __future__ import annotations

import copy

import pytest
from diffusion_operator import validation
from diffusion_operator.api import funcs, types
from diffusion_operator.api.model_facts import model_facts, product_capability
from op_helpers import sample

FLUX = sample("flux-dev.yaml")["spec"]


def parse(spec: dict, name: str = "x"):
    return validation.parse(name, "ns", spec)


def fields(parsed) -> list[str]:
    return [e.field for e in parsed.errors]


def test_samples_parse_without_errors():
    for name in ("flux-dev.yaml", "qwen-image.yaml", "tiny-cpu.yaml", "wan.yaml", "wan-i2v.yaml"):
        doc = sample(name)
        parsed = parse(doc["spec"], doc["metadata"]["name"])
        assert parsed.ok, (name, [str(e) for e in parsed.errors])


def test_flux_sample_values():
    s = parse(FLUX).cr.spec
    assert s.model.uri == "hf://black-forest-labs/FLUX.1-dev"
    assert funcs.token_secret(s) == ("hf-token", "token")
    assert s.gpu.count == 1 and funcs.replicas(s) == 1 and s.compile is True
    assert funcs.quantize_config(s) == {
        "quant_type": "float8_per_row",
        "exclude_layers": ["embedder", "embed"],
    }
    assert funcs.required_capability(s) == (8, 9)  # cache-dit's float8 floor


def test_float8_alias_is_normalised():
    spec = copy.deepcopy(FLUX)
    spec["quantize"]["quant_type"] = "float8"
    s = parse(spec).cr.spec
    assert funcs.quantize_config(s)["quant_type"] == "float8_per_row"  # type: ignore[index]
    assert funcs.quant_type_alias(s) == "float8"
    assert spec["quantize"]["quant_type"] == "float8"  # input untouched


def test_flux_fn_and_bn_are_checked_separately_against_57_blocks():
    """cache-dit 1.5.3 joins FLUX.1's 19 + 38 blocks into one list and checks Fn and Bn against it each."""
    spec = copy.deepcopy(FLUX)
    spec["cacheDit"]["cache_config"].update(Fn_compute_blocks=16, Bn_compute_blocks=8)
    assert parse(spec).ok
    spec["cacheDit"]["cache_config"].update(Fn_compute_blocks=57, Bn_compute_blocks=57)
    assert parse(spec).ok
    spec["cacheDit"]["cache_config"].update(Fn_compute_blocks=58, Bn_compute_blocks=0)
    parsed = parse(spec)
    assert fields(parsed) == ["spec.cacheDit.cache_config.Fn_compute_blocks"]
    assert "58 exceeds the 57 blocks" in parsed.errors[0].message and "FLUX.1-dev" in parsed.errors[0].message
    spec["cacheDit"]["cache_config"].update(Fn_compute_blocks=1, Bn_compute_blocks=60)
    assert fields(parse(spec)) == ["spec.cacheDit.cache_config.Bn_compute_blocks"]


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
    assert parsed.ok and funcs.required_capability(parsed.cr.spec) is None


def test_on_gpus_parallel_sizes_must_multiply_to_gpu_count():
    spec = copy.deepcopy(FLUX)
    spec["cacheDit"]["parallelism_config"] = {"ulysses_size": 2, "ring_size": 2}
    spec["gpu"] = {"count": 2}
    parsed = parse(spec)
    assert funcs.device_type(parsed.cr.spec) == "cuda"
    assert set(fields(parsed)) == {"spec.cacheDit.parallelism_config"}
    (error,) = parsed.errors
    assert error.message.startswith(types.PARALLEL_ON_GPUS), error.message
    assert "ulysses_size * ring_size * tp_size = 4, spec.gpu.count = 2" in error.message
    assert parsed.reason == "InvalidSpec"
    spec["cacheDit"]["parallelism_config"] = {"ulysses_size": 2, "ring_size": 2}
    spec["gpu"] = {"count": 4}
    assert parse(spec).ok  # 2 x 2 on four GPUs


def test_on_cpu_the_parallel_sizes_are_the_rank_count_not_gpu_count():
    """With spec.device cpu (or no GPU) the ranks are CPU processes: Ulysses 2 in a pod without GPUs is
    valid and the pod asks for no GPU; a CPU layout that holds GPUs, or more than MAX_RANKS ranks, is not."""
    from diffusion_operator import builders
    from op_helpers import owner_for

    doc = sample("tiny-cpu.yaml")
    spec = doc["spec"]
    spec["cacheDit"]["parallelism_config"] = {"ulysses_size": 2}
    parsed = parse(spec)
    assert parsed.ok, [str(e) for e in parsed.errors]
    s = parsed.cr
    assert s.spec.device == "cpu" and s.spec.gpu.count == 0 and funcs.device_type(s.spec) == "cpu"
    cm = builders.build_configmap(s, owner_for(doc))
    assert "ulysses_size: 2" in cm["data"]["cache-dit.yaml"]
    pod = builders.build_deployment(s, owner_for(doc), cm)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert not any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
    # gloo talks TCP: /dev/shm stays the CPU size whatever the rank count
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}} in pod["volumes"]

    auto = copy.deepcopy(spec)
    auto["device"] = "auto"  # no GPU: the runtime resolves auto to cpu
    assert parse(auto).ok

    holding = copy.deepcopy(spec)
    holding["gpu"] = {"count": 2}  # ranks on CPU while two GPUs sit idle
    parsed = parse(holding)
    assert fields(parsed) == ["spec.cacheDit.parallelism_config"]
    assert parsed.errors[0].message.startswith(types.PARALLEL_ON_CPU), parsed.errors[0].message
    assert "spec.gpu.count = 2, spec.device cpu" in parsed.errors[0].message

    many = copy.deepcopy(spec)
    many["cacheDit"]["parallelism_config"] = {"ulysses_size": 2 * types.MAX_RANKS}
    parsed = parse(many)
    assert fields(parsed) == ["spec.cacheDit.parallelism_config"]
    assert f"at most {types.MAX_RANKS}" in parsed.errors[0].message
    assert f"= {2 * types.MAX_RANKS}," in parsed.errors[0].message


@pytest.mark.parametrize(
    "layout, key, words",
    [
        ({"ring_size": 2}, "ring_size", "ring attention"),
        ({"ulysses_size": 2, "ring_size": 2}, "ring_size", "ring attention"),
        ({"tp_size": 2}, "tp_size", "tensor parallelism alone"),
        ({"ulysses_size": 2, "ulysses_float8": True}, "ulysses_float8", "bfloat16 CUDA GPUs"),
    ],
)
def test_on_cpu_what_the_runtime_does_not_run_is_unsupported_naming_the_key(layout, key, words):
    """The operator asks the runtime's own preflight: its refusal (parallel.layout_refusal) comes back
    as ConfigValid=False, reason Unsupported, naming the CR field."""
    from diffusion_runtime.contract.parallel import layout_refusal

    spec = copy.deepcopy(sample("tiny-cpu.yaml")["spec"])
    spec["cacheDit"]["parallelism_config"] = layout
    runtime_says = layout_refusal(layout, "cpu", "float32")
    assert runtime_says is not None and runtime_says[0] == key
    parsed = parse(spec)
    assert fields(parsed) == [f"spec.cacheDit.parallelism_config.{key}"], [str(e) for e in parsed.errors]
    assert parsed.reason == "Unsupported"
    assert words in parsed.errors[0].message and "cpu" in parsed.errors[0].message
    assert runtime_says[1] in parsed.errors[0].message


def test_parallelism_follows_the_runtime_layout_rules():
    """The runtime's one function (config.parallel_layout_error) decides; the operator follows it:
    Ulysses on GPUs is valid, what the runtime refuses is Unsupported naming the key."""
    from diffusion_runtime.contract.config import parallel_layout_error

    spec = copy.deepcopy(FLUX)
    spec["cacheDit"]["parallelism_config"] = {"ulysses_size": 2}
    spec["gpu"] = {"count": 2}
    assert parallel_layout_error({"ulysses_size": 2}, "cuda", "bfloat16") is None
    assert parse(spec).ok

    spec["cacheDit"]["parallelism_config"] = {"ulysses_size": 2, "ulysses_float8": True}
    spec["model"]["dtype"] = "float16"
    runtime_says = parallel_layout_error(spec["cacheDit"]["parallelism_config"], "cuda", "float16")
    assert runtime_says is not None
    parsed = parse(spec)
    assert fields(parsed) == ["spec.cacheDit.parallelism_config.ulysses_float8"]
    assert parsed.reason == "Unsupported" and parsed.errors[0].reason == "Unsupported"
    assert "needs spec.model.dtype bfloat16, got float16" in parsed.errors[0].message


def test_parallel_sizes_all_one_is_refused():
    spec = copy.deepcopy(FLUX)
    spec["cacheDit"]["parallelism_config"] = {"ulysses_size": 1}
    parsed = parse(spec)
    assert fields(parsed) == ["spec.cacheDit.parallelism_config"]
    assert "all 1" in parsed.errors[0].message


def test_quantize_on_cpu_int8_allowed_float8_refused():
    """One behaviour end to end: the runtime runs the int8 types on CPU with torchao, nothing else."""
    from diffusion_runtime.contract.config import CPU_QUANT_TYPES

    spec = copy.deepcopy(sample("tiny-cpu.yaml")["spec"])
    for quant_type in CPU_QUANT_TYPES:
        spec["quantize"] = {"quant_type": quant_type}
        assert parse(spec).ok, quant_type
    for quant_type in ("float8_per_row", "float8", "int4_weight_only", "nvfp4"):
        spec["quantize"] = {"quant_type": quant_type}
        parsed = parse(spec)
        assert fields(parsed) == ["spec.quantize.quant_type"], quant_type
        assert (
            "needs a CUDA GPU" in parsed.errors[0].message and "spec.gpu.count 0" in parsed.errors[0].message
        )
    spec["quantize"] = {"quant_type": "int8_per_row", "precision_plan": {"proj_out": "int8_per_tensor"}}
    assert fields(parse(spec)) == ["spec.quantize.precision_plan"]


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda s: s.pop("model"), "spec.model"),
        (lambda s: s["model"].update(uri="s3://bucket/x"), "spec.model.uri"),
        (lambda s: s.update(replicas="two"), "spec.replicas"),
        (lambda s: s.update(replicas=-1), "spec.replicas"),
        (lambda s: s["gpu"].update(count=True), "spec.gpu.count"),
        (lambda s: s["model"].update(dtype="int3"), "spec.model.dtype"),
        (lambda s: s.update(warmup={"resolutions": ["big"]}), "spec.warmup.resolutions[0]"),
        (
            lambda s: s.update(autoscaling={"minReplicas": 5, "maxReplicas": 2}),
            "spec.autoscaling.minReplicas",
        ),
        (lambda s: s.update(template={"env": [{"name": "HF_TOKEN", "value": "leak"}]}), "spec.template.env"),
        (
            lambda s: s.update(
                template={"env": [{"name": "DIFFUSION_WEBHOOK_SECRET", "value": "whsec_AA=="}]}
            ),
            "spec.template.env",
        ),
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
    assert model_facts("hf://black-forest-labs/FLUX.1-dev").max_cache_blocks == 57  # 19 + 38, joined
    assert model_facts("hf://Qwen/Qwen-Image").max_cache_blocks == 60
    assert model_facts("file:///models/tiny-flux").block_lists == (
        6,
    )  # the runtime's tiny FLUX, 2 + 4 joined
    assert model_facts("file:///models/my-own-model") is None
    assert product_capability("NVIDIA-H100-80GB-HBM3") == (9, 0)
    assert product_capability("NVIDIA-A100-SXM4-80GB") == (8, 0)
    assert product_capability("NVIDIA-L4") == (8, 9)
    assert product_capability("Mystery-GPU") is None


def test_startup_budget_grows_with_compile_and_resolutions():
    base = parse(FLUX).cr.spec
    more = copy.deepcopy(FLUX)
    more["warmup"]["resolutions"] = ["1024x1024", "768x1344"]
    assert funcs.startup_budget_seconds(parse(more).cr.spec) > funcs.startup_budget_seconds(base)
    no_compile = copy.deepcopy(FLUX)
    no_compile["compile"] = False
    assert funcs.startup_budget_seconds(parse(no_compile).cr.spec) < funcs.startup_budget_seconds(base)
    pinned = copy.deepcopy(FLUX)
    pinned["startupTimeoutSeconds"] = 120
    assert funcs.startup_budget_seconds(parse(pinned).cr.spec) == 120


@pytest.mark.parametrize(
    "mask, steps, message",
    [
        ("fast", 8, None),
        ([1, 1, 0, 1], 4, None),
        ([1, 1, 0, 1], None, None),
        ("fastest", 8, "is not one of cache-dit's masks slow, medium, fast, ultra"),
        ("ultra", 50, None),
        ("fast", None, "needs spec.cacheDit.cache_config.num_inference_steps"),
        ("fast", 5, "cache-dit has no 'fast' mask for num_inference_steps=5"),
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


@pytest.mark.parametrize(
    "mutate, field, needle",
    [
        (lambda s: s["server"].update(maxN=100), "spec.server.maxN", "less than or equal to 64"),
        (lambda s: s["server"].update(maxSteps=2000), "spec.server.maxSteps", "less than or equal to 1000"),
        (lambda s: s["warmup"].update(steps=60), "spec.warmup.steps", "spec.server.maxSteps"),
        (lambda s: s["warmup"].update(resolutions=["1000x1000"]), "spec.warmup.resolutions", "multiples of 16"),
        (lambda s: s["warmup"].update(resolutions=["1024x1024"]), "spec.warmup.resolutions", "spec.server.maxPixels"),
        (
            lambda s: s.update(template={"resources": {"limits": {"memory": "-1"}}}),
            "spec.template.resources.limits.memory",
            "non-negative",
        ),
        (lambda s: s["model"].update(dtype="float16"), "spec.model.dtype", "not supported on cpu"),
        (
            lambda s: s["cacheDit"]["cache_config"].update(steps_computation_mask="fast", num_inference_steps=5),
            "spec.cacheDit.cache_config.steps_computation_mask",
            "no 'fast' mask for num_inference_steps=5",
        ),
    ],
    ids=["maxN-100", "maxSteps-2000", "warmup-steps-above-max", "not-16", "above-max-pixels", "memory-1",
         "float16-cpu", "mask-5-steps"],
)  # fmt: skip
def test_what_the_runtime_refuses_is_refused_naming_the_cr_field(mutate, field, needle):
    """Issue item 2: the rendered runtime.yaml goes through the runtime's own validation."""
    spec = copy.deepcopy(sample("tiny-cpu.yaml")["spec"])  # maxSteps 50, maxPixels 262144
    mutate(spec)
    parsed = parse(spec)
    assert not parsed.ok
    assert fields(parsed) == [field], [str(e) for e in parsed.errors]
    assert needle in parsed.errors[0].message, str(parsed.errors[0])


def test_runtime_paths_map_back_to_cr_fields():
    assert validation.cr_field("server.max_n") == "spec.server.maxN"
    assert validation.cr_field("warmup.resolutions") == "spec.warmup.resolutions"
    assert (
        validation.cr_field("cache_config.Fn_compute_blocks")
        == "spec.cacheDit.cache_config.Fn_compute_blocks"
    )
    assert validation.cr_field("quantize_config.quant_type") == "spec.quantize.quant_type"
    assert validation.cr_field("parallelism_config") == "spec.cacheDit.parallelism_config"
    assert validation.cr_field("server.port") == "spec"  # set by the operator, not from the CR


def test_server_defaults_and_bounds_are_the_runtimes():
    from diffusion_runtime.contract.config import ServerConfig
    from diffusion_runtime.contract.limits import MAX_N_LIMIT, MAX_STEPS_LIMIT

    s = parse({"model": {"uri": "hf://a/b"}}).cr.spec.server
    runtime = ServerConfig()
    assert (s.max_queue, s.max_pixels, s.max_steps, s.max_n) == (
        runtime.max_queue,
        runtime.max_pixels,
        runtime.max_steps,
        runtime.max_n,
    )
    assert s.request_timeout_seconds == runtime.request_timeout_seconds
    server = types.ServerSpec.model_json_schema(by_alias=True)["properties"]
    assert server["maxN"]["maximum"] == MAX_N_LIMIT and server["maxSteps"]["maximum"] == MAX_STEPS_LIMIT


def test_the_operator_and_the_facts_import_without_torch():
    """The operator image has no torch: the spec, builders, the runtime's config and the cache-dit
    facts must import without it (cache_dit itself imports torch)."""
    import subprocess
    import sys

    code = (
        "import sys, diffusion_operator.validation, diffusion_operator.builders, diffusion_operator.rbac, "
        "diffusion_runtime.contract.config, diffusion_runtime.contract.cache_dit_facts as f; "
        "assert f.steps_mask(total_steps=8, mask_policy='fast'); "
        "bad = [m for m in ('torch', 'cache_dit', 'diffusers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_tiny_model_blocks_are_checked_like_the_pod_would():
    from diffusion_operator.api.model_facts import KNOWN_MODELS
    from diffusion_runtime.contract.cache_dit_facts import MODEL_BLOCK_LISTS

    assert {m.name for m in KNOWN_MODELS.values()} == set(MODEL_BLOCK_LISTS)
    spec = copy.deepcopy(sample("tiny-cpu.yaml")["spec"])
    spec["cacheDit"]["cache_config"].update(Fn_compute_blocks=6, Bn_compute_blocks=6)
    assert parse(spec).ok
    spec["cacheDit"]["cache_config"].update(Fn_compute_blocks=7)
    assert fields(parse(spec)) == ["spec.cacheDit.cache_config.Fn_compute_blocks"]


def test_huge_step_count_with_a_named_mask_is_refused_fast():
    spec = copy.deepcopy(sample("tiny-cpu.yaml")["spec"])
    spec["cacheDit"]["cache_config"].update(steps_computation_mask="fast", num_inference_steps=10**12)
    parsed = parse(spec)
    assert "spec.cacheDit.cache_config.num_inference_steps" in fields(parsed)


def test_a_null_runtime_setting_never_crashes_the_parse():
    """Every CR field that is a runtime setting, written as null: an error naming it or its default,
    never an exception (the CR field reuses the runtime's bounds, not its validators)."""
    for f in funcs.SETTING_FIELDS:
        spec: dict = copy.deepcopy(FLUX)
        where = spec
        *sections, name = f.cr.split(".")[1:]
        for section in sections:
            where = where.setdefault(section, {})
        where[name] = None
        parsed = parse(spec)
        assert parsed.ok or parsed.errors, f.cr


def test_wan_sample_renders_the_video_limits_into_the_runtime_config():
    from diffusion_operator.builders.configmap import runtime_config

    doc = sample("wan.yaml")
    parsed = parse(doc["spec"], doc["metadata"]["name"])
    assert parsed.ok, [str(e) for e in parsed.errors]
    cfg = runtime_config(parsed.cr)
    assert cfg.model.pipeline == "WanPipeline" and cfg.warmup.frames == 81
    assert (cfg.server.max_frames, cfg.server.max_video_seconds, cfg.server.video_fps) == (81, 5, 16)
    assert cfg.server.max_video_pixels == 1280 * 720 * 81


def test_startup_budget_grows_with_the_warmup_clips_frames():
    doc = sample("wan.yaml")
    long = parse(doc["spec"]).cr.spec
    short_doc = copy.deepcopy(doc)
    short_doc["spec"]["warmup"]["frames"] = 9
    short = parse(short_doc["spec"]).cr.spec
    assert funcs.startup_budget_seconds(long) > funcs.startup_budget_seconds(short)
    image = copy.deepcopy(short_doc)
    image["spec"]["model"]["pipeline"] = "FluxPipeline"
    image["spec"]["warmup"]["frames"] = 81  # frames do not count for an image pipeline
    image_short = copy.deepcopy(image)
    image_short["spec"]["warmup"]["frames"] = 9
    assert funcs.startup_budget_seconds(parse(image["spec"]).cr.spec) == funcs.startup_budget_seconds(
        parse(image_short["spec"]).cr.spec
    )
