"""Names of the shared work queue that the operator reads too (torch-free, no Redis import).

The front door exports the queue's gauges from Redis (every replica the same value, correct at zero
runtime pods); the operator's autoscaling reads `QUEUE_DEMAND_METRIC` (external metric) or KEDA's
redis-streams scaler reads the stream (`QueueConfig.stream`, group `QUEUE_GROUP`): its length is
waiting + running, because an entry is deleted when its job finishes or is cancelled (docs/queue.md).
"""

from __future__ import annotations

# front door (gauges read from Redis at scrape time)
QUEUE_WAITING_METRIC = "diffusion_queue_waiting"  # jobs in the stream not yet started
QUEUE_RUNNING_METRIC = "diffusion_queue_running"  # jobs started, not finished (pending entries)
QUEUE_DEMAND_METRIC = "diffusion_queue_demand"  # waiting + running: the autoscaling signal
QUEUE_UP_METRIC = "diffusion_queue_server_up"  # 1 when the scrape reached the queue server
QUEUE_REDELIVERIES_METRIC = "diffusion_queue_redeliveries"  # counter (Redis-side total): jobs restarted
QUEUE_EXHAUSTED_METRIC = "diffusion_queue_attempts_exhausted"  # counter: jobs failed after max_attempts
QUEUE_JOB_WAIT_METRIC = "diffusion_queue_job_wait_seconds"  # histogram: enqueued -> started
# the queue server's own health, from its INFO at scrape time (no separate exporter to deploy)
QUEUE_SERVER_MEMORY_METRIC = "diffusion_queue_server_memory_bytes"  # INFO used_memory
QUEUE_SERVER_MAXMEMORY_METRIC = "diffusion_queue_server_maxmemory_bytes"  # INFO maxmemory (0: no limit)
QUEUE_SERVER_CLIENTS_METRIC = "diffusion_queue_server_connected_clients"  # INFO connected_clients
QUEUE_SERVER_PERSISTENCE_METRIC = "diffusion_queue_server_persistence_ok"  # 1: last AOF write/RDB save ok
# what only the front door exports (the dashboard's and alerts' queue expressions need a deployment
# with spec.queue to have a series)
FRONT_DOOR_QUEUE_METRICS = (
    QUEUE_WAITING_METRIC, QUEUE_RUNNING_METRIC, QUEUE_DEMAND_METRIC, QUEUE_UP_METRIC, QUEUE_REDELIVERIES_METRIC,
    QUEUE_EXHAUSTED_METRIC, QUEUE_JOB_WAIT_METRIC, QUEUE_SERVER_MEMORY_METRIC, QUEUE_SERVER_MAXMEMORY_METRIC,
    QUEUE_SERVER_CLIENTS_METRIC, QUEUE_SERVER_PERSISTENCE_METRIC,
)  # fmt: skip
# runtime pods (queue worker)
QUEUE_EXECUTIONS_METRIC = (
    "diffusion_queue_executions"  # counter {result}: succeeded|failed|cancelled|discarded
)
EXECUTION_RESULTS = ("succeeded", "failed", "cancelled", "discarded")
