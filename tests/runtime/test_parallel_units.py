"""Which parallel layouts the runtime runs, as pure functions (the process tests are test_ranks.py)."""

from __future__ import annotations

import pytest
from diffusion_runtime.contract.config import ConfigError, parallel_layout_error
from diffusion_runtime.contract.parallel import (
    SINGLE,
    Layout,
    heads_refusal,
    layout_of,
    layout_refusal,
    local_transformer_config,
)
from diffusion_runtime.engine.optimize import plan_cache_dit


def test_layout_world_size_labels_and_description():
    layout = layout_of({"parallelism_config": {"ulysses_size": 2, "tp_size": 2}})
    assert layout == Layout(ulysses_size=2, ring_size=1, tp_size=2)
    assert layout.world_size == 4
    assert layout.labels() == {"world_size": "4", "ulysses_size": "2", "ring_size": "1", "tp_size": "2"}
    assert layout.describe() == "ulysses_size=2 x tp_size=2 (4 ranks)"
    assert layout_of({}) == layout_of(None) == SINGLE and SINGLE.world_size == 1
    assert SINGLE.labels()["world_size"] == "1"


@pytest.mark.parametrize(
    "pc",
    [
        {"ulysses_size": 2},
        {"ulysses_size": 4},
        {"ulysses_size": 2, "tp_size": 2},
        {"ulysses_size": 2, "tp_size": 4},
    ],
)
def test_cpu_runs_ulysses_and_ulysses_x_tp(pc):
    assert layout_refusal(pc, "cpu", "float32") is None
    assert layout_refusal(pc, "cuda", "bfloat16") is None


@pytest.mark.parametrize(
    ("pc", "key", "needle"),
    [
        ({"ring_size": 2}, "ring_size", "ring attention (ring_size=2) needs CUDA kernels"),
        ({"ulysses_size": 2, "ring_size": 2}, "ring_size", "ring attention (ring_size=2)"),
        ({"tp_size": 2}, "tp_size", "tensor parallelism alone (tp_size=2)"),
        ({"ulysses_size": 2, "ulysses_float8": True}, "ulysses_float8", "needs bfloat16 CUDA GPUs"),
    ],
)
def test_cpu_refuses_ring_tp_alone_and_float8_but_cuda_runs_them(pc, key, needle):
    refusal = layout_refusal(pc, "cpu", "float32")
    assert refusal is not None and refusal[0] == key and needle in refusal[1], refusal
    assert layout_refusal(pc, "cuda", "bfloat16") is None
    error = parallel_layout_error(pc, "cpu", "float32")
    assert error is not None and error.path == f"parallelism_config.{key}" and error.reason == "Unsupported"
    assert parallel_layout_error(pc, "cuda", "bfloat16") is None


def test_ulysses_float8_needs_bfloat16_and_use_ray_is_refused_everywhere():
    pc = {"ulysses_size": 2, "ulysses_float8": True}
    assert layout_refusal(pc, "cuda", "float16") == (
        "ulysses_float8",
        "needs model.dtype bfloat16, got float16",
    )
    assert layout_refusal(pc, "cuda", None) is None  # dtype unknown: the runtime's preflight checks it
    for device in ("cpu", "cuda"):
        assert (layout_refusal({"ulysses_size": 2, "use_ray": True}, device) or ("",))[0] == "use_ray"


def test_plan_cache_dit_accepts_runnable_layouts_and_names_the_key_of_the_rest():
    plan = plan_cache_dit({"parallelism_config": {"ulysses_size": 2}}, "cpu")
    assert plan.raw["parallelism_config"] == {"ulysses_size": 2} and plan.uses_cache_dit
    with pytest.raises(ConfigError, match=r"parallelism_config\.ring_size: ring attention \(ring_size=2\)"):
        plan_cache_dit({"parallelism_config": {"ring_size": 2}}, "cpu")
    assert plan_cache_dit({"parallelism_config": {"ring_size": 2}}, "cuda").raw["parallelism_config"]
    with pytest.raises(ConfigError, match="all 1"):
        plan_cache_dit({"parallelism_config": {"ulysses_size": 1}}, "cpu")


def test_heads_must_split_over_ulysses_x_tp(tmp_path):
    hybrid = {"parallelism_config": {"ulysses_size": 2, "tp_size": 2}}
    assert heads_refusal(hybrid, "FluxTransformer2DModel", 4) is None
    assert heads_refusal(hybrid, "FluxTransformer2DModel", 24) is None
    reason = heads_refusal(hybrid, "FluxTransformer2DModel", 2)
    assert (
        reason is not None and "has 2 attention heads, not divisible by ulysses_size x tp_size = 4" in reason
    )
    assert (
        heads_refusal({"parallelism_config": {"ring_size": 2}}, "X", 3) is None
    )  # ring splits the sequence only
    anything = {"parallelism_config": {"ulysses_size": 2, "ulysses_anything": True}}
    assert heads_refusal(anything, "X", 3) is None
    assert heads_refusal(hybrid, "X", None) is None  # unknown: checked on the loaded model

    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text('{"_class_name": "T", "num_attention_heads": 6}')
    assert local_transformer_config(str(tmp_path))["num_attention_heads"] == 6
    assert local_transformer_config(f"file://{tmp_path}")["_class_name"] == "T"
    assert local_transformer_config("hf://org/model") is None
