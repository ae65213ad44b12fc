"""`helm lint` and `helm template` of charts/diffusion-operator, parsed and asserted object by object."""

from __future__ import annotations

import json
import re
import tomllib

import pytest
import yaml
from chartlib import CHART, REPO, by_kind, forbidden_lines, one, run_helm

MONITORING_ON = (
    "monitoring.podMonitor.enabled=true",
    "monitoring.serviceMonitor.enabled=true",
    "monitoring.dashboard.enabled=true",
    "monitoring.prometheusRule.enabled=true",
)


@pytest.mark.parametrize(
    "sets",
    [(), MONITORING_ON, ("watch.allNamespaces=false", "watch.namespaces={team-a,team-b}", *MONITORING_ON)],
    ids=["defaults", "monitoring", "namespaced"],
)
def test_helm_lint_strict_is_clean(helm_bin, sets):
    args = ["lint", "--strict", str(CHART)]
    for s in sets:
        args += ["--set", s]
    proc = run_helm(helm_bin, *args)
    assert "0 chart(s) failed" in proc.stdout, proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


def test_chart_versions_follow_pyproject():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart["version"] == version
    assert chart["appVersion"] == version


FULLNAME = "dop-diffusion-operator"


@pytest.fixture(autouse=True)
def pod_namespace(monkeypatch):
    """The chart sets POD_NAMESPACE from the downward API (the Lease's namespace): parse_args reads it."""
    monkeypatch.setenv("POD_NAMESPACE", "diffusion-system")


def named(objects: list[dict], kind: str, name: str = FULLNAME) -> list[dict]:
    return [o for o in by_kind(objects, kind) if o["metadata"]["name"] == name]


def test_defaults_render_the_operator_objects(render):
    objects = render()
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == [
        "ClusterRole",  # the watched resources, cluster-wide
        "ClusterRole",  # the operator's own CRD, by name
        "ClusterRoleBinding",
        "ClusterRoleBinding",
        "Deployment",
        "Lease",
        "PodDisruptionBudget",
        "Role",  # the Lease, by name
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    assert all(o["metadata"].get("namespace") in (None, "diffusion-system") for o in objects)
    assert not by_kind(objects, "PodMonitor") and not by_kind(objects, "PrometheusRule")


def test_operator_deployment_is_restricted_two_replicas_with_leader_election(render):
    deploy = one(render(), "Deployment")
    spec = deploy["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == one(render(), "ServiceAccount")["metadata"]["name"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 1000
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert container["args"] == [
        "--all-namespaces",
        "--log-format",
        "json",
        "--metrics-port",
        "9090",
        "--health-port",
        "8080",
        "--leader-election-id",
        FULLNAME,
        "--lease-duration",
        "15",
        "--renew-deadline",
        "10",
        "--retry-period",
        "2",
    ]
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in container["env"]}
    assert env["POD_NAME"] == "metadata.name" and env["POD_NAMESPACE"] == "metadata.namespace"
    probe = container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert probe["path"] == "/healthz" and ports[probe["port"]] == 8080
    assert ports["metrics"] == 9090
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["image"].endswith(":" + yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"])
    # the selector matches the pod, and the metrics Service reaches it
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    service = one(render(), "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def _rules_grant(rules, group, resource, verb):
    return any(
        group in r.get("apiGroups", []) and resource in r.get("resources", []) and verb in r.get("verbs", [])
        for r in rules
    )


def test_cluster_wide_rbac_is_bound_to_the_service_account(render):
    objects = render()
    (role,) = named(objects, "ClusterRole")
    (binding,) = named(objects, "ClusterRoleBinding")
    sa = one(objects, "ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "diffusion-system"}
    ]
    rules = role["rules"]
    assert _rules_grant(rules, "diffusion.dev", "diffusiondeployments", "watch")
    assert _rules_grant(rules, "diffusion.dev", "diffusiondeployments/status", "patch")
    assert _rules_grant(rules, "apps", "deployments", "create")
    # least privilege: no wildcards, no secrets, no RBAC objects, no pod exec
    for rule in rules:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], rule
        assert "secrets" not in rule["resources"], rule
        assert "rbac.authorization.k8s.io" not in rule["apiGroups"], rule
        # the only pod subresource: reading the model download's log (no exec, attach, proxy, ...)
        assert not any(r.startswith("pods/") and r != "pods/log" for r in rule["resources"]), rule
        if "pods" in rule["resources"] or "pods/log" in rule["resources"]:  # read-only
            assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule


def test_namespaced_mode_uses_a_role_per_watched_namespace(render):
    objects = render("watch.allNamespaces=false", "watch.namespaces={team-a,team-b}")
    roles = named(objects, "Role")
    bindings = named(objects, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == "diffusion-system"
    for role in roles:
        assert _rules_grant(role["rules"], "apps", "deployments", "create")
    # nothing cluster-wide in this mode but get/patch of the operator's own CRD, by name
    (crd_role,) = by_kind(objects, "ClusterRole")
    assert crd_role["rules"] == [
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "resourceNames": ["diffusiondeployments.diffusion.dev"],
            "verbs": ["get", "patch"],
        }
    ]
    assert [b["roleRef"]["name"] for b in by_kind(objects, "ClusterRoleBinding")] == [
        crd_role["metadata"]["name"]
    ]
    assert not by_kind(render("watch.allNamespaces=false", "crds.applyOnStart=false"), "ClusterRole")
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:4] == ["--namespace", "team-a", "--namespace", "team-b"]
    assert "--all-namespaces" not in container["args"]


def _triples(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def test_rbac_yaml_binds_the_generated_rules_in_each_mode(render):
    """_rbac.tpl is generated from the resource table (tests/operator/test_rbac.py fails when it is
    stale); here: rbac.yaml puts both defines in the ClusterRole, only the namespaced one in a Role."""
    from diffusion_operator import rbac

    (cluster_role,) = named(render(), "ClusterRole")
    assert _triples(cluster_role["rules"]) == _triples(rbac.NAMESPACED_RULES + rbac.CLUSTER_RULES)
    (role,) = named(render("watch.allNamespaces=false"), "Role")
    assert _triples(role["rules"]) == _triples(rbac.NAMESPACED_RULES)
    (lease_role,) = named(render(), "Role", f"{FULLNAME}-leader-election")
    assert lease_role["metadata"]["namespace"] == "diffusion-system"
    assert lease_role["rules"] == rbac.lease_rules(FULLNAME)
    (crd_role,) = named(render(), "ClusterRole", f"{FULLNAME}-crd")
    assert crd_role["rules"] == rbac.CRD_RULES


def test_leader_election_objects_share_one_lease_name(render):
    from diffusion_operator.runner import parse_args

    objects = render()
    (lease,) = by_kind(objects, "Lease")
    assert lease["metadata"] == {**lease["metadata"], "name": FULLNAME, "namespace": "diffusion-system"}
    assert lease["spec"] == {}  # the replicas write the holder
    (role,) = named(objects, "Role", f"{FULLNAME}-leader-election")
    assert role["rules"][0]["resourceNames"] == [FULLNAME] and "create" not in role["rules"][0]["verbs"]
    (binding,) = named(objects, "RoleBinding", f"{FULLNAME}-leader-election")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = parse_args(container["args"])
    assert args.leader_elect and args.leader_election_id == FULLNAME
    assert (args.lease_duration, args.renew_deadline, args.retry_period) == (15, 10, 2)


def test_pdb_and_anti_affinity_spread_the_replicas(render):
    objects = render()
    pdb = one(objects, "PodDisruptionBudget")
    pod = one(objects, "Deployment")["spec"]["template"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (term,) = pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert (
        term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    required = one(render("podAntiAffinity=required"), "Deployment")["spec"]["template"]["spec"]["affinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" in required["podAntiAffinity"]
    # one replica: no budget (it would block every drain); a user's affinity replaces the default
    assert not by_kind(render("replicaCount=1"), "PodDisruptionBudget")
    custom = one(render("affinity.nodeAffinity.x=1"), "Deployment")["spec"]["template"]["spec"]["affinity"]
    assert "podAntiAffinity" not in custom


def test_without_leader_election_one_recreated_instance(render):
    objects = render("leaderElection.enabled=false", "replicaCount=1")
    deploy = one(objects, "Deployment")
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    assert "--no-leader-elect" in deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not by_kind(objects, "Lease") and not named(objects, "Role", f"{FULLNAME}-leader-election")


def test_namespaced_mode_defaults_to_the_release_namespace(render):
    objects = render("watch.allNamespaces=false", namespace="models")
    assert [r["metadata"]["namespace"] for r in named(objects, "Role")] == ["models"]
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:3] == ["--namespace", "models", "--log-format"]


def test_monitoring_on_renders_monitors_dashboard_and_alerts(render):
    objects = render(*MONITORING_ON)
    pm = one(objects, "PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "diffusion-operator"}
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics"]

    sm = one(objects, "ServiceMonitor")
    service = one(objects, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    assert service["spec"]["ports"][0]["port"] == 9090

    (cm,) = [c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (dashboard_json,) = cm["data"].values()
    dashboard = json.loads(dashboard_json)
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    assert "histogram_quantile(0.95" in exprs and "diffusion_request_duration_seconds_bucket" in exprs
    assert "diffusion_queue_depth" in exprs
    assert (
        'diffusion_cache_steps_total{namespace=~"$namespace", diffusion_dev_deployment=~"$deployment", result="cached"}'
        in exprs
    )
    assert "diffusion_gpu_memory_allocated_bytes" in exprs
    assert "rate(diffusion_images_generated_total" in exprs

    rule = one(objects, "PrometheusRule")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == {
        "DiffusionQueueSaturated", "DiffusionLatencyP95High", "DiffusionPodNotReady",
        "DiffusionQueueServerDown", "DiffusionQueueWaitHigh", "DiffusionQueueJobsExhaustedAttempts",
        "DiffusionQueueServerPersistenceFailing", "DiffusionQueueServerMemoryHigh",
    }  # fmt: skip


def test_podmonitor_follows_the_watched_namespaces(render):
    objects = render(
        "watch.allNamespaces=false", "watch.namespaces={team-a}", "monitoring.podMonitor.enabled=true"
    )
    assert one(objects, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}


def test_alert_thresholds_come_from_values(render):
    rule = one(
        render("monitoring.prometheusRule.enabled=true", "monitoring.prometheusRule.p95LatencySeconds=42"),
        "PrometheusRule",
    )
    (latency,) = [
        r for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == "DiffusionLatencyP95High"
    ]
    assert re.search(r"\)\s*>\s*42\s*$", latency["expr"]), latency["expr"]


@pytest.mark.parametrize(
    ("sets", "complaint"),
    [
        (("leaderElection.enabled=false", "replicaCount=2"), "replicaCount"),
        (("podAntiAffinity=sometimes",), "podAntiAffinity"),
        (("podSecurityContext.runAsNonRoot=false",), "runAsNonRoot"),
        (("watch.namespaces={Bad_Name}",), "namespaces"),
        (("monitoring.prometheusRule.queueRejectionsPerSecond=-1",), "queueRejectionsPerSecond"),
        (("monitoring.podMonitor.interval=fast",), "interval"),
        (("imagePullPolicy=Always",), "imagePullPolicy"),
        (("autoscaling.keda.prometheusAddress=prometheus:9090",), "prometheusAddress"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(helm_bin, sets, complaint):
    args = ["template", "dop", str(CHART)]
    for s in sets:
        args += ["--set", s]
    proc = run_helm(helm_bin, *args, check=False)
    assert proc.returncode != 0
    assert complaint in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "sets",
    [(), ("watch.allNamespaces=false", "watch.namespaces={team-a,team-b}", "verbose=true")],
    ids=["cluster-wide", "namespaced"],
)
def test_rendered_arguments_are_accepted_by_the_operator_cli(render, sets):
    from diffusion_operator.runner import parse_args

    container = one(render(*sets), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = parse_args(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (args.metrics_port, args.health_port) == (ports["metrics"], ports["health"])
    if sets:
        assert args.namespace == ["team-a", "team-b"] and not args.all_namespaces and args.verbose
    else:
        assert args.all_namespaces and args.namespace == []


def test_keda_prometheus_address_reaches_the_operator(render, monkeypatch):
    from diffusion_operator.runner import parse_args

    address = "http://prometheus-operated.monitoring.svc:9090"
    container = one(render(f"autoscaling.keda.prometheusAddress={address}"), "Deployment")["spec"][
        "template"
    ]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DIFFUSION_OPERATOR_KEDA_PROMETHEUS_ADDRESS"] == address
    monkeypatch.setenv("DIFFUSION_OPERATOR_KEDA_PROMETHEUS_ADDRESS", address)
    assert parse_args(container["args"]).keda_prometheus_address == address
    default = one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "DIFFUSION_OPERATOR_KEDA_PROMETHEUS_ADDRESS" not in {e["name"] for e in default["env"]}


def test_monitoring_namespace_reaches_the_operator(render, monkeypatch):
    from diffusion_operator.runner import parse_args

    def env_of(*sets: str) -> dict:
        container = one(render(*sets), "Deployment")["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e.get("value") for e in container["env"]}

    # the chart's default names the usual monitoring namespace; another value, or none
    assert env_of()["DIFFUSION_OPERATOR_MONITORING_NAMESPACE"] == "monitoring"
    assert env_of("networkPolicy.monitoringNamespace=observability")[
        "DIFFUSION_OPERATOR_MONITORING_NAMESPACE"
    ] == ("observability")
    assert "DIFFUSION_OPERATOR_MONITORING_NAMESPACE" not in env_of("networkPolicy.monitoringNamespace=")
    monkeypatch.setenv("DIFFUSION_OPERATOR_MONITORING_NAMESPACE", "observability")
    assert parse_args(["--namespace", "ns"]).monitoring_namespace == "observability"
    # the cluster's ranges, none by default
    assert "DIFFUSION_OPERATOR_CLUSTER_CIDRS" not in env_of()
    cidrs = env_of("networkPolicy.clusterCIDRs={34.118.224.0/20,2600:1900:4000::/44}")[
        "DIFFUSION_OPERATOR_CLUSTER_CIDRS"
    ]
    monkeypatch.setenv("DIFFUSION_OPERATOR_CLUSTER_CIDRS", cidrs)
    assert parse_args(["--namespace", "ns"]).cluster_cidr == ["34.118.224.0/20", "2600:1900:4000::/44"]


def test_forbidden_lines_are_http_403s_not_timestamps():
    """The chart install test's check that the operator was refused nothing reads a 403 as HTTP
    status, never as the milliseconds of a timestamp."""
    clean = (
        "[2026-12-05 08:20:31,403] diffusion_operator   [INFO    ] applied children\n"
        "[2026-12-05 08:20:32,040] kopf.objects         [INFO    ] took 403 ms; 1403 bytes\n"
    )
    assert forbidden_lines(clean) == []
    refused = [
        "[2026-12-05 08:20:33,001] diffusion_operator   [WARNING ] a child was refused: PATCH /apis/apps/v1/"
        'namespaces/ns/deployments/tiny: HTTP 403: deployments.apps "tiny" is forbidden: User "x" cannot patch',
        "[2026-12-05 08:20:34,002] kopf._cogs.clients.w [ERROR   ] Request attempt #1/9 failed; will retry: "
        "GET https://127.0.0.1/apis/diffusion.dev/v1alpha1/namespaces/ns/diffusiondeployments -> "
        "APIForbiddenError('no', {'kind': 'Status', 'code': 403})",
        '{"message": "refused", "error": {"code": 403}}',
        "[2026-12-05 08:20:35,003] kopf._core.reactor.o [WARNING ] Not enough permissions to list namespaces.",
    ]
    assert forbidden_lines(clean + "\n".join(refused)) == refused
