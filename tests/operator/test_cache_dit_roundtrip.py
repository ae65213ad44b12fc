"""The rendered cache-dit.yaml, read back by cache_dit.load_configs, equals the seed-style configs."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml
from diffusion_operator import builders, validation
from diffusion_operator.api import funcs
from op_helpers import owner_for, sample

SEED = Path(__file__).parent / "seed"


def render(doc: dict, tmp_path: Path) -> Path:
    parsed = validation.parse(doc["metadata"]["name"], "ns", doc["spec"])
    assert parsed.ok, [str(e) for e in parsed.errors]
    cm = builders.build_configmap(parsed.cr, owner_for(doc))
    path = tmp_path / "cache-dit.yaml"
    path.write_text(cm["data"]["cache-dit.yaml"])
    return path


def comparable(value):
    """Dataclasses and enums to plain values, so two loads can be compared field by field."""
    if dataclasses.is_dataclass(value):
        return {
            f.name: comparable(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if not f.name.startswith("_")
        }
    if hasattr(value, "value") and type(value).__module__.startswith("cache_dit"):
        return value.value
    if isinstance(value, list):
        return [comparable(v) for v in value]
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items()}
    return value


def test_flux_sample_roundtrip_cache_and_quantize(tmp_path, load_configs):
    rendered = load_configs(str(render(sample("flux-dev.yaml"), tmp_path)))
    seed_cache = load_configs(str(SEED / "cache.yaml"))
    seed_quant = load_configs(str(SEED / "quantize.yaml"))
    assert comparable(rendered["cache_config"]) == comparable(seed_cache["cache_config"])
    assert comparable(rendered["calibrator_config"]) == comparable(seed_cache["calibrator_config"])
    assert rendered["calibrator_config"].taylorseer_order == 1
    assert (
        rendered["cache_config"].Fn_compute_blocks == 1
        and rendered["cache_config"].residual_diff_threshold == 0.12
    )
    assert rendered["quantize_config"] is not None
    assert comparable(rendered["quantize_config"]) == comparable(seed_quant["quantize_config"])
    assert rendered["quantize_config"].quant_type == "float8_per_row"
    assert rendered["parallelism_config"] is None


def test_legacy_float8_alias_loads_as_float8_per_row(tmp_path, load_configs):
    doc = copy.deepcopy(sample("flux-dev.yaml"))
    doc["spec"]["quantize"]["quant_type"] = "float8"
    rendered = load_configs(str(render(doc, tmp_path)))
    seed_quant = load_configs(str(SEED / "quantize.yaml"))
    assert comparable(rendered["quantize_config"]) == comparable(seed_quant["quantize_config"])


def test_qwen_sample_roundtrip_parallelism(tmp_path, load_configs):
    doc = sample("qwen-image.yaml")
    assert doc["spec"]["gpu"]["count"] == 2 and doc["spec"]["cacheDit"]["parallelism_config"] == {
        "ulysses_size": 2
    }
    rendered = load_configs(str(render(doc, tmp_path)))  # valid: the runtime runs Ulysses on GPUs
    seed = load_configs(str(SEED / "parallelism.yaml"))
    for key in ("cache_config", "calibrator_config", "parallelism_config", "attention_backend"):
        assert comparable(rendered[key]) == comparable(seed[key]), key
    assert rendered["parallelism_config"].ulysses_size == 2
    assert rendered["attention_backend"] == "native"
    assert rendered["cache_config"].enable_separate_cfg is True


def test_cache_tag_matches_cache_dit_strify(tmp_path, load_configs):
    for name in ("flux-dev.yaml", "qwen-image.yaml", "tiny-cpu.yaml"):
        doc = sample(name)
        rendered = load_configs(str(render(doc, tmp_path)))
        assert funcs.cache_tag(doc["spec"]["cacheDit"]) == rendered["cache_config"].strify(), name


def test_rendered_yaml_keeps_cache_dit_keys_verbatim(tmp_path):
    doc = sample("flux-dev.yaml")
    text = yaml.safe_load(render(doc, tmp_path).read_text())
    assert list(text) == ["cache_config", "quantize_config"]
    assert text["cache_config"] == doc["spec"]["cacheDit"]["cache_config"]


def test_mask_policy_names_match_cache_dit(tmp_path, load_configs):
    from cache_dit.caching.cache_interface import steps_mask
    from diffusion_runtime.contract.cache_dit_facts import MASK_POLICIES

    for name in MASK_POLICIES:
        assert steps_mask(total_steps=8, mask_policy=name)  # each is a policy cache-dit knows
    with pytest.raises(ValueError):
        steps_mask(total_steps=8, mask_policy="fastest")
    doc = sample("tiny-cpu.yaml")
    doc["spec"]["cacheDit"]["cache_config"]["steps_computation_mask"] = "fast"
    rendered = load_configs(str(render(doc, tmp_path)))
    assert rendered["cache_config"].steps_computation_mask == steps_mask(total_steps=8, mask_policy="fast")


def test_named_mask_tag_and_expansion_equal_cache_dits_own(tmp_path, load_configs):
    """status.cacheTag for a named mask is what cache-dit's load_configs + strify give (not SCMfast)."""
    from cache_dit.caching.cache_interface import steps_mask
    from diffusion_runtime.contract import cache_dit_facts as facts

    for steps in range(1, 101):
        for name in facts.MASK_POLICIES:
            try:
                theirs = steps_mask(total_steps=steps, mask_policy=name)
            except (AssertionError, ValueError, IndexError):
                with pytest.raises(ValueError):
                    facts.expand_mask({"steps_computation_mask": name, "num_inference_steps": steps})
                continue
            ours = facts.expand_mask({"steps_computation_mask": name, "num_inference_steps": steps})
            assert ours == theirs, (steps, name)
    for name, steps, extra in (
        ("fast", 8, {}),
        ("ultra", 28, {"cache_type": "DBCache", "enable_separate_cfg": False}),
        ("slow", 50, {"force_refresh_step_hint": 10}),
        ("medium", 4, {"cache_type": "DBPrune"}),
    ):
        doc = sample("tiny-cpu.yaml")
        cache = doc["spec"]["cacheDit"]["cache_config"]
        cache.update(steps_computation_mask=name, num_inference_steps=steps, **extra)
        if steps != 8:
            doc["spec"]["warmup"]["steps"] = min(steps, doc["spec"]["server"]["maxSteps"])
        rendered = load_configs(str(render(doc, tmp_path)))
        tag = funcs.cache_tag(doc["spec"]["cacheDit"])
        assert tag == rendered["cache_config"].strify(), (name, steps)
        assert "SCM" + name not in tag


def test_facts_module_is_generated_from_the_pinned_cache_dit():
    import importlib.util
    import sys

    from op_helpers import REPO

    module_spec = importlib.util.spec_from_file_location(
        "gen_facts", REPO / "tools" / "gen_cache_dit_facts.py"
    )
    gen = importlib.util.module_from_spec(module_spec)
    sys.modules["gen_facts"] = gen
    module_spec.loader.exec_module(gen)
    assert gen.OUTPUT.read_text() == gen.render(), "stale: run .venv/bin/python tools/gen_cache_dit_facts.py"


def test_block_lists_are_what_cache_dits_adapter_caches():
    """The facts' block lists for the tiny FLUX (2 double + 4 single blocks) are what cache-dit's own
    FLUX adapter hands its cached blocks: one joined list (dummy blocks, cache-dit's default)."""
    import cache_dit
    from diffusion_runtime.contract.cache_dit_facts import FLUX_ENABLE_DUMMY_BLOCKS, MODEL_BLOCK_LISTS
    from diffusion_runtime.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny", 0)
    adapter = cache_dit.BlockAdapterRegister.get_adapter(pipe)
    blocks = adapter.blocks if isinstance(adapter.blocks, list) else [adapter.blocks]
    assert FLUX_ENABLE_DUMMY_BLOCKS
    assert tuple(len(b) for b in blocks) == MODEL_BLOCK_LISTS["tiny-flux"] == (6,)
    assert MODEL_BLOCK_LISTS["FLUX.1-dev"] == (19 + 38,)
