"""Names of the per-pod demand signal that the runtime exports and the autoscalers read (torch-free).

The runtime exports the demand (requests waiting + running, sync and async) twice: as a gauge, the value
now (`DEMAND_METRIC`, for dashboards), and as a counter of request-seconds (`DEMAND_SECONDS_METRIC`,
exported with the `_total` suffix). The autoscalers read the counter's rate over `DEMAND_RATE_WINDOW`:
the pod's time-weighted average demand, which a gauge sampled once per scrape is not (README, Autoscaling).
prometheus-adapter serves that rate as the HPA's Pods metric under the gauge's name (the rule in
charts/diffusion-operator/files/prometheus-adapter-rules.yaml); the KEDA engine's query sums it.
"""

from __future__ import annotations

DEMAND_METRIC = "diffusion_demand_requests"  # gauge: waiting + running now; the HPA's metric name
DEMAND_SECONDS_METRIC = "diffusion_demand_request_seconds"  # counter (`_total`): demand integrated over time
# the averaging window: 4 scrapes at the chart's PodMonitor interval (15 s), Grafana's $__rate_interval rule
DEMAND_RATE_WINDOW_SECONDS = 60
DEMAND_RATE_WINDOW = f"{DEMAND_RATE_WINDOW_SECONDS // 60}m"  # PromQL range: "1m"
