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
    assert "SUCCESS: 8 rules found" in proc.stdout, proc.stdout


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


def _queue(name: str, pod: str, values: str, deployment: str = "flux", **extra: str) -> dict:
    labels = {"namespace": "ml", "diffusion_dev_deployment": deployment, "pod": pod, **extra}
    return {"series": name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}


# what each queue alert says of the deployment at fault, as the chart's defaults render it
QUEUE_ANNOTATIONS = {
    ("DiffusionQueueServerDown", "flux"): {
        "summary": "Queue server unreachable (ml/flux)",
        "description": "The front door of ml/flux has not reached its queue server for 2m: new requests get 503 "
        "with Retry-After and no job starts. Check the queue server's pod (queue.enabled) or the Secret "
        "spec.queue.secretRef names.",
    },
    ("DiffusionQueueJobsExhaustedAttempts", "wan"): {
        "summary": "Jobs failed after every attempt (ml/wan)",
        "description": "2 jobs of ml/wan failed in 15 minutes because their runtime pod died spec.queue.maxAttempts "
        "times (OOM, node loss, a request that crashes the pipeline). See the jobs' error and the pods' restarts.",
    },
    ("DiffusionQueueServerPersistenceFailing", "wan"): {
        "summary": "Queue server cannot persist (ml/wan)",
        "description": "The queue server of ml/wan reports a failed append-only-file write or snapshot for 5m: "
        "accepted jobs may not survive its restart. Check its volume (full disk, read-only claim).",
    },
    ("DiffusionQueueServerMemoryHigh", "wan"): {
        "summary": "Queue server memory near its limit (ml/wan)",
        "description": "The queue server of ml/wan uses 95% of its maxmemory: results (server.storeMaxBytes per "
        "deployment) and waiting jobs fill it. Lower server.storeMaxBytes or queue.maxWaiting, or give it more.",
    },
    ("DiffusionQueueWaitHigh", "wan"): {
        "summary": "Jobs wait over 300s for a GPU (ml/wan)",
        "description": "p95 time from enqueue to start of ml/wan is 9m 45s for 10m. Raise "
        "spec.autoscaling.maxReplicas, or check that runtime pods start (scale from zero, GPU nodes).",
    },
}


def _fires(alert: str, at: str, *deployments: str, severity: str = "warning") -> dict:
    return {
        "eval_time": at,
        "alertname": alert,
        "exp_alerts": [
            {
                "exp_labels": {"severity": severity, "namespace": "ml", "diffusion_dev_deployment": d},
                "exp_annotations": QUEUE_ANNOTATIONS.get((alert, d), {}),
            }
            for d in deployments
        ],
    }


def test_queue_alerts_fire_for_the_deployment_at_fault_only(promtool_bin, rule_file):
    # two front-door pods per deployment report the same queue (read from the queue server)
    series = []
    for pod in ("fd-a", "fd-b"):
        # flux: its queue server went away at minute 5 (up 0), and stays away
        series.append(_queue("diffusion_queue_server_up", pod, "1x4 0x25"))
        series.append(_queue("diffusion_queue_server_up", pod, "1x30", deployment="wan"))
        # wan: 2 jobs ran out of attempts at minute 10; persistence broken from minute 3; memory 95%
        series.append(_queue("diffusion_queue_attempts_exhausted_total", pod, "0x9 2x20", deployment="wan"))
        series.append(_queue("diffusion_queue_attempts_exhausted_total", pod, "0x30"))
        series.append(_queue("diffusion_queue_server_persistence_ok", pod, "1x2 0x27", deployment="wan"))
        series.append(_queue("diffusion_queue_server_persistence_ok", pod, "1x30"))
        series.append(_queue("diffusion_queue_server_memory_bytes", pod, "950x30", deployment="wan"))
        series.append(_queue("diffusion_queue_server_maxmemory_bytes", pod, "1000x30", deployment="wan"))
        # flux's server has no memory limit (maxmemory 0): never a memory alert
        series.append(_queue("diffusion_queue_server_memory_bytes", pod, "950x30"))
        series.append(_queue("diffusion_queue_server_maxmemory_bytes", pod, "0x30"))
    # wan's jobs wait ~ 400-600 s for a pod (p95 above 300 s), flux's 1 s
    for le, wan, flux in (("1", "0+0x30", "0+10x30"), ("300", "0+0x30", "0+10x30"),
                          ("600", "0+10x30", "0+10x30"), ("+Inf", "0+10x30", "0+10x30")):  # fmt: skip
        series.append(_queue("diffusion_queue_job_wait_seconds_bucket", "fd-a", wan, deployment="wan", le=le))
        series.append(_queue("diffusion_queue_job_wait_seconds_bucket", "fd-a", flux, le=le))
    tests = [
        {
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [
                _fires("DiffusionQueueServerDown", "5m"),  # pending for 2m: not yet
                _fires("DiffusionQueueServerDown", "8m", "flux", severity="critical"),
                _fires("DiffusionQueueJobsExhaustedAttempts", "8m"),
                _fires("DiffusionQueueJobsExhaustedAttempts", "12m", "wan"),
                _fires("DiffusionQueueServerPersistenceFailing", "12m", "wan", severity="critical"),
                _fires("DiffusionQueueServerMemoryHigh", "20m", "wan"),
                _fires("DiffusionQueueWaitHigh", "8m"),
                _fires("DiffusionQueueWaitHigh", "20m", "wan"),
            ],
        }
    ]
    proc = _unit_test(promtool_bin, rule_file, tests)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # and the harness catches a wrong expectation (flux's server is down, not wan's)
    tests[0]["alert_rule_test"] = [_fires("DiffusionQueueServerDown", "8m", "wan", severity="critical")]
    proc = _unit_test(promtool_bin, rule_file, tests)
    assert proc.returncode != 0 and "DiffusionQueueServerDown" in proc.stdout + proc.stderr
