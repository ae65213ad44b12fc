"""Prometheus metrics of the runtime (names fixed in DESIGN.md, prefix `diffusion_`, base units).

One registry per server instance. Memory gauges are computed at scrape time: torch.cuda counters on
GPU, the process resident set size on CPU (peak = the OS's max RSS).
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from diffusion_runtime.contract.autoscaling import DEMAND_METRIC, DEMAND_SECONDS_METRIC

disable_created_metrics()  # no *_created series: half the scrape size, nothing dashboards use

LATENCY_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # images per call, up to MAX_BATCH_LIMIT
BATCH_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def _rss_bytes() -> float:
    try:
        import psutil

        return float(psutil.Process().memory_info().rss)
    except Exception:  # noqa: BLE001
        return 0.0


def _max_rss_bytes() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)


class DemandIntegral(Collector):
    """The integral of the demand over time (request-seconds), a counter read at scrape time.

    Its rate over a window is the pod's average demand in that window (requests waiting + running,
    time-weighted): what the autoscalers read. An instantaneous gauge sampled once per scrape swings
    between 0 and the full demand whenever requests are short next to the scrape interval (a single
    client's requests land on a pod at one scrape and miss it at the next), and the HPA's scale-down
    window, which keeps the largest recommendation it saw, then holds pods the load does not need."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name, self.documentation = name, documentation
        self._lock = threading.Lock()
        self._total = 0.0
        self._level = 0
        self._since = time.monotonic()

    def set(self, level: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._total += self._level * (now - self._since)
            self._level, self._since = level, now

    def value(self) -> float:
        with self._lock:
            return self._total + self._level * (time.monotonic() - self._since)

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.value())


class RuntimeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "diffusion_request_duration_seconds",
            "End-to-end time of an image request, by endpoint (generations|edits) and HTTP status.",
            ["endpoint", "status"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "diffusion_queue_wait_seconds", "Time an admitted request waited for the pipeline.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "diffusion_batch_size",
            "Images per pipeline call (server.max_batch > 1 batches compatible requests; 1 = alone).",
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_wait = Histogram(
            "diffusion_batch_wait_seconds",
            "Time the first request of a batch waited for company (server.max_batch_delay_seconds).",
            buckets=BATCH_WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_duration = Histogram(
            "diffusion_inference_duration_seconds", "Time of one pipeline call (all steps, VAE decode).",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.step_duration = Histogram(
            "diffusion_step_duration_seconds", "Time of one denoising step (transformer forward, cached or not).",
            buckets=STEP_BUCKETS, registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "diffusion_requests",
            "Image requests answered, by endpoint (generations|edits), HTTP status and API key name "
            "(server.auth_keys_dir; empty when auth is off or the caller had no valid key).",
            ["endpoint", "status", "key"],
            registry=r,
        )
        self.adapter_requests = Counter(
            "diffusion_adapter_requests",
            "Image requests answered with images, by LoRA adapter (`base`: none); a request with several "
            "adapters counts under each.",
            ["adapter"],
            registry=r,
        )
        self.adapter_inference_duration = Histogram(
            "diffusion_adapter_inference_duration_seconds",
            "Time of one pipeline call, by LoRA adapter (`base`: none; several: under each).",
            ["adapter"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.images = Counter("diffusion_images_generated", "Images generated and returned.", registry=r)
        # video (/v1/videos; docs/video.md): per-step latency is diffusion_step_duration_seconds as for images
        self.video_frames = Counter(
            "diffusion_video_frames_generated", "Video frames generated (finished clips).", registry=r
        )
        self.video_fps = Histogram(
            "diffusion_video_generation_frames_per_second",
            "Frames of a clip divided by its pipeline call's seconds.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0), registry=r,
        )  # fmt: skip
        self.video_encode_duration = Histogram(
            "diffusion_video_encode_seconds", "Time to encode a clip (H.264 MP4 and thumbnail, PyAV).",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.video_bytes = Counter(
            "diffusion_video_bytes", "Bytes of the MP4s encoded (finished clips).", registry=r
        )
        self.queue_depth = Gauge(
            "diffusion_queue_depth", "Admitted requests waiting for the pipeline.", registry=r
        )
        self.in_flight = Gauge(
            "diffusion_requests_in_flight",
            "Requests running on the pipeline now (0 or 1; up to server.max_batch when batching).",
            registry=r,
        )
        self.demand = Gauge(
            DEMAND_METRIC,
            "Waiting + running image requests (sync and async jobs) now; the autoscalers read the rate of "
            f"{DEMAND_SECONDS_METRIC}_total (the same demand averaged over time).",
            registry=r,
        )
        self.demand_seconds = DemandIntegral(
            DEMAND_SECONDS_METRIC,
            "Request-seconds of demand (waiting + running image requests, integrated over time): its rate is "
            "the pod's average demand, the per-pod autoscaling signal.",
        )
        r.register(self.demand_seconds)
        self.jobs = Counter(
            "diffusion_jobs",
            "Async jobs finished, by endpoint and outcome (succeeded|failed|cancelled).",
            ["endpoint", "status"],
            registry=r,
        )
        self.webhooks = Counter(
            "diffusion_webhook_deliveries",
            "Webhook deliveries, by result: delivered|failed|refused, and retried (one per retry).",
            ["result"],
            registry=r,
        )
        self.cache_steps = Counter(
            "diffusion_cache_steps",
            "Denoising steps by cache-dit outcome (cache_dit.summary).",
            ["result"],
            registry=r,
        )
        for result in ("cached", "computed"):
            self.cache_steps.labels(result=result)
        self.gpu_peak = Gauge(
            "diffusion_gpu_memory_peak_bytes", "Peak accelerator memory (process max RSS on CPU).", registry=r
        )
        self.gpu_allocated = Gauge(
            "diffusion_gpu_memory_allocated_bytes",
            "Allocated accelerator memory (process RSS on CPU).",
            registry=r,
        )
        self.gpu_reserved = Gauge(
            "diffusion_gpu_memory_reserved_bytes",
            "Reserved accelerator memory (process RSS on CPU).",
            registry=r,
        )
        self.model_load = Gauge(
            "diffusion_model_load_seconds",
            "Time to load and optimize the model from local files (without the download: "
            "diffusion_model_download_seconds; compiling happens in the warmup: diffusion_compile_seconds).",
            registry=r,
        )
        self.warmup = Gauge("diffusion_warmup_seconds", "Time of the warmup generations.", registry=r)
        self.model_download = Gauge(
            "diffusion_model_download_seconds",
            "Time this process spent fetching the model from the Hugging Face Hub (about 0 for a folder, "
            "a model cache volume or a complete local copy).",
            registry=r,
        )
        self.compile_seconds = Gauge(
            "diffusion_compile_seconds",
            "Part of the warmup torch.compile spent compiling (dynamo's own timer; 0 without compile).",
            registry=r,
        )
        self.compile_cache = Counter(
            "diffusion_compile_cache_lookups",
            "Compile-artifact cache lookups at start-up, by result (hit, miss, corrupt, error).",
            ["result"],
            registry=r,
        )
        for result in ("hit", "miss", "corrupt", "error"):
            self.compile_cache.labels(result=result)
        self.compile_cache_saves = Counter(
            "diffusion_compile_cache_saves",
            "Compile artifacts this process published to the shared cache after warmup.",
            registry=r,
        )
        self.quality_gate_psnr = Gauge(
            "diffusion_quality_gate_psnr_decibels",
            "Quality gate: worst canary PSNR of the optimized vs the plain pipeline (set when the gate ran).",
            registry=r,
        )
        self.quality_gate_ssim = Gauge(
            "diffusion_quality_gate_ssim",
            "Quality gate: worst canary SSIM of the optimized vs the plain pipeline (set when the gate ran).",
            registry=r,
        )
        self.quality_gate_state = Enum(
            "diffusion_quality_gate",
            "Quality gate outcome: off (not configured), skipped (nothing optimized), passed, failed "
            "(the pod then exits).",
            states=["off", "skipped", "passed", "failed"],
            registry=r,
        )
        self.quality_gate_seconds = Gauge(
            "diffusion_quality_gate_seconds",
            "Quality gate: start-up time it added (plain and optimized canaries, comparison).",
            registry=r,
        )
        self.ready = Gauge(
            "diffusion_ready", "1 when the runtime accepts requests (loaded and warmed up).", registry=r
        )
        self.info = Info(
            "diffusion_runtime", "Model, pipeline and optimizations of this runtime.", registry=r
        )
        self.use_device("cpu")

    def use_device(self, device: str) -> None:
        if device == "cuda":
            import torch

            self.gpu_peak.set_function(lambda: float(torch.cuda.max_memory_allocated()))
            self.gpu_allocated.set_function(lambda: float(torch.cuda.memory_allocated()))
            self.gpu_reserved.set_function(lambda: float(torch.cuda.memory_reserved()))
        else:
            self.gpu_peak.set_function(_max_rss_bytes)
            self.gpu_allocated.set_function(_rss_bytes)
            self.gpu_reserved.set_function(_rss_bytes)

    def set_info(self, **labels: str) -> None:
        self.info.info({k: str(v) for k, v in labels.items()})
