"""The operator's own Prometheus metrics, in an instance registry (served by runner.py on
--metrics-port, default 9090): each `Reconciler` and `Kube` counts into the `OperatorMetrics` it is
given, so two operators in one process (tests) never share counters, and nothing lands in
prometheus_client's global default registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, process: bool = False) -> None:
        """`process`: also the process, platform and GC collectors (the default registry's), for the
        registry the operator serves."""
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.reconcile_duration = Histogram(
            "diffusion_operator_reconcile_duration_seconds",
            "Time of one reconcile of a DiffusionDeployment (read, build, apply, status).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        # ok | invalid | refused (a child refused by the API server: see the Synced condition) | error | gone
        self.reconciles = Counter(
            "diffusion_operator_reconciles_total", "Reconciles by result.", ["result"], registry=r
        )
        self.reconcile_errors = Counter(
            "diffusion_operator_reconcile_errors_total",
            "Reconciles that failed (API errors), by kind of error.",
            ["error"],
            registry=r,
        )
        self.api_writes = Counter(
            "diffusion_operator_api_writes_total",
            "Writes the operator sent to the API server, by HTTP verb.",
            ["verb"],
            registry=r,
        )
        self.managed_objects = Gauge(
            "diffusion_operator_managed_objects",
            "Objects the operator manages, by kind.",
            ["kind"],
            registry=r,
        )
        self.invalid_specs = Gauge(
            "diffusion_operator_invalid_specs",
            "DiffusionDeployments whose spec is invalid (ConfigValid=False).",
            registry=r,
        )
        self.queue_depth = Gauge(
            "diffusion_operator_queue_depth",
            "DiffusionDeployments waiting for a reconcile (coalesced per object).",
            registry=r,
        )
        self.reconciles_skipped = Counter(
            "diffusion_operator_reconciles_skipped_total",
            "Queued reconciles skipped: the CR and its children were at the versions the last reconcile "
            "ended with.",
            registry=r,
        )
        self.leader = Gauge(
            "diffusion_operator_leader",
            "1 while this operator instance holds the leader Lease (and reconciles), 0 while it stands by.",
            registry=r,
        )
