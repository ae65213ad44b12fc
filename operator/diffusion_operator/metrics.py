"""The operator's own Prometheus metrics (served by runner.py on --metrics-port, default 9090)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILE_DURATION = Histogram(
    "diffusion_operator_reconcile_duration_seconds",
    "Time of one reconcile of a DiffusionDeployment (read, build, apply, status).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONCILE_TOTAL = Counter(
    "diffusion_operator_reconciles_total", "Reconciles by result.", ["result"]
)  # ok | invalid | refused (a child refused by the API server: see the Synced condition) | error | gone
RECONCILE_ERRORS = Counter(
    "diffusion_operator_reconcile_errors_total",
    "Reconciles that failed (API errors), by kind of error.",
    ["error"],
)
API_WRITES = Counter(
    "diffusion_operator_api_writes_total",
    "Writes the operator sent to the API server, by HTTP verb.",
    ["verb"],
)
MANAGED_OBJECTS = Gauge(
    "diffusion_operator_managed_objects", "Objects the operator manages, by kind.", ["kind"]
)
INVALID_SPECS = Gauge(
    "diffusion_operator_invalid_specs", "DiffusionDeployments whose spec is invalid (ConfigValid=False)."
)
QUEUE_DEPTH = Gauge(
    "diffusion_operator_queue_depth", "DiffusionDeployments waiting for a reconcile (coalesced per object)."
)
RECONCILES_SKIPPED = Counter(
    "diffusion_operator_reconciles_skipped_total",
    "Queued reconciles skipped: the CR and its children were at the versions the last reconcile ended with.",
)
