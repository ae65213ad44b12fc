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
# runtime pods (queue worker)
QUEUE_EXECUTIONS_METRIC = (
    "diffusion_queue_executions"  # counter {result}: succeeded|failed|cancelled|discarded
)
EXECUTION_RESULTS = ("succeeded", "failed", "cancelled", "discarded")
