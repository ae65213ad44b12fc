"""Pure functions of the local metrics pipeline (`diffusion_dev.monitoring`), and the chart's files it
reads: the PodMonitor translation, the aggregation objects, the PromQL helpers, the adapter rules."""

from __future__ import annotations

import json

import pytest
import yaml
from diffusion_dev.build import ensure_binaries
from diffusion_dev.monitoring import (
    ADAPTER_RULES,
    CHART,
    CUSTOM_METRICS_VERSIONS,
    aggregation_objects,
    alert_exprs,
    dashboard_exprs,
    podmonitor_scrape_config,
    render_chart_monitoring,
    signal_expr,
)
from diffusion_runtime.contract.autoscaling import DEMAND_METRIC, DEMAND_RATE_WINDOW, DEMAND_SECONDS_METRIC
from diffusion_runtime.contract.queue import QUEUE_DEMAND_METRIC

TLS = {"ca_file": "/ca.crt"}


@pytest.fixture(scope="module")
def rendered():
    return render_chart_monitoring(ensure_binaries(required=("helm",)) / "helm")


def _keep(relabel: list[dict]) -> dict[str, str]:
    return {r["source_labels"][0]: r["regex"] for r in relabel if r.get("action") == "keep"}


def test_the_scrape_config_selects_what_the_charts_podmonitor_selects(rendered):
    pm = rendered["PodMonitor"]
    cfg = podmonitor_scrape_config(pm, "runtime", "https://10.245.0.1:6443", TLS, "1s", "1s")
    keep = _keep(cfg["relabel_configs"])
    for label, value in pm["spec"]["selector"]["matchLabels"].items():
        name = label.replace(".", "_").replace("/", "_").replace("-", "_")
        assert keep[f"__meta_kubernetes_pod_label_{name}"] == value
        assert keep[f"__meta_kubernetes_pod_labelpresent_{name}"] == "true"
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert keep["__meta_kubernetes_pod_container_port_name"] == endpoint["port"] == "metrics"
    assert cfg["metrics_path"] == endpoint["path"]
    assert cfg["scrape_interval"] == "1s"  # the override; without it the PodMonitor's interval
    assert podmonitor_scrape_config(pm, "r", "s", TLS)["scrape_interval"] == endpoint["interval"]
    targets = {r.get("target_label"): r for r in cfg["relabel_configs"] if r.get("target_label")}
    # the labels the dashboard, the alerts and the KEDA query select on
    for label in ("namespace", "pod", "job", "diffusion_dev_deployment", "app_kubernetes_io_instance"):
        assert label in targets, label
    assert targets["job"]["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
    (sd,) = cfg["kubernetes_sd_configs"]
    assert sd["role"] == "pod" and "namespaces" not in sd  # the chart watches all namespaces by default


def test_namespaces_of_the_podmonitor_limit_discovery():
    pm = {"metadata": {"name": "x"}, "spec": {"selector": {"matchLabels": {"a": "b"}},
          "namespaceSelector": {"matchNames": ["models"]}, "podMetricsEndpoints": [{"port": "metrics"}]}}  # fmt: skip
    (sd,) = podmonitor_scrape_config(pm, "r", "s", TLS)["kubernetes_sd_configs"]
    assert sd["namespaces"] == {"names": ["models"]}
    pm["spec"]["selector"]["matchExpressions"] = [{"key": "a", "operator": "Exists"}]
    with pytest.raises(ValueError, match="matchExpressions"):
        podmonitor_scrape_config(pm, "r", "s", TLS)


def test_the_adapter_is_registered_for_both_custom_metrics_versions():
    objs = aggregation_objects(b"PEM", "10.245.0.1", 6443)
    kinds = [o["kind"] for o in objs]
    assert kinds == ["Namespace", "Service", "Endpoints", "APIService", "APIService"]
    services = {o["spec"]["version"]: o["spec"] for o in objs if o["kind"] == "APIService"}
    assert set(services) == set(CUSTOM_METRICS_VERSIONS)
    assert all(s["service"]["port"] == objs[1]["spec"]["ports"][0]["port"] for s in services.values())
    assert objs[2]["subsets"][0]["addresses"] == [{"ip": "10.245.0.1"}]
    assert objs[2]["subsets"][0]["ports"][0]["port"] == objs[1]["spec"]["ports"][0]["targetPort"] == 6443


@pytest.mark.parametrize(
    ("expr", "want"),
    [
        ("x > 5", "x > bool 5"),
        ("x > bool 5", "x > bool 5"),
        ('sum(rate(a{s!="429",t=~"a|b"}[5m])) >= 0.5', 'sum(rate(a{s!="429",t=~"a|b"}[5m])) >= bool 0.5'),
        ("(a == 0) or (b{job='x>y'} == 0)", "(a == bool 0) or (b{job='x>y'} == bool 0)"),
        ("histogram_quantile(0.95, sum by (le) (rate(h[5m])))", "histogram_quantile(0.95, sum by (le) (rate(h[5m])))"),
        ("a != b < c", "a != bool b < bool c"),
    ],
)  # fmt: skip
def test_signal_expr_turns_conditions_into_bool_comparisons(expr, want):
    assert signal_expr(expr) == want


def test_every_dashboard_target_and_alert_is_collected_with_its_variables_filled(rendered):
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    exprs = dashboard_exprs(dashboard, {"namespace": "ns", "deployment": "d", "__rate_interval": "1m"})
    n_targets = sum(len(p.get("targets", [])) for p in dashboard["panels"])
    assert len(exprs) == n_targets > 10
    assert not [e for _, e in exprs if "$" in e]  # every variable filled in
    # the dashboard shows the autoscalers' signal: the average demand, not the gauge sampled now
    assert any(
        f"rate({DEMAND_SECONDS_METRIC}_total" in e and f"[{DEMAND_RATE_WINDOW}]" in e for _, e in exprs
    )
    alerts = alert_exprs(rendered["PrometheusRule"])
    assert {a for a, _ in alerts} >= {
        "DiffusionQueueSaturated",
        "DiffusionLatencyP95High",
        "DiffusionPodNotReady",
    }


def test_the_adapter_rule_serves_the_demand_metric_the_hpa_asks_for():
    rule, queue = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    # served under the gauge's name (the HPA's metric), computed from the counter: its rate over the window
    assert rule["name"]["as"] == DEMAND_METRIC
    assert rule["seriesQuery"].startswith(DEMAND_SECONDS_METRIC + "_total{")
    assert (
        rule["metricsQuery"]
        == f"max(rate(<<.Series>>{{<<.LabelMatchers>>}}[{DEMAND_RATE_WINDOW}])) by (<<.GroupBy>>)"
    )
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    # spec.queue: the Object metric on the runtime Deployment, from the front door's series by their
    # owner label as the PodMonitor names it
    assert queue["name"]["as"] == QUEUE_DEMAND_METRIC and queue["seriesQuery"].startswith(
        QUEUE_DEMAND_METRIC + "{"
    )
    assert queue["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "diffusion_dev_deployment": {"group": "apps", "resource": "deployment"},
    }
