"""The resource table (resources.py) is the one list of the kinds the operator touches: RBAC rules,
REST paths and watches come from it, and the chart's `_rbac.tpl` is generated from it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from diffusion_operator import builders, rbac, validation
from diffusion_operator.api import group
from diffusion_operator.kube import Kube
from diffusion_operator.resources import MANAGED_LABELS, RESOURCES, Grant, Watch, resource, watched

REPO = Path(__file__).resolve().parents[2]


def _gen_rbac():
    spec = importlib.util.spec_from_file_location("gen_rbac", REPO / "tools" / "gen_rbac.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_rbac"] = module
    spec.loader.exec_module(module)
    return module


def test_the_charts_rbac_template_is_generated_from_the_table():
    gen = _gen_rbac()
    assert gen.OUTPUT.read_text() == gen.render(), (
        "_rbac.tpl is stale: run .venv/bin/python tools/gen_rbac.py"
    )
    assert gen.main(["--check"]) == 0


def test_every_child_the_builders_render_is_in_the_table_with_apply_verbs():
    doc = {
        "model": {"uri": "hf://org/model", "cache": {"size": "10Gi"}},
        "autoscaling": {"minReplicas": 1, "maxReplicas": 2},
    }
    parsed = validation.parse("tiny", "ns", doc)
    assert parsed.ok, parsed.errors
    owner = {"apiVersion": group.API_VERSION, "kind": group.KIND, "metadata": {"name": "tiny", "uid": "u"}}
    objs = builders.build_all(parsed.cr, owner, model_cache_ready=True, keda_prometheus_address="http://p")
    objs += [
        builders.build_download_job(parsed.cr, owner),
        builders.build_model_cache_pvc(parsed.cr, owner),
    ]
    keda = validation.parse("tiny", "ns", {**doc, "autoscaling": {**doc["autoscaling"], "engine": "keda"}})
    objs += builders.build_all(keda.cr, owner, model_cache_ready=True, keda_prometheus_address="http://p")
    kinds = {(o["apiVersion"], o["kind"]) for o in objs}
    assert ("keda.sh/v1alpha1", "ScaledObject") in kinds and ("batch/v1", "Job") in kinds
    for api_version, kind in kinds:
        row = resource(api_version, kind)  # KeyError: a child kind missing from the table
        assert {"get", "create", "patch"} <= set(row.verbs), row
        assert row.watch in (Watch.CHILD, None), row
        # a watched child's events reach the reconciler only when it carries the watch's labels
        labelled = [o for o in objs if (o["apiVersion"], o["kind"]) == (api_version, kind)]
        assert all(MANAGED_LABELS.items() <= o["metadata"]["labels"].items() for o in labelled), kind


def test_watched_rows_can_be_listed_and_watched():
    for watch in Watch:
        assert watched(watch), watch
    for row in RESOURCES:
        if row.watch is not None:
            assert {"list", "watch"} <= set(row.verbs), row


def test_paths_come_from_the_table():
    assert Kube.collection("v1", "ConfigMap", "a b") == "/api/v1/namespaces/a%20b/configmaps"
    assert Kube.collection("apps/v1", "Deployment", None) == "/apis/apps/v1/deployments"
    assert (
        Kube.collection(group.API_VERSION, group.KIND, "ns")
        == f"/apis/{group.API_VERSION}/namespaces/ns/{group.PLURAL}"
    )
    assert (
        Kube.collection("keda.sh/v1alpha1", "ScaledObject", "ns")
        == "/apis/keda.sh/v1alpha1/namespaces/ns/scaledobjects"
    )


def test_rules_are_the_tables_rows_and_nothing_more():
    triples = {
        (g, r, v)
        for rule in rbac.NAMESPACED_RULES
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    expected = set()
    for row in RESOURCES:
        if row.grant is not Grant.WATCHED:
            continue
        expected |= {(row.group, row.plural, v) for v in row.verbs}
        for sub, verbs in row.subresources:
            expected |= {(row.group, f"{row.plural}/{sub}", v) for v in verbs}
    assert triples == expected
    assert not any("secrets" in rule["resources"] for rule in rbac.NAMESPACED_RULES + rbac.CLUSTER_RULES)


def test_lease_and_crd_rules_name_one_object_each():
    """Leader election: get/update of one named Lease (the chart creates it: no create verb, which
    resourceNames could not restrict); the operator's own CRD: get/patch of it by name, never create."""
    assert rbac.lease_rules("op") == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "update"],
            "resourceNames": ["op"],
        }
    ]
    assert rbac.CRD_RULES == [
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["get", "patch"],
            "resourceNames": [f"{group.PLURAL}.{group.GROUP}"],
        }
    ]
    for rule in rbac.NAMESPACED_RULES + rbac.CLUSTER_RULES:  # neither leaks into the other roles
        assert "leases" not in rule["resources"], rule
        assert "patch" not in rule["verbs"] or "customresourcedefinitions" not in rule["resources"], rule


def test_kopf_watches_exactly_the_watched_rows():
    import kopf
    from diffusion_operator import handlers  # noqa: F401  (registers the handlers)

    # kopf keeps its watch handlers in the registry's (private) watching part
    registered = {
        (h.selector.group, h.selector.version, h.selector.plural, bool(h.labels))
        for h in kopf.get_default_registry()._watching.get_all_handlers()
    }
    expected = {
        (r.group, r.version, r.plural, r.watch is not Watch.CR) for r in RESOURCES if r.watch is not None
    }
    assert registered == expected
    assert {plural for _, _, plural, _ in registered} == {
        "diffusiondeployments", "configmaps", "services", "poddisruptionbudgets", "deployments",
        "horizontalpodautoscalers", "persistentvolumeclaims", "jobs", "pods",
    }  # fmt: skip
