"""server.max_batch / server.max_batch_delay_seconds (spec.server.maxBatch / maxBatchDelaySeconds):
the settings' checks, the CR fields and what makes two requests batchable (`GenerationParams.batch_key`)."""

from __future__ import annotations

import pytest
import yaml
from diffusion_runtime.contract.config import ConfigError, config_from_dict, validate
from diffusion_runtime.engine.params import EditParams, GenerationParams


def server(**s: object):
    return validate(config_from_dict({"model": {"uri": "/m"}, "server": s})).server


def test_defaults_leave_batching_off():
    s = server()
    assert s.max_batch == 1 and 0 < s.max_batch_delay_seconds <= 0.05


@pytest.mark.parametrize(
    ("setting", "value"),
    [("max_batch", 0), ("max_batch", -1), ("max_batch", 65), ("max_batch_delay_seconds", -0.01),
     ("max_batch_delay_seconds", 5)],
)  # fmt: skip
def test_bad_values_are_refused_naming_the_setting(setting, value):
    with pytest.raises(ConfigError, match=f"server.{setting}"):
        server(**{setting: value})


def test_the_cr_fields_render_into_runtime_yaml_and_bad_ones_name_the_cr_field():
    from diffusion_operator import builders, validation

    spec = {"model": {"uri": "/models/tiny"}, "gpu": {"count": 0},
            "server": {"maxBatch": 8, "maxBatchDelaySeconds": 0.03}}  # fmt: skip
    parsed = validation.parse("tiny", "ns", spec)
    assert parsed.ok and parsed.cr is not None, parsed.errors
    owner = {"metadata": {"name": "tiny", "uid": "u"}}
    runtime = yaml.safe_load(builders.build_configmap(parsed.cr, owner)["data"]["runtime.yaml"])
    assert runtime["server"]["max_batch"] == 8
    assert runtime["server"]["max_batch_delay_seconds"] == 0.03
    for field, bad in (("maxBatch", 0), ("maxBatchDelaySeconds", -1)):
        refused = validation.parse("tiny", "ns", {**spec, "server": {field: bad}})
        assert [e.field for e in refused.errors] == [f"spec.server.{field}"]
    unset = validation.parse("tiny", "ns", {**spec, "server": {}})
    assert unset.cr is not None
    runtime = yaml.safe_load(builders.build_configmap(unset.cr, owner)["data"]["runtime.yaml"])
    assert runtime["server"]["max_batch"] == 1  # unset: the runtime's default, batching off


BASE = GenerationParams(prompt="a", width=64, height=64, steps=8, seed=1)


def test_batch_key_ignores_what_is_per_image_and_keeps_what_is_per_call():
    same = GenerationParams(prompt="b", width=64, height=64, steps=8, seed=2, n=3)
    assert same.batch_key == BASE.batch_key  # prompt, seed, n: per image
    neg = GenerationParams(prompt="a", width=64, height=64, steps=8, seed=1, negative_prompt="x")
    assert (
        neg.batch_key
        == GenerationParams(prompt="c", width=64, height=64, steps=8, seed=5, negative_prompt="y").batch_key
    )  # the negative prompt's text is per image; whether CFG runs is per call
    others = [
        GenerationParams(prompt="a", width=48, height=64, steps=8, seed=1),
        GenerationParams(prompt="a", width=64, height=64, steps=6, seed=1),
        GenerationParams(prompt="a", width=64, height=64, steps=8, seed=1, guidance_scale=2.0),
        neg,
        GenerationParams(
            prompt="a", width=64, height=64, steps=8, seed=1, negative_prompt="x", true_cfg_scale=2
        ),
        GenerationParams(prompt="a", width=64, height=64, steps=8, seed=1, adapters=(("w", 1.0),)),
        GenerationParams(prompt="a", width=64, height=64, steps=8, seed=1, adapters=(("w", 0.5),)),
    ]
    keys = [BASE.batch_key, *(p.batch_key for p in others)]
    assert len(set(keys)) == len(keys)
    assert EditParams.of(BASE, image=object(), mask=None, strength=0.5).batch_key is None  # edits run alone
