"""The quality gate with real `diffusion-runtime serve` processes on the tiny model.

Thresholds come from runtime.yaml. On the random-weight tiny model (measured): cache-dit's "fast"
static mask (3 of 8 steps cached) gives PSNR about 49 dB against the plain pipeline, a mask caching
6 of 8 steps about 42 dB, torchao int8 about 55 dB; SSIM stays near 1. The figures show the
mechanism, not real image quality.
"""

from __future__ import annotations

import copy
import re

import pytest
from diffusion_runtime.contract.config import ConfigError, config_from_dict, validate
from fixtures_runtime import STATIC_CACHE_DIT
from test_runtime_server import generate, scrape, value

pytestmark = pytest.mark.runtime

GATE = {"prompts": ["a photo of a cat", "a red car"], "seeds": [0, 1], "min_psnr": 45.0, "min_ssim": 0.99}
# 6 of 8 steps served from the cache: most of the image is extrapolated
AGGRESSIVE = copy.deepcopy(STATIC_CACHE_DIT)
AGGRESSIVE["cache_config"].update(
    steps_computation_mask=[1, 0, 0, 0, 0, 0, 0, 1], max_warmup_steps=1, num_inference_steps=8
)


def _failure_line(rp) -> str:
    lines = [ln for ln in rp.log().splitlines() if ln.startswith("diffusion-runtime:")]
    assert lines, rp.log_tail()
    return lines[-1]


def test_mild_cache_setting_passes_with_its_figures_in_metrics(runtime_server_factory):
    rp = runtime_server_factory("mild", cache_dit=STATIC_CACHE_DIT, quality_gate=GATE)
    m = scrape(rp.metrics_url)
    assert value(m, "diffusion_quality_gate", diffusion_quality_gate="passed") == 1
    psnr = value(m, "diffusion_quality_gate_psnr_decibels")
    ssim = value(m, "diffusion_quality_gate_ssim")
    assert GATE["min_psnr"] <= psnr < 100, psnr  # finite: the cached image really differs
    assert GATE["min_ssim"] <= ssim <= 1.0
    assert value(m, "diffusion_quality_gate_seconds") > 0
    log = rp.log()
    assert "quality gate passed" in log and log.count("quality gate: 'a") == 4  # 2 prompts x 2 seeds
    r = generate(rp.url, size="64x64", num_inference_steps=8, seed=3)
    assert r.status_code == 200 and r.json()["cache"]["cached_steps"] == 3


def test_with_batching_the_gate_also_compares_batched_canaries_with_unbatched_ones(runtime_server_factory):
    rp = runtime_server_factory(
        "batched", cache_dit=STATIC_CACHE_DIT, quality_gate=GATE, server={"max_batch": 4}
    )
    m = scrape(rp.metrics_url)
    assert value(m, "diffusion_quality_gate", diffusion_quality_gate="passed") == 1
    log = rp.log()
    found = re.search(r"batched \(max_batch 4\) vs unbatched canaries: worst PSNR (\S+) dB, SSIM (\S+)", log)
    assert found, log[-3000:]
    # the static mask: a batched canary equals its unbatched twin up to float rounding
    assert float(found.group(1)) >= 60 and float(found.group(2)) >= 0.999, found.group(0)
    assert "and batched vs unbatched)" in log


def test_aggressive_mask_never_turns_ready_and_exits_with_the_figures(runtime_server_factory):
    rp = runtime_server_factory("aggressive", cache_dit=AGGRESSIVE, quality_gate=GATE, wait=False)
    assert rp.wait_exit(timeout=300) == 1
    line = _failure_line(rp)
    assert line.startswith("diffusion-runtime: quality gate failed: PSNR "), line
    assert "< min 45" in line and "SSIM" in line and "min 0.99" in line and "4 canaries" in line
    assert "Application startup complete" in rp.log()  # it listened, but /ready never said yes
    assert "quality gate passed" not in rp.log()


def test_harsh_quantization_fails_a_strict_threshold_from_the_config(runtime_server_factory):
    strict = {**GATE, "min_psnr": 60.0, "min_ssim": 0.0}
    rp = runtime_server_factory(
        "int8",
        cache_dit={"quantize_config": {"quant_type": "int8_per_tensor", "exclude_layers": []}},
        quality_gate=strict,
        wait=False,
    )
    assert rp.wait_exit(timeout=300) == 1
    line = _failure_line(rp)
    assert "quality gate failed: PSNR" in line and "< min 60" in line and "SSIM" in line, line
    # the same quantization under the default-like threshold passes: the threshold decides, not the code
    lenient = {**GATE, "min_psnr": 40.0, "min_ssim": 0.9}
    ok = runtime_server_factory(
        "int8-ok",
        cache_dit={"quantize_config": {"quant_type": "int8_per_tensor", "exclude_layers": []}},
        quality_gate=lenient,
    )
    assert value(scrape(ok.metrics_url), "diffusion_quality_gate", diffusion_quality_gate="passed") == 1


def test_gate_without_optimizations_is_skipped(runtime_server_factory):
    rp = runtime_server_factory("plain", quality_gate=GATE)
    assert "quality gate: no cache-dit, quantization or compile to check; skipped" in rp.log()
    m = scrape(rp.metrics_url)
    assert value(m, "diffusion_quality_gate", diffusion_quality_gate="skipped") == 1
    assert value(m, "diffusion_quality_gate", diffusion_quality_gate="passed") == 0


@pytest.mark.parametrize(
    "gate, field",
    [
        ({"prompts": []}, "quality_gate.prompts"),
        ({"seeds": [-1]}, "quality_gate.seeds"),
        ({"prompts": ["a"] * 5, "seeds": [0, 1, 2, 3]}, "quality_gate.seeds"),
        ({"size": "1000x1000"}, "quality_gate.size"),
        ({"steps": 0}, "quality_gate.steps"),
        ({"min_psnr": -1}, "quality_gate.min_psnr"),
        ({"min_ssim": 2}, "quality_gate.min_ssim"),
        ({"min_ssim": True}, "quality_gate.min_ssim"),
    ],
)
def test_bad_gate_settings_are_refused_naming_the_setting(gate, field):
    raw = {"model": {"uri": "/m"}, "quality_gate": gate}
    with pytest.raises(ConfigError) as e:
        validate(config_from_dict(raw))
    assert e.value.path == field and str(e.value).startswith(field)


def test_unknown_gate_key_is_refused():
    with pytest.raises(ConfigError, match="quality_gate: unknown key"):
        config_from_dict({"model": {"uri": "/m"}, "quality_gate": {"min_pnsr": 30}})
