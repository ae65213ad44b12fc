"""The operator's metrics live in an instance registry (metrics.OperatorMetrics): each reconciler counts
into its own, the runner serves one with the process collectors, the global default registry holds none."""

from __future__ import annotations

import prometheus_client
from diffusion_operator.controller import Reconciler
from diffusion_operator.kube import Kube
from diffusion_operator.metrics import OperatorMetrics
from fakekube import FakeKube
from op_helpers import deliver_watch
from test_reconciler import cr_doc


def sample(metrics: OperatorMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_two_reconcilers_count_into_their_own_registries():
    kube = FakeKube()
    rec, other = Reconciler(kube, child_delay=0.05), Reconciler(FakeKube(), child_delay=0.05)
    deliver_watch(kube, rec)
    kube.create(cr_doc())
    assert rec.drain() == 1
    assert sample(rec.metrics, "diffusion_operator_reconciles_total", result="ok") == 1
    assert sample(rec.metrics, "diffusion_operator_reconcile_duration_seconds_count") == 1
    assert (
        sample(rec.metrics, "diffusion_operator_managed_objects", kind="children") == 5
    )  # with the NetworkPolicy
    assert sample(rec.metrics, "diffusion_operator_managed_objects", kind="DiffusionDeployment") == 1
    assert sample(other.metrics, "diffusion_operator_reconciles_total", result="ok") is None
    assert sample(other.metrics, "diffusion_operator_reconcile_duration_seconds_count") == 0


def test_the_default_registry_holds_no_operator_metric():
    shared = OperatorMetrics()
    Reconciler(FakeKube(), metrics=shared)
    Kube(configuration=_configuration(), metrics=shared)
    names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not [n for n in names if n.startswith("diffusion_operator")], names


def test_the_served_registry_also_has_the_process_collectors():
    text = prometheus_client.generate_latest(OperatorMetrics(process=True).registry).decode()
    assert "python_info" in text and "diffusion_operator_queue_depth" in text
    assert "python_info" not in prometheus_client.generate_latest(OperatorMetrics().registry).decode()


def _configuration():
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = "https://127.0.0.1:1"
    return configuration
