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
{{- end -}}
