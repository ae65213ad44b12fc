"""`diffusion-runtime serve`: listen at once (/health), load + warm up in the background, then Ready.

The composition root: it builds the engine (`engine.model.load_model`, wrapped in a
`engine.distributed.RankedModel` on a parallel replica), the HTTP app (`api.app`) over one
`api.state.RuntimeState`, and moves the state through its phases."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from diffusion_runtime.api.state import Phase, RuntimeState
from diffusion_runtime.contract.config import (
    QUEUE_URL_ENV,
    ConfigError,
    RuntimeConfig,
    runtime_errors,
    validate,
)
from diffusion_runtime.contract.parallel import (
    SINGLE,
    Layout,
    heads_refusal,
    layout_of,
    local_transformer_config,
)
from diffusion_runtime.engine.distributed import RankedModel, RankGroup
from diffusion_runtime.engine.interface import Engine
from diffusion_runtime.metrics import RuntimeMetrics

log = logging.getLogger("diffusion_runtime")
# Kubernetes' default terminationMessagePath: kubelet mounts it into every container
TERMINATION_LOG = "/dev/termination-log"


# Without a config, a CPU warms up with one small generation: it proves the pipeline runs, and CPU
# has no compiled graphs to build (1024x1024 x 28 steps takes minutes there even for the tiny model).
CPU_WARMUP_RESOLUTIONS = ["256x256"]
CPU_WARMUP_STEPS = 4


def device_warmup_defaults(config: RuntimeConfig, device_setting: str) -> str:
    """Device-aware warmup for `serve` without a config: GPU keeps the config defaults (the
    shapes requests use, so compile happens before Ready), CPU gets one small generation.
    Returns where the plan came from, for the log."""
    from diffusion_runtime.engine.model import pick_device

    try:
        device = pick_device(device_setting)
    except ConfigError:
        return "the defaults"  # preflight reports the device error
    if device == "cpu":
        config.warmup.resolutions = list(CPU_WARMUP_RESOLUTIONS)
        config.warmup.steps = CPU_WARMUP_STEPS
    return f"the {device} defaults (no --config)"


def log_warmup_plan(config: RuntimeConfig, source: str) -> None:
    w = config.warmup
    log.info(
        "warmup plan: %s x %d steps, from %s; change with warmup.resolutions/steps or "
        "--warmup-size/--warmup-steps",
        ", ".join(w.resolutions) or "nothing",
        w.steps,
        source,
    )


def preflight(config: RuntimeConfig) -> tuple[str, Layout]:
    """Checks that need no model: `config.runtime_errors` (config ranges, the device, the cache-dit
    YAML against the device, the parallel layout), the same function the operator runs on the
    runtime.yaml it renders; then enough GPUs for the layout. Returns the device and the layout
    (world size 1: one process)."""
    from diffusion_runtime.engine.distributed import check_devices
    from diffusion_runtime.engine.model import pick_device
    from diffusion_runtime.engine.optimize import read_cache_dit_yaml

    validate(config)
    device = pick_device(config.device)
    raw = read_cache_dit_yaml(config.cache_dit_config) if config.cache_dit_config else None
    capability = None
    if device == "cuda":
        import torch

        capability = torch.cuda.get_device_capability()
    errors = runtime_errors(config, raw, device, capability)
    if errors:
        raise errors[0]
    layout = layout_of(raw)
    check_devices(layout, device)
    local = local_transformer_config(config.model.uri) if layout.world_size > 1 else None
    if local is not None:  # a local model: its heads against the layout before any rank starts
        refusal = heads_refusal(
            raw, str(local.get("_class_name", "the transformer")), local.get("num_attention_heads")
        )
        if refusal is not None:
            raise ConfigError(refusal)
    return device, layout


def _load_and_warm(state: RuntimeState, server: Any, ranks: RankGroup | None = None) -> None:
    from diffusion_runtime import startup
    from diffusion_runtime.contract.lines import GATE_FAILED
    from diffusion_runtime.engine import compile_cache
    from diffusion_runtime.engine.model import ModelError, load_model

    m = state.metrics
    try:
        if ranks is not None:
            ranks.join()
        local = load_model(state.config)
        # with ranks, pipeline calls run on every rank
        model: Engine = RankedModel(local, ranks) if ranks is not None else local
        state.engine = model
        m.use_device(model.device)
        m.model_load.set(local.load_seconds)
        m.model_download.set(local.download_seconds)
        m.set_info(
            model=state.config.model.uri, pipeline=model.pipeline_name, cache=model.cache_tag,
            quant=model.quant_type, compile=str(bool(state.config.compile)).lower(), device=model.device,
            dtype=state.config.model.dtype, **(ranks.layout if ranks else SINGLE).labels(),
        )  # fmt: skip
        log.info(
            "model loaded in %.2fs (%s on %s, cache %s)",
            local.load_seconds,
            model.pipeline_name,
            model.device,
            model.cache_tag,
        )
        state.phase = Phase.WARMING_UP
        cache = compile_cache.for_model(state.config, local)
        if cache is not None:
            m.compile_cache.labels(result=cache.restore()).inc()
        compiled_before = compile_cache.compile_seconds()
        warm = model.warmup()
        compiled = compile_cache.compile_seconds() - compiled_before
        m.warmup.set(warm)
        m.compile_seconds.set(compiled)
        log.info("warmup done in %.2fs (compile %.2fs)", warm, compiled)
        if cache is not None and cache.publish():
            m.compile_cache_saves.inc()
        gate = local.quality_gate  # the plain pipeline's canaries, rendered in load_model
        if state.config.quality_gate is not None and gate is None:
            m.quality_gate_state.state("skipped")
        if gate is not None:
            # optimized canaries (and, batching on, batched ones): through every rank
            result = gate.check(model.generate, model.generate_batch, state.config.server.max_batch)
            m.quality_gate_psnr.set(result.psnr)
            m.quality_gate_ssim.set(result.ssim)
            m.quality_gate_seconds.set(result.seconds)
            m.quality_gate_state.state("passed" if result.passed else "failed")
            local.quality_gate = None  # the reference images are not needed any more
            if not result.passed:
                _fail(state, server, f"{GATE_FAILED}{result.summary()}")
                return
        if ranks is not None:
            ranks.serving()
        record = startup.summary(
            started=startup.process_start_time(), ready=time.time(), model_downloaded=local.model_downloaded,
            compile=bool(state.config.compile), compile_cache=cache.result if cache is not None else "off",
            download_seconds=local.download_seconds, load_seconds=local.load_seconds, warmup_seconds=warm,
            compile_seconds=compiled,
        )  # fmt: skip
        # before /ready turns 200: a pod the kubelet sees Ready has this line in its log (the operator
        # reads it into status.startup)
        print(startup.ready_line(record), flush=True)
        state.phase = Phase.READY
        m.ready.set(0 if state.draining else 1)
    except (ConfigError, ModelError) as e:
        _fail(state, server, str(e))
    except Exception as e:  # noqa: BLE001 - any load failure: one line, exit non-zero
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _fail(state, server, f"model load failed: {type(e).__name__}: {msg}")


def exit_line(line: str, code: int) -> int:
    """Print the one-line reason and, in a Kubernetes container, make it the termination message."""
    print(f"diffusion-runtime: {line}", file=sys.stderr)
    with contextlib.suppress(OSError):
        if os.path.exists(TERMINATION_LOG):
            with open(TERMINATION_LOG, "w") as f:
                f.write(line[:4000])
    return code


def _fail(state: RuntimeState, server: Any, line: str) -> None:
    state.phase = Phase.FAILED
    state.error = line
    server.should_exit = True


def open_listeners(state: RuntimeState, serving: Any, **app_args: Any) -> tuple[Any, Any]:
    """The API server (not yet running) on server.host:port and the /metrics listener on
    server.metrics_port (None when 0), for the runtime and the front door alike. ConfigError: a config
    the app refuses (server.auth_keys_dir) or a metrics port it cannot listen on."""
    from prometheus_client import start_http_server

    from diffusion_runtime.api.app import create_app, make_server

    app = create_app(state, serving, **app_args)  # reads server.auth_keys_dir's keys
    s = state.config.server
    server = make_server(app, state, s.host, s.port)
    metrics_server = None
    if s.metrics_port:
        try:
            metrics_server, _ = start_http_server(
                s.metrics_port, addr=s.host, registry=state.metrics.registry
            )
        except OSError as e:
            raise ConfigError(f"server.metrics_port {s.metrics_port}: cannot listen ({e.strerror})") from e
    return server, metrics_server


def run_server(config: RuntimeConfig, argv: Sequence[str] = (), warmup_source: str = "the config") -> int:
    """Serve HTTP. With a parallel layout this process is rank 0 and starts the other ranks with the
    same command line (`argv`, without the program name)."""
    from diffusion_runtime.api.serving import ImageServing
    from diffusion_runtime.engine.model import ModelError

    try:
        device, layout = preflight(config)
    except (ConfigError, ModelError) as e:
        return exit_line(str(e), 2)
    log_warmup_plan(config, warmup_source)
    metrics = RuntimeMetrics()
    metrics.set_info(
        model=config.model.uri, pipeline="", cache="", quant="", compile=str(config.compile).lower(), device="",
        dtype=config.model.dtype, **layout.labels(),
    )  # fmt: skip
    state = RuntimeState(config=config, metrics=metrics)
    if config.queue is not None:  # pull work from the shared queue too (docs/queue.md)
        from diffusion_runtime.queue.worker import worker_serving

        url = os.environ.get(QUEUE_URL_ENV)
        if not url:
            return exit_line(
                f"queue: {config.queue.name!r} is set but {QUEUE_URL_ENV} is empty (redis://...)", 2
            )
        serving = worker_serving(url)
    else:
        serving = ImageServing
    try:
        server, metrics_server = open_listeners(state, serving)
    except ConfigError as e:
        return exit_line(str(e), 2)
    s = config.server
    ranks = None
    if layout.world_size > 1:
        ranks = RankGroup(layout, device, argv, config)
        ranks.start()
    loader = threading.Thread(target=_load_and_warm, args=(state, server, ranks), name="loader", daemon=True)
    loader.start()
    try:
        server.run()  # uvloop + httptools when installed (uvicorn "auto")
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        if ranks is not None:
            ranks.shutdown(clean=state.phase == Phase.READY)
    if state.phase == Phase.FAILED:
        return exit_line(str(state.error), 1)
    if not server.started:
        return exit_line(f"cannot listen on {s.host}:{s.port}", 2)
    return 0
