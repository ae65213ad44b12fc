"""The local cluster's metrics pipeline: Prometheus scrapes the runtime pods, prometheus-adapter serves
their average demand (the rate of the request-seconds counter) to the HPA through the aggregation layer.

- Prometheus v3 (built from the module proxy, `build.py`) discovers pods with Kubernetes service
  discovery (role `pod`) and scrapes them with the selection of the chart's own PodMonitor: the
  scrape config is generated from `helm template` of the chart with `monitoring.podMonitor.enabled`
  (`podmonitor_scrape_config`, the relabelling the Prometheus Operator generates for a PodMonitor),
  so what the tests scrape is what the chart ships. The chart's alert rules are loaded as a rule
  file (rendered from the chart's PrometheusRule).
- prometheus-adapter v0.12.0 serves `custom.metrics.k8s.io` (v1beta1 and v1beta2) with the rule
  file the chart ships (`charts/diffusion-operator/files/prometheus-adapter-rules.yaml`). It listens
  on the real node's bridge address (local to this machine) with a serving certificate of the
  cluster CA; a selector-less Service plus Endpoints and two APIServices register it, and the
  apiserver routes to the endpoint (`--enable-aggregator-routing`).

Both run as host processes next to the control plane and stop with it. Each reads the cluster with its
own ServiceAccount's bound token (`rbac_objects`: least privilege, proven with those tokens by
tests/cluster/test_monitoring_rbac.py): Prometheus may list and watch pods (its only service discovery
role) and nothing else; the adapter may list pods (the pods an HPA's selector names), delegate
authentication and authorization (TokenReviews, SubjectAccessReviews) and read the
extension-apiserver-authentication ConfigMap, as an aggregated API server must; neither reads Secrets
or writes anything. Settings for a fast loop:
scrape every second, the adapter relists series every 2 s (its 10 min default would hide a new
metric), and the controller manager syncs HPAs every 5 s.
"""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .build import repo_root
from .components import Component, ComponentError, free_port, log_tail, wait_for
from .pki import make_serving_cert

CHART = repo_root() / "charts" / "diffusion-operator"
ADAPTER_RULES = CHART / "files" / "prometheus-adapter-rules.yaml"
NAMESPACE = "diffusion-dev-monitoring"
ADAPTER_SERVICE = "prometheus-adapter"
CUSTOM_METRICS_GROUP = "custom.metrics.k8s.io"
CUSTOM_METRICS_VERSIONS = {"v1beta2": 200, "v1beta1": 100}  # version -> versionPriority
METRICS_ENV = "DIFFUSION_DEV_METRICS"
# each component's ServiceAccount (in NAMESPACE) and how long its token lives (a dev cluster's lifetime)
PROMETHEUS_SA = "prometheus"
ADAPTER_SA = "prometheus-adapter"
TOKEN_DURATION = "720h"
ROLE_PREFIX = "diffusion-dev:"


def metrics_default(real_node: bool) -> bool:
    """On with the real node (there are pods to scrape) unless DIFFUSION_DEV_METRICS=0 (fast path)."""
    value = os.environ.get(METRICS_ENV, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    return real_node


# ---------------------------------------------------------------- pure: config generation ----


def _label_name(label: str) -> str:
    """A Kubernetes label as Prometheus spells it in meta labels and target labels."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in label)


def podmonitor_scrape_config(podmonitor: dict, job_name: str, api_server: str, tls: dict,
                             interval: str | None = None, scrape_timeout: str | None = None) -> dict:  # fmt: skip
    """A Prometheus scrape config selecting what a PodMonitor selects, labelled the way the Prometheus
    Operator labels PodMonitor targets (namespace, pod, container, endpoint, job from `jobLabel`,
    the `podTargetLabels` as target labels). One endpoint (the chart's PodMonitor has one)."""
    spec = podmonitor["spec"]
    (endpoint,) = spec["podMetricsEndpoints"]
    relabel: list[dict[str, Any]] = []
    for key, value in sorted(spec.get("selector", {}).get("matchLabels", {}).items()):
        name = _label_name(key)
        relabel += [
            {"source_labels": [f"__meta_kubernetes_pod_labelpresent_{name}"], "regex": "true", "action": "keep"},
            {"source_labels": [f"__meta_kubernetes_pod_label_{name}"], "regex": value, "action": "keep"},
        ]  # fmt: skip
    if spec.get("selector", {}).get("matchExpressions"):
        raise ValueError("PodMonitor matchExpressions are not translated: use matchLabels")
    relabel += [
        {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": endpoint["port"], "action": "keep"},
        # pods that finished (Succeeded/Failed) are not targets, as with the Prometheus Operator
        {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)", "action": "drop"},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    ]  # fmt: skip
    for label in spec.get("podTargetLabels", []):
        name = _label_name(label)
        relabel.append(
            {"source_labels": [f"__meta_kubernetes_pod_label_{name}"], "regex": "(.+)", "target_label": name}
        )
    relabel.append({"target_label": "job", "replacement": podmonitor["metadata"]["name"]})
    if spec.get("jobLabel"):
        relabel.append(
            {
                "source_labels": [f"__meta_kubernetes_pod_label_{_label_name(spec['jobLabel'])}"],
                "regex": "(.+)",
                "target_label": "job",
            }  # fmt: skip
        )
    relabel.append({"target_label": "endpoint", "replacement": endpoint["port"]})
    sd: dict[str, Any] = {"role": "pod", "api_server": api_server, "tls_config": tls}
    selector = spec.get("namespaceSelector", {})
    if not selector.get("any") and selector.get("matchNames"):
        sd["namespaces"] = {"names": list(selector["matchNames"])}
    return {
        "job_name": job_name,
        "scrape_interval": interval or endpoint.get("interval", "30s"),
        "scrape_timeout": scrape_timeout or endpoint.get("scrapeTimeout", "10s"),
        "metrics_path": endpoint.get("path", "/metrics"),
        "kubernetes_sd_configs": [sd],
        "relabel_configs": relabel,
    }


def render_chart_monitoring(helm: Path, extra_sets: tuple[str, ...] = ()) -> dict[str, dict]:
    """The chart's PodMonitor and PrometheusRule, as `helm template` renders them (kind -> object)."""
    sets = ("monitoring.podMonitor.enabled=true", "monitoring.prometheusRule.enabled=true", *extra_sets)
    cmd = [str(helm), "template", "diffusion-operator", str(CHART), "--namespace", "diffusion-system"]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"helm template failed: {out.stderr.strip()[-2000:]}")
    docs = {d["kind"]: d for d in yaml.safe_load_all(out.stdout) if d}
    return {k: docs[k] for k in ("PodMonitor", "PrometheusRule")}


# the least privilege of each component, as ClusterRole rules (see the module docstring)
PROMETHEUS_RULES: list[dict] = [
    # kubernetes_sd_configs role pod: list + watch of pods (every namespace, or the PodMonitor's)
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
]
ADAPTER_RULES_RBAC: list[dict] = [
    # the custom metrics API's answers: the pods an HPA's label selector names (a dynamic-client list),
    # their namespaces (the rule's `namespace` resource)
    {"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["get", "list", "watch"]},
]


def _binding(kind: str, name: str, role_kind: str, role: str, sa: str, namespace: str | None = None) -> dict:
    meta: dict[str, str] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": meta,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}],
    }


def rbac_objects() -> list[dict]:
    """The namespace, each component's ServiceAccount and its least-privilege roles and bindings."""
    objs: list[dict] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}]
    for sa, rules in ((PROMETHEUS_SA, PROMETHEUS_RULES), (ADAPTER_SA, ADAPTER_RULES_RBAC)):
        role = ROLE_PREFIX + sa
        objs += [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": NAMESPACE}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": role},
             "rules": rules},
            _binding("ClusterRoleBinding", role, "ClusterRole", role, sa),
        ]  # fmt: skip
    # an aggregated API server: delegated authentication and authorization (TokenReview,
    # SubjectAccessReview), and the client CA and request-header settings the kube-apiserver publishes
    objs += [
        _binding("ClusterRoleBinding", f"{ROLE_PREFIX}{ADAPTER_SA}:auth-delegator", "ClusterRole",
                 "system:auth-delegator", ADAPTER_SA),
        _binding("RoleBinding", f"{ROLE_PREFIX}{ADAPTER_SA}:auth-reader", "Role",
                 "extension-apiserver-authentication-reader", ADAPTER_SA, namespace="kube-system"),
    ]  # fmt: skip
    return objs


def aggregation_objects(ca_pem: bytes, address: str, port: int) -> list[dict]:
    """Namespace, selector-less Service + Endpoints at the adapter, and the APIServices."""
    meta = {"name": ADAPTER_SERVICE, "namespace": NAMESPACE}
    objs: list[dict] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta,
         "spec": {"ports": [{"name": "https", "port": 443, "targetPort": port}]}},
        # a host process, not a pod: its endpoint is written by hand (mirrored to an EndpointSlice)
        {"apiVersion": "v1", "kind": "Endpoints", "metadata": meta,
         "subsets": [{"addresses": [{"ip": address}], "ports": [{"name": "https", "port": port}]}]},
    ]  # fmt: skip
    for version, priority in CUSTOM_METRICS_VERSIONS.items():
        objs.append(
            {
                "apiVersion": "apiregistration.k8s.io/v1",
                "kind": "APIService",
                "metadata": {"name": f"{version}.{CUSTOM_METRICS_GROUP}"},
                "spec": {
                    "group": CUSTOM_METRICS_GROUP,
                    "version": version,
                    "service": {"name": ADAPTER_SERVICE, "namespace": NAMESPACE, "port": 443},
                    "caBundle": base64.b64encode(ca_pem).decode(),
                    "groupPriorityMinimum": 100,
                    "versionPriority": priority,
                },
            }
        )
    return objs


_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(?!\s*bool\b)")


def signal_expr(expr: str) -> str:
    """`expr` with every comparison outside label matchers made a `bool` comparison: an alert's
    condition (`x > 60`) returns its series with 0/1 instead of filtering them, so a check that
    "the expression returns a series" tests the data behind the alert, not whether it fires now."""
    out: list[str] = []
    depth, quote, i = 0, "", 0
    while i < len(expr):
        ch = expr[i]
        if quote:
            out.append(ch)
            if ch == "\\" and i + 1 < len(expr):
                out.append(expr[i + 1])
                i += 2
                continue
            if ch == quote:
                quote = ""
            i += 1
            continue
        if ch in "\"'`":
            quote = ch
        elif ch in "{[":
            depth += 1  # label matchers and range selectors
        elif ch in "}]":
            depth -= 1
        elif depth == 0:
            m = _COMPARISON.match(expr, i)
            if m:
                out.append(f"{m.group(1)} bool")
                i = m.end()
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def dashboard_exprs(dashboard: dict, variables: dict[str, str]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of a Grafana dashboard, with its variables filled in
    (longest names first, so `$__rate_interval` is not read as `$__rate`)."""
    out = []
    for panel in dashboard.get("panels", []):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if not expr:
                continue
            for name in sorted(variables, key=len, reverse=True):
                expr = expr.replace(f"${name}", variables[name])
            out.append((f"{panel.get('title', '?')} [{target.get('refId', '')}]", expr))
    return out


def chart_exprs(helm: Path, variables: dict[str, str]) -> list[tuple[str, str]]:
    """(title, PromQL) of every dashboard target and every alert of the chart (an alert's conditions
    turned into bool comparisons, `signal_expr`, so that it has a series whether it fires or not)."""
    rendered = render_chart_monitoring(helm)
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    exprs = dashboard_exprs(dashboard, variables)
    return exprs + [(alert, signal_expr(expr)) for alert, expr in alert_exprs(rendered["PrometheusRule"])]


def uses_front_door_metrics(expr: str) -> bool:
    """Whether a PromQL expression reads a metric only the queue's front door exports."""
    from diffusion_runtime.contract.queue import FRONT_DOOR_QUEUE_METRICS

    return any(re.search(rf"\b{name}(_bucket|_total)?\b", expr) for name in FRONT_DOOR_QUEUE_METRICS)


def alert_exprs(prometheus_rule: dict) -> list[tuple[str, str]]:
    """(alert or record name, PromQL) of every rule of a rendered PrometheusRule."""
    return [
        (rule.get("alert") or rule.get("record") or "?", rule["expr"])
        for group in prometheus_rule["spec"]["groups"]
        for rule in group["rules"]
    ]


# ---------------------------------------------------------------- the running pipeline -------


@dataclass(eq=False)
class MetricsPipeline:
    """Prometheus + prometheus-adapter for a started `LocalCluster` with the real node."""

    cluster: Any  # LocalCluster (not imported: cluster.py imports this module)
    address: str  # where the adapter listens: the real node's bridge address
    scrape_interval: str = "1s"
    relist_interval: str = "2s"
    progress: Callable[[str], None] = print
    components: dict[str, Component] = field(default_factory=dict)
    prometheus_url: str = ""
    settings: dict[str, str] = field(default_factory=dict)

    def start(self, env: dict[str, str], timeout: float = 90) -> None:
        c = self.cluster
        w: Path = c.workdir / "monitoring"
        w.mkdir(parents=True, exist_ok=True)
        b: Path = c.bin_dir
        for binary in ("prometheus", "prometheus-adapter"):
            if not os.access(b / binary, os.X_OK):
                raise ComponentError(binary, f"binary not found in {b}")
        # each component with its own ServiceAccount token (least privilege), never the admin's
        c.apply(rbac_objects())
        tokens = {}
        for sa in (PROMETHEUS_SA, ADAPTER_SA):
            tokens[sa] = w / f"{sa}.token"
            fd = os.open(tokens[sa], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(c.token_for(NAMESPACE, sa, TOKEN_DURATION))
        tls = {"ca_file": str(c.pki.ca_cert)}
        rendered = render_chart_monitoring(b / "helm")
        scrape = podmonitor_scrape_config(
            rendered["PodMonitor"], "diffusion-runtime-pods", c.server, tls, self.scrape_interval,
            scrape_timeout=self.scrape_interval,
        )  # fmt: skip
        for sd in scrape["kubernetes_sd_configs"]:
            sd["authorization"] = {"type": "Bearer", "credentials_file": str(tokens[PROMETHEUS_SA])}
        adapter_kubeconfig = c.kubeconfig_for_token_file(
            tokens[ADAPTER_SA], w / "prometheus-adapter.kubeconfig"
        )
        rules = w / "alerts.yaml"
        rules.write_text(
            yaml.safe_dump({"groups": rendered["PrometheusRule"]["spec"]["groups"]}, sort_keys=False)
        )
        config = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "rule_files": [str(rules)],
            "scrape_configs": [scrape],
        }
        (w / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        prom_port, adapter_port = free_port(), free_port()
        self.prometheus_url = f"http://127.0.0.1:{prom_port}"
        serving = make_serving_cert(
            c.pki.ca_cert.parent, "prometheus-adapter-serving",
            dns=(f"{ADAPTER_SERVICE}.{NAMESPACE}.svc", f"{ADAPTER_SERVICE}.{NAMESPACE}"), ips=(self.address,),
        )  # fmt: skip
        self.settings = {
            "scrape_interval": self.scrape_interval,
            "adapter_relist_interval": self.relist_interval,
        }
        logs = c.workdir / "logs"
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        prom = Component(
            "prometheus",
            [
                str(b / "prometheus"),
                f"--config.file={w / 'prometheus.yml'}",
                f"--storage.tsdb.path={w / 'tsdb'}",
                "--storage.tsdb.retention.time=2h",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--log.level=warn",
            ],
            logs / "prometheus.log",
            health=lambda: c._http_ok(f"{self.prometheus_url}/-/ready", None, b""),
        )
        adapter = Component(
            "prometheus-adapter",
            [
                str(b / "prometheus-adapter"),
                f"--secure-port={adapter_port}",
                f"--bind-address={self.address}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--cert-dir={w / 'adapter-certs'}",
                f"--lister-kubeconfig={adapter_kubeconfig}",
                f"--authentication-kubeconfig={adapter_kubeconfig}",
                f"--authorization-kubeconfig={adapter_kubeconfig}",
                f"--prometheus-url={self.prometheus_url}/",
                f"--metrics-relist-interval={self.relist_interval}",
                f"--config={ADAPTER_RULES}",
                "--v=1",
            ],
            logs / "prometheus-adapter.log",
            health=lambda: c._http_ok(f"https://{self.address}:{adapter_port}/readyz", insecure, b"ok"),
        )
        self.components = {"prometheus": prom, "prometheus-adapter": adapter}
        self.progress(f"[metrics] starting Prometheus ({self.prometheus_url}) and prometheus-adapter")
        c._start_and_wait([prom], env, "prometheus")
        c._start_and_wait([adapter], env, "prometheus-adapter")
        c.apply(aggregation_objects(c.pki.ca_cert.read_bytes(), self.address, adapter_port))
        try:
            wait_for(self._available, timeout, "the custom metrics APIServices to be Available", interval=0.5)
        except TimeoutError as exc:
            raise ComponentError("prometheus-adapter", str(exc), log_tail(adapter.log)) from None

    def _available(self) -> bool:
        for version in CUSTOM_METRICS_VERSIONS:
            svc = self.cluster.api_get(
                f"/apis/apiregistration.k8s.io/v1/apiservices/{version}.{CUSTOM_METRICS_GROUP}"
            )
            conds = {x["type"]: x["status"] for x in svc.get("status", {}).get("conditions", [])}
            if conds.get("Available") != "True":
                return False
        self.cluster.api_get(f"/apis/{CUSTOM_METRICS_GROUP}/v1beta2")
        return True

    def stop(self) -> None:
        for name in ("prometheus-adapter", "prometheus"):
            comp = self.components.get(name)
            if comp is not None:
                comp.stop()

    # ------------------------------------------------------------ queries (tests, bench)
    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant PromQL query; the result vector (raises on a query error)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = f"{self.prometheus_url}/api/v1/query?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise RuntimeError(f"query {expr!r}: {body}")
        return body["data"]["result"]

    def diagnose(self) -> str:
        """Scrape targets, the demand series and the components' log tails (for failure messages)."""
        lines = []
        try:
            for t in self.api("/api/v1/targets")["data"]["activeTargets"]:
                lines.append(
                    f"target {t['scrapeUrl']} {t['labels']} health={t['health']} {t.get('lastError', '')}"
                )
            dropped = self.api("/api/v1/targets?state=dropped")["data"]["droppedTargets"]
            lines.append(f"{len(dropped)} discovered targets dropped by the relabelling")
            lines.append(f"diffusion_demand_requests: {self.query('diffusion_demand_requests')}")
        except Exception as exc:  # noqa: BLE001 - a diagnosis must not raise
            lines.append(f"Prometheus API: {exc}")
        for comp in self.components.values():
            lines.append(f"--- {comp.name} log ---\n{log_tail(comp.log, 25)}")
        return "\n".join(lines)

    def api(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.prometheus_url}{path}", timeout=10) as resp:
            return json.loads(resp.read())
