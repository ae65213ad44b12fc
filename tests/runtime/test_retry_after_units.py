"""server.max_retry_after_seconds (spec.server.maxRetryAfterSeconds): the cap on the Retry-After a full
queue answers, end to end: the CR field, the runtime.yaml the operator renders, the runtime's check and
its scheduler."""

from __future__ import annotations

import pytest
import yaml
from diffusion_runtime.contract.config import ConfigError, config_from_dict, validate
from diffusion_runtime.engine.scheduler import Scheduler
from diffusion_runtime.metrics import RuntimeMetrics


def scheduler(cap: int | None, avg_seconds: float, waiting: int) -> Scheduler:
    cfg = validate(config_from_dict({"model": {"uri": "/m"}, "server": {"max_retry_after_seconds": cap}}))
    s = Scheduler(RuntimeMetrics(), cfg.server, accepting=lambda: None)
    s._avg_seconds = avg_seconds
    s.queue.extend(object() for _ in range(waiting))  # type: ignore[misc]
    return s


def test_retry_after_is_the_estimated_wait_capped_by_the_setting():
    assert scheduler(None, 30.0, 3).retry_after() == 120  # unset: the estimate (30 s x 4), as before
    assert scheduler(10, 30.0, 3).retry_after() == 10
    assert scheduler(10, 1.0, 1).retry_after() == 2  # below the cap: the estimate


def test_the_setting_is_checked_like_every_other():
    with pytest.raises(ConfigError, match="server.max_retry_after_seconds"):
        validate(config_from_dict({"model": {"uri": "/m"}, "server": {"max_retry_after_seconds": 0}}))


def test_the_cr_field_renders_into_runtime_yaml_and_its_errors_name_the_cr_field():
    from diffusion_operator import builders, validation

    spec = {"model": {"uri": "/models/tiny"}, "gpu": {"count": 0}, "server": {"maxRetryAfterSeconds": 15}}
    parsed = validation.parse("tiny", "ns", spec)
    assert parsed.ok and parsed.cr is not None, parsed.errors
    owner = {"metadata": {"name": "tiny", "uid": "u"}}
    runtime = yaml.safe_load(builders.build_configmap(parsed.cr, owner)["data"]["runtime.yaml"])
    assert runtime["server"]["max_retry_after_seconds"] == 15
    assert validation.cr_field("server.max_retry_after_seconds") == "spec.server.maxRetryAfterSeconds"
    refused = validation.parse("tiny", "ns", {**spec, "server": {"maxRetryAfterSeconds": 0}})
    assert [e.field for e in refused.errors] == ["spec.server.maxRetryAfterSeconds"]
    unset = validation.parse("tiny", "ns", {**spec, "server": {}})
    assert unset.cr is not None
    text = builders.build_configmap(unset.cr, owner)["data"]["runtime.yaml"]
    assert "max_retry_after_seconds" not in text  # unset: nothing rendered, the pods do not roll
