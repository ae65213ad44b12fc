"""The ConfigMap the operator renders is read, validated and preflighted by the runtime's own code (docs/contracts.md)."""

from __future__ import annotations

import pytest
from diffusion_operator import builders, validation
from diffusion_operator.api import funcs
from op_helpers import owner_for, sample


@pytest.mark.parametrize(
    "name", ["tiny-cpu.yaml", "flux-dev.yaml", "qwen-image.yaml", "wan.yaml", "wan-i2v.yaml"]
)
def test_runtime_loads_the_rendered_config(name, tmp_path):
    from diffusion_runtime.contract.config import load_config_file

    doc = sample(name)
    parsed = validation.parse(doc["metadata"]["name"], "ns", doc["spec"])
    assert parsed.ok
    cm = builders.build_configmap(parsed.cr, owner_for(doc))
    for key, value in cm["data"].items():
        (tmp_path / key).write_text(value)
    from diffusion_runtime.contract.config import validate
    from diffusion_runtime.engine.optimize import plan_cache_dit, read_cache_dit_yaml

    cfg = validate(load_config_file(tmp_path / "runtime.yaml"))
    plan_cache_dit(read_cache_dit_yaml(cfg.cache_dit_config), funcs.device_type(parsed.cr.spec))
    assert cfg.model.uri == doc["spec"]["model"]["uri"]
    assert cfg.model.dtype == doc["spec"]["model"].get("dtype", "bfloat16")
    assert str(cfg.cache_dit_config) == str(tmp_path / "cache-dit.yaml")
    assert cfg.server.port == 8000 and cfg.server.metrics_port == 9090
    assert cfg.warmup.steps == doc["spec"]["warmup"]["steps"]
