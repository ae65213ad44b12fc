{{/*
The alert rules, as a Prometheus rule file body (`groups:`). Rendered into the PrometheusRule;
tests/chart renders it, runs `promtool check rules` and `promtool test rules` on it, and checks
every metric name against a live runtime's /metrics. `up` is the only series not exported by the
runtime: Prometheus writes it for every scrape target (job = the PodMonitor's jobLabel value).
*/}}
{{- define "diffusion-operator.alertGroups" -}}
{{- $r := .Values.monitoring.prometheusRule -}}
groups:
  - name: diffusion-runtime
    rules:
      # 429 is the runtime's answer to a full queue (spec.server.maxQueue) and only to that
      - alert: DiffusionQueueSaturated
        expr: |-
          sum by (namespace, pod) (rate(diffusion_requests_total{status="429"}[5m]))
            > {{ $r.queueRejectionsPerSecond }}
        for: {{ $r.queueSaturationFor }}
        labels:
          severity: warning
        annotations:
          summary: "Diffusion runtime queue saturated ({{ "{{ $labels.namespace }}/{{ $labels.pod }}" }})"
          description: >-
            {{ "{{ $labels.namespace }}/{{ $labels.pod }}" }} has been turning away
            {{ "{{ printf \"%.2f\" $value }}" }} requests/s with 429 (queue full) for {{ $r.queueSaturationFor }}.
            Add replicas (spec.replicas or spec.autoscaling.maxReplicas) or raise spec.server.maxQueue.
      - alert: DiffusionLatencyP95High
        expr: |-
          histogram_quantile(0.95,
            sum by (namespace, diffusion_dev_deployment, le) (rate(diffusion_request_duration_seconds_bucket[5m]))
          ) > {{ $r.p95LatencySeconds }}
        for: {{ $r.p95LatencyFor }}
        labels:
          severity: warning
        annotations:
          summary: "Diffusion p95 latency above {{ $r.p95LatencySeconds }}s ({{ "{{ $labels.namespace }}/{{ $labels.diffusion_dev_deployment }}" }})"
          description: >-
            p95 request latency of {{ "{{ $labels.namespace }}/{{ $labels.diffusion_dev_deployment }}" }} is
            {{ "{{ $value | humanizeDuration }}" }} (threshold {{ $r.p95LatencySeconds }}s) for {{ $r.p95LatencyFor }}.
            Check queue wait against inference time on the dashboard.
      - alert: DiffusionPodNotReady
        expr: |-
          (max by (namespace, pod) (diffusion_ready) == 0)
            or
          (max by (namespace, pod) (up{job="diffusion-runtime"}) == 0)
        for: {{ $r.podNotReadyFor }}
        labels:
          severity: warning
        annotations:
          summary: "Diffusion runtime pod not ready ({{ "{{ $labels.namespace }}/{{ $labels.pod }}" }})"
          description: >-
            {{ "{{ $labels.namespace }}/{{ $labels.pod }}" }} has not been ready (model load, compile or warmup
            unfinished, or the pod is down) for {{ $r.podNotReadyFor }}. See the DiffusionDeployment's
            status conditions and the pod log.
  # The shared work queue (spec.queue): read from the front door's metrics, every replica the same
  # value (read from the queue server at scrape time), hence max by deployment.
  - name: diffusion-queue
    rules:
      - alert: DiffusionQueueServerDown
        expr: |-
          max by (namespace, diffusion_dev_deployment) (diffusion_queue_server_up) == 0
        for: {{ $r.queueServerDownFor }}
        labels:
          severity: critical
        annotations:
          summary: "Queue server unreachable ({{ "{{ $labels.namespace }}/{{ $labels.diffusion_dev_deployment }}" }})"
          description: >-
            The front door of {{ "{{ $labels.namespace }}/{{ $labels.diffusion_dev_deployment }}" }} has not reached
            its queue server for {{ $r.queueServerDownFor }}: new requests get 503 with Retry-After and no job
            starts. Check the queue server's pod (queue.enabled) or the Secret spec.queue.secretRef names.
      - alert: DiffusionQueueWaitHigh
        expr: |-
          histogram_quantile(0.95,
            sum by (namespace, diffusion_dev_deployment, le) (rate(diffusion_queue_job_wait_seconds_bucket[5m]))
          ) > {{ $r.queueWaitSeconds }}
        for: {{ $r.queueWaitFor }}
        labels:
          severity: warning
        annotations:
          summary: "Jobs wait over {{ $r.queueWaitSeconds }}s for a GPU ({{ "{{ $labels.namespace }}/{{ $labels.diffusion_dev_deployment }}" }})"
          description: >-
            p95 time from enqueue to start of {{ "{{ $labels.namespace }}/{{ $labels.diffusion_dev_deployment }}" }}
            is {{ "{{ $value | humanizeDuration }}" }} for {{ $r.queueWaitFor }}. Raise
            spec.autoscaling.maxReplicas, or check that runtime pods start (scale from zero, GPU nodes).
      - alert: DiffusionQueueJobsExhaustedAttempts
        expr: |-
          max by (namespace, diffusion_dev_deployment) (increase(diffusion_queue_attempts_exhausted_total[15m])) > 0
        labels:
          severity: warning
        annotations:
          summary: "Jobs failed after every attempt ({{ "{{ $labels.namespace }}/{{ $labels.diffusion_dev_deployment }}" }})"
          description: >-
            {{ "{{ printf \"%.0f\" $value }}" }} jobs of {{ "{{ $labels.namespace }}/{{ $labels.diffusion_dev_deployment }}" }}
            failed in 15 minutes because their runtime pod died spec.queue.maxAttempts times (OOM, node loss,
            a request that crashes the pipeline). See the jobs' error and the pods' restarts.
      - alert: DiffusionQueueServerPersistenceFailing
        expr: |-
          max by (namespace, diffusion_dev_deployment) (diffusion_queue_server_persistence_ok) == 0
        for: {{ $r.queuePersistenceFor }}
        labels:
          severity: critical
        annotations:
          summary: "Queue server cannot persist ({{ "{{ $labels.namespace }}/{{ $labels.diffusion_dev_deployment }}" }})"
          description: >-
            The queue server of {{ "{{ $labels.namespace }}/{{ $labels.diffusion_dev_deployment }}" }} reports a
            failed append-only-file write or snapshot for {{ $r.queuePersistenceFor }}: accepted jobs may not
            survive its restart. Check its volume (full disk, read-only claim).
      - alert: DiffusionQueueServerMemoryHigh
        expr: |-
          max by (namespace, diffusion_dev_deployment) (diffusion_queue_server_memory_bytes)
            / max by (namespace, diffusion_dev_deployment) (diffusion_queue_server_maxmemory_bytes > 0)
            > {{ $r.queueMemoryRatio }}
        for: {{ $r.queueMemoryFor }}
        labels:
          severity: warning
        annotations:
          summary: "Queue server memory near its limit ({{ "{{ $labels.namespace }}/{{ $labels.diffusion_dev_deployment }}" }})"
          description: >-
            The queue server of {{ "{{ $labels.namespace }}/{{ $labels.diffusion_dev_deployment }}" }} uses
            {{ "{{ $value | humanizePercentage }}" }} of its maxmemory: results (server.storeMaxBytes per
            deployment) and waiting jobs fill it. Lower server.storeMaxBytes or queue.maxWaiting, or give it more.
{{- end -}}
