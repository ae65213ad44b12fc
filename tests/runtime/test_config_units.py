"""Pure functions of the runtime: config parsing/validation and the cache-dit plan (no server, no model)."""

from __future__ import annotations

import pytest
import yaml
from diffusion_runtime.contract.config import (
    ConfigError,
    RuntimeConfig,
    apply_overrides,
    config_from_dict,
    load_config_file,
    parse_size,
    validate,
)
from diffusion_runtime.engine.optimize import plan_cache_dit


def _valid(**model) -> RuntimeConfig:
    cfg = config_from_dict({"model": {"uri": "/models/x", **model}})
    return validate(cfg)


def test_contract_example_parses(tmp_path):
    text = """
model: {uri: hf://black-forest-labs/FLUX.1-dev, revision: main, pipeline: FluxPipeline, dtype: bfloat16}
cache_dit_config: cache-dit.yaml
compile: false
device: auto
warmup: {resolutions: ["1024x1024"], steps: 28, prompt: "a photo of a cat"}
server: {host: 0.0.0.0, port: 8000, metrics_port: 9090, max_queue: 16, request_timeout_seconds: 300,
         max_pixels: 4194304, max_steps: 100, max_n: 4}
"""
    path = tmp_path / "runtime.yaml"
    path.write_text(text)
    cfg = validate(load_config_file(path))
    assert cfg.model.uri == "hf://black-forest-labs/FLUX.1-dev"
    assert cfg.cache_dit_config == str(tmp_path / "cache-dit.yaml")  # relative to the file's folder
    assert cfg.server.max_queue == 16 and cfg.server.metrics_port == 9090
    assert cfg.warmup.resolutions == ["1024x1024"]


def test_flags_override_file():
    cfg = _valid()
    apply_overrides(cfg, model="/other", port=9000, max_queue=3, cache_dit_config="/c.yaml", host=None)
    assert (cfg.model.uri, cfg.server.port, cfg.server.max_queue, cfg.cache_dit_config) == (
        "/other",
        9000,
        3,
        "/c.yaml",
    )
    assert cfg.server.host == "0.0.0.0"  # None leaves the file's value


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"model": {"uri": "x", "dtype": "fp8"}}, "model.dtype"),
        ({"model": {"uri": "x"}, "server": {"max_queue": 0}}, "server.max_queue"),
        ({"model": {"uri": "x"}, "server": {"port": "80a"}}, "server.port"),
        ({"model": {"uri": "x"}, "server": {"metrics_port": 8000}}, "server.metrics_port"),
        ({"model": {"uri": "x"}, "warmup": {"resolutions": ["1000x1000"]}}, "warmup.resolutions"),
        ({"model": {"uri": "x"}, "warmup": {"steps": 0}}, "warmup.steps"),
        ({"model": {}}, "model.uri"),
        ({"model": {"uri": "x"}, "device": "tpu"}, "device"),
    ],
)
def test_bad_settings_name_the_setting(raw, needle):
    with pytest.raises(ConfigError) as e:
        validate(config_from_dict(raw))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_keys_are_refused():
    with pytest.raises(ConfigError, match="max_queu"):
        config_from_dict({"model": {"uri": "x"}, "server": {"max_queu": 3}})
    with pytest.raises(ConfigError, match="cache_dit"):
        config_from_dict({"model": {"uri": "x"}, "cache_dit": "a.yaml"})


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config_file(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config_file(tmp_path / "missing.yaml")


def test_parse_size():
    assert parse_size("1024x768") == (1024, 768)
    assert parse_size(" 64X32 ") == (64, 32)
    for bad in ("64", "x64", "64x", "-64x64", "64*64"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_plan_float8_refused_on_cpu_with_one_line():
    with pytest.raises(ConfigError) as e:
        plan_cache_dit({"quantize_config": {"quant_type": "float8_per_row"}}, "cpu")
    msg = str(e.value)
    assert "quantize_config.quant_type=float8_per_row" in msg and "8.9" in msg and "\n" not in msg


def test_plan_float8_refused_below_sm89():
    with pytest.raises(ConfigError, match="8.9"):
        plan_cache_dit({"quantize_config": {"quant_type": "float8_per_row"}}, "cuda", (8, 0))
    plan = plan_cache_dit({"quantize_config": {"quant_type": "float8_per_row"}}, "cuda", (9, 0))
    assert plan.quant_type == "float8_per_row" and not plan.quant_via_torchao
    assert plan.raw["quantize_config"]["quant_type"] == "float8_per_row"  # cache-dit applies it on CUDA


def test_plan_legacy_float8_alias():
    plan = plan_cache_dit({"quantize_config": {"quant_type": "float8"}}, "cuda", (9, 0))
    assert plan.quant_type == "float8_per_row"
    assert plan.raw["quantize_config"]["quant_type"] == "float8_per_row"
    assert any("alias" in n for n in plan.notes)


def test_plan_cpu_int8_goes_through_torchao():
    raw = {"cache_config": {"Fn_compute_blocks": 1}, "quantize_config": {"quant_type": "int8_weight_only"}}
    plan = plan_cache_dit(raw, "cpu")
    assert plan.quant_via_torchao and plan.quant_type == "int8_weight_only"
    assert "quantize_config" not in plan.raw and "cache_config" in plan.raw  # cache-dit never sees it on CPU
    assert "quantize_config" in raw  # the caller's mapping is untouched


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"cache_conifg": {}}, "cache_conifg"),
        ({"cache_config": {"enable_sperate_cfg": True}}, "enable_sperate_cfg"),
        ({"cache_config": {"Fn_compute_blocks": -1}}, "Fn_compute_blocks"),
        ({"cache_config": {"steps_computation_mask": "fast"}}, "num_inference_steps"),
        ({"quantize_config": {"quant_type": "int3"}}, "quant_type"),
        ({"quantize_config": {"quant_type": "int4_weight_only"}}, "int4_weight_only"),
        ({"parallelism_config": {"ulysses_size": 1}}, "parallelism_config"),
        ({"parallelism_config": {"ring_size": 2}}, "ring_size=2"),
    ],
)
def test_plan_rejects(raw, needle):
    with pytest.raises(ConfigError) as e:
        plan_cache_dit(raw, "cpu")
    assert needle in str(e.value)


def test_plan_keeps_cache_dit_keys_verbatim():
    raw = yaml.safe_load(
        """
cache_config: {Fn_compute_blocks: 1, Bn_compute_blocks: 0, residual_diff_threshold: 0.12,
               max_warmup_steps: 8, enable_taylorseer: true, taylorseer_order: 1}
attention_backend: native
"""
    )
    plan = plan_cache_dit(raw, "cpu")
    assert plan.raw == raw and plan.uses_cache_dit and plan.quant_type is None


def test_runtime_quant_types_are_the_crds():
    """The runtime's accepted quant types and the CRD enum (generated from cache-dit) are one list."""
    from pathlib import Path

    import yaml
    from diffusion_runtime.contract.cache_dit_facts import QUANT_TYPE_ALIASES as QUANT_ALIASES
    from diffusion_runtime.contract.cache_dit_facts import QUANT_TYPES

    crd = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "crds" / "diffusion.dev_diffusiondeployments.yaml").read_text()
    )
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert set(spec["quantize"]["properties"]["quant_type"]["enum"]) == set(QUANT_TYPES) | set(QUANT_ALIASES)


def test_serve_flags_come_from_the_settings():
    """`diffusion-runtime serve`'s flags are built from OVERRIDES and the settings' fields: the
    choices are the config's Literal values, the types its field types, every flag overrides one."""
    from diffusion_runtime.cli import _parser
    from diffusion_runtime.contract.config import DEVICES, DTYPES, OVERRIDES, setting_field

    serve = next(
        a
        for a in _parser()._subparsers._group_actions[0].choices.values()
        if a.prog.endswith(" serve")  # type: ignore[union-attr]
    )
    flags = {a.dest: a for a in serve._actions}
    assert set(OVERRIDES) <= set(flags)
    assert tuple(flags["dtype"].choices) == DTYPES and tuple(flags["device"].choices) == DEVICES
    assert flags["port"].type is int and flags["request_timeout"].type is float
    for dest, path in OVERRIDES.items():
        assert f"{setting_field(path).description} ({path})" in flags[dest].help  # the field's description
    args = serve.parse_args(
        ["--max-queue", "3", "--warmup-size", "64x64", "--warmup-size", "32x32", "--no-compile"]
    )
    cfg = apply_overrides(RuntimeConfig(), **{d: getattr(args, d) for d in OVERRIDES})
    assert (cfg.server.max_queue, cfg.warmup.resolutions, cfg.compile) == (3, ["64x64", "32x32"], False)
