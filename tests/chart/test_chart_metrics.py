"""Every metric the chart's dashboard and alert rules use is one a live runtime really exports.

A real `diffusion-runtime serve` on the tiny model answers one generation, then its metrics
listener (the `metrics` port the PodMonitor scrapes) is scraped over HTTP and parsed with
prometheus_client's parser; so is a real `diffusion-runtime front-door` (the PodMonitor scrapes it
too) on a real redis-server, for the queue's panels and alerts. The names in the PromQL of the dashboard and of the rendered
PrometheusRule must be among the exported sample names (`_bucket`, `_sum`, `_count`, `_total`
included as exported), and the labels they match on must exist on those samples.
"""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from chartlib import CHART, one
from diffusion_runtime.contract.config import QUEUE_URL_ENV
from diffusion_runtime.contract.queue import (
    QUEUE_DEMAND_METRIC,
    QUEUE_JOB_WAIT_METRIC,
    QUEUE_SERVER_PERSISTENCE_METRIC,
    QUEUE_UP_METRIC,
)
from fixtures_queue import RedisServer
from fixtures_runtime import start_runtime
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.runtime

# Labels Prometheus attaches to every scraped series (target labels from the PodMonitor:
# namespace, pod, job, instance, and the podTargetLabels), not exported by the runtime itself.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "container", "endpoint", "diffusion_dev_deployment"}
# The only series not exported by the runtime: Prometheus writes `up` for every scrape target.
SYNTHETIC = {"up"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "or", "and", "unless", "bool"}
PROMQL_WORDS |= {"offset", "inf", "nan"}


def metric_selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) for every series selector in a PromQL expression."""
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # range selectors, e.g. [5m], [$__rate_interval]
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    found = []
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?", expr):
        name, selector = match.group(1), match.group(2)
        rest = expr[match.end() :].lstrip()
        if name.lower() in PROMQL_WORDS or (not selector and rest.startswith("(")):
            continue  # a keyword or a function/aggregation call
        labels = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", selector or ""))
        found.append((name, labels))
    return found


def test_selector_extraction_finds_metrics_and_skips_functions():
    expr = (
        'histogram_quantile(0.95, sum by (le) (rate(diffusion_request_duration_seconds_bucket{status="200"}[5m])))'
        ' / on (pod) max(up{job="x"}) or vector(1)'
    )
    assert metric_selectors(expr) == [
        ("diffusion_request_duration_seconds_bucket", {"status"}),
        ("up", {"job"}),
    ]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v.get("type") == "query"]
    return exprs


def _rule_exprs(render) -> list[str]:
    rule = one(render("monitoring.prometheusRule.enabled=true"), "PrometheusRule")
    return [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]


def _label_values_query(query: str) -> str:
    # Grafana's label_values(metric{...}, label) -> the selector inside
    m = re.fullmatch(r"label_values\((.*),\s*[A-Za-z_]+\)", query.strip())
    return m.group(1) if m else query


@pytest.fixture(scope="module")
def scraped(runtime_server) -> list:
    """The samples of the live runtime's metrics listener, after one generation."""
    body = json.dumps(
        {
            "prompt": "a red cube",
            "size": "64x64",
            "num_inference_steps": 8,
            "seed": 1,
            "response_format": "b64_json",
        }
    ).encode()
    request = urllib.request.Request(
        runtime_server.url + "/v1/images/generations", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        assert response.status == 200
        assert json.loads(response.read())["data"][0]["b64_json"]
    assert runtime_server.metrics_url, "the runtime must serve a metrics listener (port `metrics`)"
    with urllib.request.urlopen(runtime_server.metrics_url, timeout=30) as response:
        text = response.read().decode()
    samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]
    assert samples, "no metrics scraped"
    return samples


@pytest.fixture(scope="module")
def front_door_scraped(tiny_model_dir, tmp_path_factory) -> list:
    """The samples of a live front door's metrics listener, its queue server up."""
    base = tmp_path_factory.mktemp("front-door-metrics")
    redis = RedisServer(base / "redis").start()
    door = start_runtime(
        tiny_model_dir, base / "fd", command="front-door", queue={"name": "metrics/test"},
        extra_env={QUEUE_URL_ENV: redis.url},
    )  # fmt: skip
    try:
        assert door.metrics_url
        with urllib.request.urlopen(door.metrics_url, timeout=30) as response:
            text = response.read().decode()
    finally:
        door.stop()
        redis.stop()
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


@pytest.fixture(scope="module")
def exported(scraped, front_door_scraped) -> dict[str, set[str]]:
    """Sample name -> label names (the runtime's and the front door's)."""
    names: dict[str, set[str]] = {}
    for sample in [*scraped, *front_door_scraped]:
        names.setdefault(sample.name, set()).update(sample.labels)
    return names


def test_every_dashboard_and_alert_metric_is_exported_by_a_live_runtime(render, exported):
    exprs = [_label_values_query(q) for q in _dashboard_exprs()] + _rule_exprs(render)
    used = [sel for expr in exprs for sel in metric_selectors(expr)]
    names = {name for name, _ in used}
    # the dashboard covers what it promises
    for needed in (
        "diffusion_request_duration_seconds_bucket",
        "diffusion_queue_depth",
        "diffusion_cache_steps_total",
        "diffusion_gpu_memory_allocated_bytes",
        "diffusion_images_generated_total",
        QUEUE_DEMAND_METRIC,
        QUEUE_UP_METRIC,
        QUEUE_JOB_WAIT_METRIC + "_bucket",
        QUEUE_SERVER_PERSISTENCE_METRIC,
    ):
        assert needed in names, needed
    unknown = sorted(names - set(exported) - SYNTHETIC)
    assert not unknown, (
        f"used in the chart but not exported by the runtime: {unknown}; exported: {sorted(exported)}"
    )
    for name, labels in used:
        if name in SYNTHETIC:
            continue
        missing = labels - exported[name] - TARGET_LABELS
        assert not missing, (
            f"{name}: the chart matches on labels {sorted(missing)} the runtime does not export"
        )


def test_label_values_the_chart_relies_on_are_exported(scraped):
    # the dashboard's cache-hit ratio divides result="cached" by all results; the saturation alert
    # counts status="429" (the runtime's queue-full answer, here 200 after a successful generation)
    results = {s.labels.get("result") for s in scraped if s.name == "diffusion_cache_steps_total"}
    assert results == {"cached", "computed"}
    statuses = {s.labels.get("status") for s in scraped if s.name == "diffusion_requests_total"}
    assert "200" in statuses and all(re.fullmatch(r"\d{3}", st) for st in statuses)
    ready = [s.value for s in scraped if s.name == "diffusion_ready"]
    assert ready == [1.0]


def test_the_front_door_reports_its_queue_server_up_and_healthy(front_door_scraped):
    values = {s.name: s.value for s in front_door_scraped if not s.labels}
    assert values[QUEUE_UP_METRIC] == 1.0
    assert values[QUEUE_SERVER_PERSISTENCE_METRIC] == 1.0  # the test server writes an append-only file
    assert values["diffusion_queue_server_memory_bytes"] > 0
    assert values["diffusion_queue_server_connected_clients"] >= 1  # the front door itself
