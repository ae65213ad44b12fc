"""The chart's alert rules, as rendered, pass `promtool check rules` and fire in `promtool test rules`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from chartlib import one

SATURATED = "DiffusionQueueSaturated"


@pytest.fixture(scope="module")
def rule_file(render, tmp_path_factory) -> Path:
    """The PrometheusRule's spec (a plain Prometheus rule file body) as the chart renders it."""
    rule = one(render("monitoring.prometheusRule.enabled=true"), "PrometheusRule")
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"], sort_keys=False))
    return path


def _promtool(promtool: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(promtool), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_promtool_check_rules(promtool_bin, rule_file):
    proc = _promtool(promtool_bin, "check", "rules", str(rule_file), cwd=rule_file.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 3 rules found" in proc.stdout, proc.stdout


def _unit_test(promtool: Path, rule_file: Path, tests: list[dict]) -> subprocess.CompletedProcess[str]:
    spec = {"rule_files": [rule_file.name], "evaluation_interval": "1m", "tests": tests}
    path = rule_file.parent / f"test-{abs(hash(yaml.safe_dump(tests)))}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return _promtool(promtool, "test", "rules", path.name, cwd=rule_file.parent)


# pod a: its queue is full, 30 of its requests a minute get 429 (0.5/s); pod b: busy, never full.
QUEUE_SERIES = [
    {"series": 'diffusion_requests_total{namespace="ml",pod="a",status="200"}', "values": "0+60x15"},
    {"series": 'diffusion_requests_total{namespace="ml",pod="a",status="429"}', "values": "0+30x15"},
    {"series": 'diffusion_queue_depth{namespace="ml",pod="a"}', "values": "16x15"},
    {"series": 'diffusion_requests_total{namespace="ml",pod="b",status="200"}', "values": "0+60x15"},
    {"series": 'diffusion_requests_total{namespace="ml",pod="b",status="429"}', "values": "0x15"},
    {"series": 'diffusion_queue_depth{namespace="ml",pod="b"}', "values": "3x15"},
]


def test_queue_saturation_alert_fires_for_the_saturated_pod_only(promtool_bin, rule_file):
    tests = [
        {
            "interval": "1m",
            "input_series": QUEUE_SERIES,
            "alert_rule_test": [
                # pending during the `for` window: not firing yet
                {"eval_time": "4m", "alertname": SATURATED, "exp_alerts": []},
                {
                    "eval_time": "10m",
                    "alertname": SATURATED,
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "warning", "namespace": "ml", "pod": "a"},
                            "exp_annotations": {
                                "summary": "Diffusion runtime queue saturated (ml/a)",
                                "description": (
                                    "ml/a has been turning away 0.50 requests/s with 429 (queue full) for 5m. "
                                    "Add replicas (spec.replicas or spec.autoscaling.maxReplicas) or raise "
                                    "spec.server.maxQueue."
                                ),
                            },
                        }
                    ],
                },
            ],
        }
    ]
    proc = _unit_test(promtool_bin, rule_file, tests)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_queue_saturation_test_case_can_fail(promtool_bin, rule_file):
    # the same harness reports a wrong expectation: the passing case above is not vacuous
    tests = [
        {
            "interval": "1m",
            "input_series": QUEUE_SERIES,
            "alert_rule_test": [
                {
                    "eval_time": "10m",
                    "alertname": SATURATED,
                    "exp_alerts": [{"exp_labels": {"severity": "warning", "namespace": "ml", "pod": "b"}}],
                }
            ],
        }
    ]
    proc = _unit_test(promtool_bin, rule_file, tests)
    assert proc.returncode != 0
    assert SATURATED in proc.stdout + proc.stderr


def _not_ready(pod: str) -> dict:
    return {
        "exp_labels": {"severity": "warning", "namespace": "ml", "pod": pod},
        "exp_annotations": {
            "summary": f"Diffusion runtime pod not ready (ml/{pod})",
            "description": (
                f"ml/{pod} has not been ready (model load, compile or warmup unfinished, or the pod is down) "
                "for 15m. See the DiffusionDeployment's status conditions and the pod log."
            ),
        },
    }


def test_p95_latency_and_not_ready_alerts_fire(promtool_bin, rule_file):
    # 10 requests/min, all in the (60, 120] bucket: p95 ~ 117s > 60s for over 10 minutes.
    buckets = {"30": "0+0x30", "60": "0+0x30", "120": "0+10x30", "+Inf": "0+10x30"}
    series = [
        {
            "series": (
                "diffusion_request_duration_seconds_bucket"
                f'{{namespace="ml",diffusion_dev_deployment="flux",pod="a",status="200",le="{le}"}}'
            ),
            "values": values,
        }
        for le, values in buckets.items()
    ]
    series += [
        {"series": 'diffusion_ready{namespace="ml",pod="warming"}', "values": "0x30"},
        {"series": 'up{job="diffusion-runtime",namespace="ml",pod="down"}', "values": "0x30"},
        {"series": 'up{job="diffusion-runtime",namespace="ml",pod="fine"}', "values": "1x30"},
        {"series": 'diffusion_ready{namespace="ml",pod="fine"}', "values": "1x30"},
    ]
    tests = [
        {
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [
                {"eval_time": "8m", "alertname": "DiffusionLatencyP95High", "exp_alerts": []},
                {
                    "eval_time": "20m",
                    "alertname": "DiffusionLatencyP95High",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning",
                                "namespace": "ml",
                                "diffusion_dev_deployment": "flux",
                            },
                            "exp_annotations": {
                                "summary": "Diffusion p95 latency above 60s (ml/flux)",
                                "description": (
                                    "p95 request latency of ml/flux is 1m 57s (threshold 60s) for 10m. "
                                    "Check queue wait against inference time on the dashboard."
                                ),
                            },
                        }
                    ],
                },
                {
                    "eval_time": "20m",
                    "alertname": "DiffusionPodNotReady",
                    "exp_alerts": [_not_ready("warming"), _not_ready("down")],
                },
            ],
        }
    ]
    proc = _unit_test(promtool_bin, rule_file, tests)
    assert proc.returncode == 0, proc.stdout + proc.stderr
